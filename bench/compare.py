"""The benchmark: ctrlnet's tiers and diffusers' train_controlnet.py (unchanged), side by side.

One invocation, one machine, one GPU: a random-weight base (`ctrlnet model init`), synthetic fill
data (`ctrlnet data synth-fill`), the precompute of the cached tiers (timed once, on its own), then
each tier of bench/tiers/ through `ctrlnet train -f`, then the reference through bench/ref_runner.py.
An SDXL arch (sdxl, tiny-sdxl) runs the SDXL tiers (online encoding: no precompute) beside
diffusers' train_controlnet_sdxl.py; a flow arch its family's tier beside train_controlnet_flux.py
(flux-dev, alias `flux`; tiny-flux) or train_controlnet_sd3.py (sd3.5-medium, alias `sd3`; tiny-sd3).
Prints a table and one `COMPARE_RESULT {json}` line: samples/s, MFU (counted FLOPs per sample over
the GPU's dense bf16 peak), peak memory, warm-up and compile time, and each row's ratios to the
reference. docs/benchmarks.md explains every column and holds the results.

    python bench/compare.py                                   # GPU: all tiers + reference, SD1.5, 512 px
    python bench/compare.py --cpu --arch tiny --steps 3       # CPU smoke on the tiny base (no speed claim)
    python bench/compare.py --arch sdxl                       # GPU: SDXL tiers + train_controlnet_sdxl.py, 1024 px
    python bench/compare.py --cpu --arch tiny-sdxl --steps 2  # CPU smoke of the SDXL side
    python bench/compare.py --arch flux                       # GPU: flux-dev tier + train_controlnet_flux.py, 1024 px
    python bench/compare.py --arch sd3                        # GPU: sd3.5-medium tier + train_controlnet_sd3.py, 1024 px
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: make the `bench` package importable

from bench import flops, ours, reference  # noqa: E402
from bench.steps import Failed  # noqa: E402
from ctrlnet_trainer.models.tiny import ARCHS, FLOW_ARCHS, family_of  # noqa: E402  (no torch at import)

# The flow families' tier (bench/tiers/<name>.yaml), one per family (ours.FLOW_TIERS).
FLOW_TIERS = {"flux": "flux-dev", "sd3": "sd3.5-medium"}
ALIASES = {"flux": "flux-dev", "sd3": "sd3.5-medium"}  # --arch flux / sd3: the full-size bases
ARCH_CHOICES = sorted([*ARCHS, *FLOW_ARCHS, *ALIASES])

GPU_TIERS = {"sd": "fastest,fastest@32,6gb,zero-offload", "sdxl": "sdxl-fastest,sdxl-24gb", **FLOW_TIERS}
CPU_TIERS = {"sd": ",".join(ours.TIERS), "sdxl": ",".join(ours.SDXL_TIERS), **FLOW_TIERS}
CPU_DEFAULTS = {"arch": "tiny", "resolution": 64, "batch_size": 8, "precision": "no", "steps": 3}
GPU_DEFAULTS = {
    "sd": {"arch": "sd15", "resolution": 512, "batch_size": 16, "precision": "bf16", "steps": 40},
    # SDXL at its native 1024 px. Batch 4, like the sdxl-fastest tier, and no gradient checkpointing
    # on either side (the reference's --gradient_checkpointing would checkpoint its UNet too, which
    # ours never does): the reference holds ~25 GiB of weights, fp32 ControlNet gradients and AdamW
    # states (its VAE in fp32, its text encoders kept on the GPU) plus ~6 GiB of activations per
    # sample (estimated on the meta device with flash attention's memory), ~55-60 GiB at batch 4;
    # batch 8 (80 GiB or more) would not fit an 80 GB H100. 30 steps: an SDXL sample is ~7x the FLOPs.
    "sdxl": {"arch": "sdxl", "resolution": 1024, "batch_size": 4, "precision": "bf16", "steps": 30},
    # Flux.1-dev at 1024 px, batch 1, both sides with 8-bit Adam and gradient checkpointing of the
    # ControlNet and the transformer (the reference's README command; ~55 GB of weights and
    # optimizer state before activations, estimated: bench/tiers/flux-dev.yaml).
    "flux": {"arch": "flux-dev", "resolution": 1024, "batch_size": 1, "precision": "bf16", "steps": 20},
    # SD3.5-medium at 1024 px, batch 2: a 12-block ControlNet on both sides (the script's only depth).
    "sd3": {"arch": "sd3.5-medium", "resolution": 1024, "batch_size": 2, "precision": "bf16", "steps": 30},
}
# The reference flags a family's tier stands for (the same memory switches on both sides).
REF_EXTRA = {"flux": ["--use_8bit_adam", "--gradient_checkpointing"], "sd3": []}
REF_WORKERS = 8  # the reference's loader workers on a GPU (ours: each tier file's data.num_workers)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument(
        "--cpu", action="store_true", help="smoke run on the CPU: tiny base, 64 px, GPU-only keys overridden"
    )
    p.add_argument(
        "--tiers",
        default=None,
        help=f"comma-separated, TIER or TIER@BATCH (default: {GPU_TIERS['sd']}; SDXL: {GPU_TIERS['sdxl']}; "
        f"Flux.1: {GPU_TIERS['flux']}; SD3: {GPU_TIERS['sd3']}; --cpu: the family's tiers)",
    )
    p.add_argument("--only", choices=["ours", "reference"], default=None, help="run one side only")
    p.add_argument(
        "--reference",
        type=Path,
        default=None,
        help="the diffusers script (default: .ref/train_controlnet.py; SDXL: .ref/train_controlnet_sdxl.py; "
        "Flux.1: .ref/train_controlnet_flux.py; SD3: .ref/train_controlnet_sd3.py)",
    )
    p.add_argument(
        "--arch",
        choices=ARCH_CHOICES,
        default=None,
        help="base architecture (random weights; default sd15); `flux` is flux-dev (FLUX.1-dev's shapes) and "
        "`sd3` is sd3.5-medium (SD3.5-medium's); tiny-flux and tiny-sd3 are their CPU-sized bases",
    )
    p.add_argument(
        "--resolution", type=int, default=None, help="pixels, every run (default 512, SDXL/Flux.1/SD3 1024; --cpu: 64)"
    )
    p.add_argument(
        "--batch-size",
        type=int,
        default=None,
        help="the reference's batch (default 16, SDXL 4, Flux.1 1, SD3 2; --cpu: 8)",
    )
    p.add_argument("--precision", choices=["no", "fp16", "bf16"], default=None, help="the reference's mixed precision")
    p.add_argument(
        "--steps",
        type=int,
        default=None,
        help="optimizer steps per run (default 40, SDXL 30, Flux.1 20, SD3 30; --cpu: 3)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=None,
        help="data loader workers, every run (default: the tiers' own, reference 8; --cpu: 0)",
    )
    p.add_argument("--peak-tflops", type=float, default=None, help="dense bf16 peak for MFU (default: by GPU name)")
    p.add_argument("--jobs", type=int, default=None, help="--cpu only: runs at a time (default 2; timings: 1)")
    p.add_argument("--work", type=Path, default=None, help="folder for base, data, caches, runs and logs")
    p.add_argument("--torchvision-shim", action="store_true", help="run the reference with bench/cpu_shim's transforms")
    a = p.parse_args(argv)
    a.arch = ALIASES.get(a.arch, a.arch)
    a.family = family_of(a.arch or (CPU_DEFAULTS if a.cpu else GPU_DEFAULTS["sd"])["arch"])
    for key, value in (CPU_DEFAULTS if a.cpu else GPU_DEFAULTS[a.family]).items():
        if getattr(a, key) is None:
            setattr(a, key, value)
    if a.reference is None:
        a.reference = reference.SCRIPTS[a.family]
    if a.cpu and a.workers is None:
        a.workers = 0  # worker processes only cost start-up time on a smoke run
    if a.jobs is not None and a.jobs > 1 and not a.cpu:
        p.error("--jobs above 1 is for the CPU smoke run: GPU runs take the GPU one at a time")
    a.jobs = a.jobs or (2 if a.cpu else 1)
    try:
        a.tier_list = [parse_tier(t) for t in (a.tiers or (CPU_TIERS if a.cpu else GPU_TIERS)[a.family]).split(",")]
        for tier in a.tier_list if a.only != "reference" else []:
            ours.check_family(tier, a.family)
            check_flow_family(tier, a.family)
    except ValueError as e:
        p.error(str(e))
    return a


def parse_tier(spec: str) -> ours.Tier:
    return ours.Tier.parse(spec)


def check_flow_family(tier: ours.Tier, family: str) -> None:
    """A flow tier trains its own family's base, and an SD/SDXL tier no flow base."""
    tier_family = ours.file_config(tier).model.family
    flow = family in FLOW_TIERS
    if (flow or tier_family in FLOW_TIERS) and tier_family != family:
        bases = f"{tier_family} bases" if tier_family in FLOW_TIERS else "SD/SDXL bases"
        use = FLOW_TIERS[family] if flow else ", ".join(ours.TIERS + ours.SDXL_TIERS)
        raise ValueError(f"tier {tier.name} is for {bases}, the arch is {family}: use {use}")


