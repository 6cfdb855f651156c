"""Step times -> the benchmark's figures, the same way for ours and the reference; and running a
command with its output kept in a log."""

from __future__ import annotations

import statistics
import subprocess
import time
from pathlib import Path


class Failed(RuntimeError):
    """A command of the benchmark exited non-zero; the message ends with its last output."""


def run(cmd: list[str], log: Path, env: dict | None = None) -> tuple[str, float]:
    """(output, wall seconds) of `cmd`, its stdout and stderr kept in `log`."""
    print("+", " ".join(cmd), flush=True)
    start = time.perf_counter()
    with log.open("w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, text=True, env=env).returncode
    seconds = time.perf_counter() - start
    text = log.read_text()
    if code != 0:
        raise Failed(f"exit {code} after {seconds:.0f} s (log {log}); last lines:\n{text[-2000:]}")
    return text, seconds


def summarize(step_s: list[float], samples_per_step: int) -> dict:
    """Median seconds per optimizer step over the steady steps, samples/s from it, and the warm-up:
    how much longer than steady the first quarter of the steps (at least the first) took in all —
    compile, cuDNN autotuning, allocator growth, the first batches of the loader."""
    if not step_s:
        raise Failed("no step times were recorded")
    warm = max(1, len(step_s) // 4) if len(step_s) > 1 else 0
    steady = step_s[warm:] or step_s
    median = statistics.median(steady)
    return {
        "steps_timed": len(steady),
        "median_step_s": round(median, 5),
        "samples_per_s": round(samples_per_step / median, 3),
        "warmup_s": round(max(0.0, sum(step_s[:warm]) - warm * median), 3),
    }
