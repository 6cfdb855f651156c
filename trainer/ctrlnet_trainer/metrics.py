"""metrics.jsonl (one line per logged step), TensorBoard through accelerate, and a loss curve PNG."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def gpu_memory_gib() -> float | None:
    if not torch.cuda.is_available():
        return None
    return round(torch.cuda.max_memory_allocated() / 2**30, 3)


class MetricsLog:
    def __init__(self, path: Path, resume_step: int):
        self.path = path
        self.rows: list[dict] = []
        if path.exists():
            # A resumed run rewrites history after its checkpoint: those steps are trained again.
            for line in path.read_text().splitlines():
                if line.strip():
                    row = json.loads(line)
                    if row.get("step", 0) <= resume_step:
                        self.rows.append(row)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text("".join(json.dumps(r) + "\n" for r in self.rows))
        self._file = path.open("a")

    def write(self, row: dict) -> None:
        self.rows.append(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()

    def plot_loss(self, out: Path) -> Path | None:
        points = [(r["step"], r["loss"]) for r in self.rows if "loss" in r]
        if not points:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        steps, losses = zip(*points)
        fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [sum(losses[max(0, i - window + 1): i + 1]) / len(losses[max(0, i - window + 1): i + 1])
                      for i in range(len(losses))]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("denoising loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out


class Progress:
    """A progress bar in a terminal, nothing otherwise (logs stay clean in pods)."""

    def __init__(self, total: int, initial: int, enabled: bool):
        self.bar = None
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, desc="steps", dynamic_ncols=True)

    def update(self, **postfix) -> None:
        if self.bar:
            self.bar.set_postfix(postfix, refresh=False)
            self.bar.update(1)

    def close(self) -> None:
        if self.bar:
            self.bar.close()
