from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from PIL import Image

from fersynth.dataset import read_manifest
from fersynth.errors import FersynthError
from fersynth.generate import RECORDS, run_generate, run_merge, select_seeds, shard_seeds
from fersynth.generate.components import build_random, load_components
from fersynth.generate.gif import gif_score, guided_latents, perturb
from fersynth.generate.prior import run_train_prior
from fersynth.settings import GenerateSettings, PriorSettings
from fersynth.train.loop import run_train
from helpers import make_demo_dataset, tiny_train_settings


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A demo dataset, a tiny FER guide model and a tiny trained prior."""
    root = tmp_path_factory.mktemp("generate")
    data = make_demo_dataset(root, train_size=70, test_size=21)
    guide = tiny_train_settings(data, root / "guide", steps=3, warmup_steps=1, log_every=100, lr=5e-4)
    run_train(guide, progress=False)
    run_train_prior(
        PriorSettings(
            data=data,
            output=root / "prior",
            image_size=32,
            channels=[8, 16],
            steps=5,
            batch_size=8,
            workers=0,
        ),
        progress=False,
    )
    return root, data


def settings(world, output: Path, **changes) -> GenerateSettings:
    root, data = world
    values = dict(
        data=data,
        output=output,
        backend="gif-prior",
        k=3,
        guide_model=str(root / "guide"),
        prior=root / "prior",
        classes=["fear", "disgust"],
        device="cpu",
    )
    values.update(changes)
    return GenerateSettings(**values)


def test_prior_reports_reconstruction_error(world):
    root, _ = world
    info = json.loads((root / "prior" / "prior.json").read_text())
    assert 0 < info["reconstruction_mae_grey_levels"] < 255 and info["scaling_factor"] > 0
    assert (root / "prior" / "reconstructions.png").is_file()


def test_prior_is_reproducible_and_trains_from_disk_when_too_big_for_memory(world, tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    import fersynth.train.data

    _, data = world
    tiny = dict(data=data, image_size=32, channels=[8, 16], steps=3, batch_size=8, workers=0)
    weights = []
    for name in ("a", "b"):  # decoded once into memory (the demo's case), same seed twice
        run_train_prior(PriorSettings(output=tmp_path / name, **tiny), progress=False)
        vae = AutoencoderKL.from_pretrained(tmp_path / name / "vae", local_files_only=True)
        weights.append(vae.decoder.conv_out.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    monkeypatch.setattr(fersynth.train.data, "IN_MEMORY_LIMIT", 0)  # streams through workers
    run_train_prior(PriorSettings(output=tmp_path / "streamed", **tiny), progress=False)
    info = json.loads((tmp_path / "streamed" / "prior.json").read_text())
    assert 0 < info["reconstruction_mae_grey_levels"] < 255


def test_gif_step_stays_in_the_eps_ball_and_raises_the_score():
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Sigmoid()
    )
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16))
    classifier = torch.nn.Linear(16, 7)

    def guide(images):
        features = head(images)
        return classifier(features), features

    latents = torch.randn(6, 4, 8, 8)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    seed_probs = torch.softmax(torch.randn(2, 7), dim=1)[groups]
    generators = [torch.Generator().manual_seed(i) for i in range(6)]
    final, before, stepped = guided_latents(
        latents, decoder, guide, seed_probs, groups, generators, step_size=1e-3, eps=0.1
    )
    assert (final - latents).abs().max() <= 0.1 + 1e-6
    with torch.no_grad():
        after = gif_score(*guide(decoder(stepped)), seed_probs, groups)
    assert after > before
    # The large default step still respects the ball.
    final, _, _ = guided_latents(
        latents,
        decoder,
        guide,
        seed_probs,
        groups,
        [torch.Generator().manual_seed(i) for i in range(6)],
        step_size=0.1,
        eps=0.05,
    )
    assert (final - latents).abs().max() <= 0.05 + 1e-6
    assert torch.equal(perturb(latents, torch.zeros(6, 4, 1, 1), torch.zeros(6, 4, 1, 1)), latents)


def test_k_outputs_per_seed_only_from_training_images(world, tmp_path):
    config = settings(world, tmp_path / "gen")
    result = run_generate(config, progress=False)
    seeds = select_seeds(config, 2048)
    assert set(seeds["split"]) == {"train"} and set(seeds["label"]) == {"fear", "disgust"}
    assert result.written == 3 * len(seeds)
    for record_file in (result.folder / RECORDS).glob("*.json"):
        records = json.loads(record_file.read_text())
        assert [r["k"] for r in records] == [0, 1, 2]
        assert all(r["seed_id"] == record_file.stem for r in records)
    merged = run_merge(config, num_shards=1, progress=False)
    manifest = read_manifest(merged.output).manifest
    assert len(manifest) == 3 * len(seeds) and set(manifest["origin"]) == {"synthetic"}
    assert set(manifest["seed_id"]) == set(seeds["id"])
    labels = seeds.set_index("id")["label"]
    assert (manifest["label"] == labels.loc[manifest["seed_id"]].to_numpy()).all()
    assert (merged.output / "samples_fear.png").is_file()
    assert_seed_sizes(manifest, merged.output, config.data)


def assert_seed_sizes(synthetic: pd.DataFrame, folder: Path, seeds: Path) -> None:
    """Every generated image is stored at its seed image's size, and the manifest says so."""
    seed_rows = read_manifest(seeds).manifest.set_index("id")
    for row in synthetic.itertuples():
        stored = np.asarray(Image.open(folder / row.path))
        seed = np.asarray(Image.open(seeds / seed_rows.at[row.seed_id, "path"]))
        assert stored.shape[:2] == seed.shape[:2] == (int(row.height), int(row.width)), row.id


