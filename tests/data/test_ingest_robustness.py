"""Ingest on the files and layouts that FER practitioners really have (issue 17): empty inputs,
decompression bombs, RAF-DB and FER2013 label-file variants, numbered class folders,
transparency. A user's mistake ends as one line naming the file, row or key (exit status 2);
the good inputs next to a bad one are kept."""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from PIL import Image

from fersynth.cli import main
from fersynth.dataset import decode_image, read_manifest
from fersynth.errors import FersynthError
from fersynth.ingest import run_ingest
from fersynth.settings import FerPlusSettings, FolderSettings, IngestSettings, RafdbSettings, load_settings
from helpers import face_like, write_jpeg, write_png, write_png_header

LABELS = "EmoLabel/list_patition_label.txt"


def ingest(source: str, path: Path, out: Path, **settings):
    return run_ingest(IngestSettings(source=source, input=path, output=out, **settings), progress=False)


def rejected(out: Path) -> dict[str, tuple[str, str]]:
    """source_id -> (kind, reason) from the ingest's rejection list."""
    table = pd.read_csv(out / "ingest_rejected.csv", keep_default_na=False)
    return {r.source_id: (r.kind, r.reason) for r in table.itertuples()}


def pixels_text(seed: int) -> str:
    return " ".join(str(v) for v in face_like(seed, 48, color=False).ravel())


# ---------------------------------------------------------------------------------------
# 1. Inputs that yield no row end with the stage's own message, never a KeyError


def _empty_rafdb(root: Path, text: str) -> tuple[str, Path]:
    (root / "Image/aligned").mkdir(parents=True)
    (root / "EmoLabel").mkdir()
    (root / LABELS).write_text(text)
    return "rafdb", root


def _empty_fer2013(root: Path, header: str) -> tuple[str, Path]:
    root.mkdir()
    (root / "fer2013.csv").write_text(header)
    return "fer2013", root / "fer2013.csv"


def _empty_affectnet(root: Path) -> tuple[str, Path]:
    root.mkdir()
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,expression\n"
    (root / "training.csv").write_text(header)
    (root / "validation.csv").write_text(header)
    return "affectnet", root


def _images_without_class_folders(root: Path) -> tuple[str, Path]:
    for i in range(3):
        write_jpeg(root / "train" / f"{i}.jpg", face_like(i, 48))
    return "folder", root


def _empty_folder(root: Path) -> tuple[str, Path]:
    (root / "train" / "happy").mkdir(parents=True)
    return "folder", root


EMPTY_INPUTS = {
    "rafdb 0-byte label file": lambda root: _empty_rafdb(root, ""),
    "rafdb blank label file with a BOM": lambda root: _empty_rafdb(root, "\ufeff\r\n\r\n"),
    "fer2013 header only": lambda root: _empty_fer2013(root, "emotion,pixels,Usage\n"),
    "affectnet headers only": _empty_affectnet,
    "folder: images under train/ without class folders": _images_without_class_folders,
    "folder: empty class folder": _empty_folder,
}


@pytest.mark.parametrize("case", list(EMPTY_INPUTS))
def test_inputs_without_a_single_row_end_with_the_stages_message(case, tmp_path, capsys):
    source, path = EMPTY_INPUTS[case](tmp_path / "input")
    out = tmp_path / "dataset"
    with pytest.raises(FersynthError, match=r"no image could be imported") as error:
        ingest(source, path, out)
    assert str(path) in str(error.value) and not out.exists()
    if source == "folder" and "without class folders" in case:
        assert "3 misplaced_file" in str(error.value) and "train/0.jpg" in str(error.value)

    code = main(["ingest", "--source", source, "--input", str(path), "--output", str(out), "--quiet"])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "no image could be imported" in err


def test_a_zero_byte_fer2013_csv_is_one_clear_line(tmp_path):
    source, path = _empty_fer2013(tmp_path / "input", "")
    with pytest.raises(
        FersynthError, match=r"fer2013.csv: no header line \(expected columns emotion, pixels\)"
    ):
        ingest(source, path, tmp_path / "dataset")


