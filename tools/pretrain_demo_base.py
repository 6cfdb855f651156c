"""Pretrain the demo base: a tiny 64 px Stable Diffusion base that draws filled circles in 12 colours.

    python tools/pretrain_demo_base.py --out DIR [--seed 0] [--vae-steps 2000] [--unet-steps 12000]
                                       [--batch 32] [--device auto] [--lr 1e-3] [--threads N]

Three stages, all from scratch and seeded (ctrlnet_trainer.models.demo has the shapes and the data):

1. the VAE (DEMO_ARCH['vae'], 64 px -> 8x8x4 latents) as an autoencoder, MSE + a small KL term, on
   fresh demo rows every step; its latent scaling factor is then measured (1 / the latents' std);
2. the rows the UNet trains on, encoded once by that VAE (latent mean and log-variance; a fresh
   latent sample, noise and timestep every step), and the 132 captions + "" encoded once by the
   frozen random text encoder of the `tiny` arch;
3. the UNet (DEMO_ARCH['unet']) with SD's DDPM epsilon objective, 10% of captions dropped (for
   classifier-free guidance), an EMA of its weights being what is saved.

The UNet and VAE are saved in fp16 (diffusers loads them into fp32 models unless told otherwise),
the text encoder in fp32 (transformers 5 keeps a checkpoint's dtype, and the trainer only casts a
frozen model when training in a lower precision); each later stage sees the earlier one's weights
as saved, rounded to fp16. DIR gets the diffusers layout (model_index.json, unet/, vae/,
text_encoder/, tokenizer/, scheduler/) and provenance.json: the command, seed, steps, periodic and
final losses, the library versions, each weight file's sha256, wall times and two checks of the
saved base (VAE reconstructions' adherence to their outlines; whether samples have the prompt's
colours).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

# Row index ranges of the demo data (seeded by --seed): disjoint for the VAE, the UNet and the checks.
VAE_ROWS = 0
UNET_ROWS = 100_000_000
CHECK_ROWS = 2_000_000_000

KL_WEIGHT = 1e-5  # on the per-element mean KL, next to the per-pixel mean MSE of images in [-1, 1]
CAPTION_DROPOUT = 0.1
EMA_DECAY = 0.999
WARMUP_STEPS = 200
FINAL_LR_FRACTION = 0.1  # cosine decay from --lr to this fraction of it
POOL_ROWS = 65_536  # rows the UNet's latents are encoded for at most (each seen ~6x in 12000 x 32)
CHECK_SAMPLES = 24
CHECK_STEPS = 25


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, type=Path, help="folder for the base (empty, or --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace what --out holds")
    p.add_argument("--seed", type=int, default=0, help="weights, data and every random draw (default 0)")
    p.add_argument("--vae-steps", type=int, default=2000)
    p.add_argument("--unet-steps", type=int, default=12000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3, help="peak learning rate of the UNet (AdamW)")
    p.add_argument("--vae-lr", type=float, default=1e-3, help="peak learning rate of the VAE (AdamW)")
    p.add_argument(
        "--vae-channels",
        default=",".join(str(c) for c in _demo_arch()["vae"]["block_out_channels"]),
        help="the VAE's block_out_channels, four comma-separated numbers (default: models.demo.DEMO_ARCH's)",
    )
    p.add_argument("--device", default="auto", help="auto (cuda if there is one), cpu, cuda, cuda:1, ...")
    p.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch CPU threads (default: torch's, one per core); 1 is much faster on a machine that is busy",
    )
    p.add_argument("--log-every", type=int, default=100, help="steps per logged (averaged) loss")
    p.add_argument("--skip-checks", action="store_true", help="do not sample the saved base at the end")
    args = p.parse_args(argv)
    for name in ("vae_steps", "unet_steps", "batch", "log_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    try:
        args.vae_channels = tuple(int(c) for c in args.vae_channels.split(","))
    except ValueError:
        p.error(f"--vae-channels {args.vae_channels!r}: give four comma-separated numbers, e.g. 16,32,32,32")
    if len(args.vae_channels) != 4:
        p.error("--vae-channels: four blocks (the latents must be 1/8 of the image, as the ControlNet expects)")
    return args


def _demo_arch():
    from ctrlnet_trainer.models.demo import DEMO_ARCH

    return DEMO_ARCH


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", flush=True)


# -- data ------------------------------------------------------------------------------------------


def rows_to_tensor(rows: list[dict], key: str = "image"):
    """[N, 3, H, W] float in [-1, 1]."""
    import numpy as np
    import torch

    array = np.stack([np.asarray(r[key].convert("RGB")) for r in rows])
    return torch.from_numpy(array).permute(0, 3, 1, 2).float().div(127.5).sub(1.0)


def demo_rows(start: int, count: int, seed: int) -> list[dict]:
    from ctrlnet_trainer.models.demo import DEMO_RESOLUTION, demo_fill_example

    return [demo_fill_example(start + i, DEMO_RESOLUTION, seed) for i in range(count)]


def lr_at(step: int, steps: int, peak: float) -> float:
    """Linear warm-up, then cosine decay to FINAL_LR_FRACTION of the peak."""
    warmup = min(WARMUP_STEPS, max(1, steps // 10))
    if step < warmup:
        return peak * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return peak * (FINAL_LR_FRACTION + (1 - FINAL_LR_FRACTION) * 0.5 * (1 + math.cos(math.pi * progress)))


class LossLog:
    """Averages over --log-every steps: what provenance.json records, and the progress lines."""

    def __init__(self, name: str, steps: int, every: int):
        self.name, self.steps, self.every = name, steps, every
        self.window: list[dict[str, float]] = []
        self.periodic: list[dict] = []
        self.start = time.perf_counter()

    def add(self, step: int, loss: float, lr: float, **extra: float) -> None:
        if not math.isfinite(loss):
            raise SystemExit(f"{self.name}: the loss is {loss} at step {step}: lower the learning rate")
        self.window.append({"loss": loss, **extra})
        if (step + 1) % self.every == 0 or step + 1 == self.steps:
            means = {k: sum(w[k] for w in self.window) / len(self.window) for k in self.window[0]}
            elapsed = time.perf_counter() - self.start
            self.periodic.append({"step": step + 1, **means, "lr": lr, "wall_s": round(elapsed, 1)})
            eta = elapsed / (step + 1) * (self.steps - step - 1)
            more = "".join(f" {k} {v:.4g}" for k, v in means.items() if k != "loss")
            log(
                f"{self.name} {step + 1}/{self.steps} loss {means['loss']:.5f}{more} lr {lr:.2e} "
                f"({elapsed / (step + 1):.3f} s/step, {eta / 60:.1f} min left)"
            )
            self.window = []

    def summary(self) -> dict:
        return {
            "final_loss": self.periodic[-1]["loss"] if self.periodic else None,
            "periodic": self.periodic,
            "wall_s": round(time.perf_counter() - self.start, 1),
        }


# -- stage 1: the VAE ------------------------------------------------------------------------------


def train_vae(vae, args, device) -> dict:
    import torch
    import torch.nn.functional as F

    vae.to(device).train()
    optimizer = torch.optim.AdamW(vae.parameters(), lr=args.vae_lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(args.seed * 2 + 1)
    losses = LossLog("vae", args.vae_steps, args.log_every)
    for step in range(args.vae_steps):
        lr = lr_at(step, args.vae_steps, args.vae_lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        x = rows_to_tensor(demo_rows(VAE_ROWS + step * args.batch, args.batch, args.seed)).to(device)
        posterior = vae.encode(x).latent_dist
        z = posterior.mean + posterior.std * torch.randn(
            posterior.mean.shape, generator=generator, device=device, dtype=posterior.mean.dtype
        )
        reconstruction = vae.decode(z).sample
        mse = F.mse_loss(reconstruction, x)
        kl = 0.5 * (posterior.mean.pow(2) + posterior.var - 1.0 - posterior.logvar).mean()
        loss = mse + KL_WEIGHT * kl
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(vae.parameters(), 1.0)
        optimizer.step()
        losses.add(step, loss.item(), lr, mse=mse.item(), kl=kl.item())
    vae.eval()
    return losses.summary()


def round_to_fp16(module) -> None:
    """What is saved is fp16: later stages train against exactly that (back in fp32)."""
    import torch

    module.to(torch.float16).to(torch.float32)


def encode_rows(vae, start: int, count: int, seed: int, device):
    """Latent mean and log-variance of demo rows start..start+count-1, and their captions."""
    import torch

    means, logvars, texts = [], [], []
    with torch.no_grad():
        for at in range(start, start + count, 32):  # 32: the fastest batch on a CPU (per row)
            rows = demo_rows(at, min(32, start + count - at), seed)
            posterior = vae.encode(rows_to_tensor(rows).to(device)).latent_dist
            means.append(posterior.mean.cpu())
            logvars.append(posterior.logvar.cpu())
            texts += [r["text"] for r in rows]
    return torch.cat(means), torch.cat(logvars), texts


def measure_scaling_factor(vae, args, device) -> float:
    """1 / the std of sampled latents of 64 batches of rows (2048 at batch 32), as SD's 0.18215 was
    measured: the UNet sees unit-variance latents."""
    import torch

    rows = 64 * args.batch
    mean, logvar, _ = encode_rows(vae, UNET_ROWS - rows, rows, args.seed, device)
    generator = torch.Generator().manual_seed(args.seed * 2 + 3)
    sample = mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=generator)
    return float(1.0 / sample.std())


# -- stage 2-3: the UNet ---------------------------------------------------------------------------


def encode_captions(parts, device):
    """{caption: index} and [len+1, 77, D] hidden states of the frozen text encoder; the last row is ''."""
    import torch

    from ctrlnet_trainer.models.demo import demo_captions
    from ctrlnet_trainer.models.sd import tokenize

    captions = demo_captions()
    ids = tokenize(parts.tokenizer, [*captions, ""])  # as the trainer tokenizes
    parts.text_encoder.to(device).eval()
    with torch.no_grad():
        hidden = parts.text_encoder(ids.to(device), return_dict=False)[0]
    return {c: i for i, c in enumerate(captions)}, hidden


def train_unet(parts, args, device) -> dict:
    import torch
    import torch.nn.functional as F

    unet, vae, scheduler = parts.unet, parts.vae, parts.noise_scheduler
    scale = vae.config.scaling_factor
    index_of, hidden = encode_captions(parts, device)
    empty = len(index_of)

    pool_rows = min(POOL_ROWS, args.unet_steps * args.batch)
    started = time.perf_counter()
    log(f"encoding {pool_rows} rows for the UNet")
    mean, logvar, texts = encode_rows(vae, UNET_ROWS, pool_rows, args.seed, device)
    mean, std = mean.to(device), torch.exp(0.5 * logvar).to(device)
    caption = torch.tensor([index_of[t] for t in texts], device=device)
    encode_s = time.perf_counter() - started

    unet.to(device).train()
    ema = [p.detach().clone() for p in unet.parameters()]
    optimizer = torch.optim.AdamW(unet.parameters(), lr=args.lr, weight_decay=0.0)
    generator = torch.Generator(device=device).manual_seed(args.seed * 2 + 5)
    order = torch.Generator().manual_seed(args.seed * 2 + 7)
    alphas = scheduler.alphas_cumprod.to(device)
    losses = LossLog("unet", args.unet_steps, args.log_every)
    permutation, at = torch.randperm(pool_rows, generator=order), 0

    def draw(*shape):
        return torch.randn(*shape, generator=generator, device=device)

    for step in range(args.unet_steps):
        lr = lr_at(step, args.unet_steps, args.lr)
        for group in optimizer.param_groups:
            group["lr"] = lr
        if at + args.batch > pool_rows:  # a new epoch over the pool, in a new order
            permutation, at = torch.randperm(pool_rows, generator=order), 0
        rows = permutation[at : at + args.batch].to(device)
        at += args.batch
        n = len(rows)
        latents = (mean[rows] + std[rows] * draw(*mean[rows].shape)) * scale
        noise = draw(*latents.shape)
        t = torch.randint(0, len(alphas), (n,), generator=generator, device=device)
        a = alphas[t].view(-1, 1, 1, 1)
        noisy = a.sqrt() * latents + (1 - a).sqrt() * noise  # DDPMScheduler.add_noise
        dropped = torch.rand(n, generator=generator, device=device) < CAPTION_DROPOUT
        text = hidden[torch.where(dropped, empty, caption[rows])]
        loss = F.mse_loss(unet(noisy, t, text).sample, noise)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), 1.0)
        optimizer.step()
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            torch._foreach_lerp_(ema, [p.detach() for p in unet.parameters()], 1 - decay)
        losses.add(step, loss.item(), lr)
    with torch.no_grad():
        for p, e in zip(unet.parameters(), ema, strict=True):
            p.copy_(e)
    unet.eval()
    return {**losses.summary(), "pool_rows": pool_rows, "encode_pool_s": round(encode_s, 1), "ema_decay": EMA_DECAY}


# -- writing ---------------------------------------------------------------------------------------


def sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def weight_files(folder: Path) -> dict[str, dict]:
    """{relative path: {sha256, bytes}} of every weight file under `folder`."""
    return {
        p.relative_to(folder).as_posix(): {"sha256": sha256(p), "bytes": p.stat().st_size}
        for p in sorted(folder.rglob("*.safetensors"))
    }


def save_base(parts, staging: Path) -> None:
    import torch
    from transformers.utils import logging as transformers_logging

    from ctrlnet_trainer.models.tiny import _write_vocab_files

    transformers_logging.disable_progress_bar()
    parts.unet.to("cpu", torch.float16)
    parts.vae.to("cpu", torch.float16)
    parts.text_encoder.to("cpu", torch.float32)
    parts.family.pipeline(parts.pipeline_parts()).save_pretrained(staging, safe_serialization=True)
    _write_vocab_files(staging / "tokenizer")  # as models.tiny.write_base: transformers 4.x's slow tokenizer
    for path in staging.rglob("*"):  # safetensors writes 0600; a file shipped in a wheel must be readable
        path.chmod(0o755 if path.is_dir() else 0o644)


def versions() -> dict:
    import diffusers
    import numpy
    import PIL
    import torch
    import transformers

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "diffusers": diffusers.__version__,
        "transformers": transformers.__version__,
        "numpy": numpy.__version__,
        "pillow": PIL.__version__,
        "platform": platform.platform(),
    }


def git_commit() -> dict:
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return {}
    return {"commit": head.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


# -- checks of the saved base ----------------------------------------------------------------------


def nearest_colour(rgb) -> str:
    from ctrlnet_trainer.models.demo import DEMO_COLOURS
    from ctrlnet_trainer.synthetic import CSS_COLOURS

    return min(DEMO_COLOURS, key=lambda name: math.dist(CSS_COLOURS[name], rgb))


def check_base(folder: Path, seed: int, device) -> dict:
    """The saved base, loaded as the trainer would: (1) its VAE's reconstructions of held-out rows,
    scored by the adherence metric against their outlines (the ceiling a ControlNet on this base can
    reach); (2) text-to-image samples of held-out captions: how often the drawn disk's colour (its
    median) and the background's (the border's median) are the nearest demo colours to the prompt's."""
    import numpy as np
    import torch
    from diffusers import AutoencoderKL, StableDiffusionPipeline, UniPCMultistepScheduler

    from ctrlnet_trainer.adherence import adherence, border_colour, drawn_disk_mask
    from ctrlnet_trainer.models.demo import demo_colours

    rows = demo_rows(CHECK_ROWS, 256, seed)
    vae = AutoencoderKL.from_pretrained(folder, subfolder="vae").to(device).eval()
    with torch.no_grad():
        x = rows_to_tensor(rows).to(device)
        reconstruction = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    mse = float(torch.nn.functional.mse_loss(reconstruction, x))
    images = ((reconstruction + 1) * 127.5).round().byte().permute(0, 2, 3, 1).cpu().numpy()
    vae_check = {"rows": len(rows), "mse": mse, **adherence(list(images), [r["conditioning_image"] for r in rows])}
    log(
        f"check: VAE reconstructions mse {mse:.5f}, adherence {vae_check['iou']:.3f} (chance {vae_check['chance']:.3f})"
    )

    # No dtype: as the trainer loads a base. diffusers upcasts the fp16 UNet/VAE files to fp32, and
    # transformers 5 keeps the checkpoint's dtype, which is why the text encoder is saved in fp32.
    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False)
    loaded = {name: str(getattr(pipe, name).dtype) for name in ("unet", "vae", "text_encoder")}
    if set(loaded.values()) != {"torch.float32"}:
        raise SystemExit(f"the saved base does not load in fp32 by default: {loaded}")
    pipe.scheduler = UniPCMultistepScheduler.from_config(pipe.scheduler.config)
    pipe = pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    prompts = [r["text"] for r in rows[:CHECK_SAMPLES]]
    generator = torch.Generator(device=device).manual_seed(seed)
    samples = pipe(prompt=prompts, num_inference_steps=CHECK_STEPS, generator=generator, output_type="np").images
    fills, backgrounds, drawn = 0, 0, 0
    for k, sample in enumerate(samples):
        pixels = np.clip(sample * 255, 0, 255)
        fill, background = demo_colours(CHECK_ROWS + k, seed)
        mask = drawn_disk_mask(pixels)
        drawn += bool(mask.any())
        backgrounds += nearest_colour(border_colour(pixels)) == background
        fills += bool(mask.any()) and nearest_colour(np.median(pixels[mask], axis=0)) == fill
    n = len(samples)
    sample_check = {
        "samples": n,
        "inference_steps": CHECK_STEPS,
        "scheduler": "UniPCMultistepScheduler",
        "guidance_scale": pipe.guidance_scale,
        "something_drawn": drawn / n,
        "fill_colour_right": fills / n,
        "background_colour_right": backgrounds / n,
    }
    log(
        f"check: {n} samples: fill colour right {fills}/{n}, background right {backgrounds}/{n}, "
        f"something drawn {drawn}/{n}"
    )
    return {"loads_as": loaded, "vae_reconstruction": vae_check, "text_to_image": sample_check}


