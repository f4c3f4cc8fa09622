"""A plain `split/class/image` folder, e.g. `train/happy/0001.jpg`.

Class folders are named by class (`happy`, `Happiness`, `anger`, ...). Numbered class
folders (`0..7`, as AffectNet re-packs have them) mean what `ingest.folder.class_map` says
(a preset or folder=class pairs); without a map they are an error, never a guess.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

from fersynth.classes import CLASS_MAP_PRESETS, EXCLUDE, folder_class
from fersynth.errors import FersynthError
from fersynth.ingest.items import Candidate, Rejection, safe_name
from fersynth.settings import FolderSettings

SPLIT_ALIASES = {"training": "train", "validation": "val", "valid": "val", "testing": "test"}


def _files(folder: Path) -> list[Path]:
    """Every entry that is not a plain folder, links included (a link to a folder, a dangling
    link, a link loop): each is an input, imported or rejected. Links are never followed."""
    found = []
    for parent, folders, files in os.walk(folder, followlinks=False):
        found += [Path(parent) / name for name in files]
        found += [Path(parent) / name for name in folders if (Path(parent) / name).is_symlink()]
    return sorted(found)


def _link_problem(path: Path, root: Path) -> tuple[str, str] | None:
    """(kind, reason) for a link that cannot be imported, None for a usable file."""
    if not path.is_symlink():
        return None
    try:
        target = path.resolve(strict=True)
    except FileNotFoundError:
        return "missing_file", "a link whose target does not exist"
    except (OSError, RuntimeError):
        return "unsafe_path", "a link loop"
    if not target.is_relative_to(root.resolve()):
        return "unsafe_path", "a link that leads outside the input folder"
    if target.is_dir():
        return "linked_folder", "a link to a folder: not followed (its images are read where they lie)"
    return None


def _split_name(folder: str) -> str | None:
    name = SPLIT_ALIASES.get(folder.lower(), folder.lower())
    return name if name.replace("_", "").isalnum() and name[:1].isalpha() else None


def count(root: Path) -> int:
    return len(_files(Path(root)))


def _check_numbered(root: Path, files: list[Path], class_map: dict[str, str] | None) -> None:
    """Refuse numbered class folders that no class map names: one re-pack's 1 is another's 7."""
    folders = {p.relative_to(root).parts[1] for p in files if len(p.relative_to(root).parts) >= 3}
    numbered = sorted((name for name in folders - set(class_map or {}) if name.strip().isdigit()), key=str)
    if numbered and class_map is not None:
        raise FersynthError(
            f"{root}: class folders {', '.join(numbered[:10])} are numbers that the class map "
            f"(ingest.folder.class_map) does not name; it names {', '.join(sorted(class_map, key=str))}"
        )
    if numbered:
        raise FersynthError(
            f"{root}: class folders {', '.join(numbered[:10])} are numbers, and numbers are never "
            "guessed; name the classes with --class-map (ingest.folder.class_map), e.g. "
            f"--class-map 0=neutral,1=happy,... or a preset: {', '.join(CLASS_MAP_PRESETS)}"
        )


def read(root: Path, settings: FolderSettings | None = None) -> Iterator[Candidate | Rejection]:
    """The files as items; a layout that cannot be read (numbered class folders without a map)
    is an error here, at once."""
    root = Path(root)
    if root.is_file():
        raise FersynthError(f"{root}: expected a split/class/image folder, got a file")
    if not root.is_dir():
        raise FersynthError(f"{root}: folder not found")
    class_map = (settings or FolderSettings()).mapping()
    files = _files(root)
    _check_numbered(root, files, class_map)
    return _items(root, files, class_map)


def _items(
    root: Path, files: list[Path], class_map: dict[str, str] | None
) -> Iterator[Candidate | Rejection]:
    for path in files:
        relative = path.relative_to(root)
        where = relative.as_posix()
        problem = _link_problem(path, root)
        if problem is not None:
            yield Rejection(where, *problem)
            continue
        if len(relative.parts) < 3:
            yield Rejection(where, "misplaced_file", "not inside a split/class/ folder")
            continue
        split = _split_name(relative.parts[0])
        if split is None:
            yield Rejection(
                where, "unknown_split", f"split folder {relative.parts[0]!r} is not a usable name"
            )
            continue
        folder_name = relative.parts[1]
        label = (class_map or {}).get(folder_name.strip()) or folder_class(folder_name)
        if label == EXCLUDE:
            yield Rejection(
                where, "excluded_class", f"class folder {folder_name!r} is excluded by the class map", split
            )
            continue
        if label is None:
            yield Rejection(where, "unknown_label", f"unknown class folder {folder_name!r}", split)
            continue
        yield Candidate(
            id=safe_name(where),
            split=split,
            label=label,
            source_id=where,
            file=str(path),
            within=str(root),
        )