def test_ferplus_header_only_files(tmp_path):
    (tmp_path / "fer2013.csv").write_text("emotion,pixels,Usage\n")
    columns = "Usage,Image name,neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF\n"
    (tmp_path / "fer2013new.csv").write_text(columns)
    settings = IngestSettings(
        source="ferplus",
        input=tmp_path / "fer2013.csv",
        output=tmp_path / "out",
        ferplus=FerPlusSettings(labels_csv=tmp_path / "fer2013new.csv"),
    )
    with pytest.raises(FersynthError, match=r"no image could be imported \(no input rows"):
        run_ingest(settings, progress=False)


# ---------------------------------------------------------------------------------------
# 2. Decompression bombs: rejected by name and size, the good images kept, a setting


def test_bomb_images_are_rejected_with_their_size_and_the_rest_kept(tmp_path):
    root = tmp_path / "faces"
    for i in range(3):
        write_jpeg(root / f"train/happy/{i}.jpg", face_like(i, 48))
    write_png_header(root / "train/happy/claims_100000.png", 100_000, 100_000)  # > 2x the limit
    write_png_header(root / "train/sad/claims_10000.png", 10_000, 10_000)  # between 1x and 2x
    out = tmp_path / "dataset"
    report = ingest("folder", root, out)
    assert report.written == 3 and report.rejected == 2 and report.rejected_by_kind == {"too_large": 2}
    reasons = rejected(out)
    assert reasons["train/happy/claims_100000.png"] == (
        "too_large",
        "100000 x 100000 = 10,000,000,000 pixels, over max_image_pixels = 89,478,485 "
        "(a decompression bomb or a huge scan)",
    )
    assert reasons["train/sad/claims_10000.png"][1].startswith("10000 x 10000 = 100,000,000 pixels")


def test_a_real_14000_by_13000_png_is_rejected(tmp_path):
    """The issue's own file: a real, fully decodable 182-megapixel PNG of under a megabyte."""
    root = tmp_path / "faces"
    write_jpeg(root / "train/happy/good.jpg", face_like(1, 48))
    path = root / "train/happy/scan.png"
    Image.new("L", (14000, 13000), 200).save(path, format="PNG", compress_level=1)
    out = tmp_path / "dataset"
    report = ingest("folder", root, out)
    assert report.written == 1
    assert rejected(out)["train/happy/scan.png"][1].startswith("14000 x 13000 = 182,000,000 pixels")


def test_the_pixel_limit_is_a_setting_for_every_command(tmp_path, capsys):
    root = tmp_path / "faces"
    write_jpeg(root / "train/happy/small.jpg", face_like(1, 40))  # 1,600 pixels
    write_jpeg(root / "train/happy/medium.jpg", face_like(2, 60))  # 3,600: over 2,000
    write_jpeg(root / "train/happy/large.jpg", face_like(3, 100))  # 10,000: over twice 2,000
    out = tmp_path / "dataset"
    args = ["-S", "max_image_pixels=2000", "ingest", "--source", "folder", "--input", str(root)]
    assert main([*args, "--output", str(out), "--quiet"]) == 0
    reasons = rejected(out)
    assert reasons["train/happy/medium.jpg"][1].startswith(
        "60 x 60 = 3,600 pixels, over max_image_pixels = 2,000"
    )
    assert reasons["train/happy/large.jpg"][0] == "too_large"
    assert [row.source_id for row in read_manifest(out).manifest.itertuples()] == ["train/happy/small.jpg"]

    assert main(["-S", "max_image_pixels=true", "params"]) == 2
    assert "max_image_pixels" in capsys.readouterr().err
    assert load_settings(None).max_image_pixels == 89_478_485  # back to the default


