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
from fersynth.generate import IMAGES, RECORDS, run_generate, run_merge, select_seeds, shard_seeds
from fersynth.generate.backends import augment_seed
from fersynth.generate.components import build_random, build_random_clip, load_components
from fersynth.generate.gif import clipped_fraction, gif_score, group_divergence, guided_latents, perturb
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
            diffusion={"steps": 6, "channels": [8, 16], "batch_size": 8},
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
    tiny = dict(
        data=data,
        image_size=32,
        channels=[8, 16],
        steps=3,
        batch_size=8,
        workers=0,
        diffusion={"steps": 0},  # the autoencoder alone (gif-prior's whole prior)
    )
    weights = []
    for name in ("a", "b"):  # decoded once into memory (the demo's case), same seed twice
        run_train_prior(PriorSettings(output=tmp_path / name, **tiny), progress=False)
        vae = AutoencoderKL.from_pretrained(tmp_path / name / "vae", local_files_only=True)
        weights.append(vae.decoder.conv_out.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not (tmp_path / "a" / "unet").exists()
    monkeypatch.setattr(fersynth.train.data, "IN_MEMORY_LIMIT", 0)  # streams through workers
    run_train_prior(PriorSettings(output=tmp_path / "streamed", **tiny), progress=False)
    info = json.loads((tmp_path / "streamed" / "prior.json").read_text())
    assert 0 < info["reconstruction_mae_grey_levels"] < 255
    with pytest.raises(FersynthError, match=r"no latent diffusion model .*prior.diffusion.steps > 0"):
        run_generate(
            settings(world, tmp_path / "ldm", backend="gif-ldm", prior=tmp_path / "a"), progress=False
        )


def toy_decoder_and_guide():
    """A 4-channel latent's toy decoder (x4 upsampling to RGB in [0, 1]) and a toy guide
    (images -> logits over 7 classes, 16 features), seeded."""
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(
        torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 3, padding=1), torch.nn.Sigmoid()
    )
    head = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(4), torch.nn.Flatten(), torch.nn.Linear(48, 16))
    classifier = torch.nn.Linear(16, 7)

    def guide(images):
        features = head(images)
        return classifier(features), features

    return decoder, guide


def test_gif_step_stays_in_the_eps_ball_and_raises_the_score():
    """`scores` is S at the perturbed latent s' before the step; the step ascends the batch's S
    (first order, a small step), and the projection is the closest point of the eps-ball.

    S on decode(projected) is above S before the step where the ball clips nothing (then the
    projected latent is the stepped one). Where it clips, the projection moves the latent by
    far more than the step (s' is s * (1 + z) + b, of the latent's own scale) and S there has
    no order to S before the step: what holds then is that the projection is the per-entry
    clamp of the stepped latent, and the step itself does not depend on eps."""
    decoder, guide = toy_decoder_and_guide()

    latents = torch.randn(6, 4, 8, 8)
    groups = torch.tensor([0, 0, 0, 1, 1, 1])
    classes = torch.tensor([1, 1, 1, 2, 2, 2])  # each seed's label: fear, disgust
    seed_probs = torch.softmax(torch.randn(2, 7), dim=1)[groups]

    def step(eps: float, step_size: float = 1e-3):
        generators = [torch.Generator().manual_seed(i) for i in range(6)]
        return guided_latents(
            latents,
            decoder,
            guide,
            seed_probs,
            groups,
            generators,
            step_size=step_size,
            eps=eps,
            classes=classes,
        )

    def score(points: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return gif_score(*guide(decoder(points)), seed_probs, groups, classes)

    # A ball that clips nothing: the written (projected) latent is the stepped one, S rose.
    wide, before, stepped, clipped = step(eps=1e3)
    assert before.shape == (6,) and float(clipped.max()) == 0.0
    assert torch.equal(wide, stepped) and (wide - latents).abs().max() <= 1e3
    assert score(wide) > before.mean()
    # The same step (it does not depend on eps) clipped by a small ball: the closest point of
    # the ball to the stepped latent, entry by entry, and the share of clipped entries reported.
    final, before_small, stepped_small, clipped = step(eps=0.1)
    assert torch.equal(stepped_small, stepped) and torch.equal(before_small, before)
    assert (final - latents).abs().max() <= 0.1 + 1e-6
    overshoot = ((stepped - latents).abs() - 0.1).clamp_min(0)
    assert torch.allclose((final - stepped).abs(), overshoot, atol=1e-6)
    assert clipped.shape == (6,) and torch.allclose(
        clipped, ((stepped - latents).abs() > 0.1).flatten(1).float().mean(1)
    )
    assert float(clipped.min()) > 0  # s' is far outside a 0.1 ball: the projection acts
    # The large default step still respects the ball.
    final, _, _, _ = step(eps=0.05, step_size=0.1)
    assert (final - latents).abs().max() <= 0.05 + 1e-6
    assert torch.equal(perturb(latents, torch.zeros(6, 4, 1, 1), torch.zeros(6, 4, 1, 1)), latents)


def test_gif_step_raises_the_probability_of_a_minor_class_seeds_own_label():
    """A disgust seed that the guide takes for happy (the minor-class case: a guide trained on a
    long tail is wrong on exactly these): the class term rewards disgust, the seed's label, so
    the projected latent decodes to an image with more disgust than the seed's own decoding.
    With the official code's rule (the guide's prediction on the seed) the same step lowers it.

    The guide is linear in the mean colour and separates disgust from happy only (the other
    classes have logits of -10), the decoder linear (a 1 x 1 convolution, upsampled): S_inf's
    gradient then points one way, towards disgust while p(disgust) < 0.73 (the gain of
    p(disgust) outweighs the entropy's loss). The step (5) is larger than the random
    perturbation s * z + b, so that its sign, not the draw, decides where each entry of the
    projected latent lands: on the ball's edge, eps from s (with the default 0.1 the draw
    mostly decides; see `clipped_fraction`)."""
    from fersynth.classes import CLASS_INDEX
    from fersynth.generate.backends import Batch, rewarded_classes

    disgust, happy = CLASS_INDEX["disgust"], CLASS_INDEX["happy"]
    torch.manual_seed(0)
    decoder = torch.nn.Sequential(torch.nn.Upsample(scale_factor=4), torch.nn.Conv2d(4, 3, 1))
    with torch.no_grad():
        decoder[1].weight.copy_(torch.randn(3, 4, 1, 1) * 0.03)
        decoder[1].bias.fill_(0.5)
    fer = torch.nn.Sequential(torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(3, 7))
    with torch.no_grad():
        fer[2].weight.zero_()
        fer[2].weight[disgust] = torch.tensor([1.0, -0.5, 0.8])
        fer[2].weight[happy] = -fer[2].weight[disgust]
        fer[2].bias.fill_(-10.0)
        fer[2].bias[disgust], fer[2].bias[happy] = 0.0, 1.7  # p(disgust) about 0.4 on the seeds

    def guide(images):
        return fer(images), images.mean(dim=(2, 3))

    def p_disgust(latents: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            return guide(decoder(latents))[0].softmax(dim=1)[:, disgust]

    count = 4
    latents = 0.2 + 0.8 * torch.rand(count, 4, 2, 2)  # four disgust seeds, one output each
    seeds = decoder(latents).detach()  # the seed images, as the guide sees them
    seed_probabilities = guide(seeds)[0].softmax(dim=1)
    assert (seed_probabilities.argmax(dim=1) == happy).all()  # the guide is wrong on every seed
    assert (seed_probabilities[:, disgust] > 0.3).all() and (seed_probabilities[:, disgust] < 0.5).all()
    groups = torch.arange(count)  # K = 1: no S_div, the class term's direction alone
    batch = Batch([np.zeros((8, 8, 3), np.uint8)] * count, ["disgust"] * count, list(range(count)), [], [])
    classes = rewarded_classes(batch)
    assert classes.tolist() == [disgust] * count  # the label, not the prediction (happy)

    def projected(rewarded: torch.Tensor) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(100 + i) for i in range(count)]
        step = guided_latents(
            latents, decoder, guide, seed_probabilities, groups, generators, 5.0, 1.0, classes=rewarded
        )
        assert torch.allclose((step.latents - latents).abs(), torch.ones_like(latents))  # on the edge
        return step.latents

    before = p_disgust(latents)
    towards_label = p_disgust(projected(classes))
    assert (towards_label > before + 0.01).all(), (before, towards_label)
    towards_prediction = p_disgust(projected(seed_probabilities.argmax(dim=1)))  # the official rule
    assert (towards_prediction < before - 0.01).all(), (before, towards_prediction)


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
        "generate.sizing": "fixed",  # every seed image x K, as `settings` (no grid to size for)
        "generate.copy_twins": "false",
    }
    args = [sys.executable, "-m", "fersynth.cli"]
    for key, value in overrides.items():
        args += ["-S", f"{key}={value}"]
    return [*args, "generate", "--shard", str(shard), "--num-shards", str(num_shards), "--quiet"]


