"""Validation's sampling spread over processes, as a torchrun script (tests/test_validation_ranks.py):

    torchrun --standalone --nproc-per-node=N -m testkit.spread OUT

builds the tiny in-code base (seed 0) with a ControlNet whose zero convolutions are given seeded
random weights (so the control reaches the images), samples the validation's grid images and
scored rows with `spread_sample` over the N processes (gloo on CPU), and writes, on rank 0, each
image as OUT/image-<index>.png and OUT/shares.json: what each process sampled, in how many seconds."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch


def main(out: Path) -> None:
    import torch.distributed as dist

    from ctrlnet_trainer.models import load_models, prepare_for_training
    from ctrlnet_trainer.validation import SCORED_BATCH, adherence_pairs, grid_items, spread_sample, validation_pairs
    from testkit.training import small_config

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1:
        dist.init_process_group("gloo")
    rank = dist.get_rank() if world > 1 else 0
    torch.set_num_threads(1)
    cfg = small_config(out / "run", validation={"num_images": 2, "num_inference_steps": 2, "adherence_rows": 3})
    seed, cpu = 0, torch.device("cpu")
    models = load_models(cfg, seed)
    prepare_for_training(models, cfg, cpu, torch.float32)
    with torch.no_grad():
        weights = torch.Generator().manual_seed(7)
        for p in models.controlnet.parameters():
            p.add_(torch.randn(p.shape, generator=weights) * 0.02)
    pairs = validation_pairs(cfg, seed)
    groups = [(grid_items(pairs, cfg), cfg.validation.num_images), (adherence_pairs(cfg, seed), SCORED_BATCH)]
    drawn, shares = spread_sample(
        models, models.controlnet, groups, cfg, torch.float32, cpu, seed, rank=rank, world=world
    )
    out.mkdir(parents=True, exist_ok=True)
    if rank == 0:
        images = [image for group in drawn for image in group]
        for k, image in enumerate(images):
            image.save(out / f"image-{k}.png")
        (out / "shares.json").write_text(json.dumps([vars(s) for s in shares]))
    if world > 1:
        dist.barrier()
        dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]))
