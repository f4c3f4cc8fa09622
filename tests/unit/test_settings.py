from __future__ import annotations

import json
from pathlib import Path

import pytest

from fersynth.errors import FersynthError
from fersynth.settings import Settings, load_settings, save_resolved
from helpers import REPO

REPO = REPO


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "params.yaml"
    path.write_text(text)
    return path


def test_params_yaml_is_a_link_to_the_demo_profile():
    # `make run` runs the demo; `make run PARAMS=...` points the link elsewhere.
    assert (REPO / "params.yaml").is_symlink()
    assert load_settings(REPO / "profiles" / "demo.yaml").experiment.name == "demo"


def test_unset_paths_follow_the_experiment_layout():
    settings = load_settings(None, ["experiment.name=other"])
    assert settings.ingest.output == Path("data/other/ingested")
    assert settings.guard.output == Path("data/other/guarded")
    assert settings.train.data == Path("data/other/guarded")
    assert settings.verify.voters == [f"runs/other/voters/voter_{k}" for k in (1, 2, 3)]
    assert settings.generate.guide_model == "runs/other/models/original/original_sl_balanced/seed_2048"
    assert settings.evaluate.output == Path("runs/other/eval/original_sl/seed_2048")
    assert settings.augment.output == Path("data/other/augmented/rho")
    assert settings.evaluate.data == [Path("data/other/test_sets/in_domain")]
    assert settings.report.comparisons == [Path("runs/other/compare/in_domain")]
    # Another experiment's paths never leak into these (defaults are not shared objects).
    assert Settings().ingest.output == Path("data/demo/ingested")
    # A path given explicitly wins over the layout.
    assert load_settings(None, ["train.data=elsewhere"]).train.data == Path("elsewhere")


def test_the_grid_names_what_each_row_beats_and_its_variants():
    settings = Settings()
    grid = settings.experiment.grid
    assert list(grid.rows()) == [
        "original_sl", "original_sl_balanced", "original_mek", "expanded_sl", "synthetic_mek", "expanded_mek"
    ]  # fmt: skip
    assert grid.variants() == ["rho", "synthetic_matched"]
    # Every row on synthetic data is compared with the cheapest competitor too.
    assert all("original_sl_balanced" in row.beats for row in grid.synthetic.values())
    assert ("Expanded_SL", "Original_SL_balanced") in settings.report.changes


def test_a_grid_row_on_new_identities():
    row = "experiment.grid.synthetic.identities_sl={variant: identities, beats: [original_sl_balanced]}"
    settings = load_settings(None, [row, "generate.backend=gif-ldm", "generate.identities.per_class=50"])
    assert settings.experiment.grid.variants() == ["identities"]
    assert ("Identities_SL", "Original_SL_balanced") in settings.report.changes
    assert settings.generate.identities.per_class == 50 and settings.generate.strength == 0.5


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("experiment.grid.synthetic.expanded_sl.beats=[nosuch]", "unknown rows"),
        ("experiment.grid.synthetic.expanded_sl.variant=null", "name the variant"),
        ("verify.voters=[expanded_sl]", "trains on synthetic data"),
        ("experiment.cross_sets={in_domain: {source: rafdb, input: x}}", "in-domain"),
        ("verify.voters=[voter_1, orignal_mek]", "'orignal_mek' is no row of experiment.grid.original"),
        ("verify.voters=[original_sl_balanced, voter_1]", "'original_sl_balanced' is the guide's model"),
        ("experiment.voters.original_sl={seed: 9}", "voters.original_sl: also a row of the grid"),
        ("experiment.voters.voter_4={seed: 1}", "two voters are the same model"),
        ("experiment.grid.seeds=[1, 1]", "give one or more different seeds"),
        ("generate.guide_model=voter_1", "'voter_1' is a voter"),
        (
            # Voters on the whole training split (no cross-fitting) at a grid seed: the guide's model.
            "experiment={voter_folds: 0, voters: {voter_1: {seed: 2048}}}",
            "trains as the guide row 'original_sl_balanced' does",
        ),
        (
            "verify.voters=[runs/demo/models/original/original_sl_balanced/seed_2049/model.pt]",
            "is the guide's model",
        ),
        ("generate.guide_model=orignal_sl", "generate.guide_model: 'orignal_sl' is no row"),
        ("demo.sets.ingested={}", "demo.sets.ingested: data/<experiment>/ingested is a stage's output"),
        ("demo.sets.raw={sed: 3}", "demo.sets.raw: unknown key 'sed'"),
        ("experiment.cross_sets.cross.options={nosuch: 1}", "cross_sets.cross.options: unknown key 'nosuch'"),
        ("experiment.grid.synthetic.expanded_sl.beats=[expanded_sl]", "cannot beat itself"),
        ("experiment.grid.original.original_mek.beats=[original_sl]", "only rows on synthetic data"),
        ("experiment.grid.synthetic.expanded_sl.label=Original_SL", "two rows share the label 'Original_SL'"),
        (
            "experiment.grid.synthetic.identities_sl={variant: identities, beats: [original_sl]}",
            "identities_sl: trains on new identities, but generate.identities.per_class is 0",
        ),
        (
            "experiment.grid.original.original_mek.sampler=balanced",
            "original.original_mek: method mek with sampler balanced: MEK with the balanced sampler "
            "weights minor classes twice",
        ),
        ("experiment.voters.voter_1={method: mek, seed: 1}", "voter_1: method mek with sampler balanced"),
        ("train={method: mek, balanced_sampler: true}", "train: method = 'mek' and balanced_sampler = true"),
    ],
)
def test_an_inconsistent_experiment_is_one_clear_error(override, message):
    with pytest.raises(FersynthError) as info:
        load_settings(REPO / "profiles" / "demo.yaml", [override])
    assert message in str(info.value)
    # One line that names the key (and the override it came from), not a dump of the section.
    assert len(str(info.value)) < 300 + len(override)


