"""The ControlNet's weights as ctrlnet writes them: gathered, copied, checked, written, read back.

Every ControlNet the trainer writes (each checkpoint's `controlnet/`, the final model) and the
copy validation samples from come from `gather()`, and files from `write()`:

* `gather()` makes a full copy on the main process (collective). Under DeepSpeed ZeRO-3 the
  weights are sharded: each module's parameters are gathered with `modifier_rank=None`, so that
  reading the weights never writes them back into the live model (DeepSpeed's own consolidated
  state dict, which `accelerate.get_state_dict` calls, re-partitions rank 0's gathered copy into
  every rank's shard: any fault in the gather then corrupts training too). Each tensor is copied
  (`.to("cpu", copy=True)`: on a CPU device `.cpu()` would alias the gather buffer).
* The copy is checked against the live model before anyone uses it: under ZeRO-3 every rank sums
  the bit patterns of its own shard of each parameter (an integer sum: exact and independent of
  order), the sums are all-reduced, and the main process compares them with the same sum over its
  gathered copy; every value must be finite. A copy that fails is gathered again (a fault of the
  gather), up to `ATTEMPTS` times; weights that are themselves non-finite stop the run.
* `write()` writes the diffusers layout and reads the safetensors file back, comparing it bitwise
  with what it wrote: a checkpoint is committed only after that.

Why: DeepSpeed <= 0.19.7 gathered ZeRO-3 parameters for `GatheredParameters` with one async
all-gather per parameter and waited on the last one only; on gloo (CPU) the others complete on
their own threads in any order, so the copy could hold the uninitialised `torch.empty` buffer
(NaN, 1e38) and, written back by `modifier_rank=0`, the live model did too (deepspeedai/DeepSpeed
PR 8539, fixed in 0.19.8; on CUDA, NCCL's single stream ordered them). The checks here make that
class of fault an error instead of a published ControlNet.
"""

from __future__ import annotations

from pathlib import Path

import torch

from ctrlnet.errors import IntegrityError
from ctrlnet.log import get_logger

log = get_logger(__name__)

ATTEMPTS = 3  # gathers of one save before giving up: a gather fault is rare and transient
WEIGHTS_FILE = "diffusion_pytorch_model.safetensors"


def gather(accelerator, prepared: torch.nn.Module, *, is_main: bool, sharded: bool) -> dict[str, torch.Tensor] | None:
    """A checked full CPU copy of the ControlNet's weights on the main process, None elsewhere.
    Collective: every process calls it. Raises IntegrityError (one line) when no correct copy
    could be made or the weights are not finite."""
    module = accelerator.unwrap_model(prepared)
    for attempt in range(1, ATTEMPTS + 1):
        if sharded:
            state, mismatched = _gather_sharded(module, accelerator.device, is_main)
        else:
            state, mismatched = (_copy(module) if is_main else None), []
        nonfinite = _nonfinite(state) if is_main else []
        # Main decides (only it holds the copy); every rank acts on the same verdict.
        verdict, bad = _from_main(
            ("retry", "") if mismatched else ("diverged", names(nonfinite)) if nonfinite else ("ok", "")
        )
        if verdict == "ok":
            return state
        if verdict == "diverged":
            # The copy matches the live shards, and is not finite: the weights themselves are not.
            raise IntegrityError(
                f"the ControlNet's weights are not finite ({bad}): training diverged; nothing was written. "
                "Lower optim.learning_rate (or set optim.max_grad_norm) and resume from the last checkpoint"
            )
        log.warning(
            f"gathering the ControlNet's weights gave a copy that differs from the live model "
            f"({names(mismatched)}; attempt {attempt} of {ATTEMPTS}): gathering again"
        )
    raise IntegrityError(
        f"could not gather a copy of the ControlNet equal to the live model in {ATTEMPTS} attempts: nothing was "
        "written or committed; the newest committed checkpoint is intact (resume with --resume latest)"
    )


def gather_to_all(accelerator, prepared: torch.nn.Module, *, is_main: bool) -> dict[str, torch.Tensor]:
    """The sharded (ZeRO-3) ControlNet's full weights on every process, for validation to sample
    from: `gather()`'s checked copy made on the main process, then broadcast tensor by tensor
    (over the process group's device: NCCL needs CUDA tensors). Collective: every process calls it."""
    import torch.distributed as dist

    state = gather(accelerator, prepared, is_main=is_main, sharded=True)
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return state
    layout = _from_main([(k, tuple(v.shape), v.dtype) for k, v in state.items()] if is_main else None)
    device = accelerator.device
    out = {}
    for key, shape, dtype in layout:
        tensor = state[key].to(device) if is_main else torch.empty(shape, dtype=dtype, device=device)
        dist.broadcast(tensor, src=0)
        out[key] = tensor.to("cpu", copy=True) if not is_main else state[key]
    return out


DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
"""checkpoint.final_dtype's values -> the dtype the final ControlNet's weights are written in."""


