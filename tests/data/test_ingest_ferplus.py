from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from fersynth.classes import FERPLUS_VOTE_COLUMNS
from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.ingest import run_ingest
from fersynth.ingest.ferplus import majority
from fersynth.settings import FerPlusSettings, IngestSettings
from helpers import face_like


def votes(**counts: int) -> list[int]:
    return [counts.get(name, 0) for name in FERPLUS_VOTE_COLUMNS]


@pytest.mark.parametrize(
    ("row", "expected"),
    [
        (votes(happiness=10), "happiness"),
        (votes(happiness=6, surprise=4), "happiness"),
        (votes(happiness=5, surprise=5), "unknown"),  # no majority
        (votes(happiness=4, surprise=3, neutral=3), "unknown"),  # 4 of 10 is not > half
        # single votes are outliers: 4 of (4 + 3) remaining votes is a majority
        (votes(happiness=4, surprise=3, neutral=1, fear=1, anger=1), "happiness"),
        (votes(contempt=8, neutral=2), "contempt"),
        (votes(NF=10), "NF"),
        (votes(neutral=1, happiness=1), "unknown"),  # nothing left after outlier removal
    ],
)
def test_majority_rule_matches_microsoft(row, expected):
    assert majority([float(v) for v in row]) == expected


def make_ferplus(folder: Path, extra_label_row: bool = False) -> tuple[Path, Path]:
    pixels = [" ".join(str(v) for v in face_like(i, 48, color=False).ravel()) for i in range(6)]
    fer = pd.DataFrame(
        {
            "emotion": [0] * 6,
            "pixels": pixels,
            "Usage": ["Training"] * 4 + ["PublicTest", "PrivateTest"],
        }
    )
    labels = [
        ("Training", "fer0000000.png", votes(happiness=9, neutral=1)),
        ("Training", "fer0000001.png", votes(surprise=5, fear=5)),
        ("Training", "", votes(neutral=10)),  # removed by FER+
        ("Training", "fer0000003.png", votes(contempt=7, anger=3)),
        ("PublicTest", "fer0000004.png", votes(NF=10)),
        ("PrivateTest", "fer0000005.png", votes(anger=8, disgust=2)),
    ]
    if extra_label_row:
        labels.append(("Training", "fer0000006.png", votes(neutral=10)))
    table = pd.DataFrame(
        [[usage, name, *row] for usage, name, row in labels],
        columns=["Usage", "Image name", *FERPLUS_VOTE_COLUMNS],
    )
    fer.to_csv(folder / "fer2013.csv", index=False)
    table.to_csv(folder / "fer2013new.csv", index=False)
    return folder / "fer2013.csv", folder / "fer2013new.csv"


def test_ferplus_joins_votes_with_pixels(tmp_path):
    pixels, labels = make_ferplus(tmp_path)
    out = tmp_path / "dataset"
    settings = IngestSettings(
        source="ferplus", input=pixels, output=out, ferplus=FerPlusSettings(labels_csv=labels)
    )
    report = run_ingest(settings, progress=False)
    assert report.inputs == 6 and report.accounted
    rows = read_manifest(out).manifest.set_index("id")
    assert rows["label"].to_dict() == {"ferplus_00000": "happy", "ferplus_00005": "angry"}
    assert rows.loc["ferplus_00005", "split"] == "private_test"
    rejected = pd.read_csv(out / "ingest_rejected.csv", keep_default_na=False)
    reasons = dict(zip(rejected["source_id"], rejected["reason"], strict=True))
    assert reasons["fer2013new.csv row 3 (fer0000001.png)"] == "FER+ majority rule: no majority / unknown"
    assert reasons["fer2013new.csv row 4"] == "no image name: FER+ removed this image"
    assert "contempt" in reasons["fer2013new.csv row 5 (fer0000003.png)"]
    assert reasons["fer2013new.csv row 6 (fer0000004.png)"] == "FER+ majority rule: not a face"
    kinds = dict(zip(rejected["source_id"].str.split(" [(]").str[0], rejected["kind"], strict=True))
    assert [kinds[f"fer2013new.csv row {n}"] for n in (3, 4, 5, 6)] == [
        "no_majority",
        "removed_by_source",
        "excluded_class",
        "not_a_face",
    ]


def test_ferplus_row_count_mismatch_is_an_error(tmp_path):
    pixels, labels = make_ferplus(tmp_path, extra_label_row=True)
    settings = IngestSettings(
        source="ferplus",
        input=pixels,
        output=tmp_path / "out",
        ferplus=FerPlusSettings(labels_csv=labels),
    )
    with pytest.raises(FersynthError, match="fer2013new.csv: has more rows"):
        run_ingest(settings, progress=False)
    assert not (tmp_path / "out").exists()


def test_ferplus_needs_its_labels_file(tmp_path):
    pixels, _ = make_ferplus(tmp_path)
    with pytest.raises(FersynthError, match="ingest.ferplus.labels_csv"):
        run_ingest(IngestSettings(source="ferplus", input=pixels, output=tmp_path / "o"), progress=False)
