"""The demo's benchmark: does `make demo`'s ControlNet follow its outlines, within its time budget?

Trains the embedded demo (cli/ctrlnet/presets/demo.yaml: the shipped pretrained demo base,
synthetic circles in its 12 colours) once per seed, each in a fresh process as `make demo` runs
it, and prints per seed: the training time (wall time of the steps, validation excluded, from
metrics.jsonl), the condition adherence before training (the zero ControlNet: the base alone) and
after, on held-out outlines, with the chance level; then the mean, spread and the ratio to chance.

    .venv/bin/python tools/demo_adherence.py                       # seeds 0 1 2, the preset as it is
    .venv/bin/python tools/demo_adherence.py --seeds 0 --set train.loop.max_steps=1500 \\
        --set train.optim.learning_rate=2e-3                       # a variant of the preset
    .venv/bin/python tools/demo_adherence.py --rows 64              # score more held-out rows
    .venv/bin/python tools/demo_adherence.py --seeds 0 --grid docs/demo-grid.png   # the README's grid

--grid: after the first seed, held-out outlines beside what the base draws for them with the
untrained (zero) ControlNet and with the trained one, written as one PNG (docs/demo-grid.png).

Prints one `DEMO_ADHERENCE {json}` line at the end.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run_seed(seed: int, rows: int, overrides: list[str], work: Path) -> dict:
    out = work / f"seed-{seed}"
    cmd = [sys.executable, "-m", "ctrlnet", "train", "--output", str(out)]
    for item in [f"train.loop.seed={seed}", f"train.validation.adherence_rows={rows}", *overrides]:
        cmd += ["--set", item]
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    wall = time.perf_counter() - start
    if done.returncode:
        raise SystemExit(f"seed {seed} failed:\n{done.stdout[-2000:]}\n{done.stderr[-2000:]}")
    rows_ = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines() if line.strip()]
    steps = [r for r in rows_ if "loss" in r]
    scored = [r for r in rows_ if "adherence_iou" in r]
    before, after = scored[0], scored[-1]
    return {
        "seed": seed,
        "steps": steps[-1]["step"],
        "train_s": round(sum(r["step_s"] for r in steps) * _logged_every(steps), 1),
        "wall_s": round(wall, 1),
        "before": before["adherence_iou"],
        "chance_before": before["adherence_chance"],
        "after": after["adherence_iou"],
        "chance": after["adherence_chance"],
        "grid": str(out / "samples" / f"step-{steps[-1]['step']}.png"),
    }


def write_grid(run: Path, out: Path, rows: int = 6, scale: int = 2) -> None:
    """Columns: outline, the zero ControlNet's image, the trained ControlNet's image; one row per
    held-out outline (past the validation rows), at `scale` x the training resolution."""
    import torch
    from diffusers import ControlNetModel
    from PIL import Image

    from ctrlnet.config.loading import load_job_config
    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.adherence import adherence
    from ctrlnet_trainer.data import synthetic_row
    from ctrlnet_trainer.validation import grid, sample

    cfg = load_job_config(str(ROOT / "cli/ctrlnet/presets/demo.yaml")).train
    state = json.loads((run / "run.json").read_text())
    seed = int(state["seed"])
    cpu = torch.device("cpu")
    models = model_lib.load_models(cfg, seed)
    d = cfg.data
    pairs = [
        (r["text"], r["conditioning_image"])
        for r in (
            synthetic_row(d.synthetic_rows + 500 + k, d.resolution, seed, d.synthetic_colours) for k in range(rows)
        )
    ]
    trained = ControlNetModel.from_pretrained(run / "controlnet")
    before = sample(models, models.controlnet, pairs, cfg, torch.float32, cpu, seed)
    after = sample(models, trained, pairs, cfg, torch.float32, cpu, seed)
    conds = [image for _, image in pairs]
    size = d.resolution * scale
    big = lambda im: im.resize((size, size), Image.NEAREST)  # noqa: E731
    grid([[big(c), big(b), big(a)] for c, b, a in zip(conds, before, after, strict=True)]).save(out)
    a, b = adherence(after, conds), adherence(before, conds)
    print(f"grid {out}: {rows} outlines | zero ControlNet (IoU {b['iou']:.2f}) | trained (IoU {a['iou']:.2f})")


def _logged_every(steps: list[dict]) -> int:
    """Steps per metrics row (logging.every_steps): step_s is a per-step mean over the window."""
    return steps[1]["step"] - steps[0]["step"] if len(steps) > 1 else 1


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--rows", type=int, default=32, help="held-out outlines scored per validation")
    p.add_argument("--set", dest="overrides", action="append", default=[], help="KEY=VALUE on top of the preset")
    p.add_argument("--work", type=Path, default=None, help="folder for the runs (default: a temporary one)")
    p.add_argument("--grid", type=Path, default=None, help="write the outline | before | after grid here")
    p.add_argument("--grid-from", type=Path, default=None, help="a finished demo run: only write --grid from it")
    a = p.parse_args(argv)
    if a.grid_from:
        write_grid(a.grid_from, a.grid or Path("demo-grid.png"))
        return
    work = a.work or Path(tempfile.mkdtemp(prefix="ctrlnet-demo-"))
    results = []
    print(f"{'seed':>4} {'steps':>5} {'train s':>7} {'wall s':>6} {'before':>6} {'after':>6} {'chance':>6} {'x':>5}")
    for seed in a.seeds:
        r = run_seed(seed, a.rows, a.overrides, work)
        results.append(r)
        print(
            f"{r['seed']:>4} {r['steps']:>5} {r['train_s']:>7} {r['wall_s']:>6} {r['before']:>6.3f} "
            f"{r['after']:>6.3f} {r['chance']:>6.3f} {r['after'] / r['chance']:>5.2f}",
            flush=True,
        )
    if a.grid:
        write_grid(work / f"seed-{a.seeds[0]}", a.grid)
    after = [r["after"] for r in results]
    ratios = [r["after"] / r["chance"] for r in results]
    summary = {
        "overrides": a.overrides,
        "rows": a.rows,
        "runs": results,
        "after_mean": round(statistics.mean(after), 3),
        "after_range": [min(after), max(after)],
        "ratio_mean": round(statistics.mean(ratios), 2),
        "ratio_min": round(min(ratios), 2),
        "train_s_max": max(r["train_s"] for r in results),
    }
    print(
        f"after training: IoU {summary['after_mean']:.3f} (range {min(after):.3f}-{max(after):.3f}), "
        f"{summary['ratio_mean']:.2f}x chance (lowest {summary['ratio_min']:.2f}x); "
        f"training at most {summary['train_s_max']} s"
    )
    print("DEMO_ADHERENCE " + json.dumps(summary), flush=True)


if __name__ == "__main__":
    main()
