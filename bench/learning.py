"""Does ctrlnet's flow-family ControlNet learn as diffusers' reference script's does? Side by side,
on one shared tiny base and one synthetic dataset, scored by one evaluator.

    OMP_NUM_THREADS=1 python bench/learning.py --family sd3 --seeds 0,1,2 --steps 200
    OMP_NUM_THREADS=1 python bench/learning.py --family flux --seeds 0,1,2 --steps 200

For each seed it trains
  (a) diffusers' train_controlnet_sd3.py / train_controlnet_flux.py, unchanged (.ref/, git-ignored:
      bench/README.md), through bench/ref_runner.py and, where torchvision is not importable, the
      CPU torchvision shim (bench/cpu_shim), with the flags bench/reference.py gives a flow script
      (data columns, depth, T5 length) and lr, batch, resolution, steps and seed set here, no
      validation, mixed precision no; and
  (b) ctrlnet (`python -m ctrlnet train -f <job file>`) on the same base, data, lr, batch, steps and
      seed, with the script's defaults for everything else that both have (constant LR schedule;
      AdamW betas 0.9/0.999, eps 1e-8, weight decay 1e-2; max grad norm 1.0; logit-normal timestep
      density; SD3 preconditioned, Flux.1 not) and the same ControlNet depth,
then scores the zero ControlNet (made from the base: what step 0 is) and each trained one with
ctrlnet_trainer.validation.heldout_loss on fixed held-out synthetic rows (past the training ones,
rows + 100 onward) with fixed draws, and reports trained / zero.

The base. SD3: train_controlnet_sd3.py always builds 12 joint blocks (SD3ControlNetModel.
from_transformer's default) and needs a base of 13 or more, so the SD3 base is tiny-sd3 with 13
joint blocks (`tiny-sd3-13`, registered here at run time) and ctrlnet gets model.controlnet_layers
12. Flux.1: tiny-flux (2 double + 2 single blocks); both sides get a 2 + 2 ControlNet.

The evaluators (both for each family):
  `objective`  the family's training objective as ctrlnet's config builds it (SD3: EDM-
               preconditioned, as the SD3 script trains; Flux.1: the velocity MSE);
  `velocity`   plain velocity MSE (FlowMatching(precondition=False); the logit-normal scheme's loss
               weights are all 1, so unweighted), with the same draws.

What one evaluator cannot make equal (SD3 only): train_controlnet_sd3.py feeds its ControlNet the
condition in [0, 1] (no Normalize) and saves a ControlNet whose config says
force_zeros_for_pooled_projection (diffusers' default), which StableDiffusion3ControlNetPipeline,
and so ctrlnet's evaluator, reads as "zero pooled text, no VAE shift on the condition latents" —
while the script trained it on the real pooled text with the shift. So the SD3 reference is scored
twice: `as saved` (what the pipeline would give it) and `as trained` (its config's
force_zeros_for_pooled_projection set False and the condition pixels mapped so that the ControlNet
sees [0, 1]: the inputs it trained on). ctrlnet's ControlNet is trained and scored on the
pipeline's inputs (models/sd3.py). Flux.1's script and ctrlnet feed the same inputs.

Prints a table and one `LEARNING_RESULT {json}` line; everything is kept under --work.

Measured (2 CPU cores shared with a test run, OMP_NUM_THREADS=1 per process, 200 steps, lr 1e-4,
batch 8, 64 px, 400 rows; 32 held-out rows from row 500; held-out loss trained / zero):
    family  seed  reference (objective / velocity)         ctrlnet (objective / velocity)
    sd3     0     0.9093 / 0.9089 (as trained 0.9087 / 0.9078)   0.9080 / 0.9073
    sd3     1     0.9090 / 0.9088 (as trained 0.9083 / 0.9075)   0.9086 / 0.9079
    sd3     2     0.9092 / 0.9090 (as trained 0.9085 / 0.9078)   0.9084 / 0.9076
    flux    0     0.8049                                         0.8047
    flux    1     0.8046                                         0.8050
    flux    2     0.8046                                         0.8045
On these tiny bases the reference itself reaches ~0.909 (SD3, 13 blocks, 12-block ControlNet) and
~0.805 (Flux.1), and ctrlnet matches it within 0.001 on every seed.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: make the `bench` package importable

FAMILIES = ("sd3", "flux")
ARCH = {"sd3": "tiny-sd3-13", "flux": "tiny-flux"}
SD3_BLOCKS = 13  # the reference builds 12; the base needs one more (module docstring)
# ctrlnet's ControlNet depth, the same as the reference's (bench/reference.py family_args)
DEPTH = {"sd3": {"controlnet_layers": 12}, "flux": {"controlnet_layers": 2, "controlnet_single_layers": 2}}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--family", required=True, choices=FAMILIES)
    p.add_argument("--seeds", default="0", help="comma-separated training seeds (default 0)")
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--rows", type=int, default=400, help="training rows of the synthetic data (default 400)")
    p.add_argument("--heldout", type=int, default=32, help="held-out rows scored (default 32, in batches of 8)")
    p.add_argument("--sides", default="reference,ctrlnet", help="which to train: reference, ctrlnet or both")
    p.add_argument("--work", type=Path, default=None, help="work folder (default /tmp/ctrlnet-learning-<family>)")
    a = p.parse_args(argv)
    try:
        a.seeds = [int(s) for s in a.seeds.split(",") if s.strip()]
    except ValueError:
        p.error(f"--seeds {a.seeds!r}: give comma-separated integers, e.g. 0,1,2")
    if not a.seeds:
        p.error("--seeds: give at least one seed")
    a.sides = [s.strip() for s in a.sides.split(",") if s.strip()]
    if not a.sides or any(s not in ("reference", "ctrlnet") for s in a.sides):
        p.error(f"--sides {','.join(a.sides)!r}: use reference, ctrlnet or reference,ctrlnet")
    for name in ("steps", "batch_size", "rows", "heldout"):
        if getattr(a, name) <= 0:
            p.error(f"--{name.replace('_', '-')} must be positive")
    if a.resolution % 16:
        p.error("--resolution must be a multiple of 16 (2x2 patches of the 8x latents)")
    if a.heldout % 8:
        p.error("--heldout must be a multiple of 8 (batches of 8)")
    a.work = a.work or Path(f"/tmp/ctrlnet-learning-{a.family}")
    return a


# ------------------------------------------------------------------ base and data
def register_sd3_13() -> None:
    """tiny-sd3 with 13 joint blocks, under ARCH["sd3"] (in this process only; tiny.py unchanged)."""
    from ctrlnet_trainer.models.tiny import FLOW_ARCHS

    spec = copy.deepcopy(FLOW_ARCHS["tiny-sd3"])
    spec["transformer"]["num_layers"] = SD3_BLOCKS
    FLOW_ARCHS[ARCH["sd3"]] = spec


def prepare(a) -> tuple[Path, Path]:
    """The shared base (seed 0) and synthetic data (seed 0), written once per work folder."""
    from ctrlnet_trainer.models.tiny import write_base
    from ctrlnet_trainer.synthetic import write_fill_parquet

    register_sd3_13()
    base, data = a.work / f"base-{ARCH[a.family]}", a.work / f"data-{a.resolution}px-{a.rows}"
    if not (base / "model_index.json").exists():
        print(f"+ write_base({base}, arch={ARCH[a.family]}, seed=0)", flush=True)
        write_base(base, arch=ARCH[a.family], seed=0, overwrite=True)
    if not (data / "train.parquet").exists():
        print(f"+ ctrlnet data synth-fill --rows {a.rows} --resolution {a.resolution} --out {data}", flush=True)
        write_fill_parquet(str(data), rows=a.rows, resolution=a.resolution, seed=0, overwrite=True)
    return base, data


def environment() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    env["CUDA_VISIBLE_DEVICES"] = ""  # a CPU comparison
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


# ------------------------------------------------------------------ the two sides
def reference_command(a, seed: int, base: Path, data: Path, out: Path) -> list[str]:
    from bench.reference import SCRIPTS, family_args, torchvision_importable

    cmd = [
        sys.executable,
        str(ROOT / "bench" / "ref_runner.py"),
        str(SCRIPTS[a.family]),
        f"--pretrained_model_name_or_path={base}",
        *family_args(a.family, base, data),
        f"--output_dir={out}",
        f"--resolution={a.resolution}",
        f"--train_batch_size={a.batch_size}",
        f"--max_train_steps={a.steps}",
        "--mixed_precision=no",
        "--dataloader_num_workers=0",
        f"--checkpointing_steps={a.steps * 10}",  # none
        f"--learning_rate={a.lr}",
        f"--seed={seed}",
        "--report_to=tensorboard",
    ]
    if not torchvision_importable():
        cmd.insert(1, str(ROOT / "bench" / "cpu_shim" / "run_with_shim.py"))
    return cmd


def ctrlnet_config(a, seed: int, base: Path, data: Path, out: Path) -> dict:
    """The `train` section: the run's place, length and hyper-parameters; the script's defaults
    spelled out where both have them (they are also ctrlnet's defaults)."""
    return {
        "output": str(out),
        "model": {"base": str(base), **DEPTH[a.family]},
        "data": {"dataset": str(data), "resolution": a.resolution, "num_workers": 0},
        "optim": {
            "optimizer": "adamw",
            "learning_rate": a.lr,
            "lr_scheduler": "constant",
            "adam_beta1": 0.9,
            "adam_beta2": 0.999,
            "adam_epsilon": 1e-8,
            "weight_decay": 1e-2,
            "max_grad_norm": 1.0,
        },
        "loop": {
            "seed": seed,
            "batch_size": a.batch_size,
            "max_steps": a.steps,
            "mixed_precision": "no",
            "weighting_scheme": "logit_normal",
            "device": "cpu",
        },
        "checkpoint": {"every_steps": a.steps * 10},
        # validation cannot be turned off: one cheap one at the end
        "validation": {"every_steps": a.steps * 10, "num_images": 1, "num_inference_steps": 1, "adherence_rows": 0},
        "logging": {"report_to": "none"},
    }


def train_reference(a, seed: int, base: Path, data: Path, env: dict) -> dict:
    from bench.steps import run

    work = a.work / f"seed{seed}"
    out = work / "reference"
    work.mkdir(parents=True, exist_ok=True)
    cmd = reference_command(a, seed, base, data, out)
    text, wall = run(cmd, work / "reference.log", env)
    line = next((ln for ln in reversed(text.splitlines()) if ln.startswith("REFERENCE_RESULT ")), None)
    steps = json.loads(line.split(" ", 1)[1])["step_s"] if line else []
    return {"controlnet": str(out), "wall_s": round(wall, 1), "train_s": round(sum(steps), 1), "command": cmd}


def train_ctrlnet(a, seed: int, base: Path, data: Path, env: dict) -> dict:
    from bench.steps import run

    work = a.work / f"seed{seed}"
    out = work / "ctrlnet"
    work.mkdir(parents=True, exist_ok=True)
    job = work / "ctrlnet.yaml"
    job.write_text(json.dumps({"train": ctrlnet_config(a, seed, base, data, out)}, indent=2))  # JSON is YAML
    cmd = [sys.executable, "-m", "ctrlnet", "train", "-f", str(job)]
    _, wall = run(cmd, work / "ctrlnet.log", env)
    rows = [json.loads(ln) for ln in (out / "metrics.jsonl").read_text().splitlines() if ln.strip()]
    train_s, previous = 0.0, 0
    for r in rows:  # step_s: the mean of the window since the previous row
        train_s, previous = train_s + r["step_s"] * (r["step"] - previous), r["step"]
    return {"controlnet": str(out / "controlnet"), "wall_s": round(wall, 1), "train_s": round(train_s, 1) or None}


# ------------------------------------------------------------------ the evaluator
def heldout_batches(a, cfg, models) -> list[dict]:
    """Synthetic rows rows+100 .. (seed 0, the training data's): never trained on."""
    from ctrlnet_trainer import data

    first = a.rows + 100
    source = data.Source(data.SyntheticFillSource(first + a.heldout, a.resolution, 0), None)
    examples = data.Examples.of(source, cfg.data, models, 0)
    return [data.collate([examples[(first + b + i, 0)] for i in range(8)]) for b in range(0, a.heldout, 8)]


def as_trained(batches: list[dict]) -> list[dict]:
    """The batches with the condition pixels p -> (p + 1) / 2: ctrlnet maps [0, 1] to [-1, 1]
    before the VAE (models/flow.py), so the ControlNet sees [0, 1], as train_controlnet_sd3.py fed it."""
    return [{**b, "conditioning_pixel_values": (b["conditioning_pixel_values"] + 1.0) / 2.0} for b in batches]


def evaluate(a, base: Path, data: Path, runs: dict) -> dict:
    """{evaluator: {"zero": loss, (side, seed, variant): loss}} on one set of held-out batches."""
    import torch

    from ctrlnet.config.train import TrainConfig
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.models.objective import FlowMatching
    from ctrlnet_trainer.validation import heldout_loss

    cpu = torch.device("cpu")
    cfg = TrainConfig.model_validate(ctrlnet_config(a, 0, base, data, a.work / "eval"))
    models = load_models(cfg, 0)  # its controlnet: made from the base, zero outputs
    batches = heldout_batches(a, cfg, models)
    objectives = {
        "objective": models.objective,
        "velocity": FlowMatching(models.noise_scheduler, cfg.loop.weighting_scheme, precondition=False),
    }
    loaded = {}
    for (side, seed), run in runs.items():
        controlnet = models.family.load_controlnet(run["controlnet"], None)
        loaded[(side, seed, "as saved" if side == "reference" and a.family == "sd3" else "")] = (controlnet, batches)
        if side == "reference" and a.family == "sd3":
            trained = models.family.load_controlnet(run["controlnet"], None)
            trained.register_to_config(force_zeros_for_pooled_projection=False)
            loaded[(side, seed, "as trained")] = (trained, as_trained(batches))
    scores: dict = {}
    for name, objective in objectives.items():
        models.objective = objective
        scores[name] = {"zero": heldout_loss(models, models.controlnet, batches, torch.float32, cpu)}
        for key, (controlnet, b) in loaded.items():
            scores[name][key] = heldout_loss(models, controlnet, b, torch.float32, cpu)
    return scores


# ------------------------------------------------------------------ report
def table(a, runs: dict, scores: dict) -> tuple[str, list[dict]]:
    rows = []
    for side, seed, variant in [k for k in scores["objective"] if k != "zero"]:
        row = {"family": a.family, "seed": seed, "side": side, "variant": variant or None}
        for name, s in scores.items():
            row[f"{name}_loss"] = round(s[(side, seed, variant)], 5)
            row[f"{name}_zero"] = round(s["zero"], 5)
            row[f"{name}_ratio"] = round(s[(side, seed, variant)] / s["zero"], 4)
        row["wall_s"] = runs[(side, seed)]["wall_s"]
        row["train_s"] = runs[(side, seed)]["train_s"]
        rows.append(row)
    rows.sort(key=lambda r: (r["seed"], r["side"] != "reference", r["variant"] or ""))
    head = f"{'family':6} {'seed':>4} {'side':28} {'ratio (objective)':>18} {'ratio (velocity)':>17} {'wall s':>8}"
    lines = [head, "-" * len(head)]
    for r in rows:
        side = r["side"] + (f" ({r['variant']})" if r["variant"] else "")
        lines.append(
            f"{r['family']:6} {r['seed']:>4} {side:28} {r['objective_ratio']:>18.4f} {r['velocity_ratio']:>17.4f} "
            f"{r['wall_s']:>8.1f}"
        )
    zero = ", ".join(f"{name} {s['zero']:.5f}" for name, s in scores.items())
    lines.append(f"zero ControlNet held-out loss: {zero} ({a.heldout} rows from row {a.rows + 100})")
    return "\n".join(lines), rows


def main(argv: list[str] | None = None) -> int:
    a = parse_args(argv)
    a.work.mkdir(parents=True, exist_ok=True)
    env = environment()
    os.environ.setdefault("OMP_NUM_THREADS", env["OMP_NUM_THREADS"])
    import torch

    torch.set_num_threads(int(env["OMP_NUM_THREADS"]))
    started = time.perf_counter()
    base, data = prepare(a)
    runs: dict = {}
    for seed in a.seeds:
        for side in a.sides:
            trainer = train_reference if side == "reference" else train_ctrlnet
            runs[(side, seed)] = trainer(a, seed, base, data, env)
            print(f"{side} seed {seed}: {runs[(side, seed)]['wall_s']} s", flush=True)
    scores = evaluate(a, base, data, runs)
    text, rows = table(a, runs, scores)
    print(text)
    result = {
        "family": a.family,
        "arch": ARCH[a.family],
        "steps": a.steps,
        "lr": a.lr,
        "batch_size": a.batch_size,
        "resolution": a.resolution,
        "rows": a.rows,
        "heldout": a.heldout,
        "omp_num_threads": env["OMP_NUM_THREADS"],
        "rows_scored": rows,
        "total_s": round(time.perf_counter() - started, 1),
        "work": str(a.work),
    }
    name = "result-s" + "-".join(map(str, a.seeds)) + ".json"
    (a.work / name).write_text(json.dumps(result, indent=2))
    print("LEARNING_RESULT " + json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