# -- main ------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.models.tiny import check_out

    try:
        check_out(args.out, args.overwrite)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    started = time.perf_counter()

    import torch
    from diffusers.utils import logging as diffusers_logging

    from ctrlnet_trainer.models.demo import DEMO_ARCH, DEMO_COLOURS, DEMO_RESOLUTION, TEXT_ENCODER_ARCH, build_demo_base

    diffusers_logging.set_verbosity_error()
    diffusers_logging.disable_progress_bar()
    if args.threads:
        torch.set_num_threads(args.threads)
    auto = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(auto if args.device == "auto" else args.device)
    torch.manual_seed(args.seed)
    parts = build_demo_base(args.seed)
    if args.vae_channels != tuple(DEMO_ARCH["vae"]["block_out_channels"]):
        from diffusers import AutoencoderKL

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(args.seed)
            parts.vae = AutoencoderKL(
                in_channels=3,
                out_channels=3,
                latent_channels=4,
                down_block_types=("DownEncoderBlock2D",) * 4,
                up_block_types=("UpDecoderBlock2D",) * 4,
                **{**DEMO_ARCH["vae"], "block_out_channels": args.vae_channels},
            )
    parts.text_encoder.requires_grad_(False)  # frozen: the `tiny` arch's, bit for bit
    log(
        f"device {device}, {torch.get_num_threads()} threads; VAE {args.vae_steps} steps, "
        f"UNet {args.unet_steps} steps, batch {args.batch}, seed {args.seed}"
    )

    vae_log = train_vae(parts.vae, args, device)
    round_to_fp16(parts.vae)
    scaling_factor = measure_scaling_factor(parts.vae, args, device)
    parts.vae.register_to_config(scaling_factor=scaling_factor)
    log(f"VAE latent scaling factor {scaling_factor:.5f}")

    unet_log = train_unet(parts, args, device)

    out = args.out
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = out.parent / f".{out.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        save_base(parts, staging)
        checks = None if args.skip_checks else check_base(staging, args.seed, device)
        provenance = {
            "tool": "tools/pretrain_demo_base.py",
            "command": shlex.join([Path(sys.executable).name, *sys.argv]),
            "seed": args.seed,
            "git": git_commit(),
            "versions": versions(),
            "device": str(device),
            "threads": torch.get_num_threads(),
            "data": {
                "generator": "ctrlnet_trainer.models.demo.demo_fill_example",
                "resolution": DEMO_RESOLUTION,
                "colours": list(DEMO_COLOURS),
                "seed": args.seed,
                "rows": {
                    "vae": [VAE_ROWS, VAE_ROWS + args.vae_steps * args.batch],
                    "unet": [UNET_ROWS, UNET_ROWS + unet_log["pool_rows"]],
                },
            },
            "arch": {
                "unet": {k: list(v) if isinstance(v, tuple) else v for k, v in DEMO_ARCH["unet"].items()},
                "vae_block_out_channels": list(args.vae_channels),
                "text_encoder": f"models.tiny.build_base({TEXT_ENCODER_ARCH!r}, seed={args.seed}), frozen",
            },
            "vae": {
                "steps": args.vae_steps,
                "batch": args.batch,
                "lr": args.vae_lr,
                "schedule": f"linear warm-up {WARMUP_STEPS} steps, cosine to {FINAL_LR_FRACTION} x lr",
                "loss": f"mse + {KL_WEIGHT} x mean KL",
                "scaling_factor": scaling_factor,
                **vae_log,
            },
            "unet": {
                "steps": args.unet_steps,
                "batch": args.batch,
                "lr": args.lr,
                "schedule": f"linear warm-up {WARMUP_STEPS} steps, cosine to {FINAL_LR_FRACTION} x lr",
                "objective": "DDPM epsilon, SD1.x schedule (models.tiny.SCHEDULER_CONFIG)",
                "caption_dropout": CAPTION_DROPOUT,
                **unet_log,
            },
            "checks": checks,
            "weights": weight_files(staging),
            "wall_s": round(time.perf_counter() - started, 1),
        }
        (staging / "provenance.json").write_text(json.dumps(provenance, indent=2) + "\n")
        old = out.parent / f".{out.name}.old-{os.getpid()}"
        if out.exists():
            out.rename(old)
        staging.rename(out)
        shutil.rmtree(old, ignore_errors=True)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(v["bytes"] for v in provenance["weights"].values())
    log(f"wrote {out} ({size / 1e6:.1f} MB of weights) in {provenance['wall_s'] / 60:.1f} min")
    return 0


if __name__ == "__main__":
    sys.exit(main())