@pytest.mark.slow  # kills a real generation process and resumes it: about 40 s
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

    def files(root: Path) -> dict[str, bytes]:  # the images and their records
        return {
            p.relative_to(root).as_posix(): p.read_bytes()
            for p in sorted((root / "shards").rglob("*"))
            if p.suffix in (".png", ".json") and p.name != "settings.json"
        }

    assert files(killed) == files(straight)
    config = settings(world, killed, classes=["fear", "disgust", "angry"])
    merged = run_merge(config, num_shards=2, progress=False)
    manifest = pd.read_csv(merged.output / "manifest.csv")
    assert manifest["id"].is_unique and len(manifest) == 3 * len(select_seeds(config, 2048))


def test_merge_refuses_missing_shards(world, tmp_path):
    config = settings(world, tmp_path / "gen")
    run_generate(config, shard=0, num_shards=2, progress=False)
    with pytest.raises(FersynthError, match="shard-001-of-002: .* jobs not generated"):
        run_merge(config, num_shards=2, progress=False)
    assert len(shard_seeds(select_seeds(config, 2048), 1, 2)) > 0


def sd_settings(world, output: Path, sd_folder: Path, **changes) -> GenerateSettings:
    """gif-sd on a tiny Stable Diffusion folder at 64 px."""
    return settings(world, output, backend="gif-sd", sd_model=str(sd_folder), image_size=64, **changes)


def calls_of(owner, name: str) -> list[tuple[tuple, dict]]:
    """Wraps the real method `owner.name` (it still runs) so that each call's arguments are
    recorded; functools.wraps keeps its signature for the callers that inspect it."""
    import functools

    method = getattr(owner, name)
    calls: list[tuple[tuple, dict]] = []

    @functools.wraps(method)
    def recorded(*args, **kwargs):
        calls.append((args, kwargs))
        return method(*args, **kwargs)

    setattr(owner, name, recorded)
    return calls


def rewarded_per_call(monkeypatch) -> list[list[int]]:
    """The classes S_inf rewards in each guided step that a backend runs (gif-prior, gif-ldm and
    gif-sd call it from backends.py, gif-unclip from unclip.py); the step itself runs as is."""
    import fersynth.generate.backends
    import fersynth.generate.unclip

    rewarded: list[list[int]] = []

    def step(*args, classes, **kwargs):
        rewarded.append(classes.tolist())
        return guided_latents(*args, classes=classes, **kwargs)

    monkeypatch.setattr(fersynth.generate.backends, "guided_latents", step)
    monkeypatch.setattr(fersynth.generate.unclip, "guided_latents", step)
    return rewarded


def test_the_guided_step_seed_by_seed_is_the_whole_batchs_step():
    """An output's S depends on its own seed's K outputs only, and the step's direction is the
    sign of S's gradient: taking the step one seed (or two) at a time, so that the decoder's
    activations of only those outputs are held at once, gives the whole batch's step."""
    decoder, guide = toy_decoder_and_guide()
    passes: list[int] = []

    def decode(latents):
        passes.append(len(latents))
        return decoder(latents)

    latents = torch.randn(9, 4, 8, 8)
    groups = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2])
    classes = torch.tensor([1] * 3 + [2] * 3 + [4] * 3)
    seed_probs = torch.softmax(torch.randn(3, 7), dim=1)[groups]

    def step(chunk):
        generators = [torch.Generator().manual_seed(i) for i in range(9)]
        return guided_latents(
            latents,
            decode,
            guide,
            seed_probs,
            groups,
            generators,
            0.1,
            0.5,
            classes=classes,
            chunk_groups=chunk,
        )

    whole = step(None)
    assert passes == [9]
    for chunk, expected in ((1, [3, 3, 3]), (2, [6, 3])):
        passes.clear()
        chunked = step(chunk)
        assert passes == expected
        assert torch.equal(chunked.latents, whole.latents) and torch.equal(chunked.stepped, whole.stepped)
        assert torch.allclose(chunked.scores, whole.scores, atol=1e-6)
        assert torch.equal(chunked.clipped, whole.clipped)
    with pytest.raises(ValueError, match="chunk_groups"):
        step(0)