def test_train_stops_on_a_bomb_with_one_line_naming_it(tmp_path):
    from fersynth.train.loop import run_train
    from helpers import make_demo_dataset, tiny_train_settings

    data = make_demo_dataset(tmp_path / "ds", train_size=28, test_size=7)
    frame = read_manifest(data).manifest
    victim = frame[frame["split"] == "train"].iloc[3]
    write_png_header(data / victim["path"], 50_000, 50_000)
    for in_memory in ("always", "never"):
        with pytest.raises(FersynthError, match=r"50000 x 50000 = 2,500,000,000 pixels") as error:
            run_train(tiny_train_settings(data, tmp_path / f"model_{in_memory}", in_memory=in_memory))
        assert victim["path"] in str(error.value)


def test_quality_scores_refuse_a_bomb(tmp_path):
    from fersynth.quality_scores import score_file

    path = write_png_header(tmp_path / "bomb.png", 100_000, 100_000)
    assert score_file(path, 0.25).startswith("100000 x 100000 = 10,000,000,000 pixels")


# ---------------------------------------------------------------------------------------
# 3. RAF-DB label files as people have them


def make_rafdb(root: Path, lines: list[str], *, images: str = "aligned", newline: str = "\n", bom=False):
    """Images for train_00001..6 and test_00001..2 in `images` (aligned or original)."""
    folder = root / "Image" / images
    for i in range(1, 7):
        name = f"train_{i:05d}" + ("_aligned" if images == "aligned" else "")
        write_jpeg(folder / f"{name}.jpg", face_like(i, 64))
    for i in range(1, 3):
        name = f"test_{i:05d}" + ("_aligned" if images == "aligned" else "")
        write_jpeg(folder / f"{name}.jpg", face_like(100 + i, 64))
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    text = newline.join(lines) + newline + newline + newline  # trailing blank lines
    (root / LABELS).write_bytes(("\ufeff" if bom else "").encode() + text.encode())
    return root


def labels_of(out: Path) -> dict[str, str]:
    return dict(read_manifest(out).manifest.set_index("id")["label"])


def test_rafdb_bom_crlf_tabs_aligned_names_and_a_third_column(tmp_path):
    lines = [
        "train_00001_aligned.jpg 1",  # already the aligned name
        "train_00002.jpg\t2",  # tab
        "train_00003.jpg  3 1",  # third column
        "train_00004.jpg 4",
        "train_00005_aligned.jpg\t5\t0",
        "train_00006.jpg 6",
        "test_00001.jpg 7",
        "test_00002_aligned.jpg 4",
    ]
    root = make_rafdb(tmp_path / "RAF-DB", lines, newline="\r\n", bom=True)
    out = tmp_path / "dataset"
    report = ingest("rafdb", root, out, val_fraction=0.0)
    assert report.rejected == 0 and report.written == 8
    assert labels_of(out) == {
        "train_00001": "surprise",
        "train_00002": "fear",
        "train_00003": "disgust",
        "train_00004": "happy",
        "train_00005": "sad",
        "train_00006": "angry",
        "test_00001": "neutral",
        "test_00002": "happy",
    }
    assert any("_aligned" in note for note in report.notes)
    assert any(note.startswith("2 label lines have columns after the label") for note in report.notes)
    assert "Notes on the input" in (out / "ingest_report.md").read_text()


def test_rafdb_zero_based_labels_stop_with_the_option_and_read_with_it(tmp_path, capsys):
    lines = [f"train_{i:05d}.jpg {i - 1}" for i in range(1, 7)] + ["test_00001.jpg 6", "test_00002.jpg 0"]
    root = make_rafdb(tmp_path / "RAF-DB", lines)
    out = tmp_path / "dataset"
    with pytest.raises(FersynthError, match=r"looks 0-based.*ingest.rafdb.label_base=0 \(--label-base 0\)"):
        ingest("rafdb", root, out)
    assert not out.exists()
    assert main(["ingest", "--source", "rafdb", "--input", str(root), "--output", str(out), "--quiet"]) == 2
    assert "label_base" in capsys.readouterr().err

    report = ingest("rafdb", root, out, val_fraction=0.0, rafdb=RafdbSettings(label_base=0))
    assert report.rejected == 0
    labels = labels_of(out)
    assert labels["train_00001"] == "surprise" and labels["train_00006"] == "angry"
    assert labels["test_00001"] == "neutral" and labels["test_00002"] == "surprise"


