"""Run a diffusers training script unchanged and report when each optimizer step ended.

usage: python bench/ref_runner.py SCRIPT [script args...]

The diffusers ControlNet scripts advance one tqdm bar, described "Steps", once per optimizer step
(and read the loss with .item() right after, so the GPU has finished the step by then). This
wraps that bar's __init__ and update to timestamp the steps, and prints at exit one line:
`REFERENCE_RESULT {"step_s": [...], "peak_alloc_gib": ..., ...}`. Other tqdm bars (dataset
preparation) are ignored. The script itself runs as is, through runpy, as `__main__`.
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


script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
