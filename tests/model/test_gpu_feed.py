"""Training that keeps an accelerator busy (issue 32), checked on the CPU: the device's "auto"
settings, a divergence found without a per-step wait for the device, and the throughput
benchmark at its tiny size, so that it never rots."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch

from fersynth.errors import FersynthError
from fersynth.train.loop import device_settings, run_train
from helpers import REPO, colour_dataset, tiny_train_settings


def test_auto_settings_follow_the_device(tmp_path, monkeypatch):
    from fersynth.train import loop

    monkeypatch.setattr(loop, "c_compiler", lambda: "gcc")
    settings = tiny_train_settings(
        tmp_path, tmp_path / "m", workers="auto", cpu_threads="auto", compile="auto"
    )
    cpu = device_settings(settings, torch.device("cpu"))
    assert (cpu.cpu_threads, cpu.workers, cpu.compile) == (2, 4, False)  # reproducible CPU tables
    cuda = device_settings(settings, torch.device("cuda"))  # resolved only: no GPU needed
    cores = os.cpu_count() or 2
    assert (cuda.cpu_threads, cuda.compile) == (0, True)
    assert cuda.workers == min(16, max(1, cores - 2))
    given = tiny_train_settings(tmp_path, tmp_path / "m", workers=3, cpu_threads=1, compile=False)
    assert device_settings(given, torch.device("cuda")) == given  # what a user sets stays
    # A slim image has no C compiler for torch.compile's kernels: auto stays off, true is refused.
    monkeypatch.setattr(loop, "c_compiler", lambda: None)
    assert device_settings(settings, torch.device("cuda")).compile is False
    with pytest.raises(FersynthError, match="train.compile: true, but no C compiler"):
        loop.check_compiler(given.model_copy(update={"compile": True}))


def test_a_row_with_nothing_to_train_is_skipped_before_any_device_is_asked_for(tmp_path):
    data = colour_dataset(tmp_path / "ds", per_class=0, test_per_class=1)
    settings = tiny_train_settings(data, tmp_path / "m", device="cuda:7")  # no such device here
    result = run_train(settings, progress=False, skip_if_empty=True)
    assert "no training images" in result.skipped


def test_a_cpu_run_records_the_resolved_settings_and_trains_on_two_threads(tmp_path):
    data = colour_dataset(tmp_path / "ds", per_class=4, test_per_class=1, val_per_class=1)
    settings = tiny_train_settings(data, tmp_path / "m", steps=2, cpu_threads="auto", compile="auto")
    run_train(settings, progress=False)
    saved = json.loads((tmp_path / "m" / "settings.json").read_text())["train"]
    assert (saved["cpu_threads"], saved["compile"], saved["workers"]) == (2, False, 0)
    assert json.loads((tmp_path / "m" / "train_summary.json").read_text())["cpu_threads"] == 2


def test_a_diverging_run_names_its_first_bad_step_and_keeps_no_weights_trained_past_it(tmp_path):
    """The loss is read once per log window, yet the error names the first step whose loss was
    not finite, and nothing trained after it is validated or saved."""
    data = colour_dataset(tmp_path / "ds", per_class=4, test_per_class=1, val_per_class=1)
    settings = tiny_train_settings(
        data, tmp_path / "m", steps=8, lr=1e12, warmup_steps=0, grad_clip=None, log_every=8, eval_every=8
    )
    with pytest.raises(
        FersynthError, match=r"training diverged at step (\d+) \(its loss was not finite\)"
    ) as err:
        run_train(settings, progress=False)
    step = int(err.value.args[0].split("step ")[1].split(" ")[0])
    assert 0 < step < 8
    assert not (tmp_path / "m" / "model.pt").exists() and not (tmp_path / "m" / "checkpoint.pt").exists()


@pytest.mark.slow
def test_the_throughput_benchmark_runs_at_its_tiny_size(tmp_path):
    """`benchmarks/gpu_throughput.py --tiny`: every measurement and ratio of the full run."""
    output = tmp_path / "throughput.json"
    done = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "gpu_throughput.py"), "--tiny", "--output", str(output)],
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    result = json.loads(output.read_text())
    assert result["size"] == "tiny"
    runs = result["training"]["resnet18_32"]
    trained = ("fersynth_in_memory", "fersynth_loader", "fersynth_mek", "fersynth_sl_double_batch")
    for key in ("random_batches", "plain_loader", *trained):
        assert runs[key]["images_per_s"] > 0, (key, runs[key])
    assert runs["fersynth_in_memory"]["cpu_threads"] == 2
    assert all(value > 0 for value in runs["ratios"].values()), runs["ratios"]
    generation = result["generation"]
    guided = {  # each variant's decoder checkpointing (a CPU stores the activations by default)
        "gif_sd_guided": False,
        "gif_sd_guided_whole_batch": False,
        "gif_sd_guided_checkpointing": True,
        "gif_sd_guided_no_checkpointing": False,
    }
    assert generation["plain_img2img"]["images_per_s"] > 0
    for key, checkpointed in guided.items():
        assert generation[key]["images_per_s"] > 0 and generation[key]["time_ratio_over_plain"] > 0, key
        assert generation[key]["decoder_checkpointed"] is checkpointed, key
    one, whole = (
        generation["decoder_activations_bytes_one_seed"],
        generation["decoder_activations_bytes_whole_batch"],
    )
    assert one > 0 and whole == pytest.approx(one * result["config"]["gen_seeds"], rel=0.05)
    outputs = generation["outputs"]  # a CPU: float32 both ways, so no difference at all
    assert outputs["checkpointing_max_grey_difference"] == 0 and outputs["vae_dtype"] == "torch.float32"
    assert outputs["before_issue_32_mean_grey_difference"] == 0
    assert outputs["before_issue_32_clipped_share"] == outputs["clipped_share"]
    assert generation["time_ratio_guided_over_plain"] == generation["gif_sd_guided"]["time_ratio_over_plain"]