def test_rafdb_with_only_original_images(tmp_path):
    lines = [f"train_{i:05d}.jpg {i}" for i in range(1, 7)] + ["test_00001.jpg 7", "test_00002.jpg 4"]
    root = make_rafdb(tmp_path / "RAF-DB", lines, images="original")
    out = tmp_path / "dataset"
    report = ingest("rafdb", root, out, val_fraction=0.0)
    assert report.written == 8 and report.rejected == 0
    manifest = read_manifest(out).manifest.set_index("id")
    assert manifest.loc["train_00002", "source_id"] == "Image/original/train_00002.jpg"
    assert any("Image/original" in note and "not aligned" in note for note in report.notes)


def test_rafdb_defects_name_the_image_and_links_out_are_refused(tmp_path):
    lines = [f"train_{i:05d}.jpg {i}" for i in range(1, 7)] + ["test_00001.jpg 9", "test_00002.jpg"]
    root = make_rafdb(tmp_path / "RAF-DB", lines)
    outside = write_jpeg(tmp_path / "secret.jpg", face_like(99, 64))
    link = root / "Image/aligned/train_00003_aligned.jpg"
    link.unlink()
    os.symlink(outside, link)
    out = tmp_path / "dataset"
    ingest("rafdb", root, out)
    reasons = rejected(out)
    assert reasons[f"{LABELS} line 7 (test_00001.jpg)"] == (
        "unknown_label",
        "unknown label '9' (labels here are 1..7)",
    )
    assert reasons[f"{LABELS} line 8 (test_00002.jpg)"][0] == "malformed_row"
    assert reasons["Image/aligned/train_00003_aligned.jpg"] == (
        "unsafe_path",
        "a link that leads outside the input folder",
    )


# ---------------------------------------------------------------------------------------
# 4. FER2013 files as people have them


def write_csv(path: Path, header: str, rows: list[str], gz: bool = False) -> Path:
    text = header + "\n" + "\n".join(rows) + "\n"
    if gz:
        with gzip.open(path, "wt") as handle:
            handle.write(text)
    else:
        path.write_text(text)
    return path


def test_icml_face_data_header_with_spaces(tmp_path):
    rows = [f"{e}, Training, {pixels_text(e)}" for e in range(7)] + [f"3, PublicTest, {pixels_text(9)}"]
    path = write_csv(tmp_path / "icml_face_data.csv", "emotion, Usage, pixels", rows)
    out = tmp_path / "dataset"
    report = ingest("fer2013", path, out, val_fraction=0.0)
    assert report.written == 8 and report.rejected == 0
    manifest = read_manifest(out).manifest.set_index("id")
    assert (
        manifest.loc["fer2013_00007", "split"] == "test" and manifest.loc["fer2013_00007", "label"] == "happy"
    )
    pixels = decode_image((out / manifest.loc["fer2013_00001", "path"]).read_bytes())
    assert np.array_equal(pixels, face_like(1, 48, color=False))


def test_challenge_train_csv_without_usage_needs_the_split_option(tmp_path, capsys):
    rows = [f"{e},{pixels_text(e)}" for e in range(7)]
    path = write_csv(tmp_path / "train.csv", "emotion,pixels", rows)
    out = tmp_path / "dataset"
    with pytest.raises(
        FersynthError, match=r"train.csv: no Usage column.*ingest.fer2013.split \(--split train"
    ):
        ingest("fer2013", path, out)
    args = ["ingest", "--source", "fer2013", "--input", str(path), "--output", str(out), "--quiet"]
    assert main(args) == 2 and "--split" in capsys.readouterr().err
    assert main(["-S", "ingest.val_fraction=0", *args, "--split", "train"]) == 0
    manifest = read_manifest(out).manifest
    assert set(manifest["split"]) == {"train"} and len(manifest) == 7

    usage = write_csv(tmp_path / "with_usage.csv", "emotion,pixels,Usage", [f"0,{pixels_text(0)},Training"])
    with pytest.raises(FersynthError, match=r"has a Usage column"):
        ingest("fer2013", usage, tmp_path / "other", fer2013={"split": "train"})


