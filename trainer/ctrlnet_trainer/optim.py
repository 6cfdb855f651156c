"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import importlib.util

import torch

from ctrlnet.config.train import OptimConfig
from ctrlnet.errors import UserError


def build_optimizer(params, cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("optim.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes, or use adamw")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused kernel is one launch for all parameters; it exists for CUDA (and recent CPU builds).
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def scaled_lr(cfg: OptimConfig, batch_size: int, accumulation: int, processes: int) -> float:
    return cfg.learning_rate * (batch_size * accumulation * processes if cfg.scale_lr else 1)


def build_lr_scheduler(optimizer, cfg: OptimConfig, total_steps: int):
    from diffusers.optimization import get_scheduler

    # One scheduler step per optimizer step (we step it ourselves; no per-process multiplier).
    return get_scheduler(
        cfg.lr_scheduler,
        optimizer=optimizer,
        num_warmup_steps=cfg.lr_warmup_steps,
        num_training_steps=total_steps,
        num_cycles=cfg.lr_num_cycles,
        power=cfg.lr_power,
    )