def write(controlnet: torch.nn.Module, folder: str | Path, state: dict[str, torch.Tensor], dtype: str = "fp32") -> Path:
    """Write `state` as `controlnet`'s diffusers folder (config.json + safetensors) and read the
    weights file back: IntegrityError if the file does not hold exactly `state`. (diffusers'
    save_pretrained ignores a `state_dict` argument, so the file is written here.) `dtype` (a
    checkpoint.final_dtype value): the floating-point tensors are cast to it first (the final
    model); checkpoints keep the default, the fp32 master weights as they are."""
    from safetensors.torch import load_file, save_file

    state = cast(state, dtype)
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    controlnet.save_config(folder)
    path = folder / WEIGHTS_FILE
    save_file({k: v.contiguous() for k, v in state.items()}, str(path), metadata={"format": "pt"})
    back = load_file(str(path))
    differs = sorted(k for k in state if k not in back or not torch.equal(back[k], state[k]))
    if differs or back.keys() != state.keys():
        raise IntegrityError(
            f"{path} does not hold what was written ({names(differs) or 'other keys'}): check the disk"
        )
    return folder


def cast(state: dict[str, torch.Tensor], dtype: str) -> dict[str, torch.Tensor]:
    """`state` with its floating-point tensors in `dtype` (fp32, fp16 or bf16); integer buffers
    as they are. A weight that becomes infinite (beyond fp16's 65504) is an IntegrityError naming it."""
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}: one of {', '.join(DTYPES)}")
    to = DTYPES[dtype]
    out = {k: v.to(to) if v.is_floating_point() and v.dtype != to else v for k, v in state.items()}
    overflow = sorted(set(_nonfinite(out)) - set(_nonfinite(state)))
    if overflow:
        raise IntegrityError(
            f"the ControlNet's weights do not fit {dtype} ({names(overflow)} become infinite): "
            "nothing was written; set checkpoint.final_dtype to bf16 or fp32 (the checkpoints hold the fp32 weights)"
        )
    return out


def nonfinite_in_file(path: str | Path) -> list[str]:
    """Names of the tensors of a safetensors file that hold NaN or inf."""
    from safetensors.torch import load_file

    return _nonfinite(load_file(str(path)))


def nonfinite_local(prepared: torch.nn.Module, accelerator) -> list[str]:
    """Names of the parameters whose values on this process are not finite: the whole parameter,
    or under ZeRO-3 this rank's shard of it."""
    module = accelerator.unwrap_model(prepared)
    bad = []
    for name, p in module.named_parameters():
        local = p.ds_tensor if hasattr(p, "ds_tensor") else p
        if local.numel() and not torch.isfinite(local.detach()).all():
            bad.append(name)
    return bad


# ------------------------------------------------------------------ internals
def _copy(module: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().to("cpu", copy=True) for k, v in module.state_dict().items()}


def _gather_sharded(module: torch.nn.Module, device, is_main: bool) -> tuple[dict | None, list[str]]:
    """Gather one module's own parameters at a time (memory stays one layer), copy them on main;
    returns the copy and the names whose copy differs from the shards every rank holds."""
    import deepspeed
    import torch.distributed as dist

    rank, world = dist.get_rank(), dist.get_world_size()
    state: dict[str, torch.Tensor] | None = {} if is_main else None
    names, shard_sums, copies = [], [], {}
    for prefix, sub in module.named_modules():
        own = list(sub.parameters(recurse=False))
        with deepspeed.zero.GatheredParameters(own, modifier_rank=None):
            for name, p in sub.named_parameters(recurse=False):
                key = f"{prefix}.{name}" if prefix else name
                names.append(key)
                shard_sums.append(_shard_bitsum(p, rank, world))
                if is_main:
                    copies[key] = p.detach().to("cpu", copy=True)
            if is_main:
                for name, buf in sub.named_buffers(recurse=False):
                    if name not in sub._non_persistent_buffers_set:
                        copies[f"{prefix}.{name}" if prefix else name] = buf.detach().to("cpu", copy=True)
    totals = torch.tensor(shard_sums, dtype=torch.int64, device=device)
    dist.all_reduce(totals)  # the bit sum of every parameter, from its owners' shards
    if not is_main:
        return None, []
    state.update(copies)
    mismatched = [n for n, total in zip(names, totals.tolist(), strict=True) if _bitsum(state[n]) != total]
    return state, mismatched


def _shard_bitsum(p: torch.nn.Parameter, rank: int, world: int) -> int:
    """The bit sum of the part of `p` this rank owns (ZeRO-3 pads the last shard: padding is not
    counted). Plain ZeRO-3: the partition group is the whole world."""
    shard = p.ds_tensor.detach().reshape(-1)
    size = shard.numel()
    own = max(0, min(size, p.ds_numel - rank * size))
    return _bitsum(shard[:own])


def _bitsum(t: torch.Tensor) -> int:
    """Sum of the values' bit patterns as integers: exact, so equal only for equal bits (to a
    vanishing chance), and the same whatever the order of the parts."""
    bits = {8: torch.int64, 4: torch.int32, 2: torch.int16, 1: torch.int8}[t.element_size()]
    return int(t.detach().reshape(-1).view(bits).to(torch.int64).sum().item())


def _nonfinite(state: dict[str, torch.Tensor] | None) -> list[str]:
    if not state:
        return []
    return [k for k, v in state.items() if v.is_floating_point() and v.numel() and not torch.isfinite(v).all()]


def _from_main(value):
    """The main process's `value` on every process (a plain return on one process)."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def names(keys: list[str]) -> str:
    """The first three of `keys` and how many more: for one-line messages."""
    return ", ".join(keys[:3]) + (f" and {len(keys) - 3} more" if len(keys) > 3 else "")