def test_malformed_fer2013_rows_are_rejected_by_line_and_the_rest_kept(tmp_path):
    rows = [
        f"0,{pixels_text(0)},Training",
        f"1,{pixels_text(1)},Training,extra",  # line 3: a fourth field
        "2",  # line 4: one field
        f'3,"{pixels_text(3)}",Training',  # quoted: fine
        f"4,{pixels_text(4)},PublicTest",
    ]
    path = write_csv(tmp_path / "fer2013.csv.gz", "emotion,pixels,Usage", rows, gz=True)
    out = tmp_path / "dataset"
    report = ingest("fer2013", path, out, val_fraction=0.0)
    assert report.written == 3 and report.rejected == 2
    reasons = rejected(out)
    assert reasons["fer2013.csv.gz row 3"] == ("malformed_row", "expected 3 fields, got 4")
    assert reasons["fer2013.csv.gz row 4"] == ("malformed_row", "expected 3 fields, got 1")
    manifest = read_manifest(out).manifest.set_index("source_id")
    assert manifest.loc["fer2013.csv.gz row 5", "label"] == "happy"


def test_a_file_that_is_no_csv_at_all_is_one_error(tmp_path):
    path = tmp_path / "fer2013.csv"
    path.write_bytes(b"\x1f\x8b\x08\x00garbage that is not gzip data")
    with pytest.raises(FersynthError, match=r"fer2013.csv: not a readable CSV file"):
        ingest("fer2013", path, tmp_path / "dataset")


# ---------------------------------------------------------------------------------------
# 5. Numbered class folders: never guessed


def make_numbered(root: Path) -> Path:
    for folder in range(8):
        write_jpeg(root / f"train/{folder}/a.jpg", face_like(folder, 48))
    write_jpeg(root / "test/happy/b.jpg", face_like(20, 48))
    return root


def test_numbered_class_folders_without_a_map_are_an_error(tmp_path, capsys):
    root = make_numbered(tmp_path / "affectnet")
    out = tmp_path / "dataset"
    with pytest.raises(FersynthError, match=r"class folders 0, 1, 2, .* are numbers.*--class-map"):
        ingest("folder", root, out)
    assert main(["ingest", "--source", "folder", "--input", str(root), "--output", str(out), "--quiet"]) == 2
    assert "affectnet-alphabetical" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("class_map", "expected"),
    [
        ("affectnet-alphabetical", {"0": "angry", "1": None, "4": "happy", "5": "neutral", "7": "surprise"}),
        ("affectnet", {"0": "neutral", "1": "happy", "3": "surprise", "6": "angry", "7": None}),
        (
            "0=neutral,1=Happiness,2=sad,3=surprise,4=fear,5=disgust,6=anger,7=exclude",
            {"1": "happy", "6": "angry"},
        ),
    ],
)
def test_a_class_map_names_numbered_folders(class_map, expected, tmp_path):
    root = make_numbered(tmp_path / "affectnet")
    out = tmp_path / "dataset"
    args = ["ingest", "--source", "folder", "--input", str(root), "--output", str(out), "--quiet"]
    assert main(["-S", "ingest.val_fraction=0", *args, "--class-map", class_map]) == 0
    labels = dict(read_manifest(out).manifest.set_index("source_id")["label"])
    reasons = rejected(out)
    for folder, label in expected.items():
        if label is None:
            assert reasons[f"train/{folder}/a.jpg"][0] == "excluded_class"
        else:
            assert labels[f"train/{folder}/a.jpg"] == label
    assert labels["test/happy/b.jpg"] == "happy"  # named folders keep working


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ("affectnet8", "not a preset"),
        ("0=neutral,1=joy", "folder 1: 'joy' is not a class"),
        ("0=neutral,=happy", "expected FOLDER=CLASS pairs"),
    ],
)
def test_bad_class_maps_are_refused_by_key(value, message):
    with pytest.raises(FersynthError, match=rf"ingest.folder.class_map.*{message}"):
        load_settings(None, [f"ingest.folder.class_map={value}"])
    assert FolderSettings(class_map={0: "neutral", "1": "happy"}).mapping() == {"0": "neutral", "1": "happy"}


