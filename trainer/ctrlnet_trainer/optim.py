"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import importlib.util

import torch

from ctrlnet.config.train import OptimConfig
from ctrlnet.errors import UserError
from ctrlnet.log import get_logger

log = get_logger(__name__)


def build_optimizer(params, cfg: OptimConfig, lr: float, device: torch.device) -> torch.optim.Optimizer:
    if cfg.optimizer == "adafactor":
        return _adafactor(params, cfg, lr)
    kwargs = dict(lr=lr, betas=(cfg.adam_beta1, cfg.adam_beta2), weight_decay=cfg.weight_decay, eps=cfg.adam_epsilon)
    if cfg.optimizer == "adamw_8bit":
        if importlib.util.find_spec("bitsandbytes") is None:
            raise UserError("optim.optimizer=adamw_8bit needs bitsandbytes: pip install bitsandbytes, or use adamw")
        import bitsandbytes as bnb

        return bnb.optim.AdamW8bit(params, **kwargs)
    # The fused kernel is one launch for all parameters; it exists for CUDA (and recent CPU builds).
    fused = device.type == "cuda"
    return torch.optim.AdamW(params, fused=fused, **kwargs)


def _adafactor(params, cfg: OptimConfig, lr: float) -> torch.optim.Optimizer:
    """transformers' Adafactor as train_controlnet_flux.py's --use_adafactor builds it: the learning
    rate as given (so the LR schedule drives it, like AdamW's), no relative step, no scaling by the
    parameters' RMS, no warmup-init, and the configured weight decay."""
    try:
        from transformers.optimization import Adafactor
    except ImportError as e:
        raise UserError(
            f"optim.optimizer=adafactor needs transformers' Adafactor ({e}): pip install transformers, or use adamw"
        ) from None
    return Adafactor(
        params,
        lr=lr,
        relative_step=False,
        scale_parameter=False,
        warmup_init=False,
        weight_decay=cfg.weight_decay,
    )


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


def replay_cpu_adam_steps(accelerator) -> None:
    """Make a resumed DeepSpeed CPU Adam compute Adam's bias correction as the run it continues did.

    Under optimizer offload accelerate swaps torch's AdamW for DeepSpeed's CPU Adam, whose C++ side
    keeps beta1^t and beta2^t as running float products (`*= beta` each step) but recomputes them
    with `pow(beta, t)` in a fresh process: one rounding apart, so the first step after a resume
    moved the weights by an ulp more or less than the uninterrupted run did (measured: 1.2e-7 on
    the fp32 master weights, 2.7e-7 two steps later, Adam's moments equal). Calling its update on
    a one-element dummy for steps 1..t rebuilds the same running products; the real parameters
    are untouched. Costs t calls of a tiny C++ function (about a second per 100k steps)."""
    cpu_adam = _cpu_adam(accelerator)
    if cpu_adam is None:
        return
    steps = {int(s["step"]) for s in cpu_adam.state.values() if "step" in s}
    if len(steps) != 1:
        return  # nothing trained yet (or per-parameter counts, which DeepSpeed does not make)
    group = cpu_adam.param_groups[0]
    beta1, beta2 = group["betas"]
    dummy = [torch.zeros(1) for _ in range(4)]  # parameter, gradient, exp_avg, exp_avg_sq
    try:
        for step in range(1, steps.pop() + 1):
            cpu_adam.ds_opt_adam.adam_update(
                cpu_adam.opt_id, step, group["lr"], beta1, beta2, group["eps"], 0.0, True, *dummy
            )
    except (AttributeError, TypeError, RuntimeError) as e:  # another DeepSpeed's binding
        log.info(
            f"note: could not replay DeepSpeed CPU Adam's step count ({type(e).__name__}): this resume is exact "
            "up to one rounding of Adam's bias correction"
        )


def _cpu_adam(accelerator):
    """DeepSpeed's CPU Adam inside the prepared optimizer (AcceleratedOptimizer -> DeepSpeed's
    ZeRO optimizer -> CPU Adam), or None."""
    for opt in getattr(accelerator, "_optimizers", []):
        for _ in range(4):
            if hasattr(opt, "ds_opt_adam") and hasattr(opt, "opt_id"):
                return opt
            opt = getattr(opt, "optimizer", None)
            if opt is None:
                break
    return None
