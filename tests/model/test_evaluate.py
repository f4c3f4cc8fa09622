from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest

from fersynth.classes import CLASSES
from fersynth.cli import main
from fersynth.compare import comparison_table, load_result, to_markdown, write_comparison
from fersynth.demo import RAFDB_TRAIN_COUNTS
from fersynth.errors import FersynthError
from fersynth.evaluate import compute_metrics, run_evaluate
from fersynth.predict import Predictor, crop_face, predict
from fersynth.settings import EvaluateSettings
from fersynth.train.loop import run_train
from helpers import make_demo_dataset, tiny_train_settings, write_png_header


def test_metrics_against_a_hand_computed_confusion_matrix():
    # true: 3 surprise, 2 fear, 1 happy; predictions below. Rows true, columns predicted.
    y_true = np.array([0, 0, 0, 1, 1, 3])
    y_pred = np.array([0, 0, 3, 1, 0, 3])
    metrics = compute_metrics(y_true, y_pred)
    expected = np.zeros((7, 7), int)
    expected[0, 0], expected[0, 3], expected[1, 1], expected[1, 0], expected[3, 3] = 2, 1, 1, 1, 1
    assert np.array_equal(np.array(metrics["confusion"]), expected)
    assert metrics["accuracy"] == pytest.approx(4 / 6)
    assert metrics["per_class_accuracy"]["surprise"] == pytest.approx(2 / 3)
    assert metrics["per_class_accuracy"]["fear"] == pytest.approx(1 / 2)
    assert metrics["per_class_accuracy"]["happy"] == 1.0
    assert metrics["per_class_accuracy"]["sad"] is None  # absent classes have no accuracy
    assert metrics["mean_accuracy"] == pytest.approx((2 / 3 + 1 / 2 + 1) / 3)
    assert metrics["confusion_normalised"][0][3] == pytest.approx(1 / 3)
    assert metrics["support"]["surprise"] == 3


def hand_made(folder: Path, name: str, per_class: list[float], total: float, counts=None) -> Path:
    folder = folder / name / "test"
    folder.mkdir(parents=True)
    metrics = {
        "accuracy": total,
        "mean_accuracy": float(np.mean(per_class)),
        "per_class_accuracy": dict(zip(CLASSES, per_class, strict=True)),
        "test_set": "test",
        "train_counts": counts or {},
    }
    (folder / "metrics.json").write_text(json.dumps(metrics))
    return folder.parent


def test_comparison_table_orders_by_training_count_and_marks_best(tmp_path):
    counts = RAFDB_TRAIN_COUNTS
    a = hand_made(tmp_path, "a", [0.8, 0.3, 0.5, 0.95, 0.8, 0.7, 0.85], 0.85, counts)
    b = hand_made(tmp_path, "b", [0.82, 0.45, 0.55, 0.93, 0.79, 0.72, 0.84], 0.86)
    runs = [load_result("Original_SL", a, None), load_result("Expanded_SL", b, "test")]
    table = comparison_table(runs)
    assert list(table.columns) == [
        "happy",
        "neutral",
        "sad",
        "surprise",
        "disgust",
        "angry",
        "fear",
        "Total",
        "Mean",
    ]
    assert table.loc["Expanded_SL", "fear"] == pytest.approx(45.0)
    text = to_markdown(table)
    assert "| Original_SL | **95.00** | **85.00** | **80.00** | 80.00 |" in text
    assert (
        "| Expanded_SL | 93.00 | 84.00 | 79.00 | **82.00** | **55.00** | **72.00** | **45.00** "
        "| **86.00** |" in text
    )
    md, csv = write_comparison(table, tmp_path / "out")
    assert pd.read_csv(csv, index_col=0).loc["Original_SL", "Total"] == pytest.approx(85.0)
    with pytest.raises(FersynthError, match="no test set 'other'"):
        load_result("x", a, "other")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("eval")
    make_demo_dataset(root, train_size=70, test_size=21)
    settings = tiny_train_settings(
        root / "ds", root / "model", steps=4, warmup_steps=1, eval_every=4, checkpoint_every=4, lr=5e-4
    )
    run_train(settings, progress=False)
    return root


