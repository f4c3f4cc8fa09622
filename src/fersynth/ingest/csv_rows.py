"""Label and pixel CSV files as people have them, row by row (FER2013, FER+, AffectNet).

Plain, gzipped or a zip holding one CSV (by content, not name); UTF-8 with or without a
byte-order mark, or UTF-16 with one (Windows' "Unicode"); CRLF, blank lines and spaces
around header names (Kaggle's `icml_face_data.csv` has `emotion, Usage, pixels`) are fine.

Each record is one line: none of these files has a field spanning lines, so a stray quote
or a wrong field count spoils its own line only. Such a line is yielded as malformed with
its line number, the readers reject it and keep the good rows; only a file with no usable
header is an error.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import io
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fersynth.errors import FersynthError

_GZIP = b"\x1f\x8b"
_ZIP = b"PK\x03\x04"
_UTF16 = (b"\xff\xfe", b"\xfe\xff")
_READ_ERRORS = (OSError, EOFError, zlib.error, zipfile.BadZipFile, UnicodeError)


@dataclass(frozen=True)
class CsvRow:
    """One record: `line` is its line in the file; `values` maps each header name (stripped)
    to its field, or is None with `problem` set."""

    line: int
    values: dict[str, str] | None
    problem: str = ""


def _binary(path: Path) -> io.BufferedIOBase:
    """The file's bytes: decompressed when gzipped, the single member of a zip."""
    with path.open("rb") as probe:
        magic = probe.read(4)
    if magic.startswith(_GZIP):
        return gzip.open(path, "rb")  # type: ignore[return-value]
    if magic == _ZIP:
        archive = zipfile.ZipFile(path)
        members = [info for info in archive.infolist() if not info.is_dir()]
        if len(members) != 1:
            names = ", ".join(info.filename for info in members[:5]) or "nothing"
            raise FersynthError(f"{path}: a zip archive of {len(members)} files ({names}); extract the CSV")
        return archive.open(members[0])  # type: ignore[return-value]
    return path.open("rb")


@contextlib.contextmanager
def _text(path: Path) -> Iterator[TextIO]:
    with _binary(path) as raw:
        head = raw.peek(512)[:512] if hasattr(raw, "peek") else b""
        if len(head) > 262 and head[257:262] == b"ustar":
            raise FersynthError(f"{path}: a tar archive; extract the CSV from it first")
        encoding = "utf-16" if head[:2] in _UTF16 else "utf-8-sig"
        buffered = raw if hasattr(raw, "peek") else io.BufferedReader(raw)  # type: ignore[arg-type]
        yield io.TextIOWrapper(buffered, encoding=encoding, errors="replace", newline="")


def _fields(text: str) -> list[str] | str:
    """The line's fields, or why it cannot be read."""
    try:
        return next(csv.reader([text], strict=True))
    except csv.Error as exc:
        return f"cannot parse as CSV ({exc})"
    except StopIteration:
        return []


def _printable(text: str, limit: int = 120) -> str:
    return "".join(c if c.isprintable() else "?" for c in text)[:limit]


class CsvFile:
    """A CSV file's header, checked for `required` columns, and its rows (`rows()`)."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        self.path = Path(path)
        if self.path.is_dir():
            raise FersynthError(f"{self.path}: a folder; expected a CSV file")
        if not self.path.is_file():
            raise FersynthError(f"{self.path}: file not found")
        header: list[str] | str = []
        try:
            with _text(self.path) as handle:
                for number, line in enumerate(handle, start=1):
                    if line.strip():
                        header, self.header_line = _fields(line), number
                        break
        except _READ_ERRORS as exc:
            raise FersynthError(f"{self.path}: not a readable CSV file ({exc})") from None
        if not header:
            raise FersynthError(f"{self.path}: no header line (expected columns {', '.join(required)})")
        if isinstance(header, str) or any("\x00" in name or "\ufffd" in name for name in header):
            raise FersynthError(f"{self.path}: not a text CSV file (first line: {_printable(line)!r})")
        self.header = [name.strip() for name in header]
        while len(self.header) > 1 and not self.header[-1]:  # a trailing comma
            self.header.pop()
        missing = [name for name in required if name not in self.header]
        if missing:
            raise FersynthError(
                f"{self.path}: missing columns {', '.join(missing)} "
                f"(header: {_printable(', '.join(self.header))})"
            )

    def has(self, column: str) -> bool:
        return column in self.header

    def rows(self) -> Iterator[CsvRow]:
        """Every record after the header; blank lines are skipped."""
        width, number = len(self.header), self.header_line
        try:
            with _text(self.path) as handle:
                for number, line in enumerate(handle, start=1):
                    if number <= self.header_line or not line.strip():
                        continue
                    fields = _fields(line)
                    if isinstance(fields, str):
                        yield CsvRow(number, None, fields)
                        continue
                    while len(fields) > width and not fields[-1].strip():  # trailing commas
                        fields.pop()
                    if len(fields) != width:
                        yield CsvRow(number, None, f"expected {width} fields, got {len(fields)}")
                        continue
                    yield CsvRow(number, dict(zip(self.header, fields, strict=True)))
        except _READ_ERRORS as exc:
            raise FersynthError(f"{self.path}: unreadable after line {number} ({exc})") from None

    def count(self) -> int:
        """Data lines (for a progress bar)."""
        with contextlib.suppress(*_READ_ERRORS), _text(self.path) as handle:
            return max(0, sum(1 for line in handle if line.strip()) - 1)
        return 0
