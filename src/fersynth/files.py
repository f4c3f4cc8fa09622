"""Atomic writes: a reader never sees a half-written file or output folder."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

from fersynth.errors import FersynthError

T = TypeVar("T")


def _temporary(parent: Path, name: str, suffix: str, create: Callable[[Path], T]) -> tuple[Path, T]:
    """A new hidden `.<name>.<random><suffix>` beside the target, made by `create` (which fails
    with FileExistsError on a taken name)."""
    for _ in range(100):
        candidate = parent / f".{name}.{secrets.token_hex(4)}{suffix}"
        try:
            return candidate, create(candidate)
        except FileExistsError:
            continue
    raise FileExistsError(f"no free temporary name for {name} in {parent}")


def _create_file(path: Path) -> int:
    # 0o666 as open() asks for, so the kernel applies the umask (and any default ACL) exactly as
    # it does for every other file; mkstemp's 0o600 made manifests and models private.
    return os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o666)


def _create_folder(path: Path) -> None:
    os.mkdir(path, 0o777)  # as mkdir(1): the umask decides, not mkdtemp's 0o700


def _write_error(path: Path, exc: OSError, verb: str = "write") -> FersynthError:
    """`<path>: could not write (<reason>)`; the reason names another file when that one failed
    (a parent that is a file, say), never the temporary one beside `path`."""
    reason = exc.strerror or str(exc)
    named = [Path(name) for name in (exc.filename, exc.filename2) if name]  # a copy names both
    hidden = f".{path.name}."  # our temporary files beside `path`
    if named and not any(p == path or (p.parent == path.parent and p.name.startswith(hidden)) for p in named):
        reason = f"{named[0]}: {reason}"
    return FersynthError(f"{path}: could not {verb} ({reason})")


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write to a temporary file beside `path`, then rename it into place.

    The file gets the mode a plain open() gives (0o666 less the umask). A failed write (a full
    disk, no permission) is one FersynthError naming `path`, and leaves no temporary file.
    """
    path = Path(path)
    tmp: Path | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp, fd = _temporary(path.parent, path.name, ".tmp", _create_file)
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
        os.replace(tmp, path)
    except BaseException as exc:
        if tmp is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
        if isinstance(exc, OSError):
            raise _write_error(path, exc) from exc
        raise


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def link_or_copy(source: Path, target: Path) -> None:
    """Put `source` at `target` as a hard link (same bytes, no extra disk; inputs are never
    modified in place), or as a copy across file systems. A failed copy (a full disk) is one
    FersynthError naming `target`, and leaves no partial copy."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.link(source, target)
        except OSError:
            shutil.copy2(source, target)
    except OSError as exc:
        # Only the source named alone is a failed read: a failed copy names both files.
        if exc.filename2 is None and exc.filename and Path(exc.filename) == Path(source):
            raise _write_error(Path(source), exc, "read") from exc
        with contextlib.suppress(OSError):
            os.unlink(target)
        raise _write_error(target, exc) from exc


@contextlib.contextmanager
def staged_folder(target: Path, *, force: bool = False) -> Iterator[Path]:
    """Build an output folder under a temporary name and rename it to `target` on success.

    A stage that fails leaves no folder at `target` that a rerun could trust. An existing
    `target` is an error unless `force`, in which case it is replaced only after success. The
    folder gets the mode a plain mkdir gives (0o777 less the umask).
    """
    target = Path(target)
    if target.exists() and not force:
        raise FersynthError(f"{target}: output already exists (pass --force to replace it)")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        staging, _ = _temporary(target.parent, target.name, ".partial", _create_folder)
    except OSError as exc:
        raise _write_error(target, exc) from exc
    try:
        yield staging
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    trash = target.with_name(f".{target.name}.old")
    moved = False
    try:
        if target.exists():
            shutil.rmtree(trash, ignore_errors=True)
            os.replace(target, trash)
            moved = True
        os.replace(staging, target)
    except OSError as exc:
        if moved:  # the old output stays where it was
            with contextlib.suppress(OSError):
                os.replace(trash, target)
        shutil.rmtree(staging, ignore_errors=True)
        raise _write_error(target, exc) from exc
    if moved:
        shutil.rmtree(trash, ignore_errors=True)
