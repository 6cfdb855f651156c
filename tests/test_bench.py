"""The benchmark (bench/compare.py) and its tiers (bench/tiers/*.yaml).

Each tier file is a config a user trains with: it loads with the config model, and the benchmark's
CPU smoke mode trains every tier (`ctrlnet train -f bench/tiers/<tier>.yaml`, on the tiny base from
a precomputed cache, with only the keys a CPU cannot run overridden: bench/ours.py CPU_OVERRIDES)
and prints a COMPARE_RESULT whose fields are there and sane; the reference
(diffusers' train_controlnet.py, fetched into the git-ignored .ref/, bench/README.md) runs beside
ours when that script is present, and is reported as skipped when it is not. The SDXL side
(`--arch sdxl`: the SDXL tiers beside train_controlnet_sdxl.py at 1024 px) is checked here by its
argument resolution, its tier files, its FLOPs count and its reference command; its CPU smoke
(`--cpu --arch tiny-sdxl`) is not run by the suite."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench import compare, flops, ours, reference
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


@pytest.mark.parametrize("tier", ours.SDXL_TIERS)
def test_sdxl_tier_file_is_a_valid_job_config_that_encodes_online(tier):
    train = load_job_config(ROOT / "bench" / "tiers" / f"{tier}.yaml").train
    assert train.model.family == "sdxl" and train.data.cache is None  # SDXL cannot use the precompute cache
    assert train.data.resolution == 1024 and train.loop.mixed_precision == "bf16"
    assert train.model.base is None and train.data.dataset is None


def test_sdxl_tiers_say_what_the_docs_say():
    """sdxl-fastest: batch 4, compile and channels_last auto, fused AdamW, no checkpointing;
    sdxl-24gb: batch 1, checkpointing, 8-bit AdamW, gradients freed."""
    fastest, small = (load_job_config(ROOT / "bench" / "tiers" / f"{t}.yaml").train for t in ours.SDXL_TIERS)
    assert (fastest.loop.batch_size, fastest.loop.compile, fastest.loop.channels_last) == (4, "auto", "auto")
    assert fastest.optim.optimizer == "adamw" and not fastest.loop.gradient_checkpointing
    assert (small.loop.batch_size, small.loop.gradient_checkpointing, small.optim.optimizer) == (1, True, "adamw_8bit")
    assert small.optim.set_grads_to_none


def test_the_docs_hold_each_tier_file_verbatim():
    doc = (ROOT / "docs" / "benchmarks.md").read_text()
    for tier in ours.ALL_TIERS:
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


def test_sdxl_flops_count_both_text_encoders_and_the_added_conditions(tiny_sdxl_dir):
    """The SDXL step on the meta device, its shapes from the base folder's config files: a
    cached-shape step < the reference's (VAE every step, prompts before training) < an online step
    (VAE and both text encoders)."""
    models = flops.meta_models(tiny_sdxl_dir)  # built once for the three counts
    assert models.text_encoder_2 is not None
    cached = flops.flops_per_sample(models, 2, 64, encode=False)
    images = flops.flops_per_sample(models, 2, 64, encode=True, text=False)
    online = flops.flops_per_sample(models, 2, 64, encode=True)
    assert 0 < cached < images < online


def test_each_row_is_counted_as_its_step_encodes(monkeypatch):
    """compare.count_flops: an uncached tier encodes images and text every step; the SDXL
    reference (text_per_step false) images only; a cached tier neither; one count per shape."""
    counts = []

    def fake_count(models, batch, resolution, *, encode, text=None):
        counts.append((batch, resolution, encode, text))
        return 1.0 + encode + 10 * text

    monkeypatch.setattr(flops, "meta_models", lambda base: "meta")
    monkeypatch.setattr(flops, "flops_per_sample", fake_count)
    online = {"name": "sdxl-fastest", "resolution": 64, "batch_size": 4, "cached": False}
    rows = [online, {**online, "name": "again"}, {**online, "name": "reference", "text_per_step": False}]
    rows.append({**online, "name": "fastest", "cached": True})
    compare.count_flops({"runs": rows}, "base")
    assert [r["flops_per_sample"] for r in rows] == [12.0, 12.0, 2.0, 1.0] and len(counts) == 3


def test_arch_picks_the_family_reference_resolution_and_tiers():
    sd = compare.parse_args([])
    assert (sd.arch, sd.resolution, sd.batch_size, sd.steps) == ("sd15", 512, 16, 40)
    assert sd.reference.name == "train_controlnet.py" and [t.label for t in sd.tier_list][0] == "fastest"
    xl = compare.parse_args(["--arch", "sdxl"])
    assert (xl.family, xl.resolution, xl.batch_size, xl.precision) == ("sdxl", 1024, 4, "bf16")
    assert xl.reference.name == "train_controlnet_sdxl.py"
    assert [t.name for t in xl.tier_list] == list(ours.SDXL_TIERS)
    smoke = compare.parse_args(["--cpu", "--arch", "tiny-sdxl"])
    assert (smoke.resolution, smoke.precision) == (64, "no") and [t.name for t in smoke.tier_list] == list(
        ours.SDXL_TIERS
    )
    given = compare.parse_args(["--arch", "sdxl", "--reference", "/x/mine.py", "--resolution", "768"])
    assert str(given.reference) == "/x/mine.py" and given.resolution == 768


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--arch", "sdxl", "--tiers", "fastest"], "tier fastest reads a precompute cache (data.cache)"),
        (["--arch", "tiny-sdxl", "--cpu", "--tiers", "sdxl-fastest,6gb@2"], "tier 6gb reads a precompute cache"),
        (["--tiers", "sdxl-24gb"], "tier sdxl-24gb is for SDXL bases"),
    ],
)
def test_a_tier_of_the_other_family_is_refused_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit) as exit_:
        compare.parse_args(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]  # argparse: usage, then the one error line
    assert "error: " + says in err


@pytest.mark.parametrize(
    ("family", "precision", "cast"), [("sdxl", "bf16", True), ("sdxl", "no", False), ("sd", "bf16", False)]
)
def test_the_reference_command_per_family(family, precision, cast, tmp_path, monkeypatch):
    """The SDXL script under mixed precision gets ref_runner's one dtype cast (reference.py says
    why), and its prompts are encoded before training (no text encoder in its FLOPs per step)."""
    seen = {}

    def fake_run(cmd, log, env):
        seen["cmd"] = cmd
        return 'REFERENCE_RESULT {"step_s": [1.0, 0.5, 0.5]}\n', 3.0

    monkeypatch.setattr(reference, "run", fake_run)
    script = reference.SCRIPTS[family]
    kw = dict(base=tmp_path, data=tmp_path, work=tmp_path, batch=4, resolution=1024, steps=3, workers=0)
    row = reference.run_reference(script, **kw, precision=precision, shim=False, env={}, family=family)
    assert ("--cast-unet-text" in seen["cmd"]) is cast
    assert str(script) in seen["cmd"] and f"--mixed_precision={precision}" in seen["cmd"]
    assert row["text_per_step"] is (family == "sd") and ("patch" in row) is cast
    assert row["samples_per_s"] == pytest.approx(8.0) and row["config"].startswith(script.name)


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
        # samples_per_s is rounded to 3 decimals (steps.summarize): below ~0.5/s that exceeds rel 1e-3
        assert run["samples_per_s"] == pytest.approx(run["batch_size"] / run["median_step_s"], rel=1e-3, abs=5e-4)
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


# ------------------------------------------------------------------ the flow families (SD3.5, Flux.1)
@pytest.mark.parametrize(("tier", "family"), [("flux-dev", "flux"), ("sd3.5-medium", "sd3")])
def test_flow_tier_file_is_a_valid_job_config(tier, family):
    train = load_job_config(ROOT / "bench" / "tiers" / f"{tier}.yaml").train
    assert train.model.family == family and train.data.cache  # T5 and the VAE precomputed, as the reference pre-encodes
    assert train.data.resolution == 1024 and train.loop.mixed_precision == "bf16"
    assert train.model.base is None and train.data.dataset is None
    assert train.model.controlnet_layers == (4 if family == "flux" else 12)  # the reference scripts' depths


@pytest.mark.parametrize(
    ("arch", "full", "family", "script", "batch"),
    [
        ("flux", "flux-dev", "flux", "train_controlnet_flux.py", 1),
        ("flux-dev", "flux-dev", "flux", "train_controlnet_flux.py", 1),
        ("sd3", "sd3.5-medium", "sd3", "train_controlnet_sd3.py", 2),
    ],
)
def test_flow_arch_picks_its_reference_tier_and_shape(arch, full, family, script, batch):
    a = compare.parse_args(["--arch", arch])
    assert (a.arch, a.family, a.resolution, a.batch_size, a.precision) == (full, family, 1024, batch, "bf16")
    assert a.reference.name == script and [t.name for t in a.tier_list] == [compare.FLOW_TIERS[family]]
    smoke = compare.parse_args(["--cpu", "--arch", f"tiny-{family}"])
    assert (smoke.family, smoke.resolution) == (family, 64) and smoke.reference.name == script
    assert [t.label for t in compare.parse_args(["--arch", arch, "--tiers", f"{full}@2"]).tier_list] == [f"{full}@2"]


@pytest.mark.parametrize(
    ("argv", "says"),
    [
        (["--arch", "flux", "--tiers", "fastest"], "tier fastest is for SD/SDXL bases, the arch is flux: use flux-dev"),
        (["--arch", "sd3", "--tiers", "flux-dev"], "tier flux-dev is for flux bases, the arch is sd3"),
        (["--tiers", "sd3.5-medium"], "tier sd3.5-medium is for sd3 bases, the arch is sd"),
        (["--arch", "flux", "--tiers", "flux-pro"], "unknown tier 'flux-pro'"),
    ],
)
def test_a_flow_tier_of_another_family_is_refused_in_one_line(argv, says, capsys):
    with pytest.raises(SystemExit):
        compare.parse_args(argv)
    assert "error: " + says in capsys.readouterr().err.strip().splitlines()[-1]


def _transformer_config(base: Path, **config) -> Path:
    (base / "transformer").mkdir(parents=True)
    (base / "transformer" / "config.json").write_text(json.dumps(config))
    return base


@pytest.mark.parametrize(
    ("family", "config", "flags"),
    [
        (
            "flux",
            {"num_layers": 19, "num_single_layers": 38},
            ["--num_double_layers=4", "--num_single_layers=4", "--use_8bit_adam", "--gradient_checkpointing"],
        ),
        ("flux", {"num_layers": 2, "num_single_layers": 2}, ["--num_double_layers=2", "--num_single_layers=2"]),
        ("sd3", {"num_layers": 24}, ["--max_sequence_length=256"]),
    ],
)
def test_the_flow_reference_commands(family, config, flags, tmp_path, monkeypatch):
    """The Flux script reads the data as --dataset_name with ours' ControlNet depth (at most the base's
    blocks); the SD3 script as --train_data_dir at the pipeline's T5 length; both name the columns."""
    seen = {}

    def fake_run(cmd, log, env):
        seen["cmd"] = cmd
        return 'REFERENCE_RESULT {"step_s": [1.0, 0.5, 0.5]}\n', 3.0

    monkeypatch.setattr(reference, "run", fake_run)
    base, data = _transformer_config(tmp_path / "base", **config), tmp_path / "data"
    extra = compare.REF_EXTRA[family] if config["num_layers"] > 2 else []
    kw = dict(base=base, data=data, work=tmp_path, batch=1, resolution=1024, steps=3, workers=0, precision="bf16")
    row = reference.run_reference(reference.SCRIPTS[family], **kw, shim=False, env={}, family=family, extra=extra)
    cmd = seen["cmd"]
    assert set(flags) <= set(cmd) and "--cast-unet-text" not in cmd and not row["text_per_step"]
    assert (f"--dataset_name={data}" if family == "flux" else f"--train_data_dir={data}") in cmd
    assert {"--image_column=image", "--conditioning_image_column=conditioning_image", "--caption_column=text"} <= set(
        cmd
    )
    script = ROOT / ".ref" / reference.SCRIPTS[family].name
    if script.is_file():  # fetched (git-ignored): every flag given is one the script has
        for flag in {arg.split("=")[0] for arg in cmd if arg.startswith("--")} - {"--cast-unet-text"}:
            assert f'"{flag}"' in script.read_text(), f"{flag} is not a flag of the {family} script"


def test_the_sd3_reference_needs_13_joint_blocks(tmp_path):
    base = _transformer_config(tmp_path / "base", num_layers=4)
    with pytest.raises(Exception, match="12-block ControlNet.*this one has 4"):
        reference.family_args("sd3", base, tmp_path)


@pytest.mark.parametrize("arch", ["tiny-flux", "tiny-sd3"])
def test_flow_flops_count_the_encoders_the_step_runs(arch):
    """A flow step on the meta device, through the family's own predict: cached < images (the VAE on
    the image and the condition) < online (the text encoders too)."""
    models = flops.meta_models(arch)
    assert isinstance(models, flops.FlowMetaModels)
    cached = flops.flops_per_sample(models, 2, 64, encode=False)
    images = flops.flops_per_sample(models, 2, 64, encode=True, text=False)
    online = flops.flops_per_sample(models, 2, 64, encode=True)
    assert 0 < cached < images < online
    assert flops.flops_per_sample(models, 1, 64, encode=False) == pytest.approx(cached)  # per sample