def test_tiny_stable_diffusion_round_trip_and_gif_sd(world, tmp_path, monkeypatch):
    from fersynth.generate import build_backend
    from fersynth.generate.backends import Batch, to_uint8
    from helpers import face_like

    components = build_random(sample_size=64)
    assert len(components.tokenizer) > 2
    folder = components.save(tmp_path / "sd")
    loaded = load_components(str(folder))
    assert len(loaded.tokenizer) == len(components.tokenizer)
    for a, b in zip(components.unet.state_dict().values(), loaded.unet.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    config = sd_settings(world, tmp_path / "gen", folder, steps=10, strength=0.2, k=2, max_seeds_per_class=1)
    backend, size = build_backend(config, torch.device("cpu"))
    unet_calls = calls_of(backend.pipe.unet, "forward")
    scheduler_steps = calls_of(backend.pipe.scheduler, "step")
    rewarded = rewarded_per_call(monkeypatch)
    result = run_generate(config, backend=(backend, size), progress=False)
    assert result.written == 2 * 2
    merged = run_merge(config, num_shards=1, progress=False)
    synthetic = read_manifest(merged.output).manifest
    assert len(synthetic) == 4 and 64 not in set(synthetic["width"].astype(int))  # not the working size
    assert_seed_sizes(synthetic, merged.output, config.data)
    records = json.loads(next((result.folder / RECORDS).glob("*.json")).read_text())
    assert records[0]["backend"] == "gif-sd" and records[0]["strength"] == 0.2
    assert "face" in records[0]["prompt"]

    # The job's strength reached the denoising: int(0.2 * 10) = 2 DDIM steps per batch (one seed
    # of K = 2 per batch, two batches), the last two timesteps of a 10-step schedule, each one
    # UNet call on the K noised latents and their unconditional twins (guidance scale 50).
    schedule = type(backend.pipe.scheduler).from_config(backend.pipe.scheduler.config)
    schedule.set_timesteps(10)
    last_two = [int(t) for t in schedule.timesteps[-2:]]
    timesteps = [
        int(kwargs.get("timestep", args[1] if len(args) > 1 else -1)) for args, kwargs in scheduler_steps
    ]
    assert timesteps == last_two * 2
    assert [args[0].shape[0] for args, _ in unet_calls] == [2 * 2] * 4
    assert sorted(rewarded) == [[1, 1], [2, 2]]  # the fear seed's and the disgust seed's own labels

    # One fear seed, K = 2, each run with fresh generators (the same draws): the output is neither
    # the seed view encoded and decoded (the denoising changed the latent) nor the denoised
    # latent decoded (GIF's step moved it, within its eps-ball).
    def batch() -> Batch:
        generators = [torch.Generator().manual_seed(s) for s in (5, 6)]
        return Batch([face_like(3, size)], ["fear"], [0, 0], generators, ["a photo of a fearful face"] * 2)

    with torch.no_grad():
        encoded = backend.encode(batch())
        denoised = backend.latents(batch())
        plain, unguided = to_uint8(backend.decode(encoded)), to_uint8(backend.decode(denoised))
    assert (denoised - encoded).abs().mean() > 0.1 * encoded.abs().mean()
    calls = len(unet_calls)
    generated = backend.generate(batch())
    assert len(unet_calls) - calls == 2 and rewarded[-1] == [1, 1]
    for image, seed_view, denoised_only in zip(generated.images, plain, unguided, strict=True):
        assert np.abs(image.astype(int) - seed_view.astype(int)).mean() > 1.0
        assert not np.array_equal(image, denoised_only)


def test_gif_prior_and_gif_ldm_reward_each_outputs_intended_class(world, tmp_path, monkeypatch):
    """S_inf's class is each output's label: its seed's own for an expansion, the target for an
    edit, whatever the guide predicts on the seed (gif-sd: the round trip above; gif-unclip: its
    tests below)."""
    from fersynth.generate import build_backend
    from fersynth.generate.backends import Batch, to_tensor
    from helpers import face_like

    rewarded = rewarded_per_call(monkeypatch)
    for config in (settings(world, tmp_path / "prior"), ldm_settings(world, tmp_path / "ldm")):
        backend, size = build_backend(config, torch.device("cpu"))
        seeds = [face_like(1, size), face_like(2, size)]
        with torch.no_grad():
            predicted = backend.guide(to_tensor(seeds, torch.device("cpu")))[0].argmax(dim=1)
        assert int(predicted[0]) != 2  # the guide does not take the disgust seed for disgust
        generators = [torch.Generator().manual_seed(i) for i in range(3)]
        batch = Batch(seeds, ["disgust", "fear"], [0, 0, 1], generators, [""] * 3, edits=[False, True])
        assert len(backend.generate(batch).images) == 3
    assert rewarded == [[2, 2, 1]] * 2  # disgust, disgust (the seed's label), fear (the edit's target)


def test_stable_diffusion_folder_errors(tmp_path):
    (tmp_path / "sd" / "unet").mkdir(parents=True)
    with pytest.raises(FersynthError, match="missing vae, text_encoder"):
        load_components(str(tmp_path / "sd"))


def test_s_div_is_kl_of_the_group_mean_from_each_sample_as_the_official_code():
    """GIF's code: KLDivLoss(reduction="batchmean", log_target=True)(log_softmax(f), log_softmax(mean)),
    which is KL(mean || sample); the other direction gives another value."""
    torch.manual_seed(1)
    features = torch.randn(5, 12)
    normalised = torch.nn.functional.normalize(features, dim=1)
    mean = normalised.mean(0, keepdim=True).repeat(5, 1)
    official = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        torch.log_softmax(normalised, dim=1), torch.log_softmax(mean, dim=1)
    )
    ours = group_divergence(features, torch.zeros(5, dtype=torch.long)).mean()  # per sample: (5,)
    assert ours == pytest.approx(float(official), rel=1e-5)
    reverse = torch.nn.KLDivLoss(reduction="batchmean", log_target=True)(
        torch.log_softmax(mean, dim=1), torch.log_softmax(normalised, dim=1)
    )
    assert abs(float(reverse) - float(ours)) > 1e-3 * float(ours)
    # Two groups are two batches of the official code: the mean of their values.
    groups = torch.tensor([0, 0, 0, 1, 1])
    both = group_divergence(features, groups).mean()
    first = group_divergence(features[:3], torch.zeros(3, dtype=torch.long)).mean()
    second = group_divergence(features[3:], torch.zeros(2, dtype=torch.long)).mean()
    assert both == pytest.approx((3 * float(first) + 2 * float(second)) / 5, rel=1e-5)


def test_seed_views_rotate_and_flip_per_output_reproducibly():
    yy, xx = torch.meshgrid(torch.linspace(0.2, 0.9, 32), torch.linspace(0.2, 0.9, 32), indexing="ij")
    seed = torch.stack([xx, yy, xx * yy])  # asymmetric: a flip or a rotation shows
    views = [augment_seed(seed, torch.Generator().manual_seed(k), 15.0, True) for k in range(8)]
    again = [augment_seed(seed, torch.Generator().manual_seed(k), 15.0, True) for k in range(8)]
    assert all(torch.equal(a, b) for a, b in zip(views, again, strict=True))  # from its generator only
    assert all(v.shape == seed.shape for v in views)
    flipped = [torch.corrcoef(torch.stack([v[0].flatten(), seed[0].flatten()]))[0, 1] < 0 for v in views]
    assert 0 < sum(flipped) < 8  # some views are mirrored, some not
    distinct = {tuple(v.flatten()[::97].tolist()) for v in views}
    assert len(distinct) == 8  # each output its own geometry, not only a colour shift
    assert min(float(v.min()) for v in views) >= float(seed.min()) - 1e-4  # reflected: no black corners
    generator = torch.Generator().manual_seed(3)
    assert torch.equal(augment_seed(seed, generator, 0.0, False), seed)
    assert generator.initial_seed() == 3 and torch.rand((), generator=generator) == torch.rand(
        (), generator=_after_two_draws(3)
    )  # two draws whatever the settings: later draws stay where they were


def _after_two_draws(seed: int) -> torch.Generator:
    generator = torch.Generator().manual_seed(seed)
    torch.rand((), generator=generator), torch.rand((), generator=generator)
    return generator


def test_clipped_fraction_counts_entries_outside_the_ball():
    base = torch.zeros(1, 1, 2, 2)
    stepped = torch.tensor([[[[0.05, -0.3], [0.2, 1.0]]]])
    assert clipped_fraction(stepped, base, 0.1) == 0.75
    assert clipped_fraction(stepped, base, 0.5) == 0.25
    assert clipped_fraction(stepped, base, 2.0) == 0.0


def test_clip_guide_on_tiny_clip_through_generate(world, tmp_path):
    """The CLIP guide (GIF's own) loads a saved CLIP folder and scores through the real path;
    transformers 5 returns output objects from get_text_features / get_image_features."""
    from fersynth.generate.guide import ClipGuide

    folder = build_random_clip(tmp_path / "clip", image_size=32)
    guide = ClipGuide(str(folder), torch.device("cpu"))
    images = torch.rand(3, 3, 40, 40, requires_grad=True)
    logits, features = guide(images)
    assert logits.shape == (3, 7) and features.shape == (3, 16)
    assert torch.allclose(features.norm(dim=1), torch.ones(3), atol=1e-5)
    logits.sum().backward()
    assert images.grad is not None and images.grad.abs().sum() > 0

    config = settings(
        world, tmp_path / "gen", guide="clip", guide_model=str(folder), max_seeds_per_class=1, k=2
    )
    result = run_generate(config, progress=False)
    assert result.written == 4
    records = [r for f in (result.folder / RECORDS).glob("*.json") for r in json.loads(f.read_text())]
    assert {r["guide"] for r in records} == {"clip"}
    assert all(0.0 <= r["clipped_fraction"] <= 1.0 for r in records)
    assert {r["seed_rotation"] for r in records} == {15.0}


def test_edit_settings_are_checked():
    with pytest.raises(ValueError, match="not edited towards itself"):
        GenerateSettings(edit={"fear": {"sources": ["fear", "happy"]}})
    with pytest.raises(ValueError, match="'joy' is not a class"):
        GenerateSettings(edit={"joy": {}})
    with pytest.raises(ValueError, match="expected one or more of"):
        GenerateSettings(edit={"fear": {"sources": ["happiness"]}})
    assert GenerateSettings(edit={"fear": {}}).edit["fear"].sources == ["neutral", "happy"]


