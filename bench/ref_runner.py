"""Run a diffusers training script unchanged and report when each optimizer step ended.

usage: python bench/ref_runner.py [--cast-unet-text] SCRIPT [script args...]

The diffusers ControlNet scripts (train_controlnet.py, train_controlnet_sdxl.py) advance one tqdm
bar, described "Steps", once per optimizer step (and read the loss with .item() right after, so
the GPU has finished the step by then). This wraps that bar's __init__ and update to timestamp the
steps, and prints at exit one line:
`REFERENCE_RESULT {"step_s": [...], "peak_alloc_gib": ..., ...}`. Other tqdm bars (dataset
preparation, train_controlnet_sdxl.py's prompt-encoding map) are ignored. The script itself runs
as is, through runpy, as `__main__`.

--cast-unet-text: train_controlnet_sdxl.py under bf16/fp16 hands its frozen UNet (in that dtype,
outside autocast) the prompt embeddings its dataset map stored as fp32, and fails in the UNet's
first cross-attention. This casts `encoder_hidden_states` to the UNet's dtype as
UNet2DConditionModel is called (one [B, 77, 2048] cast per step; the ControlNet, under autocast,
is left alone) — the fix diffusers made to train_controlnet_sd3.py (huggingface/diffusers#11051).
"""

import atexit
import json
import runpy
import sys
import time

import tqdm.auto

BAR = "Steps"
started = time.perf_counter()
stamps: list[float] = []  # [bar created, step 1 done, step 2 done, ...]
_init, _update = tqdm.auto.tqdm.__init__, tqdm.auto.tqdm.update


def init(self, *args, **kwargs):
    _init(self, *args, **kwargs)
    if getattr(self, "desc", None) == BAR:
        stamps.append(time.perf_counter())


def update(self, n=1):
    if getattr(self, "desc", None) == BAR:
        stamps.append(time.perf_counter())
    return _update(self, n)


tqdm.auto.tqdm.__init__, tqdm.auto.tqdm.update = init, update


def cast_unet_text() -> None:
    from diffusers import UNet2DConditionModel

    forward = UNet2DConditionModel.forward

    def cast(self, *args, **kwargs):
        states = kwargs.get("encoder_hidden_states", args[2] if len(args) > 2 else None)
        if states is not None and states.is_floating_point() and states.dtype != self.dtype:
            if "encoder_hidden_states" in kwargs:
                kwargs["encoder_hidden_states"] = states.to(self.dtype)
            else:
                args = (*args[:2], states.to(self.dtype), *args[3:])
        return forward(self, *args, **kwargs)

    UNet2DConditionModel.forward = cast
    print("ref_runner: UNet2DConditionModel's encoder_hidden_states cast to the UNet's dtype", flush=True)


@atexit.register
def report():
    out = {
        "step_s": [b - a for a, b in zip(stamps, stamps[1:], strict=False)],
        "first_step_at_s": stamps[1] - started if len(stamps) > 1 else None,
    }
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        out["peak_alloc_gib"] = torch.cuda.max_memory_allocated() / 2**30
        out["peak_reserved_gib"] = torch.cuda.max_memory_reserved() / 2**30
    print("REFERENCE_RESULT " + json.dumps(out), flush=True)


args = sys.argv[1:]
if args and args[0] == "--cast-unet-text":
    args = args[1:]
    cast_unet_text()
sys.argv = args
runpy.run_path(args[0], run_name="__main__")
