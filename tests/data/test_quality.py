from __future__ import annotations

import shutil
from pathlib import Path

import cv2
import numpy as np
import pandas as pd
import pytest
import torch

from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.quality import combine, run_quality
from fersynth.quality.superres import SuperResolver, load_sr_model
from fersynth.quality_scores import SCORE_NAMES, score_grey
from fersynth.settings import QualitySettings, SuperResolutionSettings
from helpers import make_demo_dataset, write_tiny_swinir


def demo_face(size: int = 100) -> np.ndarray:
    from fersynth.demo import draw_face

    return cv2.cvtColor(draw_face("happy", np.random.default_rng(0), size), cv2.COLOR_RGB2GRAY)


def test_degraded_copies_score_below_the_original():
    original = demo_face()
    blurred = cv2.GaussianBlur(original, (0, 0), 2.5)
    low_contrast = (128 + (original.astype(np.float32) - 128) * 0.25).astype(np.uint8)
    downscaled = cv2.resize(original, (32, 32), interpolation=cv2.INTER_AREA)
    scores = {
        name: score_grey(image, 0.25)
        for name, image in [
            ("original", original),
            ("blurred", blurred),
            ("low_contrast", low_contrast),
            ("downscaled", downscaled),
        ]
    }
    assert scores["blurred"]["sharpness"] < 0.2 * scores["original"]["sharpness"]
    assert scores["blurred"]["detail"] < scores["original"]["detail"]
    assert scores["blurred"]["texture"] < scores["original"]["texture"]
    assert scores["low_contrast"]["contrast"] < 0.3 * scores["original"]["contrast"]
    assert scores["downscaled"]["size"] == 32 < scores["original"]["size"]
    frame = pd.DataFrame([{f"q_{k}": v for k, v in s.items()} for s in scores.values()], index=list(scores))
    combined = combine(frame, {name: 1.0 for name in SCORE_NAMES})
    for degraded in ("blurred", "low_contrast", "downscaled"):
        assert combined[degraded] < combined["original"], degraded


def test_blank_frame_scores_zero():
    blank = np.full((48, 48), 7, np.uint8)
    scores = score_grey(blank, 0.25)
    assert scores["sharpness"] == scores["detail"] == scores["contrast"] == 0.0
    assert scores["texture"] == 0.0


def test_tiny_swinir_loads_through_spandrel_from_the_official_layout(tmp_path):
    descriptor = load_sr_model(str(write_tiny_swinir(tmp_path / "swinir_x2.pth")), torch.device("cpu"))
    assert descriptor.architecture.name == "SwinIR" and descriptor.scale == 2
    with pytest.raises(FersynthError, match="spandrel does not recognise"):
        torch.save({"params": {"weight": torch.zeros(3)}}, tmp_path / "other.pth")
        load_sr_model(str(tmp_path / "other.pth"), torch.device("cpu"))


def test_tiling_gives_the_full_size_output(tmp_path):
    resolver = SuperResolver.from_uris(
        [str(write_tiny_swinir(tmp_path / "x2.pth"))],
        torch.device("cpu"),
        batch_size=4,
        tile=32,
        precision="fp32",
    )
    image = np.random.default_rng(0).integers(0, 255, (70, 50, 3), dtype=np.uint8)
    (tiled,) = resolver.upscale([image], [2])
    assert tiled.shape == (140, 100, 3) and tiled.dtype == np.uint8
    resolver.tile = 512  # whole-image pass for comparison: tiles agree away from their seams
    (whole,) = resolver.upscale([image], [2])
    assert np.abs(tiled.astype(int) - whole.astype(int)).mean() < 40


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> Path:
    return make_demo_dataset(tmp_path_factory.mktemp("quality"), train_size=120, test_size=40)