def test_edit_jobs_draw_source_images_for_each_target(world, tmp_path):
    config = settings(
        world,
        tmp_path / "gen",
        classes=["fear"],
        edit={
            "fear": {"sources": ["neutral", "happy"], "max_seeds": 3},
            "disgust": {"sources": ["happy"], "max_seeds": None},
        },
    )
    jobs = select_seeds(config, 2048)
    data = read_manifest(world[1]).manifest
    train = data[data["split"] == "train"]
    expand = jobs[jobs["edit_from"] == ""]
    assert set(expand["label"]) == {"fear"} and (expand["key"] == expand["id"]).all()
    to_fear = jobs[(jobs["target"] == "fear") & (jobs["edit_from"] != "")]
    assert len(to_fear) == 3 and set(to_fear["edit_from"]) <= {"neutral", "happy"}
    assert (to_fear["key"] == to_fear["id"] + "_to_fear").all() and (to_fear["strength"] == 0.6).all()
    to_disgust = jobs[jobs["target"] == "disgust"]
    assert len(to_disgust) == int((train["label"] == "happy").sum())  # max_seeds null: every happy image
    assert jobs["key"].is_monotonic_increasing and jobs["key"].is_unique
    assert select_seeds(config, 2048)["key"].tolist() == jobs["key"].tolist()  # the same on every machine
    assert select_seeds(config.model_copy(update={"classes": []}), 2048)["edit_from"].ne("").all()


def test_gif_score_rewards_the_class_it_is_given_never_the_guides_prediction():
    logits = torch.tensor([[0.0, 0.0, 4.0, 0.0, 0.0, 0.0, 0.0]] * 2)
    features = torch.randn(2, 8)
    seed_probabilities = torch.softmax(torch.tensor([[4.0, 0, 0, 0, 0, 0, 0]] * 2), dim=1)  # predicts 0
    groups = torch.zeros(2, dtype=torch.long)
    surprise = gif_score(logits, features, seed_probabilities, groups, torch.tensor([0, 0]))
    disgust = gif_score(logits, features, seed_probabilities, groups, torch.tensor([2, 2]))
    assert float(disgust - surprise) == pytest.approx(
        float(torch.softmax(logits[0], 0)[2] - torch.softmax(logits[0], 0)[0])
    )
    with pytest.raises(TypeError, match="classes"):  # no default: no fallback to the prediction
        gif_score(logits, features, seed_probabilities, groups)
    with pytest.raises(TypeError, match="classes"):
        guided_latents(torch.zeros(2, 4), lambda x: x, lambda x: (x, x), seed_probabilities, groups, [])
    with pytest.raises(ValueError, match="one intended class per output"):
        gif_score(logits, features, seed_probabilities, groups, torch.tensor([2]))


def test_cross_class_edits_with_the_prior_and_tiny_stable_diffusion(world, tmp_path):
    edit = {"fear": {"sources": ["happy"], "max_seeds": 2, "strength": 0.7}}
    config = settings(world, tmp_path / "prior", classes=[], edit=edit, k=2)
    result = run_generate(config, progress=False)
    assert result.written == 4
    merged = read_manifest(run_merge(config, num_shards=1, progress=False).output).manifest
    assert set(merged["label"]) == {"fear"} and set(merged["gen_edit_from"]) == {"happy"}
    assert merged["id"].str.contains("_to_fear_k").all()
    seeds = read_manifest(world[1]).manifest.set_index("id")
    assert (seeds.loc[merged["seed_id"], "label"] == "happy").all()  # seeded from the source class

    config = sd_settings(
        world,
        tmp_path / "sd_gen",
        build_random(sample_size=64).save(tmp_path / "sd"),
        steps=10,
        strength=0.2,
        k=1,
        classes=["fear"],
        max_seeds_per_class=1,
        edit=edit,
    )
    result = run_generate(config, progress=False)
    records = [r for f in (result.folder / RECORDS).glob("*.json") for r in json.loads(f.read_text())]
    strengths = {r["edit_from"]: r["strength"] for r in records}
    assert strengths == {"": 0.2, "happy": 0.7}  # each job its own strength, batches never mixed
    assert all("fear" in r["prompt"] or "fearful" in r["prompt"] for r in records)


def test_gif_sd_takes_the_guided_step_one_seed_at_a_time_with_the_whole_batchs_outputs(world, tmp_path):
    """gif-sd decodes 512 px images with gradients in its guided step: it holds one seed's K
    outputs' decoder activations at a time, whatever seeds_per_batch is, and writes what a step
    over the whole batch writes (same images, scores and clipped shares)."""
    from fersynth.generate import build_backend
    from fersynth.generate.backends import Batch
    from helpers import face_like

    config = sd_settings(
        world, tmp_path / "gen", build_random(sample_size=64).save(tmp_path / "sd"), steps=10, strength=0.2
    )
    backend, size = build_backend(config, torch.device("cpu"))
    assert backend.guided_seeds_per_pass == 1
    decodes = calls_of(backend.vae, "decode")

    def batch() -> Batch:
        generators = [torch.Generator().manual_seed(s) for s in range(6)]
        seeds = [face_like(i, size) for i in (3, 4)]
        return Batch(seeds, ["fear", "sad"], [0, 0, 0, 1, 1, 1], generators, ["a photo of a face"] * 6)

    by_seed = backend.generate(batch())
    assert [args[0].shape[0] for args, _ in decodes] == [3, 3, 6]  # the step seed by seed, then all
    backend.guided_seeds_per_pass = None
    whole = backend.generate(batch())
    assert [args[0].shape[0] for args, _ in decodes[3:]] == [6, 6]
    for a, b in zip(by_seed.images, whole.images, strict=True):
        assert np.abs(a.astype(int) - b.astype(int)).max() <= 1
    assert by_seed.scores == pytest.approx(whole.scores, abs=1e-5)
    assert by_seed.clipped == pytest.approx(whole.clipped, abs=1e-6)