def test_an_empty_mapping_override_empties_it_and_a_number_is_text_where_text_is_expected():
    demo = REPO / "profiles" / "demo.yaml"
    assert load_settings(demo).experiment.cross_sets
    assert load_settings(demo, ["experiment.cross_sets={}"]).experiment.cross_sets == {}
    assert load_settings(demo, ["kfp.data_rev=12345678"]).kfp.data_rev == "12345678"  # a commit


def test_thesis_seed_default():
    assert Settings().seed == 2048


def test_bad_value_names_key_value_and_expectation(tmp_path):
    path = write(tmp_path, "ingest:\n  workers: many\n")
    with pytest.raises(FersynthError) as info:
        load_settings(path)
    message = str(info.value)
    assert "ingest.workers" in message and "'many'" in message and "integer" in message
    assert str(path) in message


def test_out_of_range_value_is_refused(tmp_path):
    with pytest.raises(FersynthError, match=r"demo.label_noise = 1.5"):
        load_settings(write(tmp_path, "demo:\n  label_noise: 1.5\n"))


def test_unknown_key_is_refused(tmp_path):
    with pytest.raises(FersynthError, match=r"unknown key 'ingest.wrkers'"):
        load_settings(write(tmp_path, "ingest:\n  wrkers: 2\n"))


def test_unknown_source_lists_choices(tmp_path):
    with pytest.raises(FersynthError, match=r"ingest.source = 'kdef'.*rafdb"):
        load_settings(write(tmp_path, "ingest:\n  source: kdef\n"))


def test_invalid_yaml_and_missing_file(tmp_path):
    with pytest.raises(FersynthError, match="not valid YAML"):
        load_settings(write(tmp_path, "ingest: [unclosed\n"))
    with pytest.raises(FersynthError, match="not found"):
        load_settings(tmp_path / "absent.yaml")
    with pytest.raises(FersynthError, match="mapping"):
        load_settings(write(tmp_path, "- a\n- b\n"))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        # A second section: PyYAML would keep it and drop the first (train.arch, steps) silently.
        (
            "train:\n  arch: resnet18\n  steps: 10\nseed: 3\ntrain:\n  image_size: 48\n",
            "key 'train' written twice: line 1 and line 5",
        ),
        (
            "train:\n  arch: resnet18\n  lr: 0.1\n  lr: 0.01\n",
            "key 'train.lr' written twice: line 3 and line 4",
        ),
        (
            "experiment:\n  grid:\n    original:\n      a: {method: sl}\n      a: {method: mek}\n",
            "key 'experiment.grid.original.a' written twice: line 4 and line 5",
        ),
        ("seed: 1\nseed: 2\n", "key 'seed' written twice: line 1 and line 2"),
    ],
)
def test_a_key_written_twice_is_refused_with_the_file_key_and_both_lines(tmp_path, text, message):
    path = write(tmp_path, text)
    with pytest.raises(FersynthError) as refused:
        load_settings(path)
    assert str(refused.value).startswith(f"{path}: {message}")


def test_a_key_written_twice_in_an_override_is_refused_and_every_profile_is_clean():
    with pytest.raises(FersynthError, match="key 'train.steps' written twice"):
        load_settings(None, ["train={steps: 1, steps: 2}"])
    for profile in sorted((REPO / "profiles").glob("*.yaml")):
        load_settings(profile)  # the shipped profiles have no repeated key (and are valid)