def test_exact_regeneration_from_the_recorded_seed(world, tmp_path):
    first = run_generate(settings(world, tmp_path / "a"), progress=False)
    seed_id = sorted(p.stem for p in (first.folder / RECORDS).glob("*.json"))[1]
    again = run_generate(settings(world, tmp_path / "b"), only=[seed_id], progress=False)
    assert again.written == 3
    for k in range(3):
        name = f"images/{seed_id}_k{k}.png"
        assert (again.folder / name).read_bytes() == (first.folder / name).read_bytes()


def _cli(output: Path, world, shard: int, num_shards: int) -> list[str]:
    root, data = world
    overrides = {
        "generate.data": str(data),
        "generate.output": str(output),
        "generate.k": "3",
        "generate.guide_model": str(root / "guide"),
        "generate.prior": str(root / "prior"),
        "generate.device": "cpu",
        "generate.classes": "[fear, disgust, angry]",
    }
    args = [sys.executable, "-m", "fersynth.cli"]
    for key, value in overrides.items():
        args += ["-S", f"{key}={value}"]
    return [*args, "generate", "--shard", str(shard), "--num-shards", str(num_shards), "--quiet"]


def test_killed_shard_resumes_to_exactly_the_uninterrupted_set(world, tmp_path):
    straight, killed = tmp_path / "straight", tmp_path / "killed"
    for shard in (0, 1):
        subprocess.run(_cli(straight, world, shard, 2), check=True, capture_output=True, timeout=600)
    process = subprocess.Popen(
        _cli(killed, world, 0, 2), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
    )
    records = killed / "shards" / "shard-000-of-002" / RECORDS
    deadline = time.monotonic() + 300
    while not (records.is_dir() and any(records.glob("*.json"))) and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    done = len(list(records.glob("*.json")))
    expected = len(list((straight / "shards" / "shard-000-of-002" / RECORDS).glob("*.json")))
    assert 0 < done < expected, "the shard must be killed part-way for this test to mean anything"
    subprocess.run(_cli(killed, world, 0, 2), check=True, capture_output=True, timeout=600)
    subprocess.run(_cli(killed, world, 1, 2), check=True, capture_output=True, timeout=600)

    def files(root: Path) -> dict[str, bytes]:
        return {
            p.relative_to(root).as_posix(): p.read_bytes() for p in sorted((root / "shards").rglob("*.png"))
        }

    assert files(killed) == files(straight)
    config = settings(world, killed, classes=["fear", "disgust", "angry"])
    merged = run_merge(config, num_shards=2, progress=False)
    manifest = pd.read_csv(merged.output / "manifest.csv")
    assert manifest["id"].is_unique and len(manifest) == 3 * len(select_seeds(config, 2048))


def test_merge_refuses_missing_shards(world, tmp_path):
    config = settings(world, tmp_path / "gen")
    run_generate(config, shard=0, num_shards=2, progress=False)
    with pytest.raises(FersynthError, match="shard-001-of-002: .* seeds not generated"):
        run_merge(config, num_shards=2, progress=False)
    assert len(shard_seeds(select_seeds(config, 2048), 1, 2)) > 0


def test_tiny_stable_diffusion_round_trip_and_gif_sd(world, tmp_path):
    components = build_random(sample_size=64)
    assert len(components.tokenizer) > 2
    folder = components.save(tmp_path / "sd")
    loaded = load_components(str(folder))
    assert len(loaded.tokenizer) == len(components.tokenizer)
    for a, b in zip(components.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    config = settings(
        world,
        tmp_path / "gen",
        backend="gif-sd",
        sd_model=str(folder),
        image_size=64,
        steps=10,
        strength=0.2,
        k=2,
        max_seeds_per_class=1,
    )
    result = run_generate(config, progress=False)
    assert result.written == 2 * 2
    merged = run_merge(config, num_shards=1, progress=False)
    synthetic = read_manifest(merged.output).manifest
    assert len(synthetic) == 4 and 64 not in set(synthetic["width"].astype(int))  # not the working size
    assert_seed_sizes(synthetic, merged.output, config.data)
    records = json.loads(next((result.folder / RECORDS).glob("*.json")).read_text())
    assert records[0]["backend"] == "gif-sd" and records[0]["strength"] == 0.2
    assert "face" in records[0]["prompt"]


def test_stable_diffusion_folder_errors(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(FersynthError, match="missing vae, text_encoder"):
        load_components(str(tmp_path / "sd"))
