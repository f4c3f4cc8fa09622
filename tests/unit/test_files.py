from __future__ import annotations

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from fersynth.errors import FersynthError
from fersynth.files import atomic_write_bytes, atomic_write_text, link_or_copy, staged_folder


@pytest.fixture
def umask():
    """Set the process umask for one test, restored after it."""
    saved = os.umask(0o022)
    os.umask(saved)
    yield os.umask
    os.umask(saved)


def mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


@pytest.mark.parametrize(
    ("mask", "file_mode", "folder_mode"), [(0o022, 0o644, 0o755), (0o027, 0o640, 0o750)], ids=["022", "027"]
)
def test_written_files_and_folders_follow_the_umask(tmp_path, umask, mask, file_mode, folder_mode):
    umask(mask)
    atomic_write_text(tmp_path / "manifest.csv", "id\n")
    atomic_write_bytes(tmp_path / "model.pt", b"weights")
    atomic_write_bytes(tmp_path / "model.pt", b"weights again")  # a replaced file too
    with staged_folder(tmp_path / "out") as staging:
        atomic_write_text(staging / "report.md", "# report\n")
    # As a plain open() and mkdir give them, like the images beside them.
    plain = tmp_path / "plain.png"
    plain.write_bytes(b"png")
    assert mode(plain) == file_mode
    assert mode(tmp_path / "manifest.csv") == file_mode
    assert mode(tmp_path / "model.pt") == file_mode
    assert (tmp_path / "model.pt").read_bytes() == b"weights again"
    assert mode(tmp_path / "out") == folder_mode
    assert mode(tmp_path / "out" / "report.md") == file_mode
    assert sorted(p.name for p in tmp_path.iterdir()) == ["manifest.csv", "model.pt", "out", "plain.png"]


def test_an_unwritable_target_names_the_target_not_the_temporary_file(tmp_path):
    (tmp_path / "runs").write_text("a file where a folder belongs")
    with pytest.raises(FersynthError) as info:
        atomic_write_text(tmp_path / "runs" / "x" / "summary.json", "{}")
    assert str(info.value).startswith(f"{tmp_path / 'runs' / 'x' / 'summary.json'}: could not write (")
    assert ".tmp" not in str(info.value)


@pytest.fixture
def small_disk(tmp_path):
    """A 64 KiB tmpfs mounted for the test (root only), unmounted after it."""
    if not hasattr(os, "geteuid") or os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root and mount(8)")
    disk = tmp_path / "disk"
    disk.mkdir()
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], capture_output=True, text=True
    )
    if done.returncode != 0:
        pytest.skip(f"mounting a tmpfs is not allowed here: {done.stderr.strip()}")
    try:
        yield disk
    finally:
        subprocess.run(["umount", str(disk)], check=True)


def test_a_full_disk_names_the_path_and_leaves_no_temporary_file(small_disk, tmp_path):
    target = small_disk / "model.pt"
    with pytest.raises(FersynthError) as info:
        atomic_write_bytes(target, os.urandom(256 * 1024))
    assert str(info.value) == f"{target}: could not write (No space left on device)"
    assert list(small_disk.iterdir()) == []
    # An older file at the target stays as it was.
    atomic_write_bytes(target, b"old")
    with pytest.raises(FersynthError, match="No space left on device"):
        atomic_write_bytes(target, os.urandom(256 * 1024))
    assert [p.name for p in small_disk.iterdir()] == ["model.pt"] and target.read_bytes() == b"old"


def test_a_full_disk_while_copying_into_a_staged_folder_names_the_copy(small_disk, tmp_path):
    source = tmp_path / "big.png"  # another file system than the disk: copied, not linked
    source.write_bytes(os.urandom(256 * 1024))
    with pytest.raises(FersynthError) as info, staged_folder(small_disk / "out") as staging:
        link_or_copy(source, staging / "images" / "big.png")
    assert str(info.value) == f"{staging / 'images' / 'big.png'}: could not write (No space left on device)"
    assert list(small_disk.iterdir()) == []  # neither the partial copy nor the staging folder


def test_a_missing_source_is_a_failed_read(tmp_path):
    with pytest.raises(FersynthError, match=r"absent.png: could not read \(No such file or directory\)"):
        link_or_copy(tmp_path / "absent.png", tmp_path / "out" / "absent.png")
    assert not (tmp_path / "out" / "absent.png").exists()