def environment(cpu: bool) -> dict:
    import diffusers
    import torch

    env = {
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "python": platform.python_version(),
        "cpu_cores": os.cpu_count(),
    }
    if not cpu and torch.cuda.is_available():
        env["device"] = torch.cuda.get_device_name()
        env["cuda"] = torch.version.cuda
        try:
            query = ["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]
            env["driver"] = subprocess.run(query, capture_output=True, text=True, timeout=30).stdout.strip() or None
        except OSError:
            env["driver"] = None
    else:
        env["device"] = f"cpu ({platform.processor() or platform.machine()})"
    return env


def prepare(a, work: Path, rows: int) -> tuple[Path, Path]:
    """The base and the data, written once per work folder by the code behind `ctrlnet model
    init` and `ctrlnet data synth-fill` (in this process: two fewer interpreter start-ups)."""
    from ctrlnet_trainer.models.tiny import write_base
    from ctrlnet_trainer.synthetic import write_fill_parquet

    base, data = work / f"base-{a.arch}", work / f"data-{a.resolution}px-{rows}"
    if not (base / "model_index.json").exists():
        print(f"+ ctrlnet model init --arch {a.arch} --out {base}", flush=True)
        write_base(base, arch=a.arch, seed=0, overwrite=True)
    if not (data / "train.parquet").exists():
        print(f"+ ctrlnet data synth-fill --rows {rows} --resolution {a.resolution} --out {data}", flush=True)
        write_fill_parquet(str(data), rows=rows, resolution=a.resolution, seed=0, overwrite=True)
    return base, data


def run_all(a, setup: ours.Setup, base: Path, data: Path, result: dict) -> None:
    """Every run, `a.jobs` at a time (one at a time on a GPU: runs never share it). A cached tier
    starts once its cache is made; each distinct cache is precomputed once, before the tiers that
    read it. A run that fails is a row with its error: the others' figures still count."""
    with ThreadPoolExecutor(max_workers=a.jobs) as pool:
        ref = None
        if a.only != "ours" and a.jobs > 1:  # alongside the precompute
            ref = pool.submit(_guarded, "reference", None, run_reference, a, setup, base, data)
        made: dict[str, tuple[Path, Future]] = {}
        tiers: list[Future | dict] = []
        for tier in [] if a.only == "reference" else a.tier_list:
            try:
                train = ours.load(tier, setup)
            except Exception as e:  # noqa: BLE001 - a tier file that does not load is that tier's failure
                tiers.append(_failed(tier.label, tier.shown, e))
                continue
            cache, precomputed = None, None
            if train.data.cache:
                key = ours.cache_key(train)
                if key not in made:
                    path = setup.work / f"cache-{len(made)}"
                    made[key] = (
                        path,
                        pool.submit(_guarded, f"precompute {path.name}", None, ours.precompute, tier, setup, path),
                    )
                cache, precomputed = made[key]
            tiers.append(pool.submit(_guarded, tier.label, tier.shown, _train, tier, setup, cache, precomputed))
        if a.only != "ours" and ref is None:
            ref = pool.submit(_guarded, "reference", None, run_reference, a, setup, base, data)
        result["precompute"] = [f.result() for _, f in made.values()]
        result["runs"] = [t if isinstance(t, dict) else t.result() for t in tiers] + ([ref.result()] if ref else [])


def _guarded(name: str, config: str | None, job, *args) -> dict:
    try:
        return job(*args)
    except Exception as e:  # noqa: BLE001 - reported in its row, and on stderr as it happens
        return _failed(name, config, e)


def _failed(name: str, config: str | None, error: Exception) -> dict:
    print(f"{name} failed: {error}", file=sys.stderr, flush=True)
    return {"name": name, **({"config": config} if config else {}), "error": str(error)}


def _train(tier: ours.Tier, setup: ours.Setup, cache: Path | None, precomputed: Future | None) -> dict:
    if precomputed is not None and "error" in (made := precomputed.result()):
        raise Failed(f"its cache could not be made: {made['error']}")
    return ours.train(tier, setup, cache)


def run_reference(a, setup: ours.Setup, base: Path, data: Path) -> dict:
    return reference.run_reference(
        a.reference,
        base=base,
        data=data,
        work=setup.work,
        batch=a.batch_size,
        resolution=a.resolution,
        steps=a.steps,
        precision=a.precision,
        workers=REF_WORKERS if a.workers is None else a.workers,
        shim=a.torchvision_shim or (a.cpu and not reference.torchvision_importable()),
        env=setup.env,
        family=a.family,
        extra=REF_EXTRA.get(a.family, []) if not a.cpu else [],
    )


def count_flops(result: dict, base: Path) -> None:
    """Each row's counted FLOPs per sample (bench/flops.py), once per distinct step shape: what
    the step encodes, images (uncached) and text (uncached, unless the reference encoded its
    prompts before training, as train_controlnet_sdxl.py does)."""
    counted: dict[tuple, float] = {}
    models = None
    for row in result["runs"]:
        if "error" in row:
            continue
        key = (row["resolution"], row["batch_size"], not row["cached"], row.get("text_per_step", not row["cached"]))
        if key not in counted:
            models = models or (
                flops.meta_models(base, controlnet_layers=12) if _sd3_12(base) else flops.meta_models(base)
            )
            counted[key] = flops.flops_per_sample(models, key[1], key[0], encode=key[2], text=key[3])
        row["flops_per_sample"] = counted[key]


def _sd3_12(base: Path) -> bool:
    """An SD3 base the sd3 tier (and the reference) give a 12-block ControlNet: 13 joint blocks or more."""
    config = Path(base) / "transformer" / "config.json"
    if not config.is_file():
        return False
    spec = json.loads(config.read_text())
    return spec.get("_class_name") == "SD3Transformer2DModel" and spec.get("num_layers", 0) > 12


def finish(result: dict, peak: float | None) -> None:
    """MFU and the ratios to the reference, on every row that ran."""
    ref = next((r for r in result["runs"] if r["name"] == "reference" and "error" not in r), None)
    for row in result["runs"]:
        if "error" in row:
            continue
        row["mfu"] = _round(flops.mfu(row["flops_per_sample"], row["samples_per_s"], peak), 4)
        if ref is not None and row is not ref:
            row["speedup"] = round(row["samples_per_s"] / ref["samples_per_s"], 3)
            if row["peak_memory_gib"] and ref["peak_memory_gib"]:
                row["memory_ratio"] = round(row["peak_memory_gib"] / ref["peak_memory_gib"], 3)


def table(result: dict) -> str:
    cols = [
        ("run", "name", "{}"),
        ("batch", "batch_size", "{}"),
        ("px", "resolution", "{}"),
        ("samples/s", "samples_per_s", "{:.2f}"),
        ("s/step", "median_step_s", "{:.4f}"),
        ("TFLOP/sample", "flops_per_sample", "{:.4g}", 1e12),
        ("MFU", "mfu", "{:.1%}"),
        ("peak GiB", "peak_memory_gib", "{:.2f}"),
        ("warm-up s", "warmup_s", "{:.1f}"),
        ("compile s", "compile_s", "{:.1f}"),
        ("x ref", "speedup", "{:.2f}"),
        ("mem x ref", "memory_ratio", "{:.2f}"),
    ]
    lines = [[c[0] for c in cols]]
    for row in result["runs"]:
        if "error" in row:
            lines.append([row["name"], "failed: " + row["error"].splitlines()[0]])
            continue
        cells = []
        for col in cols:
            value = row.get(col[1])
            if value is not None and len(col) > 3:
                value = value / col[3]
            cells.append("-" if value is None else col[2].format(value))
        lines.append(cells)
    widths = [max(len(line[i]) for line in lines if i < len(line)) for i in range(len(cols))]
    out = ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=False)).rstrip() for line in lines]
    for p in result["precompute"]:
        out.append(f"precompute ({p['for']}): {p['rows']} rows in {p['seconds']} s -> {p['cache']}")
    out += [f"{row['name']}: {row['patch']}" for row in result["runs"] if row.get("patch")]
    return "\n".join(out)