# ---------------------------------------------------------------------------------------
# 6. Transparency is composited onto the background, and counted


def test_transparent_pixels_are_composited_and_counted(tmp_path):
    root = tmp_path / "faces"
    face = face_like(1, 40)
    hidden = face.copy()
    hidden[:, :20] = (255, 0, 0)  # the colour under transparent pixels: must not show
    alpha = np.full((40, 40), 255, np.uint8)
    alpha[:, :20] = 0
    alpha[:, 20:30] = 128
    write_png(root / "train/happy/rgba.png", np.dstack([hidden, alpha]))
    write_png(root / "train/happy/opaque_rgba.png", np.dstack([face, np.full((40, 40), 255, np.uint8)]))
    grey = face_like(2, 40, color=False)
    write_png(root / "train/sad/la.png", np.dstack([grey, alpha]))
    palette = Image.fromarray(face).convert("P", palette=Image.Palette.ADAPTIVE, colors=16)
    palette.info["transparency"] = int(np.asarray(palette)[0, 0])
    (root / "train/fear").mkdir(parents=True)
    palette.save(root / "train/fear/palette.png", transparency=int(np.asarray(palette)[0, 0]))
    out = tmp_path / "dataset"
    report = ingest("folder", root, out, val_fraction=0.0)
    assert report.written == 4 and report.composited == 3
    assert "images with transparent pixels: 3" in (out / "ingest_report.md").read_text()

    manifest = read_manifest(out).manifest.set_index("source_id")
    rgba = decode_image((out / manifest.loc["train/happy/rgba.png", "path"]).read_bytes()).astype(int)
    assert (rgba[:, :20] == 255).all()  # white, not the hidden red
    expected = np.rint(face[:, 20:30] * (128 / 255) + 255 * (127 / 255))
    assert np.abs(rgba[:, 20:30] - expected).max() <= 1
    assert np.array_equal(rgba[:, 30:], face[:, 30:])
    la = decode_image((out / manifest.loc["train/sad/la.png", "path"]).read_bytes())
    assert la.ndim == 2 and (la[:, :20] == 255).all()
    opaque = decode_image((out / manifest.loc["train/happy/opaque_rgba.png", "path"]).read_bytes())
    assert np.array_equal(opaque, face)


# ---------------------------------------------------------------------------------------
# 7. AffectNet with training.csv only


def test_affectnet_without_validation_csv_is_train_only_and_says_so(tmp_path):
    root = tmp_path / "affectnet"
    images = root / "Manually_Annotated_Images"
    rows = []
    for i, expression in enumerate([0, 1, 2, 3, 4, 5, 6]):
        write_jpeg(images / f"1/{i}.jpg", face_like(i, 64))
        rows.append(f"1/{i}.jpg,0,0,64,64,{expression}")
    write_csv(
        root / "training.csv", "subDirectory_filePath,face_x,face_y,face_width,face_height,expression", rows
    )
    out = tmp_path / "dataset"
    report = ingest("affectnet", root, out, val_fraction=0.0)
    assert report.written == 7 and set(read_manifest(out).manifest["split"]) == {"train"}
    assert any("no validation.csv" in note and "train split only" in note for note in report.notes)


# ---------------------------------------------------------------------------------------
# Found by trying to break the above


