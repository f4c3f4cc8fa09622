from __future__ import annotations

import os
import pickle

import numpy as np
import pandas as pd
import pytest

from fersynth.dataset import (
    COLUMNS,
    ImageDecodeError,
    decode_image,
    pixel_hash,
    read_manifest,
    safe_join,
    write_manifest,
)
from fersynth.errors import FersynthError
from fersynth.files import staged_folder
from helpers import (
    face_like,
    write_cmyk_jpeg,
    write_empty,
    write_png,
    write_png16,
    write_rgba_png,
    write_truncated_jpeg,
)


def manifest_row(**changes) -> dict:
    row = {c: "" for c in COLUMNS}
    row.update(
        id="a",
        path="images/train/a.png",
        label="happy",
        split="train",
        origin="real",
        source="test",
        width="4",
        height="4",
        channels="1",
        pixel_hash="x",
    )
    row.update(changes)
    return row


# --- paths -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "bad", ["../outside.png", "images/../../x.png", "/etc/passwd", "C:/x.png", "images\\x.png", ""]
)
def test_safe_join_refuses_paths_that_escape(tmp_path, bad):
    with pytest.raises(FersynthError):
        safe_join(tmp_path, bad)


def test_safe_join_refuses_symlink_escape(tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "data"
    root.mkdir()
    os.symlink(outside, root / "link")
    with pytest.raises(FersynthError, match="link"):
        safe_join(root, "link/x.png")
    assert safe_join(root, "images/x.png") == root / "images" / "x.png"


# --- manifest ----------------------------------------------------------------------------


def test_manifest_round_trip_keeps_extra_columns(tmp_path):
    frame = pd.DataFrame(
        [manifest_row(), manifest_row(id="b", path="images/test/b.png", split="test", score="0.5")]
    )
    write_manifest(tmp_path, frame)
    dataset = read_manifest(tmp_path)
    assert list(dataset.manifest.columns[: len(COLUMNS)]) == list(COLUMNS)
    assert dataset.manifest["score"].tolist() == ["", "0.5"]
    assert dataset.class_counts("train")["happy"] == 1
    assert dataset.manifest["width"].tolist() == [4, 4]


def test_manifest_with_escaping_path_names_the_row(tmp_path):
    frame = pd.DataFrame([manifest_row(), manifest_row(id="b", path="../../etc/passwd")])
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(FersynthError, match=r"row 3: path '../../etc/passwd' escapes"):
        read_manifest(tmp_path)


def test_manifest_errors_name_rows_and_values(tmp_path):
    frame = pd.DataFrame(
        [
            manifest_row(label="contempt"),
            manifest_row(id="a", origin="fake"),
            manifest_row(id="c", split="Train"),
        ]
    )
    frame.to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(FersynthError) as info:
        read_manifest(tmp_path)
    message = str(info.value)
    assert "row 2: label 'contempt'" in message
    assert "row 3: origin 'fake'" in message
    assert "row 3: id 'a' is empty or repeated" in message
    assert "row 4: split 'Train'" in message


def test_manifest_missing_columns_and_folder(tmp_path):
    pd.DataFrame({"path": ["a.png"]}).to_csv(tmp_path / "manifest.csv", index=False)
    with pytest.raises(FersynthError, match="missing columns id, label"):
        read_manifest(tmp_path)
    with pytest.raises(FersynthError, match="no manifest"):
        read_manifest(tmp_path / "nowhere")


# --- decoding ----------------------------------------------------------------------------


def test_decode_grey_and_rgb(tmp_path):
    grey = face_like(1, color=False)
    assert np.array_equal(decode_image(write_png(tmp_path / "g.png", grey).read_bytes()), grey)
    rgb = face_like(2)
    assert np.array_equal(decode_image(write_png(tmp_path / "c.png", rgb).read_bytes()), rgb)


def test_decode_16bit_png_scales_instead_of_clipping(tmp_path):
    path, expected = write_png16(tmp_path / "deep.png")
    decoded = decode_image(path.read_bytes())
    assert decoded.dtype == np.uint8 and decoded.ndim == 2
    assert np.abs(decoded.astype(int) - expected.astype(int)).max() <= 1
    assert decoded.max() > 200  # clipping 16-bit values would give all 255 or wrap around


def test_decode_rgba_composites_half_transparent_pixels_onto_white(tmp_path):
    decoded = decode_image(write_rgba_png(tmp_path / "a.png", seed=3).read_bytes())  # alpha 128
    assert decoded.shape == (40, 40, 3)
    expected = np.rint(face_like(3, 40) * (128 / 255) + 255 * (127 / 255))
    assert np.abs(decoded.astype(int) - expected).max() <= 1


def test_decode_cmyk_jpeg_gives_rgb_close_to_source(tmp_path):
    path, rgb = write_cmyk_jpeg(tmp_path / "cmyk.jpg")
    decoded = decode_image(path.read_bytes())
    assert decoded.shape == rgb.shape
    assert np.abs(decoded.astype(int) - rgb.astype(int)).mean() < 12


@pytest.mark.parametrize(
    ("writer", "reason", "kind"),
    [
        (write_empty, "empty file", "empty_file"),
        (write_truncated_jpeg, "truncated", "corrupt_image"),
        (lambda p: (p.write_bytes(b"not an image at all"), p)[1], "not a readable image", "not_an_image"),
    ],
)
def test_decode_rejects_bad_files_with_reason(tmp_path, writer, reason, kind):
    path = writer(tmp_path / "bad.jpg")
    with pytest.raises(ImageDecodeError, match=reason) as caught:
        decode_image(path.read_bytes())
    assert caught.value.kind == kind
    copy = pickle.loads(pickle.dumps(caught.value))  # as it comes back from a worker process
    assert (str(copy), copy.kind) == (str(caught.value), kind)


def test_pixel_hash_depends_on_pixels_and_shape():
    image = face_like(1, color=False)
    assert pixel_hash(image) == pixel_hash(image.copy())
    changed = image.copy()
    changed[0, 0] ^= 1
    assert pixel_hash(changed) != pixel_hash(image)
    assert pixel_hash(image.reshape(-1)) != pixel_hash(image)


# --- atomic output folders -----------------------------------------------------------------


def test_staged_folder_leaves_nothing_on_failure(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), staged_folder(target) as staging:
        (staging / "half.txt").write_text("half")
        raise RuntimeError("stage failed")
    assert not target.exists()
    assert list(tmp_path.iterdir()) == []


def test_staged_folder_refuses_existing_output_unless_forced(tmp_path):
    target = tmp_path / "out"
    target.mkdir()
    (target / "old.txt").write_text("old")
    with pytest.raises(FersynthError, match="--force"), staged_folder(target):
        pass
    with staged_folder(target, force=True) as staging:
        (staging / "new.txt").write_text("new")
    assert sorted(p.name for p in target.iterdir()) == ["new.txt"]
    umask = os.umask(0)
    os.umask(umask)
    assert oct(target.stat().st_mode & 0o777) == oct(0o777 & ~umask)  # an ordinary folder