def _round(x: float | None, digits: int) -> float | None:
    return None if x is None else round(x, digits)


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    work = a.work or Path(tempfile.mkdtemp(prefix="ctrlnet-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    if a.cpu:
        env["CUDA_VISIBLE_DEVICES"] = ""  # the smoke run is a CPU run even on a GPU machine
    batches = [t.batch or ours.file_batch(t) for t in a.tier_list] + [a.batch_size]
    base, data = prepare(a, work, rows=max(batches) * (a.steps + 2))
    setup = ours.Setup(base, data, work, a.steps, a.resolution, a.workers, a.cpu, env)
    result: dict = {"env": environment(a.cpu), "steps": a.steps, "arch": a.arch, "work": str(work)}
    result["reference_script"] = str(a.reference)
    peak = a.peak_tflops or (None if a.cpu else flops.peak_tflops(result["env"].get("device")))
    result["peak_tflops"] = peak
    if a.only != "ours" and a.family == "sd3" and not _sd3_12(base):
        why = f"{a.reference.name} builds a 12-block ControlNet: the {a.arch} base has 12 joint blocks or fewer"
        if not a.cpu:
            sys.exit(f"error: {why}; use --arch sd3.5-medium, or pass --only ours")
        result["reference_skipped"] = why
        print(f"reference skipped: {why}", file=sys.stderr, flush=True)
        a.only = "ours"
    if a.only != "ours" and not a.reference.is_file():
        why = f"no reference script at {a.reference} (bench/README.md: how to fetch it)"
        if not a.cpu:
            sys.exit(f"error: {why}; or pass --only ours")
        result["reference_skipped"] = why  # offline, e.g. CI: the smoke run is ours alone
        print(f"reference skipped: {why}", file=sys.stderr, flush=True)
        a.only = "ours"
    run_all(a, setup, base, data, result)
    count_flops(result, base)
    finish(result, peak)
    print(table(result), flush=True)
    print("COMPARE_RESULT " + json.dumps(result), flush=True)
    return 1 if any("error" in r for r in result["runs"]) else 0


if __name__ == "__main__":
    sys.exit(main())