def test_rafdb_one_based_file_read_as_zero_based_stops(tmp_path):
    lines = [f"train_{i:05d}.jpg {i}" for i in range(1, 7)] + ["test_00001.jpg 7", "test_00002.jpg 4"]
    root = make_rafdb(tmp_path / "RAF-DB", lines)
    with pytest.raises(FersynthError, match=r"labels run 1\.\.7.*drop --label-base 0"):
        ingest("rafdb", root, tmp_path / "dataset", rafdb=RafdbSettings(label_base=0))


def test_rafdb_repeated_and_conflicting_lines_utf16_and_float_labels(tmp_path):
    lines = [
        "train_00001.jpg 1",
        "train_00001.jpg 1",  # identical repeat: dropped, the first line is read
        "train_00002.jpg 2",
        "train_00002_aligned.jpg 4",  # the same image with another label: both refused
        "train_00003.jpg 3.0",  # a label written as a float
        "train_00004.jpg 4",
        "train_00005.jpg 5",
        "train_00006.jpg 6",
        "test_00001.jpg 7",
        "test_00002.jpg 4",
    ]
    root = make_rafdb(tmp_path / "RAF-DB", lines)
    (root / LABELS).write_bytes("\r\n".join(lines).encode("utf-16"))  # Windows Notepad's "Unicode"
    out = tmp_path / "dataset"
    report = ingest("rafdb", root, out, val_fraction=0.0)
    reasons = rejected(out)
    assert reasons[f"{LABELS} line 2 (train_00001.jpg)"] == ("duplicate_row", f"repeats {LABELS} line 1")
    conflict = reasons[f"{LABELS} line 3 (train_00002.jpg)"]
    assert conflict == ("conflicting_labels", "the image is listed 2 times with labels 2, 4")
    assert reasons[f"{LABELS} line 4 (train_00002_aligned.jpg)"][0] == "conflicting_labels"
    labels = labels_of(out)
    assert labels["train_00001"] == "surprise" and labels["train_00003"] == "disgust"
    assert "train_00002" not in labels and report.written == 7 and report.accounted


def test_folder_links_of_every_kind_are_listed_never_lost(tmp_path):
    root = tmp_path / "faces"
    write_jpeg(root / "train/happy/a.jpg", face_like(1, 48))
    outside = tmp_path / "outside" / "anger"
    write_jpeg(outside / "b.jpg", face_like(2, 48))
    os.symlink(outside, root / "train/anger")  # a class folder that is a link out
    os.symlink(root / "train/happy", root / "train/happiness")  # a link to a folder inside
    os.symlink("missing.jpg", root / "train/happy/dangling.jpg")
    os.symlink("loop.jpg", root / "train/happy/loop.jpg")
    out = tmp_path / "dataset"
    report = ingest("folder", root, out, val_fraction=0.0)
    assert report.inputs == 5 and report.written == 1 and report.accounted
    reasons = rejected(out)
    assert reasons["train/anger"] == ("unsafe_path", "a link that leads outside the input folder")
    assert reasons["train/happiness"][0] == "linked_folder"
    assert reasons["train/happy/dangling.jpg"] == ("missing_file", "a link whose target does not exist")
    assert reasons["train/happy/loop.jpg"] == ("unsafe_path", "a link loop")