def test_overrides_are_typed_and_validated(tmp_path):
    settings = load_settings(write(tmp_path, "seed: 1\n"), ["ingest.workers=3", "demo.seed=7"])
    assert settings.seed == 1
    assert settings.ingest.workers == 3 and settings.demo.seed == 7
    with pytest.raises(FersynthError, match="KEY=VALUE"):
        load_settings(None, ["ingest.workers"])
    with pytest.raises(FersynthError, match="ingest.workers = -1"):
        load_settings(None, ["ingest.workers=-1"])


def test_save_resolved_writes_every_default(tmp_path):
    settings = load_settings(None, ["ingest.workers=2"])
    path = save_resolved({"seed": settings.seed, "ingest": settings.ingest}, tmp_path)
    saved = json.loads(path.read_text())
    assert saved["seed"] == 2048
    assert saved["ingest"]["workers"] == 2
    assert saved["ingest"]["affectnet"]["test_per_class"] == 500
    assert saved["ingest"]["fer2013"]["split_map"]["PublicTest"] == "test"


@pytest.mark.parametrize(
    ("yaml_text", "expected"),
    [
        ("train:\n  batch_size: true\n", "train.batch_size = True: expected an integer, not true/false"),
        ("train:\n  lr: false\n", "train.lr = False: expected a number, not true/false"),
        ("seed: true\n", "seed = True: expected an integer, not true/false"),
        ("train:\n  in_chans: true\n", "train.in_chans = True: expected an integer"),  # Literal[1, 3]
        ("train:\n  grad_clip: true\n", "train.grad_clip = True: expected a number"),  # optional
        (
            "train:\n  mek:\n    lr_scale_batch: true\n",
            "train.mek.lr_scale_batch = True: expected an integer",
        ),
        ("train:\n  mean: [0.5, true, 0.4]\n", "train.mean: [1] = True: expected a number"),  # a tuple
        ("quality:\n  weights: {sharpness: true}\n", "quality.weights: sharpness = True: expected a number"),
        (
            "experiment:\n  grid:\n    seeds: [1, false]\n",
            "experiment.grid.seeds: [1] = False: expected an integer",
        ),
        ("demo:\n  sets:\n    raw: {seed: true}\n", "demo.sets.raw: seed = True: expected an integer"),
    ],
    ids=lambda value: value.partition(" ")[0] if " = " in value else "params",
)
def test_a_boolean_is_refused_where_a_number_is_expected(tmp_path, yaml_text, expected):
    # Lax validation would read true as 1: `batch_size: true` would train at batch size 1.
    path = write(tmp_path, yaml_text)
    with pytest.raises(FersynthError) as info:
        load_settings(path)
    assert str(info.value).startswith(f"{path}: {expected}")


def test_a_boolean_is_still_a_boolean_where_one_is_expected(tmp_path):
    settings = load_settings(write(tmp_path, "train:\n  hflip: false\ndemo:\n  sets:\n    raw: {}\n"))
    assert settings.train.hflip is False
    assert load_settings(None, ["evaluate.tta_flip=false"]).evaluate.tta_flip is False


def test_an_error_in_an_override_names_the_override_and_one_in_the_file_the_file(tmp_path):
    path = write(tmp_path, "train:\n  steps: 0\n  lr: 0.001\n")
    with pytest.raises(FersynthError) as info:
        load_settings(path, ["train.batch_size=abc", "demo.seed=3"])
    problems = str(info.value).split("; ")
    assert problems[0] == f"{path}: train.steps = 0: Input should be greater than or equal to 1"
    assert problems[1].startswith("override train.batch_size=abc: train.batch_size = 'abc': Input should be")
    assert len(problems) == 2
    # A section set by an override (a parent of the key), and a check of the section above it.
    with pytest.raises(FersynthError, match=r"^override train=\{batch_size: 0\}: train.batch_size = 0"):
        load_settings(write(tmp_path, "train:\n  lr: 0.001\n"), ["train={batch_size: 0}"])
    with pytest.raises(
        FersynthError, match=r"^override experiment.grid.seeds=\[1, 1\]: experiment.grid: seeds"
    ):
        load_settings(None, ["experiment.grid.seeds=[1, 1]"])
    with pytest.raises(FersynthError, match=r"^override ingest.wrkers=2: unknown key 'ingest.wrkers'$"):
        load_settings(None, ["ingest.wrkers=2"])
    with pytest.raises(
        FersynthError, match=r"^override verify.voters=\[orignal_mek\]: verify.voters: 'orignal_mek'"
    ):
        load_settings(None, ["verify.voters=[orignal_mek]"])


def test_the_command_line_names_a_bad_override(tmp_path, capsys):
    from fersynth.cli import main

    path = write(tmp_path, "train:\n  lr: 0.001\n")
    assert main(["--params", str(path), "-S", "train.batch_size=true", "params"]) == 2
    error = capsys.readouterr().err
    assert error == (
        "fersynth: error: override train.batch_size=true: train.batch_size = True: "
        "expected an integer, not true/false\n"
    )
