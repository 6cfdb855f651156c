"""Our side of the benchmark: each tier is a job file in bench/tiers/ that a user trains with
(`ctrlnet train -f bench/tiers/<tier>.yaml`), run here exactly so — through `ctrlnet train` —
with only the run's place and length set on top (base, data, cache, output, steps, seed) and, on
a CPU, the keys only a GPU can run (CPU_OVERRIDES). A cached tier's cache is made first by
`ctrlnet precompute` on the same file, once per distinct cache, and timed on its own. The SDXL
tiers (SDXL_TIERS) encode online: SDXL cannot use the precompute cache, so they have none, and a
cached tier is refused for an SDXL base before anything runs (check_family)."""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass
from pathlib import Path

from bench.steps import run, summarize

TIERS_DIR = Path(__file__).resolve().parent / "tiers"
TIERS = ("fastest", "6gb", "zero-offload")  # SD1.5: cached (the precompute)
SDXL_TIERS = ("sdxl-fastest", "sdxl-24gb")  # SDXL: online encoding (SDXL cannot use data.cache)
FLOW_TIERS = ("flux-dev", "sd3.5-medium")  # Flux.1 and SD3: cached (T5 and the VAE precomputed)
ALL_TIERS = TIERS + SDXL_TIERS + FLOW_TIERS

# The GPU-only keys, per tier, and what a CPU runs instead (the CPU smoke of bench/compare.py --cpu
# and tests/test_bench.py): compiling the step is for the GPU (inductor on a CPU compiles for
# minutes); channels_last is for tensor-core convolutions (on this CPU it made a step ~7x slower);
# DeepSpeed's mixed precision needs CUDA. Everything else in the tier files runs on a CPU as is.
CPU_OVERRIDES: dict[str, dict[str, str]] = {
    "fastest": {"train.loop.compile": "off", "train.loop.channels_last": "off"},
    "6gb": {},
    "zero-offload": {"train.loop.mixed_precision": "no"},
    "sdxl-fastest": {},  # compile and channels_last `auto`: off on a CPU by themselves
    "sdxl-24gb": {},
    # The tiny CPU bases cannot give the tiers' ControlNet depth: tiny-flux has 2 double and 2
    # single blocks (its reference is given the same), tiny-sd3 4 joint blocks where the sd3 tier
    # asks for 12 (what train_controlnet_sd3.py builds; its reference is skipped on tiny-sd3).
    "flux-dev": {"train.model.controlnet_layers": "2", "train.model.controlnet_single_layers": "2"},
    "sd3.5-medium": {"train.model.controlnet_layers": "3"},
}

# The CPU smoke run (bench/compare.py --cpu) also trains every tier in fp32: bf16 autocast on a CPU
# is emulated (slower, and no statement about the GPU), and one precision lets every cached tier
# share one cache, so the smoke precomputes once.
CPU_SMOKE = {"train.loop.mixed_precision": "no"}

CLI = [sys.executable, "-m", "ctrlnet"]


@dataclass(frozen=True)
class Tier:
    name: str
    batch: int | None = None  # None: the tier file's own batch size

    @property
    def label(self) -> str:
        return self.name if self.batch is None else f"{self.name}@{self.batch}"

    @property
    def file(self) -> Path:
        return TIERS_DIR / f"{self.name}.yaml"

    @property
    def shown(self) -> str:
        """The file as a user runs it: relative to the repository."""
        root = Path(__file__).resolve().parent.parent
        return str(self.file.relative_to(root)) if self.file.is_relative_to(root) else str(self.file)

    @classmethod
    def parse(cls, spec: str) -> Tier:
        """`fastest` or `fastest@32` (the tier at another batch size)."""
        name, _, batch = spec.strip().partition("@")
        if name not in ALL_TIERS:
            raise ValueError(f"unknown tier {name!r}: use one of {', '.join(ALL_TIERS)} (optionally @BATCH)")
        if batch and not (batch.isdigit() and int(batch) > 0):
            raise ValueError(f"tier {spec!r}: the batch after @ must be a positive number")
        return cls(name, int(batch) if batch else None)


@dataclass
class Setup:
    """What every run of one benchmark shares."""

    base: Path
    data: Path
    work: Path
    steps: int
    resolution: int | None  # None: each tier's own
    workers: int | None
    cpu: bool
    env: dict