def test_quality_enhances_flagged_training_images_and_keeps_labels(demo, tmp_path):
    x2 = write_tiny_swinir(tmp_path / "swinir_x2.pth", 2)
    x4 = write_tiny_swinir(tmp_path / "swinir_x4.pth", 4)
    settings = QualitySettings(
        data=demo,
        output=tmp_path / "out",
        workers=2,
        threshold=20.0,
        sr=SuperResolutionSettings(model=[str(x2), str(x4)], batch_size=4),
    )
    result = run_quality(settings, progress=False)
    before = read_manifest(demo).manifest.set_index("id")
    after = read_manifest(tmp_path / "out").manifest.set_index("id")
    assert list(after.index) == list(before.index)
    assert (after["label"] == before["label"]).all() and (after["split"] == before["split"]).all()

    enhanced = after[after["q_action"] == "enhanced"]
    assert len(enhanced) == (after["q_flag"] != "").sum() > 0
    assert set(enhanced["split"]) == {"train"} and set(enhanced["origin"]) == {"enhanced"}
    assert (enhanced["original_path"] == before.loc[enhanced.index, "path"]).all()
    for row in enhanced.itertuples():
        image = cv2.imread(str(tmp_path / "out" / row.path))
        assert image.shape[:2] == (100, 100)  # the working size (median of the training images)
        assert (tmp_path / "out" / row.original_path).is_file()  # the original is kept
    tiny = before[(before["split"] == "train") & (before["width"] < 40)].index
    assert set(tiny) <= set(enhanced.index)  # tiny images always go through super-resolution
    test_rows = after[after["split"] == "test"]
    assert (test_rows["q_action"] == "kept").all() and (test_rows["origin"] == "real").all()
    assert (test_rows["path"] == before.loc[test_rows.index, "path"]).all()
    assert (tmp_path / "out" / "quality_before_after.png").is_file()
    text = (tmp_path / "out" / "quality_report.md").read_text()
    assert "super-resolution with" in text and result.working_size == (100, 100)


def test_quality_without_sr_says_so_and_reports_unreadable_images(demo, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(demo, broken)
    victim = read_manifest(broken).split("train")["path"].iloc[0]
    (broken / victim).write_bytes(b"garbage")
    result = run_quality(QualitySettings(data=broken, output=tmp_path / "out", workers=1), progress=False)
    assert [Path(p).name for p, _ in result.problems] == [Path(victim).name]
    manifest = read_manifest(tmp_path / "out").manifest
    assert manifest.loc[manifest["path"] == victim, "q_action"].item() == "unreadable"
    flagged = manifest[manifest["q_flag"] != ""]
    assert len(flagged) > 0 and (flagged["q_action"] == "flagged, not enhanced (sr.model: none)").all()
    assert (manifest["origin"] == "real").all()
    text = (tmp_path / "out" / "quality_report.md").read_text()
    assert "super-resolution skipped" in text and "unreadable: 1" in text


def test_missing_weights_file_fails_before_any_work(demo, tmp_path):
    settings = QualitySettings(
        data=demo, output=tmp_path / "out", sr=SuperResolutionSettings(model=str(tmp_path / "absent.pth"))
    )
    with pytest.raises(FersynthError, match="absent.pth: weights file not found"):
        run_quality(settings, progress=False)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_fer2013_near_blank_frames_score_lowest(fer2013_dataset, tmp_path):
    manifest = read_manifest(fer2013_dataset).manifest
    train = manifest[manifest["split"] == "train"]
    stds = {
        row.id: cv2.imread(str(fer2013_dataset / row.path), cv2.IMREAD_GRAYSCALE).std()
        for row in train.itertuples()
    }
    blank = {i for i, s in stds.items() if s < 2}
    assert len(blank) == 12
    result = run_quality(QualitySettings(data=fer2013_dataset, output=tmp_path / "q"), progress=False)
    scored = result.manifest[result.manifest["split"] == "train"].sort_values("q_score")
    ranks = {i: int(np.flatnonzero(scored["id"].to_numpy() == i)[0]) for i in blank}
    # The 11 exactly constant frames score lowest of all; the 12th (grey 127-130 with JPEG noise)
    # lands among the ~150 non-face rows that also crowd the bottom of the ranking.
    assert sum(r < 15 for r in ranks.values()) >= 11, ranks
    assert max(ranks.values()) < 150, ranks
    assert set(scored.loc[scored["id"].isin(blank), "q_flag"]) == {"low_score"}
