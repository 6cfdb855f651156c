"""The Accelerator, built in code from the config (no launcher flags): DDP or DeepSpeed ZeRO,
mixed precision, gradient accumulation. Processes come from torchrun's environment."""

from __future__ import annotations

from pathlib import Path

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError

DTYPES = {"no": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def check_device_options(cfg: TrainConfig) -> bool:
    """Refuse GPU-only options on a machine without a GPU; returns whether CUDA is used."""
    has_cuda = torch.cuda.is_available()
    use_cuda = has_cuda and cfg.loop.device != "cpu"
    if cfg.loop.device == "cuda" and not has_cuda:
        raise UserError("loop.device=cuda but no CUDA GPU is visible: use loop.device=auto or cpu")
    if not use_cuda:
        if cfg.loop.mixed_precision == "fp16":
            raise UserError("loop.mixed_precision=fp16 needs a CUDA GPU: use bf16 or no on the CPU")
        if cfg.loop.attention == "xformers":
            raise UserError("loop.attention=xformers needs a CUDA GPU: use attention=sdpa on the CPU")
        if cfg.distributed.strategy == "deepspeed" and cfg.loop.mixed_precision != "no":
            raise UserError("DeepSpeed mixed precision needs a CUDA GPU: set loop.mixed_precision=no on the CPU")
    return use_cuda


def deepspeed_plugin(cfg: TrainConfig):
    from accelerate.utils import DeepSpeedPlugin

    d = cfg.distributed
    # An explicit batch config: we do not hand our dataloader to accelerate, so it cannot infer one.
    ds_config = {
        "train_micro_batch_size_per_gpu": cfg.loop.batch_size,
        "gradient_accumulation_steps": cfg.loop.gradient_accumulation_steps,
        "gradient_clipping": cfg.optim.max_grad_norm or 0.0,
        "zero_optimization": {
            "stage": d.zero_stage,
            "overlap_comm": True,
            "contiguous_gradients": True,
            **({"offload_optimizer": {"device": "cpu", "pin_memory": True}} if d.offload_optimizer else {}),
        },
        "bf16": {"enabled": cfg.loop.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.loop.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
    }
    return DeepSpeedPlugin(hf_ds_config=ds_config)


def build_accelerator(cfg: TrainConfig, work_dir: Path, use_cuda: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, ProjectConfiguration

    log_with = None if cfg.logging.report_to == "none" else cfg.logging.report_to
    if log_with == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("logging.report_to=wandb needs the wandb package: pip install wandb, or use tensorboard")
    kwargs = {}
    if cfg.distributed.strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError("distributed.strategy=deepspeed needs the deepspeed package: pip install deepspeed, or use ddp")
        kwargs["deepspeed_plugin"] = deepspeed_plugin(cfg)
    return Accelerator(
        gradient_accumulation_steps=cfg.loop.gradient_accumulation_steps,
        mixed_precision=cfg.loop.mixed_precision,
        cpu=not use_cuda,
        log_with=log_with,
        project_config=ProjectConfiguration(project_dir=str(work_dir), logging_dir=str(work_dir / cfg.logging.logging_dir)),
        # The zero-conv branch of the first steps leaves no parameter unused; keep DDP's fast path.
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=False)],
        **kwargs,
    )
