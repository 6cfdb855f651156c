"""The benchmark (bench/compare.py) and its tiers (bench/tiers/*.yaml).

Each tier file is a config a user trains with: it loads with the config model, and the benchmark's
CPU smoke mode trains every tier (`ctrlnet train -f bench/tiers/<tier>.yaml`, on the tiny base from
a precomputed cache, with only the keys a CPU cannot run overridden: bench/ours.py CPU_OVERRIDES)
and prints a COMPARE_RESULT whose fields are there and sane; the reference
(diffusers' train_controlnet.py, fetched into the git-ignored .ref/, bench/README.md) runs beside
ours when that script is present, and is reported as skipped when it is not."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import flops, ours
from ctrlnet.config import load_job_config

ROOT = Path(__file__).resolve().parent.parent
CTRLNET = [sys.executable, "-m", "ctrlnet"]


# ------------------------------------------------------------------ the tier files
@pytest.mark.parametrize("tier", ours.TIERS)
def test_tier_file_is_a_valid_job_config(tier):
    train = load_job_config(ROOT / "bench" / "tiers" / f"{tier}.yaml").train
    assert train.data.cache and train.data.resolution == 512 and train.loop.mixed_precision == "bf16"
    assert train.model.base is None and train.data.dataset is None  # the user's (or the benchmark's)


def test_tiers_say_what_the_docs_say():
    """fastest: batch 16, regional compile, channels_last, fused AdamW; 6gb: batch 1, checkpointing,
    8-bit AdamW; zero-offload: DeepSpeed ZeRO-2 with the optimizer on the CPU."""
    fastest, small, offload = (load_job_config(ROOT / "bench" / "tiers" / f"{t}.yaml").train for t in ours.TIERS)
    assert (fastest.loop.batch_size, fastest.loop.compile, fastest.loop.channels_last) == (16, "regional", "on")
    assert fastest.optim.optimizer == "adamw" and not fastest.loop.gradient_checkpointing
    assert (small.loop.batch_size, small.loop.gradient_checkpointing, small.optim.optimizer) == (1, True, "adamw_8bit")
    d = offload.distributed
    assert (d.strategy, d.zero_stage, d.offload_optimizer) == ("deepspeed", 2, True)


def test_the_docs_hold_each_tier_file_verbatim():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for tier in ours.TIERS:
        text = (ROOT / "bench" / "tiers" / f"{tier}.yaml").read_text()
        assert text in doc, f"docs/benchmarks.md does not hold bench/tiers/{tier}.yaml as it is"


# ------------------------------------------------------------------ the benchmark
def test_flops_are_counted_at_the_runs_shapes(tiny_base_dir):
    cached = flops.flops_per_sample(tiny_base_dir, 2, 64, encode=False)
    online = flops.flops_per_sample(tiny_base_dir, 2, 64, encode=True)
    assert 0 < cached < online  # the encoders' forward is work the cached step does not do
    assert flops.flops_per_sample(tiny_base_dir, 4, 64, encode=False) == pytest.approx(cached)  # per sample
    assert flops.flops_per_sample(tiny_base_dir, 2, 128, encode=False) == pytest.approx(4 * cached, rel=0.2)
    assert flops.peak_tflops("NVIDIA H100 80GB HBM3") == flops.peak_tflops("NVIDIA H200") == 989.0
    assert flops.peak_tflops("cpu") is None and flops.mfu(1e12, 10.0, 989.0) == pytest.approx(10 / 989)


@pytest.mark.slow
def test_cpu_smoke_runs_every_tier_and_the_reference_side_by_side(tmp_path):
    """`bench/compare.py --cpu`: precompute once, every tier, the reference if fetched; one JSON line."""
    cmd = [sys.executable, "bench/compare.py", "--cpu", "--arch", "tiny", "--steps", "2", "--peak-tflops", "1"]
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": ""}
    done = subprocess.run(
        [*cmd, "--work", str(tmp_path)], capture_output=True, text=True, timeout=400, cwd=ROOT, env=env
    )
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    line = next(ln for ln in done.stdout.splitlines() if ln.startswith("COMPARE_RESULT "))
    result = json.loads(line.split(" ", 1)[1])
    assert result["env"]["torch"] and result["env"]["diffusers"] and result["env"]["device"].startswith("cpu")
    assert result["peak_tflops"] == 1.0 and result["steps"] == 2

    (pre,) = result["precompute"]  # every tier shares one cache: precomputed once
    assert pre["rows"] >= 16 * 4 and pre["seconds"] > 0
    runs = {r["name"]: r for r in result["runs"]}
    reference = (ROOT / ".ref" / "train_controlnet.py").is_file()
    assert set(runs) == {*ours.TIERS, *(["reference"] if reference else [])}
    for run in runs.values():
        assert "error" not in run, run
        assert run["samples_per_s"] > 0 and run["median_step_s"] > 0 and run["warmup_s"] >= 0
        assert run["samples_per_s"] == pytest.approx(run["batch_size"] / run["median_step_s"], rel=1e-3)
        assert 0 < run["flops_per_sample"] and 0 < run["mfu"] < 1  # against the 1 TFLOP/s given
        assert run["resolution"] == 64 and run["peak_memory_gib"] is None  # no CUDA memory on a CPU
    for tier in ours.TIERS:
        assert runs[tier]["cached"] and runs[tier]["config"] == f"bench/tiers/{tier}.yaml"
        assert runs[tier]["compile_s"] is not None  # the trainer's own measure of the first step's extra
    assert (runs["fastest"]["batch_size"], runs["6gb"]["batch_size"]) == (16, 1)
    if reference:
        assert runs["reference"]["flops_per_sample"] > runs["fastest"]["flops_per_sample"]  # it encodes each step
        assert all(runs[t]["speedup"] > 0 for t in ours.TIERS)
    else:
        assert "no reference script" in result["reference_skipped"]
    assert done.stdout.splitlines()[-2].startswith("precompute (fastest): ")
    assert "samples/s" in done.stdout and "MFU" in done.stdout