def test_the_decoders_activations_are_counted_on_the_meta_device_as_a_real_backward_saves():
    """checkpointing.py counts the bytes the guided step's decoder would store on a weightless
    meta twin: what a real backward saves (the weights left out), half of it in bf16."""
    from fersynth.generate.checkpointing import saved_activation_bytes, should_checkpoint

    vae = build_random(sample_size=64, vae_channels=(8, 16, 16, 16)).vae.eval().requires_grad_(False)
    weights = {id(p) for p in vae.parameters()}
    for dtype in (torch.float32, torch.bfloat16):
        saved: dict[int, torch.Tensor] = {}

        def keep(tensor, saved=saved):
            if id(tensor) not in weights:
                saved[id(tensor)] = tensor
            return tensor

        latent = torch.randn(3, 4, 8, 8, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(keep, lambda tensor: tensor):
            vae.to(dtype).decode(latent.to(dtype))
        real = sum(t.numel() * t.element_size() for t in saved.values())
        # Equal but for the attention, whose kernel (and what it saves) the device chooses.
        assert saved_activation_bytes(vae, (3, 4, 8, 8), dtype) == pytest.approx(real, rel=0.02)
    half, full = (saved_activation_bytes(vae, (3, 4, 8, 8), d) for d in (torch.bfloat16, torch.float32))
    assert half == pytest.approx(full / 2, rel=0.02)
    assert saved_activation_bytes(torch.nn.Conv2d(4, 3, 1), (1, 4, 8, 8), torch.float32) is None
    assert should_checkpoint(None, 10**12) and should_checkpoint(6, 10) and not should_checkpoint(5, 10)


def test_the_guided_step_stores_or_recomputes_by_memory_with_the_same_outputs(world, tmp_path, monkeypatch):
    """Per guided pass the decoder's activations are stored where they take at most half of the
    device's available memory, else recomputed (counted once per pass shape); a CPU, whose
    memory the backend does not read, stores them. A stored pass that still runs out of memory
    is taken again recomputing, from the same draws. The outputs are the same every way."""
    import fersynth.generate.backends as backends
    from fersynth.generate import build_backend
    from fersynth.generate.backends import Batch
    from helpers import face_like

    config = sd_settings(
        world, tmp_path / "gen", build_random(sample_size=64).save(tmp_path / "sd"), steps=10, strength=0.2
    )
    backend, size = build_backend(config, torch.device("cpu"))
    monkeypatch.setattr(backends, "saved_activation_bytes", backends.saved_activation_bytes)  # restored after
    counts = calls_of(backends, "saved_activation_bytes")

    def batch() -> Batch:
        generators = [torch.Generator().manual_seed(s) for s in range(4)]
        seeds = [face_like(i, size) for i in (3, 4)]
        return Batch(seeds, ["fear", "sad"], [0, 0, 1, 1], generators, ["a photo of a face"] * 4)

    last_block = calls_of(backend.vae.decoder.up_blocks[-1], "forward")
    stored = backend.generate(batch())
    assert backend.last_pass_checkpointed is False and not counts  # a CPU: stored, nothing counted
    assert len(last_block) == 3  # two guided passes (a seed each), the final decode

    from fersynth.generate.checkpointing import saved_activation_bytes

    needed = saved_activation_bytes(backend.vae, (2, 4, 8, 8), torch.float32)
    for available, recomputed in ((4 * needed, False), (needed, True), (2 * needed, False)):
        backend.available_memory = lambda available=available: available
        before = len(last_block)
        out = backend.generate(batch())
        assert backend.last_pass_checkpointed is recomputed, available
        assert backend.vae.is_gradient_checkpointing is recomputed
        assert len(last_block) - before == (5 if recomputed else 3)  # again in each backward
        assert all(np.array_equal(a, b) for a, b in zip(stored.images, out.images, strict=True))
        assert out.scores == pytest.approx(stored.scores, abs=1e-6)
    assert len(counts) == 1  # one pass shape: counted once

    # Memory taken by someone else between the reading and the pass: the stored pass runs out,
    # and the step is taken again recomputing, with the draws it started from.
    block = backend.vae.decoder.up_blocks[-1]
    forward = block.forward

    def short_of_memory(*args, **kwargs):
        if torch.is_grad_enabled() and not backend.vae.is_gradient_checkpointing:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return forward(*args, **kwargs)

    block.forward = short_of_memory
    backend.available_memory = lambda: 10**15
    retried = backend.generate(batch())
    assert backend.last_pass_checkpointed is True
    assert all(np.array_equal(a, b) for a, b in zip(stored.images, retried.images, strict=True))
    backend.generate(batch())  # that pass shape is recomputed from then on, memory or not
    assert backend.last_pass_checkpointed is True
    backend.force_checkpointing = False
    with pytest.raises(torch.OutOfMemoryError):  # forced to store: no second try
        backend.generate(batch())


def test_gif_sd_runs_its_vae_in_bf16_and_gif_prior_keeps_float32_weights(world, tmp_path):
    """On CUDA with generate.half, gif-sd holds its VAE in bf16 (`bf16_vae`), as diffusers' img2img
    holds it in half precision: encoder and decoder in bf16, with no float32 GroupNorm between
    them. Here on a CPU (where the backend picks float32) the VAE is put in bf16, the dtype
    the constructor picks on CUDA: the outputs stay those of float32 to a grey level, and GIF's
    step still gets its gradient through the bf16 decoder."""
    from fersynth.generate import build_backend
    from fersynth.generate.backends import Batch, GifPrior, GifSD, vae_dtype
    from fersynth.generate.ldm import GifLatentDiffusion
    from helpers import face_like

    assert GifSD.bf16_vae and not GifPrior.bf16_vae and not GifLatentDiffusion.bf16_vae
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert vae_dtype(True, cuda, GifSD.bf16_vae) == torch.bfloat16
    for half, device, bf16 in ((False, cuda, True), (True, cpu, True), (True, cuda, GifPrior.bf16_vae)):
        assert vae_dtype(half, device, bf16) == torch.float32, (half, device, bf16)
    config = sd_settings(
        world, tmp_path / "gen", build_random(sample_size=64).save(tmp_path / "sd"), steps=10, strength=0.2
    )
    backend, size = build_backend(config, torch.device("cpu"))
    assert backend.vae_dtype == torch.float32 and backend.vae.dtype == torch.float32

    def batch() -> Batch:
        generators = [torch.Generator().manual_seed(s) for s in range(3)]
        return Batch([face_like(3, size)], ["fear"], [0, 0, 0], generators, ["a photo of a face"] * 3)

    full = backend.generate(batch())
    backend.vae_dtype = torch.bfloat16
    backend.vae.to(torch.bfloat16)
    decodes = calls_of(backend.vae, "decode")
    half = backend.generate(batch())
    assert [args[0].dtype for args, _ in decodes] == [torch.bfloat16] * 2  # the guided pass, the final
    differences = [
        np.abs(a.astype(int) - b.astype(int)).mean() for a, b in zip(full.images, half.images, strict=True)
    ]
    assert max(differences) < 2.0, differences  # 0.5-0.6 grey levels when written
    assert half.scores == pytest.approx(full.scores, abs=1e-3)
    # The signed step's directions survive bf16: the projection clips about the same entries.
    assert half.clipped == pytest.approx(full.clipped, abs=0.05) and min(half.clipped) > 0.1


def test_outputs_and_records_do_not_depend_on_the_batch(world, tmp_path):
    """Two seeds per batch or one: the same images and the same records (score, clipped share)."""
    one = run_generate(settings(world, tmp_path / "one", seeds_per_batch=1), progress=False)
    two = run_generate(settings(world, tmp_path / "two", seeds_per_batch=2), progress=False)
    names = sorted(p.name for p in (one.folder / IMAGES).glob("*.png"))
    assert len(names) > 3
    for name in names:
        assert (one.folder / IMAGES / name).read_bytes() == (two.folder / IMAGES / name).read_bytes()
    for record in (one.folder / RECORDS).glob("*.json"):
        # Every field equal, the floats to their last kept decimal (a score's 6th, a share's 4th):
        # a batch of two sums the guide's features in another order, which can move that digit.
        mine = json.loads(record.read_text())
        theirs = json.loads((two.folder / RECORDS / record.name).read_text())
        for a, b in zip(mine, theirs, strict=True):
            assert b == pytest.approx(a, abs=1e-4), record.name  # same keys; strings compared exactly


def test_a_shard_folder_of_other_settings_is_refused_and_only_takes_keys(world, tmp_path):
    edit = {"fear": {"sources": ["happy"], "max_seeds": 1}}
    config = settings(world, tmp_path / "gen", classes=[], edit=edit, k=1)
    first = run_generate(config, progress=False)
    key = next((first.folder / RECORDS).glob("*.json")).stem
    assert "_to_fear" in key
    with pytest.raises(
        FersynthError, match=r"holds outputs of other settings \(changed: generate.eps 0.8 -> 0.3\)"
    ):
        run_generate(config.model_copy(update={"eps": 0.3}), progress=False)
    resumed = run_generate(config.model_copy(update={"seeds_per_batch": 4}), progress=False)
    assert resumed.skipped == 1 and resumed.written == 0  # how, not what: a resume may change it
    again = run_generate(
        settings(world, tmp_path / "again", classes=[], edit=edit, k=1), only=[key], progress=False
    )
    assert again.written == 1
    with pytest.raises(FersynthError, match="not jobs of this shard"):
        run_generate(config, only=["no_such_seed"], progress=False)


def unclip_settings(world, tmp_path: Path, **changes) -> GenerateSettings:
    """gif-unclip on tiny random Stable unCLIP components and a tiny CLIP of the same embedding
    width, both saved as folders under `tmp_path`."""
    from fersynth.generate.unclip import build_random_unclip

    clip = build_random_clip(tmp_path / "clip", image_size=32, projection=16)
    unclip = build_random_unclip(tmp_path / "unclip", sample_size=64, image_encoder=clip)
    values = dict(
        backend="gif-unclip",
        unclip_model=str(unclip),
        guide="clip",
        guide_model=str(clip),
        image_size=64,
        scale=5.0,
    )
    return settings(world, tmp_path / "gen", **{**values, **changes})


def test_gif_unclip_perturbs_the_clip_image_embedding_and_decodes_with_stable_unclip(
    world, tmp_path, monkeypatch
):
    """GIF's DALL-E 2 setting on tiny Stable unCLIP components, saved and loaded as a folder,
    scored by a tiny CLIP in the same embedding space; each output its own embedding."""
    config = unclip_settings(world, tmp_path, steps=3, k=2, max_seeds_per_class=1)
    rewarded = rewarded_per_call(monkeypatch)
    result = run_generate(config, progress=False)
    assert result.written == 4
    assert sorted(rewarded) == [[1, 1], [2, 2]]  # the fear seed's and the disgust seed's own labels
    images = sorted((result.folder / IMAGES).glob("*.png"))
    first, second = (np.asarray(Image.open(p)) for p in images[:2])
    assert not np.array_equal(first, second)  # two outputs of one seed: two embeddings
    records = [r for f in (result.folder / RECORDS).glob("*.json") for r in json.loads(f.read_text())]
    assert {r["backend"] for r in records} == {"gif-unclip"}
    assert all(0.0 <= r["clipped_fraction"] <= 1.0 for r in records)
    merged = run_merge(config, num_shards=1, progress=False).output
    assert_seed_sizes(read_manifest(merged).manifest, merged, config.data)
    again = run_generate(config.model_copy(update={"output": tmp_path / "again"}), progress=False)
    for p in images:
        assert (again.folder / IMAGES / p.name).read_bytes() == p.read_bytes()  # from the records' seeds

    other = build_random_clip(tmp_path / "other_clip", image_size=32, projection=16, seed=1)
    with pytest.raises(FersynthError, match=r"not the unCLIP image encoder's own \(.* cosine similarity"):
        run_generate(
            config.model_copy(update={"guide_model": str(other), "output": tmp_path / "y"}), progress=False
        )
    with pytest.raises(FersynthError, match="gif-unclip scores CLIP image embeddings of 16 dimensions"):
        run_generate(
            config.model_copy(
                update={"guide": "fer", "guide_model": str(world[0] / "guide"), "output": tmp_path / "x"}
            ),
            progress=False,
        )


def test_edits_reward_their_target_in_every_backend_and_unclip_needs_a_clip_guide(
    world, tmp_path, monkeypatch
):
    from fersynth.generate.backends import Batch, rewarded_classes

    # Per output: the edit's target (fear), else the seed's own label (happy), whatever the
    # guide predicts on the seed; a batch without edits the same.
    batch = Batch([], ["fear", "happy"], [0, 0, 1], [], [], edits=[True, False])
    assert rewarded_classes(batch).tolist() == [1, 1, 3]
    assert rewarded_classes(Batch([], ["disgust", "fear"], [1, 0, 0], [], [])).tolist() == [1, 2, 2]

    with pytest.raises(ValueError, match="set guide: clip"):
        GenerateSettings(backend="gif-unclip", guide="fer")
    with pytest.raises(ValueError, match="multiple of 8"):
        GenerateSettings(backend="gif-unclip", guide="clip", image_size=60)

    edit = {"fear": {"sources": ["happy"], "max_seeds": 1}}
    config = unclip_settings(world, tmp_path, steps=2, k=1, classes=[], edit=edit)
    rewarded = rewarded_per_call(monkeypatch)
    records = [
        r
        for f in (run_generate(config, progress=False).folder / RECORDS).glob("*.json")
        for r in json.loads(f.read_text())
    ]
    assert [(r["label"], r["edit_from"]) for r in records] == [("fear", "happy")]
    assert rewarded == [[1]]  # the edit's target, fear


def ldm_settings(world, output: Path, **changes) -> GenerateSettings:
    return settings(world, output, **{"backend": "gif-ldm", "steps": 10, "strength": 0.5, "k": 2, **changes})


def test_prior_trains_a_class_conditional_latent_diffusion_model(world):
    from diffusers import DDIMScheduler, UNet2DModel

    from fersynth.generate.ldm import NULL_CLASS

    folder = world[0] / "prior"
    info = json.loads((folder / "prior.json").read_text())["diffusion"]
    assert info["steps"] == 6 and info["latent_shape"] == [8, 16, 16]  # 8 channels; 32 px, one downsampling
    train_images = (read_manifest(world[1]).manifest["split"] == "train").sum()
    assert info["training_latents"] == 2 * train_images  # each training image and its mirror
    assert np.isfinite(info["final_loss"])
    unet = UNet2DModel.from_pretrained(folder / "unet", local_files_only=True)
    assert unet.config.num_class_embeds == NULL_CLASS + 1 == 8  # seven classes and the null class
    saved = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert saved["_class_name"] == "DDIMScheduler" and saved["beta_schedule"] == "squaredcos_cap_v2"
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler", local_files_only=True)
    assert scheduler.config.num_train_timesteps == 1000
    sheet = np.asarray(Image.open(folder / "samples.png"))
    assert sheet.shape[0] > 7 * 64 and sheet.std() > 0  # a row of samples per class


def test_gif_ldm_regenerates_exactly_and_denoises_towards_the_intended_class(world, tmp_path):
    from fersynth.generate import build_backend
    from fersynth.generate.backends import Batch

    config = ldm_settings(world, tmp_path / "a", max_seeds_per_class=1)
    first = run_generate(config, progress=False)
    assert first.written == 4  # fear and disgust, one seed each, K = 2
    records = [r for f in (first.folder / RECORDS).glob("*.json") for r in json.loads(f.read_text())]
    assert {(r["backend"], r["strength"], r["scale"], r["steps"]) for r in records} == {
        ("gif-ldm", 0.5, 2.0, 10)
    }
    assert all(r["prompt"] is None for r in records)  # class-conditioned: no text prompt
    again = run_generate(config.model_copy(update={"output": tmp_path / "b"}), progress=False)
    for image in (first.folder / IMAGES).glob("*.png"):
        assert (again.folder / IMAGES / image.name).read_bytes() == image.read_bytes()
    merged = run_merge(config, num_shards=1, progress=False).output
    assert_seed_sizes(read_manifest(merged).manifest, merged, config.data)

    backend, size = build_backend(config, torch.device("cpu"))
    assert len(backend.timesteps(0.5)) == 5 and len(backend.timesteps(0.1)) == 1  # int(strength * 10)
    seed = np.full((size, size, 3), 128, np.uint8)

    def latents(label: str, strength: float | None = None) -> torch.Tensor:
        generators = [torch.Generator().manual_seed(7)]
        return backend.latents(Batch([seed], [label], [0], generators, [""], strength=strength))

    assert torch.equal(latents("fear"), latents("fear"))  # each output's noise from its generator
    assert not torch.allclose(latents("fear"), latents("happy"))  # the class reaches the UNet
    assert not torch.allclose(latents("fear"), latents("fear", strength=0.9))
    guided = latents("fear")
    backend.scale = 1.0  # the conditional prediction alone: another result than guidance 2
    assert not torch.allclose(guided, latents("fear"))


def test_gif_ldm_edits_carry_their_own_strength(world, tmp_path):
    edit = {"fear": {"sources": ["happy"], "max_seeds": 1, "strength": 0.8}}
    config = ldm_settings(world, tmp_path / "edit", classes=["fear"], max_seeds_per_class=1, edit=edit, k=1)
    result = run_generate(config, progress=False)
    records = [r for f in (result.folder / RECORDS).glob("*.json") for r in json.loads(f.read_text())]
    assert {r["edit_from"]: r["strength"] for r in records} == {"": 0.5, "happy": 0.8}
    assert {r["label"] for r in records} == {"fear"}

    from fersynth.generate import build_backend
    from fersynth.generate.ldm import GifLatentDiffusion

    counts = []
    original = GifLatentDiffusion.timesteps
    backend, size = build_backend(config, torch.device("cpu"))
    backend.timesteps = lambda strength: counts.append(strength) or original(backend, strength)
    again = config.model_copy(update={"output": tmp_path / "again"})
    run_generate(again, backend=(backend, size), progress=False)
    assert sorted(counts) == [0.5, 0.8]  # the edit's own strength reaches the denoising


def test_strength_and_scale_default_to_the_backends():
    ldm = GenerateSettings(backend="gif-ldm")
    assert (ldm.steps, ldm.strength, ldm.scale) == (20, 0.5, 2.0)
    sd = GenerateSettings(backend="gif-sd")
    assert (sd.steps, sd.strength, sd.scale) == (50, 0.1, 50.0)  # the thesis' settings
    assert GenerateSettings().backend == "gif-prior"
    assert GenerateSettings(backend="gif-sd", strength=0.3, scale=None).strength == 0.3

    # A resolved mapping (what a compiled pipeline carries) switched to another backend by an
    # override takes that backend's defaults, unless the override sets them too.
    from fersynth.settings import load_settings, resolved_dict, settings_from_mapping

    resolved = resolved_dict(load_settings(None))
    switched = settings_from_mapping(resolved, ["generate.backend=gif-ldm"]).generate
    assert (switched.steps, switched.strength, switched.scale) == (20, 0.5, 2.0)
    chosen = settings_from_mapping(resolved, ["generate.backend=gif-ldm", "generate.strength=0.3"]).generate
    assert (chosen.steps, chosen.strength) == (20, 0.3)
    with pytest.raises(ValueError, match="must divide by 4 for 3 UNet blocks"):
        PriorSettings(image_size=40, channels=[8, 16, 32], diffusion={"steps": 1, "channels": [8, 16, 16]})


def test_identity_prompts_vary_the_face_and_keep_the_expression():
    from fersynth.generate.prompts import CLASS_WORDS, identity_prompt

    prompts = [identity_prompt("fear", np.random.default_rng(s)) for s in range(40)]
    assert all("with a fearful expression" in p for p in prompts)
    assert len(set(prompts)) == 40  # age, ethnicity, gender, lighting, pose, accessory vary
    assert identity_prompt("fear", np.random.default_rng(3)) == prompts[3]  # from its own rng
    assert all(CLASS_WORDS["sad"] in identity_prompt("sad", np.random.default_rng(s)) for s in range(5))
    assert any(" elderly " in p for p in prompts) and any(" child " in p for p in prompts)


def test_identities_need_a_backend_that_draws_from_noise():
    with pytest.raises(ValueError, match="gif-prior cannot draw a face from noise"):
        GenerateSettings(backend="gif-prior", identities={"per_class": 2})
    with pytest.raises(ValueError, match="unknown classes"):
        GenerateSettings(backend="gif-ldm", identities={"per_class": 2, "classes": ["joy"]})
    with pytest.raises(ValueError, match="no new identity would be drawn"):
        GenerateSettings(backend="gif-ldm", identities={"per_class": 2, "classes": []})
    assert GenerateSettings(backend="gif-prior").identities.per_class == 0  # off by default


def test_gif_ldm_draws_new_identities_from_noise_at_the_training_size(world, tmp_path):
    identities = {"per_class": 3, "classes": ["fear", "sad"]}  # K = 2 per job: 2 jobs, 4 faces
    config = ldm_settings(world, tmp_path / "a", max_seeds_per_class=1, identities=identities)
    jobs = select_seeds(config, 2048)
    faces = jobs[jobs["kind"] == "identity"]
    assert sorted(faces["key"]) == [f"identity_{c}_{i:05d}" for c in ("fear", "sad") for i in range(2)]
    assert (faces["id"] == "").all() and set(faces["target"]) == {"fear", "sad"}
    result = run_generate(config, progress=False)
    assert result.written == 2 * 2 + 2 * 4  # K = 2 per seed (fear, disgust) and per identity job
    records = json.loads((result.folder / RECORDS / "identity_sad_00001.json").read_text())
    assert [r["k"] for r in records] == [0, 1] and {r["seed_id"] for r in records} == {""}
    record = records[0]
    assert record["kind"] == "identity" and record["label"] == "sad"
    assert record["prompt"] is None  # gif-ldm: the class conditions, no text
    assert record["steps"] == 10 and record["scale"] == 2.0 and record["gif_score"] is None
    # Regenerated alone, an identity job gives the same images (each output's own generator).
    again = run_generate(
        config.model_copy(update={"output": tmp_path / "b"}), only=["identity_sad_00001"], progress=False
    )
    assert again.written == 2
    for k in range(2):
        name = f"identity_sad_00001_k{k}.png"
        assert (again.folder / IMAGES / name).read_bytes() == (result.folder / IMAGES / name).read_bytes()
    pixels = [
        np.asarray(Image.open(result.folder / IMAGES / f"identity_fear_0000{i}_k{k}.png"))
        for i in range(2)
        for k in range(2)
    ]
    assert all(p.std() > 0 for p in pixels) and len({p.tobytes() for p in pixels}) == 4
    merged = run_merge(config, num_shards=1, progress=False)
    manifest = read_manifest(merged.output).manifest
    assert merged.images == 12
    assert manifest["gen_kind"].value_counts().to_dict() == {"identity": 8, "expand": 4}
    train = read_manifest(config.data).manifest.query("split == 'train'")
    new = manifest[manifest["gen_kind"] == "identity"]
    median = (int(train["width"].astype(int).median()), int(train["height"].astype(int).median()))
    assert set(zip(new["width"].astype(int), new["height"].astype(int), strict=True)) == {median}
    assert (new["seed_id"] == "").all() and (new["source_id"] == "").all()
    assert (merged.output / "samples_sad.png").is_file()  # identities only: a sheet all the same
    assert_seed_sizes(manifest[manifest["gen_kind"] != "identity"], merged.output, config.data)


def test_gif_sd_draws_new_identities_with_varied_prompts(world, tmp_path):
    config = sd_settings(
        world,
        tmp_path / "gen",
        build_random(sample_size=64).save(tmp_path / "sd"),
        steps=4,
        classes=[],
        k=2,
        identities={"per_class": 2, "classes": ["disgust"]},
    )
    result = run_generate(config, progress=False)
    assert result.written == 2
    records = json.loads((result.folder / RECORDS / "identity_disgust_00000.json").read_text())
    assert all("with a disgusted expression" in r["prompt"] for r in records)
    assert records[0]["prompt"] != records[1]["prompt"]
    assert {(r["scale"], r["steps"]) for r in records} == {
        (7.5, 4)
    }  # text-to-image guidance, not img2img's 50
    from fersynth.generate import build_backend

    backend, size = build_backend(config, torch.device("cpu"))
    prompts = [records[0]["prompt"]] * 2

    def draw(seed: int, prompts=prompts) -> list[np.ndarray]:
        generators = [torch.Generator().manual_seed(seed) for _ in prompts]
        return backend.identities(["disgust"] * 2, prompts, generators, size=size, steps=4, scale=7.5)

    first = draw(1)
    assert first[0].shape == (64, 64, 3) and np.array_equal(first[0], first[1])  # same seed and prompt
    assert not np.array_equal(first[0], draw(2)[0])  # the noise is the output's own
    other = draw(1, ["a close-up photo of a child with a happy expression"] * 2)
    assert not np.array_equal(first[0], other[0])  # the prompt reaches the UNet


def test_gif_unclip_in_float16_keeps_gif_in_float32_and_only_text_embeddings_of_the_guide(world, tmp_path):
    """generate.half on CUDA loads Stable unCLIP in float16; GIF's step stays float32 on its own
    normaliser, and the guide's CLIP leaves the device (its text tower is gone altogether)."""
    from fersynth.generate import _guide
    from fersynth.generate.backends import Batch
    from fersynth.generate.unclip import GifUnclip, load_unclip

    config = unclip_settings(world, tmp_path, steps=2, k=2, max_seeds_per_class=1)
    pipe = load_unclip(config.unclip_model, torch.device("cpu"), torch.float16)
    assert pipe.unet.dtype == torch.float16 and pipe.image_normalizer.mean.dtype == torch.float16
    guide = _guide(config, torch.device("cpu"))
    assert guide.model.text_model is None and guide.text.shape == (7, 16)
    guide.model.to("meta")  # where nothing can run: the backend must not use the CLIP after its check
    with pytest.raises((NotImplementedError, RuntimeError)):
        GifUnclip(pipe, guide, torch.device("cpu"), size=64, steps=2, scale=3.0, step_size=0.1, eps=0.8)
    guide = _guide(config, torch.device("cpu"))
    backend = GifUnclip(pipe, guide, torch.device("cpu"), size=64, steps=2, scale=3.0, step_size=0.1, eps=0.8)
    assert backend.normaliser.mean.dtype == torch.float32
    assert next(guide.model.parameters()).device.type == "cpu"
    guide.model.to("meta")
    seed = np.full((64, 64, 3), 120, np.uint8)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    out = backend.generate(Batch([seed], ["fear"], [0, 0], generators, ["a photo of a fearful face"] * 2))
    assert len(out.images) == 2 and out.images[0].dtype == np.uint8 and np.isfinite(out.scores).all()


def test_gif_prior_keeps_the_seeds_detail_that_the_prior_loses(world, tmp_path):
    """keep_detail: an output is its seed view plus what GIF's perturbation changes in the
    decoded image. With a vanishing step and no seed augmentation that is the seed itself, while
    the tiny prior's plain decoding is far from it."""
    still = dict(eps=1e-6, step_size=1e-6, seed_rotation=0.0, seed_hflip=False, classes=["fear"])
    kept = run_generate(settings(world, tmp_path / "kept", keep_detail=True, **still), progress=False)
    plain = run_generate(settings(world, tmp_path / "plain", keep_detail=False, **still), progress=False)
    _, data = world
    seeds = read_manifest(data).manifest.set_index("id")

    def error_to_seed(folder: Path) -> float:
        errors = []
        for path in sorted((folder / IMAGES).glob("*.png")):
            seed_id = path.stem.rsplit("_k", 1)[0]
            seed = np.asarray(Image.open(data / seeds.at[seed_id, "path"]).convert("RGB"), dtype=float)
            errors.append(np.abs(np.asarray(Image.open(path), dtype=float) - seed).mean())
        return float(np.mean(errors))

    kept_error, plain_error = error_to_seed(kept.folder), error_to_seed(plain.folder)
    assert kept_error < 0.3 * plain_error, (kept_error, plain_error)
    assert kept_error < 12  # only the resizing to the prior's 32 px and back


def test_only_gif_sd_steps_seed_by_seed_and_gif_prior_renders_its_batch_whole(world, tmp_path):
    """gif-sd takes the guided step one seed at a time; gif-prior and gif-ldm step the batch at
    once. gif-prior's render adds its batch's detail row for row, so it refuses a chunk."""
    from fersynth.generate import build_backend
    from fersynth.generate.backends import GifPrior, GifSD
    from fersynth.generate.ldm import GifLatentDiffusion

    assert GifSD.guided_seeds_per_pass == 1
    for backend in (GifPrior, GifLatentDiffusion):
        assert backend.guided_seeds_per_pass is None
    prior, _ = build_backend(settings(world, tmp_path / "prior"), torch.device("cpu"))
    prior._detail = torch.zeros(4, 3, 32, 32)
    with pytest.raises(ValueError, match="batch of 4 whole, got 2"):
        prior.render(torch.zeros(2, 1))  # refused before anything is decoded


def test_copy_twins_are_the_seed_views_the_gif_outputs_start_from_and_k_follows_the_need(world, tmp_path):
    from fersynth.augment import COPY_SUFFIX
    from fersynth.generate.backends import Batch, seed_views, to_tensor, to_uint8

    root, data = world
    train = read_manifest(data).manifest.query("split == 'train'")
    counts = train["label"].value_counts()
    # rho 1 with the whole class as acceptance: fear and disgust each need (largest - own) images.
    config = settings(world, tmp_path / "gen", variants=["balanced"], rho=1.0, acceptance=1.0, max_k=4)
    config = config.model_copy(update={"copy_twins": True, "seed_rotation": 15.0})
    seeds = select_seeds(config, 2048)
    for name in ("fear", "disgust"):
        need = int(counts.max() - counts[name])
        jobs = seeds[seeds["label"] == name]
        assert jobs["k"].nunique() == 1
        k = int(jobs["k"].iloc[0])
        assert len(jobs) == min(counts[name], -(-need // 3))  # at K=3 first, then K up to max_k
        assert k == (3 if len(jobs) * 3 >= need else min(4, -(-need // len(jobs))))
    result = run_generate(config, progress=False)
    assert result.written == 2 * int(seeds["k"].sum())  # every output and its copy twin
    merged = run_merge(config, num_shards=1, progress=False)
    manifest = read_manifest(merged.output).manifest
    twins = manifest[manifest["gen_kind"] == "copy"]
    assert len(twins) == int(seeds["k"].sum()) and set(twins["source"]) == {"seed-copy"}
    assert set(twins["id"]) == {
        f"{i}{COPY_SUFFIX}" for i in manifest.loc[manifest["gen_kind"] == "expand", "id"]
    }
    sizing = json.loads((merged.output / "sizing.json").read_text())
    assert sizing["copy_twins"] and sizing["per_class"]["fear"]["k"] == int(
        seeds.query("label == 'fear'")["k"].iloc[0]
    )
    # A twin is exactly the seed view its generated sibling started from: drawn from the same
    # output seed at the backend's working size (the prior's 32 px), stored at the seed's size.
    twin = twins.iloc[0]
    record = json.loads((result.folder / RECORDS / f"{twin['seed_id']}.json").read_text())
    sibling = next(r for r in record if r["id"] == twin["id"].removesuffix(COPY_SUFFIX))
    seed_row = train.set_index("id").loc[twin["seed_id"]]
    stored = np.asarray(Image.open(data / seed_row["path"]).convert("RGB"))
    from fersynth.generate.backends import resize_seed, to_seed_size

    view = seed_views(
        Batch(
            [resize_seed(stored, 32)],
            [twin["label"]],
            [0],
            [torch.Generator().manual_seed(sibling["random_seed"])],
            [""],
        ),
        to_tensor([resize_seed(stored, 32)], torch.device("cpu")),
        15.0,
        True,
    )
    expected = to_seed_size(to_uint8(view)[0], stored.shape[1], stored.shape[0])
    assert np.array_equal(np.asarray(Image.open(merged.output / twin["path"]).convert("RGB")), expected)
    # The null generator alone: the seed views at the seed's own size, no model loaded.
    alone = settings(world, tmp_path / "copies", backend="seed-copy", guide_model="nowhere", prior=None)
    copies = run_generate(alone, progress=False)
    assert copies.written == 3 * len(select_seeds(alone, 2048))
    records = json.loads(next((copies.folder / RECORDS).glob("*.json")).read_text())
    assert {r["backend"] for r in records} == {"seed-copy"} and all(
        r["gif_score"] != r["gif_score"] for r in records
    )