def test_evaluate_writes_metrics_tables_figure_and_predictions(trained, tmp_path):
    settings = EvaluateSettings(
        model=trained / "model",
        data=[trained / "ds", trained / "ds"],
        output=tmp_path / "eval",
        workers=0,
    )
    results = run_evaluate(settings, progress=False)
    assert [r.name for r in results] == ["ds", "ds_"]  # two test sets, distinct folders
    folder = tmp_path / "eval" / "ds"
    metrics = json.loads((folder / "metrics.json").read_text())
    predictions = pd.read_csv(folder / "predictions.csv")
    assert len(predictions) == metrics["images"] == 21
    assert metrics["accuracy"] == pytest.approx(predictions["correct"].mean())
    confusion = pd.read_csv(folder / "confusion.csv", index_col=0)
    assert confusion.to_numpy().sum() == 21
    assert np.allclose(predictions[[f"p_{c}" for c in CLASSES]].sum(axis=1), 1.0, atol=1e-4)
    image = cv2.imread(str(folder / "confusion.png"))
    assert image.shape[0] > 300 and image.shape[1] > 800
    assert (
        json.loads((tmp_path / "eval" / "summary.json").read_text())["ds"]["accuracy"] == metrics["accuracy"]
    )


def test_predict_matches_evaluate_on_the_same_image(trained, tmp_path):
    run_evaluate(
        EvaluateSettings(model=trained / "model", data=[trained / "ds"], output=tmp_path / "eval", workers=0),
        progress=False,
    )
    evaluated = pd.read_csv(tmp_path / "eval" / "ds" / "predictions.csv").iloc[0]
    image = trained / "ds" / evaluated["path"]
    table = predict(image, Predictor.from_uri(str(trained / "model" / "model.pt"), "cpu"), progress=False)
    assert table.loc[0, "predicted"] == evaluated["predicted"]
    for name in CLASSES:
        assert table.loc[0, f"p_{name}"] == pytest.approx(evaluated[f"p_{name}"], abs=1e-4)


def test_predict_folder_reports_unreadable_images_and_writes_json(trained, tmp_path):
    folder = tmp_path / "photos"
    folder.mkdir()
    for i, path in enumerate(sorted((trained / "ds" / "images" / "test").iterdir())[:3]):
        (folder / f"{i}.jpg").write_bytes(path.read_bytes())
    (folder / "broken.png").write_bytes(b"\x89PNG broken")
    write_png_header(folder / "bomb.png", 100_000, 100_000)  # a decompression bomb's header
    output = tmp_path / "predictions.json"
    assert main(["predict", str(folder), "--model", str(trained / "model"), "--output", str(output)]) == 0
    rows = json.loads(output.read_text())
    assert len(rows) == 5
    broken = [r for r in rows if r["path"].endswith("broken.png")][0]
    assert broken["error"] and broken["predicted"] == ""
    bomb = [r for r in rows if r["path"].endswith("bomb.png")][0]
    assert bomb["error"].startswith("100000 x 100000 = 10,000,000,000 pixels, over max_image_pixels")
    assert sum(r["predicted"] in CLASSES for r in rows) == 3
    assert all(r["predicted"] in CLASSES for r in rows if not r["error"])


def test_predict_folder_reads_every_file_by_content_and_names_each_one_it_cannot(trained, tmp_path, capsys):
    """Good images under names a suffix list would skip (.jfif, upper case, .webp, no extension)
    are predicted; a text file, a hidden file and links out of the folder are listed with why."""
    from PIL import Image

    folder = tmp_path / "photos"
    (folder / "Sub").mkdir(parents=True)
    source = sorted((trained / "ds" / "images" / "test").iterdir())[0]
    pixels = Image.open(source).convert("RGB")
    pixels.save(folder / "a.jfif", format="JPEG")
    pixels.save(folder / "Sub" / "B.JPG", format="JPEG")
    pixels.save(folder / "c.webp", format="WEBP")
    pixels.save(folder / "noextension", format="PNG")
    (folder / "notes.txt").write_text("not an image")
    (folder / ".DS_Store").write_bytes(b"\x00\x00\x00\x01Bud1")
    outside = tmp_path / "outside.png"
    pixels.save(outside, format="PNG")
    (folder / "escape.png").symlink_to(outside)
    (folder / "dangling.png").symlink_to(tmp_path / "gone.png")
    output = tmp_path / "predictions.csv"
    assert main(["predict", str(folder), "--model", str(trained / "model"), "--output", str(output)]) == 0
    table = pd.read_csv(output, keep_default_na=False).set_index("path")
    assert len(table) == 8
    for name in ("a.jfif", "Sub/B.JPG", "c.webp", "noextension"):
        row = table.loc[str(folder / name)]
        assert row["predicted"] in CLASSES and row["error"] == "", name
    assert table.loc[str(folder / "notes.txt"), "error"] == "not a readable image format"
    assert table.loc[str(folder / ".DS_Store"), "error"] == "not a readable image format"
    assert "outside the folder" in table.loc[str(folder / "escape.png"), "error"]
    assert "broken link" in table.loc[str(folder / "dangling.png"), "error"]
    captured = capsys.readouterr()
    assert "8 files: 4 predicted, 4 not" in captured.out
    assert f"not predicted: {folder / 'notes.txt'}: not a readable image format" in captured.err