def overrides(tier: Tier, s: Setup) -> list[str]:
    """--set arguments: the run's place and length, then (on a CPU) the GPU-only keys."""
    sets = {
        "train.model.base": str(s.base),
        "train.data.dataset": str(s.data),
        "train.loop.max_steps": str(s.steps),
        "train.loop.seed": "0",
        "train.checkpoint.every_steps": str(s.steps * 10),  # no checkpoint inside the timed steps
        "train.logging.report_to": "none",
        "train.logging.every_steps": "1",  # one metrics row per step: its time
    }
    if tier.batch is not None:
        sets["train.loop.batch_size"] = str(tier.batch)
    if s.resolution is not None:
        sets["train.data.resolution"] = str(s.resolution)
    if s.workers is not None:
        sets["train.data.num_workers"] = str(s.workers)
    if s.cpu:
        sets.update(CPU_OVERRIDES[tier.name])
        sets.update(CPU_SMOKE)
    return [arg for key, value in sets.items() for arg in ("--set", f"{key}={value}")]


def file_batch(tier: Tier) -> int:
    return file_config(tier).loop.batch_size


def file_config(tier: Tier):
    """The tier file's train config as it is (no base, data or overrides)."""
    from ctrlnet.config import load_job_config

    return load_job_config(tier.file).train


def check_family(tier: Tier, family: str) -> None:
    """A tier runs on the family it is written for: a cached tier cannot train SDXL (the precompute
    cache holds SD1.x/2.x embeddings only), an SDXL tier (model.family sdxl) needs an SDXL base."""
    train = file_config(tier)
    if family == "sdxl" and train.data.cache:
        raise ValueError(
            f"tier {tier.name} reads a precompute cache (data.cache), which SDXL cannot use (it encodes "
            f"online): for an SDXL arch use {', '.join(SDXL_TIERS)}"
        )
    if family != "sdxl" and train.model.family == "sdxl":
        raise ValueError(
            f"tier {tier.name} is for SDXL bases (model.family sdxl): use --arch sdxl or tiny-sdxl, "
            f"or the SD tiers {', '.join(TIERS)}"
        )


def load(tier: Tier, s: Setup):
    """The tier's config as this benchmark runs it (validated like `ctrlnet train` would)."""
    from ctrlnet.config import load_job_config

    return load_job_config(tier.file, overrides(tier, s)[1::2]).train


def cache_key(train) -> str:
    """Tiers whose cached rows would be the same share one cache (precomputed once)."""
    return json.dumps(
        [train.model.model_dump(), train.data.resolution, train.loop.mixed_precision, train.loop.seed], sort_keys=True
    )


def precompute(tier: Tier, s: Setup, cache: Path) -> dict:
    text, wall = run(
        [*CLI, "precompute", "-f", str(tier.file), *overrides(tier, s), "--set", f"train.data.cache={cache}"],
        s.work / f"precompute-{cache.name}.log",
        s.env,
    )
    rows = next((ln.split()[-1] for ln in text.splitlines() if ln.startswith("rows:")), None)
    return {"cache": str(cache), "rows": int(rows) if rows else None, "seconds": round(wall, 1), "for": tier.label}


def train(tier: Tier, s: Setup, cache: Path | None) -> dict:
    out = s.work / "runs" / tier.label
    if out.exists():  # a new run each time: the trainer refuses an output that holds one
        import shutil

        shutil.rmtree(out)
    extra = ["--set", f"train.data.cache={cache}"] if cache else []
    cmd = [*CLI, "train", "-f", str(tier.file), *overrides(tier, s), *extra, "--output", str(out)]
    _, wall = run(cmd, s.work / f"train-{tier.label}.log", s.env)
    cfg = load(tier, s)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    per_step = cfg.loop.batch_size * cfg.loop.gradient_accumulation_steps
    # Logging every step, each row is one step: its wall time, data waits included, as the
    # reference's step times are (step_s; older trainers: from the row's samples/s).
    step_s = [r.get("step_s") or per_step / r["samples_per_s"] for r in rows]
    result = {
        "name": tier.label,
        "config": tier.shown,
        "batch_size": cfg.loop.batch_size,
        "resolution": cfg.data.resolution,
        "cached": cache is not None,
        **summarize(step_s, per_step),
        "peak_memory_gib": _peak(rows),
        "compile_s": _first(rows, "compile_s"),
        "data_wait_s": _median(rows, "data_wait_s"),
        "wall_s": round(wall, 1),
    }
    return result


def _peak(rows: list[dict]) -> float | None:
    values = [r.get("peak_memory_gib", r.get("gpu_mem_gib")) for r in rows]
    values = [v for v in values if v is not None]
    return round(max(values), 3) if values else None


def _first(rows: list[dict], key: str) -> float | None:
    return next((r[key] for r in rows if r.get(key) is not None), None)


def _median(rows: list[dict], key: str) -> float | None:
    import statistics

    values = [r[key] for r in rows[max(1, len(rows) // 4) :] if r.get(key) is not None]
    return round(statistics.median(values), 5) if values else None