def test_csv_lines_spoil_only_themselves(tmp_path):
    """A stray quote, a number past int64, a trailing comma, a leading blank line: each line
    on its own; a zip holding the CSV is read, a tar archive is named."""
    rows = [
        f"0,{pixels_text(0)},Training,",  # trailing comma: fine
        f'3,"{pixels_text(3)},Training',  # an unclosed quote: this line only
        f"4,{pixels_text(4)},Training",
        f"5,99999999999999999999999 {pixels_text(5)},Training",  # past int64
        f"6,{pixels_text(6)},PublicTest",
    ]
    path = tmp_path / "fer2013.csv"
    path.write_text("\n" + "emotion,pixels,Usage\n" + "\n".join(rows) + "\n")
    out = tmp_path / "dataset"
    report = ingest("fer2013", path, out, val_fraction=0.0)
    assert report.written == 3 and report.rejected == 2
    reasons = rejected(out)
    assert reasons["fer2013.csv row 4"][0] == "malformed_row" and "parse" in reasons["fer2013.csv row 4"][1]
    assert reasons["fer2013.csv row 6"] == ("bad_pixels", "pixels are not all integers in 0..255")

    import tarfile
    import zipfile

    with zipfile.ZipFile(tmp_path / "fer2013.zip", "w") as archive:
        archive.write(path, "fer2013.csv")
    assert ingest("fer2013", tmp_path / "fer2013.zip", tmp_path / "from_zip", val_fraction=0.0).written == 3
    with tarfile.open(tmp_path / "fer2013.tar.gz", "w:gz") as archive:
        archive.add(path, "fer2013/fer2013.csv")
    with pytest.raises(FersynthError, match=r"fer2013.tar.gz: a tar archive; extract the CSV"):
        ingest("fer2013", tmp_path / "fer2013.tar.gz", tmp_path / "from_tar")


def test_non_finite_affectnet_values_are_rejected_not_raised(tmp_path):
    root = tmp_path / "affectnet"
    images = root / "Manually_Annotated_Images"
    rows = []
    for i, (box, expression) in enumerate(
        [
            ("0,0,64,64", "1"),
            ("nan,5,40,40", "2"),
            ("0,0,inf,40", "3"),
            ("0,0,64,64", "inf"),
            ("0,0,64,64", "1.9"),
        ]
    ):
        write_jpeg(images / f"1/{i}.jpg", face_like(i, 64))
        rows.append(f"1/{i}.jpg,{box},{expression}")
    header = "subDirectory_filePath,face_x,face_y,face_width,face_height,expression"
    write_csv(root / "training.csv", header, rows)
    out = tmp_path / "dataset"
    report = ingest("affectnet", root, out, val_fraction=0.0)
    assert report.written == 1 and report.rejected == 4
    kinds = {key.split(" (")[1].rstrip(")"): kind for key, (kind, _) in rejected(out).items()}
    assert kinds == {
        "1/1.jpg": "bad_face_box",
        "1/2.jpg": "bad_face_box",
        "1/3.jpg": "malformed_row",
        "1/4.jpg": "malformed_row",
    }


def test_colliding_ids_get_unique_suffixes(tmp_path):
    root = tmp_path / "faces"
    for i, name in enumerate(["a b.jpg", "a_b.jpg", "a_b__2.jpg"]):
        write_jpeg(root / "train/happy" / name, face_like(i, 48))
    out = tmp_path / "dataset"
    assert ingest("folder", root, out, val_fraction=0.0).written == 3
    assert read_manifest(out).manifest["id"].is_unique


def test_options_of_another_source_are_refused_and_predict_reads_the_limit(tmp_path, capsys):
    root = make_numbered(tmp_path / "affectnet")
    args = ["ingest", "--source", "rafdb", "--input", str(root), "--output", str(tmp_path / "o")]
    assert main([*args, "--class-map", "affectnet"]) == 2
    assert "--class-map is for --source folder, not rafdb" in capsys.readouterr().err
    assert main(["-S", "max_image_pixels=true", "predict", str(root), "--model", "none"]) == 2
    assert "max_image_pixels" in capsys.readouterr().err


def test_a_dataloader_worker_error_is_one_line(tmp_path):
    from fersynth.errors import one_line

    wrapped = FersynthError(
        "Caught FersynthError in DataLoader worker process 0.\nOriginal Traceback (most recent call last):\n"
        '  File "x.py", line 1, in f\nfersynth.errors.FersynthError: data/x.png: 9 x 9 = 81 pixels, over'
    )
    assert one_line(wrapped) == "data/x.png: 9 x 9 = 81 pixels, over"
    assert one_line(FersynthError("plain")) == "plain"