def test_predict_on_a_dataset_folder_reads_the_images_its_manifest_lists_with_their_labels(
    trained, tmp_path, capsys
):
    """A dataset folder's manifest, reports and figures are not images of the set: only the
    manifest's images get rows, each with its label, and the CLI says how many match."""
    import shutil

    from fersynth.dataset import read_manifest

    folder = tmp_path / "ds"
    shutil.copytree(trained / "ds", folder)
    (folder / "report.json").write_text("{}")
    shutil.copy(next((folder / "images" / "test").iterdir()), folder / "preview.png")  # a figure
    manifest = read_manifest(folder).manifest
    output = tmp_path / "predictions.csv"
    assert main(["predict", str(folder), "--model", str(trained / "model"), "--output", str(output)]) == 0
    table = pd.read_csv(output, keep_default_na=False)
    assert list(table["path"]) == [str(folder / p) for p in manifest["path"]]
    assert list(table["label"]) == list(manifest["label"])
    assert (table["error"] == "").all() and set(table["predicted"]) <= set(CLASSES)
    hits = int((table["predicted"] == table["label"]).sum())
    captured = capsys.readouterr()
    assert f"{len(manifest)} files: {len(manifest)} predicted, 0 not" in captured.out
    assert f"{hits} of {len(manifest)} predicted images match their manifest label" in captured.err


def test_face_crop_finds_a_real_face():
    from skimage import data

    photo = data.astronaut()  # 512 x 512 photograph with one frontal face
    face, found = crop_face(photo)
    assert found
    assert 60 < face.shape[0] < 400 and face.shape[0] < photo.shape[0]
    blank = np.full((200, 200, 3), 128, np.uint8)
    same, found = crop_face(blank)
    assert not found and same.shape == blank.shape


def test_compare_command_prints_and_writes_the_table(tmp_path, capsys):
    a = hand_made(tmp_path, "a", [0.5] * 7, 0.5)
    b = hand_made(tmp_path, "b", [0.6] * 7, 0.6)
    assert main(["compare", f"Original_SL={a}", f"Expanded_SL={b}", "--output", str(tmp_path / "c")]) == 0
    out = capsys.readouterr().out
    assert "| Expanded_SL | **60.00**" in out
    assert (tmp_path / "c" / "comparison.md").is_file()


def test_a_row_with_nothing_to_train_on_is_skipped_through_compare_and_report(trained, tmp_path, capsys):
    """The vote accepted nothing: the synthetic-only row is recorded as skipped, shown as such in
    the table and the report, instead of stopping the grid."""
    from fersynth.report import REPORT_JSON, REPORT_MD, run_report
    from fersynth.settings import ReportSettings
    from fersynth.skipped import skipped_reason
    from helpers import colour_dataset

    empty = colour_dataset(tmp_path / "synthetic", per_class=0, test_per_class=1)
    model = tmp_path / "synthetic_mek"
    train = ["train", "--data", str(empty), "--output", str(model), "--quiet"]
    assert main(train) == 2
    assert "no training images" in capsys.readouterr().err and not model.exists()
    assert main([*train, "--skip-if-empty"]) == 0
    assert "skipped:" in capsys.readouterr().out
    assert "no training images" in skipped_reason(model)

    results = tmp_path / "eval_synthetic_mek"
    evaluate = ["evaluate", "--model", str(model), "--data", str(trained / "ds"), "--output", str(results)]
    assert main(evaluate) == 0
    assert skipped_reason(results) == skipped_reason(model)

    original = hand_made(tmp_path, "eval_original_mek", [0.5] * 7, 0.5)
    compare = tmp_path / "compare" / "test"
    args = ["compare", f"Original_MEK={original}", f"Synthetic_MEK={results}", "--output", str(compare)]
    assert main(args) == 0
    table = (compare / "comparison.md").read_text()
    assert "| Synthetic_MEK | - | - | - | - | - | - | - | - | - |" in table
    assert "Synthetic_MEK: skipped, " in table and "no training images" in table

    report = run_report(
        ReportSettings(
            output=tmp_path / "report",
            comparisons=[compare],
            evaluations=tmp_path,
            changes=[("Synthetic_MEK", "Original_MEK")],
        )
    )
    page = (report.output / REPORT_MD).read_text()
    assert "Synthetic_MEK: skipped, " in page and "(skipped: " in page
    assert "No synthetic row has results beside its original row" in page  # no change to show for it
    summary = json.loads((report.output / REPORT_JSON).read_text())
    assert "no training images" in summary["skipped"]["Synthetic_MEK"]
    assert summary["comparisons"]["test"]["Synthetic_MEK"]["Mean"] is None
