"""The Accelerator, built in code from the config (no launcher flags): DDP or DeepSpeed ZeRO,
mixed precision, gradient accumulation. Processes come from torchrun's environment."""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta
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
            # ZeRO-3 shards the weights: checkpoints, the final model and validation gather them.
            **({"stage3_gather_16bit_weights_on_model_save": True} if d.zero_stage == 3 else {}),
            **({"stage3_allgather_sequential": True} if d.zero_stage == 3 and _racy_cpu_gather() else {}),
        },
        "bf16": {"enabled": cfg.loop.mixed_precision == "bf16"},
        "fp16": {"enabled": cfg.loop.mixed_precision == "fp16"},
        "zero_allow_untested_optimizer": True,
    }
    return DeepSpeedPlugin(hf_ds_config=ds_config)


def _racy_cpu_gather() -> bool:
    """DeepSpeed before 0.19.8 on the CPU (gloo): its blocking ZeRO-3 gather (GatheredParameters,
    checkpoints, the persistent parameters after a save) waited on the last of its async
    all-gathers only, so the weights could be read before they arrived (deepspeedai/DeepSpeed PR
    8539; see ctrlnet_trainer.weights). Its sequential gather waits on each: correct, and on the
    CPU no slower. On CUDA the old code was right (one NCCL stream orders the gathers)."""
    if torch.cuda.is_available():
        return False
    import re
    from importlib.metadata import version

    release = tuple(int(n) for n in re.findall(r"\d+", version("deepspeed"))[:3])
    return release < (0, 19, 8)


def build_accelerator(cfg: TrainConfig, work_dir: Path, use_cuda: bool):
    from accelerate import Accelerator
    from accelerate.utils import DistributedDataParallelKwargs, InitProcessGroupKwargs, ProjectConfiguration

    log_with = None if cfg.logging.report_to == "none" else cfg.logging.report_to
    if log_with == "wandb":
        import importlib.util

        if importlib.util.find_spec("wandb") is None:
            raise UserError("logging.report_to=wandb needs the wandb package: pip install wandb, or use tensorboard")
    kwargs = {}
    if cfg.distributed.strategy == "deepspeed":
        import importlib.util

        if importlib.util.find_spec("deepspeed") is None:
            raise UserError(
                "distributed.strategy=deepspeed needs the deepspeed package: pip install deepspeed, or use ddp"
            )
        kwargs["deepspeed_plugin"] = deepspeed_plugin(cfg)
    # accelerate's `cpu=True` is what makes torchrun processes on CPUs one MULTI_CPU group, but
    # it silently drops a DeepSpeed plugin; DeepSpeed finds the CPU by itself without it.
    deepspeed = cfg.distributed.strategy == "deepspeed"
    force_cpu = not use_cuda and not deepspeed
    if deepspeed and not use_cuda and torch.cuda.is_available():
        raise UserError(
            "distributed.strategy=deepspeed with loop.device=cpu on a GPU machine is not supported: use ddp"
        )
    accelerator = Accelerator(
        gradient_accumulation_steps=cfg.loop.gradient_accumulation_steps,
        mixed_precision=cfg.loop.mixed_precision,
        cpu=force_cpu,
        log_with=log_with,
        project_config=ProjectConfiguration(
            project_dir=str(work_dir), logging_dir=str(work_dir / cfg.logging.logging_dir)
        ),
        kwargs_handlers=[
            # The zero-conv branch of the first steps leaves no parameter unused; keep DDP's fast path.
            DistributedDataParallelKwargs(find_unused_parameters=False),
            # How long a collective waits for the slowest process (validation keeps under it: validation.py).
            InitProcessGroupKwargs(timeout=timedelta(seconds=cfg.distributed.collective_timeout_s)),
        ],
        **kwargs,
    )
    # Fail loudly rather than train N independent copies or lose DeepSpeed without a word.
    if deepspeed and accelerator.distributed_type.value != "DEEPSPEED":
        raise RuntimeError(f"DeepSpeed was asked for but accelerate chose {accelerator.distributed_type.value}")
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if process_ranks().world != world:
        raise RuntimeError(f"torchrun started {world} processes but only {process_ranks().world} joined the group")
    return accelerator


@dataclass(frozen=True)
class Ranks:
    """Who this process is, from torch.distributed itself: accelerate 1.15 reports one process
    and rank 0 on every rank for DeepSpeed on CPUs, which would make every rank the writer."""

    rank: int
    world: int
    local_rank: int

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def is_local_main(self) -> bool:
        return self.local_rank == 0


def process_ranks() -> Ranks:
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return Ranks(0, 1, 0)


def all_reduce(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """Sum or mean over all processes (a no-op in one process)."""
    import torch.distributed as dist

    if process_ranks().world == 1:
        return tensor
    out = tensor.clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out / dist.get_world_size() if op == "mean" else out
