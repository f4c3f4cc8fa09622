"""Label and pixel CSV files as people have them, row by row (FER2013, FER+, AffectNet).

Plain or gzipped (by content, not name); a byte-order mark, CRLF and spaces around header
names are accepted (Kaggle's `icml_face_data.csv` has `emotion, Usage, pixels`). A row that
cannot be parsed or has the wrong number of fields is yielded as malformed with its line
number, so the readers reject it and keep the good rows; only a file with no usable header
is an error.
"""

from __future__ import annotations

import contextlib
import csv
import gzip
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from fersynth.errors import FersynthError

_GZIP_MAGIC = b"\x1f\x8b"


@dataclass(frozen=True)
class CsvRow:
    """One record: `line` is where it starts in the file (the header is line 1); `values`
    maps each header name (stripped) to its field, or is None with `problem` set."""

    line: int
    values: dict[str, str] | None
    problem: str = ""


@contextlib.contextmanager
def _text(path: Path) -> Iterator[TextIO]:
    with path.open("rb") as probe:
        packed = probe.read(2) == _GZIP_MAGIC
    opener = gzip.open if packed else open
    with opener(path, "rt", encoding="utf-8-sig", errors="replace", newline="") as handle:  # type: ignore[operator]
        yield handle


class CsvFile:
    """A CSV file's header, checked for `required` columns, and its rows (`rows()`)."""

    def __init__(self, path: Path, required: tuple[str, ...]) -> None:
        self.path = Path(path)
        if not self.path.is_file():
            raise FersynthError(f"{self.path}: file not found")
        try:
            with _text(self.path) as handle:
                first = next(csv.reader(handle), None)
        except (OSError, EOFError, zlib.error, csv.Error, UnicodeError) as exc:
            raise FersynthError(f"{self.path}: not a readable CSV file ({exc})") from None
        if not first or not any(name.strip() for name in first):
            raise FersynthError(
                f"{self.path}: empty file, no header line (expected columns {', '.join(required)})"
            )
        self.header = [name.strip() for name in first]
        missing = [name for name in required if name not in self.header]
        if missing:
            raise FersynthError(
                f"{self.path}: missing columns {', '.join(missing)} (header: {', '.join(self.header)[:120]})"
            )

    def has(self, column: str) -> bool:
        return column in self.header

    def rows(self) -> Iterator[CsvRow]:
        """Every record after the header; blank lines are skipped."""
        width, start = len(self.header), 1
        try:
            with _text(self.path) as handle:
                reader = csv.reader(handle)
                next(reader, None)
                while True:
                    start = reader.line_num + 1
                    try:
                        record = next(reader)
                    except StopIteration:
                        return
                    except csv.Error as exc:
                        if reader.line_num < start:  # nothing consumed: the reader is stuck
                            raise FersynthError(f"{self.path} line {start}: cannot parse ({exc})") from None
                        yield CsvRow(start, None, f"cannot parse as CSV ({exc})")
                        continue
                    if not record or (len(record) == 1 and not record[0].strip()):
                        continue
                    if len(record) != width:
                        yield CsvRow(start, None, f"expected {width} fields, got {len(record)}")
                        continue
                    yield CsvRow(start, dict(zip(self.header, record, strict=True)))
        except (OSError, EOFError, zlib.error, gzip.BadGzipFile) as exc:
            raise FersynthError(f"{self.path}: unreadable after line {start} ({exc})") from None

    def count(self) -> int:
        """Data lines (for a progress bar; a multi-line record counts once per line)."""
        with _text(self.path) as handle, contextlib.suppress(OSError, EOFError, zlib.error):
            return max(0, sum(1 for line in handle if line.strip()) - 1)
        return 0
