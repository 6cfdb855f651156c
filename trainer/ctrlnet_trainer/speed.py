"""The fast step's switches: torch.compile (loop.compile, loop.compile_cache), channels_last
(loop.channels_last), FP8 matmuls (loop.fp8), and the attention kernels SDPA prefers.

Each switch resolves to what this machine can do. What it cannot do is one line saying so and
why, and training goes on without it: a config that runs on a GPU node also runs on a laptop.
`auto` is the fastest safe choice: on CUDA regional compile and channels_last; on the CPU
neither. Measured on 2 cores with the tiny base (tools/measure_speed.py): inductor compiles for
2-3 minutes cold, is no faster after, and this torch's CPU build gets gradients wrong (see
GradientCheck); channels_last was 25% faster on an idle machine but slower on a busy one.

`apply_speed_settings` changes the models in place (before the optimizer and accelerate see
them); `GradientCheck` compares the compiled step's gradients with eager ones once, on the first
micro-batch, and falls back to eager if they differ; `process_settings` holds the process-wide
parts (compile cache folder, dynamo limits, SDPA priority) for the length of a run and restores
them after.

What is deliberately not here: CUDA graphs (compile mode "reduce-overhead"). The ControlNet's
residuals are outputs of one graph read by another, gradient accumulation holds them across
replays, and DDP's hooks fire inside backward: all cases cudagraph trees re-record or refuse,
while a 512 px SD step is GPU-bound (its kernels are long), so the launch time they save is small.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import sysconfig
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError, one_line
from ctrlnet.log import get_logger
from ctrlnet_trainer.models import Models

log = get_logger(__name__)

FP8_MIN_CAPABILITY = (8, 9)  # Ada and Hopper: the first GPUs with FP8 tensor cores
TRITON_MIN_CAPABILITY = (7, 0)
# Blocks of one class share their code: the UNet's and the ControlNet's blocks, their shapes,
# training and validation (no_grad) each compile a variant. Dynamo's default of 8 variants per
# code would send the rest to eager without a word.
RECOMPILE_LIMIT = 64
COMPILE_BACKEND = "inductor"  # tests swap in "aot_eager": the same tracing, no kernel compiler


# ------------------------------------------------------------------ what each switch resolves to
def compile_mode(cfg: TrainConfig, device: torch.device) -> str:
    """off, regional or full: `auto` is regional on CUDA, off elsewhere."""
    if cfg.loop.compile == "auto":
        return "regional" if device.type == "cuda" else "off"
    return cfg.loop.compile


def channels_last(cfg: TrainConfig, device: torch.device) -> bool:
    return cfg.loop.channels_last == "on" or (cfg.loop.channels_last == "auto" and device.type == "cuda")


def fp8_models(cfg: TrainConfig) -> tuple[str, ...]:
    return {"off": (), "controlnet": ("controlnet",), "unet": ("unet",), "both": ("unet", "controlnet")}[cfg.loop.fp8]


def compile_cache_dir(cfg: TrainConfig) -> str | None:
    """loop.compile_cache, else <model.cache_dir>/torch-compile for a local cache_dir, else None
    (inductor's own default)."""
    folder = cfg.loop.compile_cache
    if folder is None and cfg.model.cache_dir and "://" not in cfg.model.cache_dir:
        folder = str(Path(cfg.model.cache_dir) / "torch-compile")
    if folder and folder.startswith("file://"):
        folder = folder[len("file://") :]
    return folder


def compile_blocker(device: torch.device) -> str | None:
    """Why torch.compile (inductor) cannot work on this machine; None when it can. Checked up
    front so the answer is one line, not an inductor traceback at the first step."""
    if not torch._dynamo.is_dynamo_supported():
        return "torch.compile does not support this Python"
    if not Path(sysconfig.get_paths()["include"], "Python.h").exists():
        return "the Python headers (Python.h) are missing: install python3-dev"
    if device.type == "cuda":
        if importlib.util.find_spec("triton") is None:
            return "triton is not installed (the CUDA builds of torch bring it)"
        capability = torch.cuda.get_device_capability(device)
        if capability < TRITON_MIN_CAPABILITY:
            return f"triton needs compute capability 7.0; this GPU has {capability[0]}.{capability[1]}"
        # triton builds its launcher with the C compiler it finds this way (triton.runtime.build).
        if not (os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")):
            return "no C compiler (triton builds its kernel launcher with gcc or clang): install gcc"
    elif not (os.environ.get("CXX") or shutil.which("g++") or shutil.which("clang++") or shutil.which("c++")):
        return "no C++ compiler (inductor builds CPU kernels with g++ or clang++): install g++"
    return None


def fp8_blocker(device: torch.device) -> str | None:
    if device.type != "cuda":
        return f"FP8 matmuls need a CUDA GPU of compute capability {_cc(FP8_MIN_CAPABILITY)} or newer (Ada, Hopper); this run is on the CPU"
    capability = torch.cuda.get_device_capability(device)
    if capability < FP8_MIN_CAPABILITY:
        name = torch.cuda.get_device_name(device)
        return f"FP8 matmuls need compute capability {_cc(FP8_MIN_CAPABILITY)} or newer (Ada, Hopper); this GPU ({name}) has {_cc(capability)}"
    return None


def _cc(capability: tuple[int, int]) -> str:
    return f"{capability[0]}.{capability[1]}"


# ------------------------------------------------------------------ which modules
def compile_targets(models: Models, mode: str, *, controlnet: bool = True) -> list[tuple[str, torch.nn.Module]]:
    """(name, module) pairs that `mode` compiles: the UNet's and the ControlNet's down, mid and up
    blocks (regional: each block is compiled once on first use and the glue between them - time
    embedding, conv_in/out, zero convolutions - stays eager), or the two whole models (full)."""
    parts = [("unet", models.unet)] + ([("controlnet", models.controlnet)] if controlnet else [])
    if mode == "full":
        return parts
    if mode != "regional":
        return []
    targets = []
    for name, model in parts:
        for group in ("down_blocks", "mid_block", "up_blocks"):
            blocks = getattr(model, group, None)
            if isinstance(blocks, torch.nn.ModuleList):
                targets += [(f"{name}.{group}.{i}", block) for i, block in enumerate(blocks)]
            elif isinstance(blocks, torch.nn.Module):
                targets.append((f"{name}.{group}", blocks))
    return targets


def fp8_filter(module: torch.nn.Module, name: str) -> bool:
    """The Linear layers of the attention blocks (projections, feed-forward: one row per latent
    pixel or text token, where FP8 pays for its casts) whose dimensions are multiples of 16 (the
    FP8 GEMM's alignment). The time-embedding layers (one row per image) stay as they are."""
    return (
        isinstance(module, torch.nn.Linear)
        and ".attentions." in f".{name}."
        and module.in_features % 16 == 0
        and module.out_features % 16 == 0
    )


# ------------------------------------------------------------------ applying them
def apply_speed_settings(models: Models, cfg: TrainConfig, device: torch.device) -> list[str]:
    """Put the switches into effect on `models` (in place, before the optimizer and accelerate
    wrap the ControlNet); the lines saying what is on, what is off and why."""
    lines: list[str] = []
    zero3 = cfg.distributed.strategy == "deepspeed" and cfg.distributed.zero_stage == 3
    deepspeed = cfg.distributed.strategy == "deepspeed"

    # channels_last first: it re-lays the weights that FP8 and compile then see.
    if channels_last(cfg, device):
        # DeepSpeed re-lays the ControlNet's weights into its own flat buffers: left as they are.
        parts = {"UNet": models.unet, "ControlNet": None if deepspeed else models.controlnet, "VAE": models.vae}
        for part in parts.values():
            if part is not None:
                part.to(memory_format=torch.channels_last)
        on = ", ".join(k for k, v in parts.items() if v is not None)
        lines.append(f"channels_last: on ({on})" + (" - not the ControlNet under DeepSpeed" if deepspeed else ""))
    elif cfg.loop.channels_last == "auto":
        lines.append("channels_last: off (auto: on for CUDA only)")

    if fp8_parts := fp8_models(cfg):
        if blocker := fp8_blocker(device):
            lines.append(f"loop.fp8={cfg.loop.fp8}: off - {blocker}; training goes on in {_dtype_name(cfg)}")
        else:
            if zero3 and "controlnet" in fp8_parts:
                fp8_parts = tuple(t for t in fp8_parts if t != "controlnet")
                lines.append("loop.fp8: not the ControlNet under DeepSpeed ZeRO-3 (its weights are sharded)")
            lines += [_to_fp8(models, name) for name in fp8_parts]

    mode = compile_mode(cfg, device)
    if mode == "off":
        lines.append("compile: off" + (" (auto: on for CUDA only)" if cfg.loop.compile == "auto" else ""))
    elif blocker := compile_blocker(device):
        lines.append(f"loop.compile={mode}: off - {blocker}; training goes on eagerly")
    else:
        # ZeRO-3 gathers the ControlNet's sharded weights in hooks around every submodule: not traceable.
        compiled = compile_targets(models, mode, controlnet=not zero3)
        for _, module in compiled:
            # In place (nn.Module.compile): state_dict keys, checkpoints and DDP stay as they are.
            # Static shapes: a training step's shapes never change, and a dynamic-shape kernel is slower.
            module.compile(backend=COMPILE_BACKEND, dynamic=False)
        where = compile_cache_dir(cfg) or os.environ.get("TORCHINDUCTOR_CACHE_DIR") or "inductor's default under /tmp"
        what = f"{len(compiled)} blocks" if mode == "regional" else " and ".join(n for n, _ in compiled)
        lines.append(
            f"compile: {mode} ({what}, compiled on first use; cache: {where})"
            + (" - not the ControlNet under DeepSpeed ZeRO-3" if zero3 else "")
            + (" - on the CPU the first steps take minutes" if device.type != "cuda" else "")
        )
    if fp8_models(cfg) and mode == "off" and not fp8_blocker(device):
        lines.append("loop.fp8 without loop.compile: FP8 casts run eagerly and are usually slower than bf16")
    if device.type == "cuda":
        lines.append(_attention_line(cfg, device))
    return lines


def _to_fp8(models: Models, name: str) -> str:
    try:
        from torchao.float8 import convert_to_float8_training
    except ImportError:
        raise UserError(
            "loop.fp8 needs torchao: pip install 'ctrlnet[fp8]' (or pip install torchao), or set loop.fp8=off"
        ) from None
    model = getattr(models, name)
    before = sum(isinstance(m, torch.nn.Linear) for m in model.modules())  # Float8Linear is one too
    # The frozen UNet still runs its backward (the ControlNet's residuals flow through it), so its
    # activation gradients go through FP8 too. torchao's backward also computes weight gradients
    # that a frozen weight never uses: eagerly they are computed and dropped; compiled, AOT
    # autograd keeps only the gradients some input needs.
    convert_to_float8_training(model, module_filter_fn=fp8_filter)
    after = sum(isinstance(m, torch.nn.Linear) and type(m).__name__ != "Float8Linear" for m in model.modules())
    return f"fp8: {name} - {before - after} of {before} Linear layers run FP8 matmuls (torchao float8)"


def _dtype_name(cfg: TrainConfig) -> str:
    return {"no": "fp32", "fp16": "fp16", "bf16": "bf16"}[cfg.loop.mixed_precision]


def sdpa_priority(device: torch.device) -> list:
    """SDPA kernels in the order tried; each only where it supports the inputs (head dim, dtype,
    GPU), so the list falls through. cuDNN's attention is the fastest on Hopper; flash elsewhere."""
    from torch.nn.attention import SDPBackend

    order = [SDPBackend.FLASH_ATTENTION, SDPBackend.CUDNN_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]
    if torch.cuda.get_device_capability(device) >= (9, 0):
        order[:2] = order[1::-1]
    return [*order, SDPBackend.MATH]


def _has_sdpa_priority() -> bool:
    import inspect

    from torch.nn.attention import sdpa_kernel

    return "set_priority" in inspect.signature(sdpa_kernel).parameters  # torch 2.6 and newer


def _attention_line(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.loop.attention == "xformers":
        return "attention: xformers (loop.attention)"
    if not _has_sdpa_priority():
        return "attention: SDPA in torch's default order (this torch cannot reorder its kernels)"
    names = {"FLASH_ATTENTION": "flash", "CUDNN_ATTENTION": "cuDNN", "EFFICIENT_ATTENTION": "memory-efficient"}
    return "attention: SDPA, preferring " + ", then ".join(names.get(b.name, b.name) for b in sdpa_priority(device))


class GradientCheck:
    """Once per process, on the first micro-batch: the ControlNet's gradients from the compiled
    models against eager ones, from the same inputs. Compilers have silent bugs (measured here:
    this torch's CPU inductor returns zero input gradients from the frozen UNet's up block with an
    upsampler, while its forward is right); a wrong gradient trains a wrong model without a word,
    so a disagreement turns compile off for the run, with one line. Costs one eager and one
    compiled forward + backward, once."""

    MIN_COSINE = 0.99  # bf16 autocast: compiled and eager gradients agree to ~1e-3, not 1e-7

    def __init__(self, controlnet: torch.nn.Module, is_main: bool):
        self.controlnet = controlnet  # the module itself, not the DDP wrapper: no all-reduce here
        self.is_main, self.done = is_main, False

    @classmethod
    def needed(cls, cfg: TrainConfig, device: torch.device) -> bool:
        # Under DeepSpeed the ControlNet's weights live in the engine (ZeRO-3: sharded): not checked.
        compiled = compile_mode(cfg, device) != "off" and compile_blocker(device) is None
        # (torch before 2.6 cannot run compiled modules eagerly on demand: nothing to compare with)
        return compiled and cfg.distributed.strategy != "deepspeed" and hasattr(torch.compiler, "set_stance")

    def run(self, loss_fn, *args) -> bool:
        """`loss_fn(*args)`: the first micro-batch's loss through `self.controlnet`. Whether the
        compiled gradients agree (the main process prints the line either way)."""
        from ctrlnet_trainer.accel import all_reduce

        self.done = True
        params = [p for p in self.controlnet.parameters() if p.requires_grad]
        with eager():
            reference, _ = _gradients(loss_fn, args, params)
        compiled, failed = _gradients(loss_fn, args, params)
        cosine, ratio = _agreement(reference, compiled)
        agree = ((cosine >= self.MIN_COSINE) & (ratio - 1).abs().le(0.1)).float()
        ok = all_reduce(agree, "mean").item() == 1.0  # every process: the same decision everywhere
        if ok:
            line = f"compile check: compiled and eager gradients agree (cosine {cosine.item():.6f})"
        else:
            torch.compiler.set_stance("force_eager")  # reset when the run ends (process_settings)
            why = (
                f"the compiled step failed ({failed})"
                if failed
                else (
                    f"the compiled step's ControlNet gradients disagree with eager ones (cosine "
                    f"{cosine.item():.4f}, norm ratio {ratio.item():.4f})"
                )
            )
            line = f"compile: OFF for this run - {why}: a torch.compile bug here; training goes on eagerly"
        log.info(f"speed: {line}")
        return ok


def _gradients(loss_fn, args, params) -> tuple[list, str | None]:
    """d loss / d params (None where a parameter got none), and why they could not be had."""
    try:
        loss = loss_fn(*args)
        if not loss.requires_grad:
            return [None] * len(params), None
        return list(torch.autograd.grad(loss, params, allow_unused=True)), None
    except Exception as e:  # e.g. a compiled kernel failing at run time
        return [None] * len(params), one_line(e, with_type=True)


def _agreement(reference: list, got: list) -> tuple[torch.Tensor, torch.Tensor]:
    """Cosine between the two gradients (all parameters as one vector), and |got| / |reference|."""
    dot = norm_ref = norm_got = 0.0
    for a, b in zip(reference, got, strict=True):
        if a is None:
            continue
        a = a.float()
        norm_ref = norm_ref + a.square().sum()
        if b is not None:
            b = b.float()
            dot, norm_got = dot + (a * b).sum(), norm_got + b.square().sum()
    dot, norm_ref, norm_got = (torch.as_tensor(x, dtype=torch.float32) for x in (dot, norm_ref, norm_got))
    cosine = (dot / (norm_ref.sqrt() * norm_got.sqrt()).clamp_min(1e-30)).nan_to_num(0.0)
    return cosine, norm_got.sqrt() / norm_ref.sqrt().clamp_min(1e-30)


@contextmanager
def eager() -> Iterator[None]:
    """Compiled modules run uncompiled in here: validation samples under no_grad, at the pipeline's
    shapes, would compile every block again (minutes on a GPU) to save seconds."""
    set_stance = getattr(torch.compiler, "set_stance", None)  # torch 2.6 and newer
    if set_stance is None:
        yield
        return
    with set_stance("force_eager"):
        yield


# ------------------------------------------------------------------ process-wide, for one run
@contextmanager
def process_settings(cfg: TrainConfig, device: torch.device) -> Iterator[None]:
    """The process-wide side of the switches, for the length of a run, restored after (a second
    run in the same process, a notebook, a test, starts from what it found)."""
    with ExitStack() as stack:
        if device.type == "cuda" and cfg.loop.attention == "sdpa" and _has_sdpa_priority():
            from torch.nn.attention import sdpa_kernel

            stack.enter_context(sdpa_kernel(sdpa_priority(device), set_priority=True))
        if compile_mode(cfg, device) != "off" and compile_blocker(device) is None:
            stack.enter_context(_compile_settings(compile_cache_dir(cfg)))
        yield


@contextmanager
def _compile_settings(cache: str | None) -> Iterator[None]:
    import torch._dynamo.config as dynamo_config
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    saved_env = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if cache:
        Path(cache).mkdir(parents=True, exist_ok=True)
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(Path(cache).resolve())  # triton's cache goes under it too
    # (torch before 2.6 names the recompile limit cache_size_limit, and may lack the autograd cache)
    limit = "recompile_limit" if hasattr(dynamo_config, "recompile_limit") else "cache_size_limit"
    patches = [
        inductor_config.patch(fx_graph_cache=True),  # compiled graphs, keyed on graph + inputs + versions
        # A block that fails to compile runs eagerly (dynamo logs why) instead of ending the run.
        dynamo_config.patch({limit: RECOMPILE_LIMIT, "suppress_errors": True}),
    ]
    if hasattr(functorch_config, "enable_autograd_cache"):
        patches.append(functorch_config.patch(enable_autograd_cache=True))  # the forward/backward split too
    try:
        with ExitStack() as stack:
            for patch in patches:
                stack.enter_context(patch)
            yield
    finally:
        if hasattr(torch.compiler, "set_stance"):
            torch.compiler.set_stance("default")  # GradientCheck may have turned compiled code off
        if saved_env is None:
            os.environ.pop("TORCHINDUCTOR_CACHE_DIR", None)
        else:
            os.environ["TORCHINDUCTOR_CACHE_DIR"] = saved_env
