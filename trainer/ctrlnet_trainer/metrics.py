"""What a run reports while it trains: the `Meter` (windowed loss and samples/s between logging
steps) writes metrics.jsonl (one line per logged step), the tracker (TensorBoard through
accelerate), a progress bar in a terminal or progress lines (ctrlnet.config.progress) on a pod's
stdout; at the end, a loss curve PNG.

Speed fields of a row (a window = the steps since the previous row; paused time excluded):
    step_s           mean wall seconds per optimizer step
    data_wait_s      mean seconds per step spent blocked waiting for the next batch (0: the loader
                     keeps up; close to step_s: the GPU starves)
    compile_s        once, in the first row after the process's first WARMUP_STEPS steps (or the
                     last row of a shorter run): how much longer the first step took than the
                     median of the steps after it, data waits left out. The one-time cost of
                     torch.compile (plus cuDNN autotuning and allocator warm-up, a fraction of a
                     second in an eager run); a warm compile cache shrinks it
    peak_memory_gib  CUDA: the window's peak of allocated memory (gpu_mem_gib: the run's peak so far)
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import torch

from ctrlnet.config.contract import METRICS_FILE
from ctrlnet.config.progress import format_line
from ctrlnet_trainer.storage import Prefix

LOSS_CURVE = "loss.png"
# Steps timed one by one at the start (synchronized on CUDA, so each is its own device time): the
# first against the median of the rest gives compile_s.
WARMUP_STEPS = 4


def finite_row(row: dict) -> dict:
    """`row` with its non-finite numbers as null: metrics.jsonl stays JSON (no NaN or Infinity)."""
    return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in row.items()}


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
        row = finite_row(row)
        self.rows.append(row)
        self._file.write(json.dumps(row, allow_nan=False) + "\n")
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

        steps, losses = zip(*points, strict=False)
        lines = self._score_lines()
        if lines:
            fig, (ax, right) = plt.subplots(1, 2, figsize=(10, 3.5), dpi=100)
            for k, (label, chance_label, own, chance) in enumerate(lines):
                colour = f"C{k}"
                right.plot(*zip(*own, strict=True), marker="o", color=colour, label=label)
                if chance:
                    right.plot(*zip(*chance, strict=True), marker="o", ls="--", color=colour, label=chance_label)
            right.set_xlabel("step")
            right.set_ylabel("condition adherence / fidelity")
            right.set_ylim(0, 1)
            right.legend(fontsize="small")
        else:
            fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
        ax.plot(steps, losses, lw=0.8, alpha=0.4, label="loss")
        window = max(1, len(losses) // 20)
        if window > 1:
            smooth = [
                sum(losses[max(0, i - window + 1) : i + 1]) / len(losses[max(0, i - window + 1) : i + 1])
                for i in range(len(losses))
            ]
            ax.plot(steps, smooth, lw=1.5, label=f"mean of {window}")
        ax.set_xlabel("step")
        ax.set_ylabel("denoising loss")
        ax.legend()
        fig.tight_layout()
        fig.savefig(out)
        plt.close(fig)
        return out

    def _score_lines(self) -> list[tuple[str, str, list, list]]:
        """Validation's scores over the steps, one line per measure with its chance level: (label,
        chance label, [(step, score)], [(step, chance)]); a null (no chance level) is left out."""

        def points(key: str) -> list[tuple[int, float]]:
            return [(r["step"], r[key]) for r in self.rows if isinstance(r.get(key), (int, float))]

        lines = []
        if points("adherence_iou"):
            lines.append(
                (
                    "IoU with its outline",
                    "IoU with another outline (chance)",
                    points("adherence_iou"),
                    points("adherence_chance"),
                )
            )
        names = dict.fromkeys(
            k.removeprefix("fidelity_")
            for r in self.rows
            for k in r
            if k.startswith("fidelity_") and not k.endswith("_chance")
        )
        for name in names:
            if own := points(f"fidelity_{name}"):
                lines.append(
                    (
                        f"{name} fidelity",
                        f"{name} fidelity, another condition (chance)",
                        own,
                        points(f"fidelity_{name}_chance"),
                    )
                )
        return lines


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


class Meter:
    """Loss and throughput over the window since the last logging step, reported every
    `logging.every_steps` and at the last step. samples/s counts training time only: checkpoints
    and validation run inside `paused()`."""

    def __init__(
        self,
        output: Prefix,
        accelerator,
        *,
        every: int,
        total_steps: int,
        start_step: int,
        samples_per_step: int,
        is_main: bool,
        is_local_main: bool,
        device: torch.device,
        logging_dir: str,
        count_skipped: bool = False,
    ):
        self.output, self.acc, self.every, self.total = output, accelerator, every, total_steps
        self.samples_per_step, self.logging_dir = samples_per_step, logging_dir
        self.log_file: MetricsLog | None = None
        if is_main:
            if start_step and output.exists(METRICS_FILE):
                output.fetch(METRICS_FILE)  # a resumed run keeps its history
            self.log_file = MetricsLog(output.local(METRICS_FILE), start_step)
        self.progress = Progress(total_steps, start_step, is_local_main)
        # Off a terminal (a pod, a pipe), rank 0 prints progress lines for `ctrlnet status`.
        self.progress_lines = is_main and not sys.stdout.isatty()
        # Under Kubeflow Trainer v2 with its TrainJobStatus gate: progress in the TrainJob's status too.
        from ctrlnet_trainer.trainjob_status import TrainJobStatus

        self.trainjob = TrainJobStatus.from_env() if is_main else None
        self.trainjob_last: tuple[float, dict] | None = None  # the newest (ETA, metrics) logged
        self.window_loss = torch.zeros((), device=device)
        self.window_steps = 0
        # Rows skipped as unreadable (data.skip_bad_rows), summed over processes per logged window.
        self.count_skipped, self.window_skipped = count_skipped, torch.zeros((), device=device)
        self.window_start = time.perf_counter()
        self.paused_seconds = 0.0
        self.device = device
        self.window_data_wait = 0.0
        # Per-step timing of the first WARMUP_STEPS steps (for compile_s); paused time left out.
        self.step_mark, self.paused_total, self.paused_at_mark = self.window_start, 0.0, 0.0
        self.step_data_wait, self.first_steps, self.compile_reported = 0.0, [], False
        self.run_peak_gib = 0.0

    @contextmanager
    def waiting(self):
        """Time spent in here is the step waiting for its batch (data_wait_s)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            waited = time.perf_counter() - start
            self.window_data_wait += waited
            self.step_data_wait += waited

    def add(self, loss: torch.Tensor) -> None:
        """One optimizer step's mean loss (a device tensor: no host sync until the window is logged)."""
        self.window_loss += loss.detach()
        self.window_steps += 1
        if len(self.first_steps) < WARMUP_STEPS:
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)  # a step's time is its device time, not its launch time
            now = time.perf_counter()
            took = now - self.step_mark - (self.paused_total - self.paused_at_mark)
            self.first_steps.append(max(0.0, took - self.step_data_wait))
            self.step_mark, self.paused_at_mark = now, self.paused_total
        self.step_data_wait = 0.0

    def skipped(self, rows: int) -> None:
        """This process skipped `rows` unreadable rows (reported as `skipped_rows` with the window)."""
        self.window_skipped += rows

    def log(self, step: int, *, lr: float, grad_norm, epoch: int) -> dict | None:
        """Report the window when `step` is a logging step (collective: every rank calls it)."""
        if step % self.every != 0 and step != self.total:
            self.progress.update()
            return None
        from ctrlnet_trainer.accel import all_reduce

        mean_loss = all_reduce(self.window_loss, "mean").item() / self.window_steps
        elapsed = time.perf_counter() - self.window_start - self.paused_seconds
        row = {
            "step": step,
            "loss": round(mean_loss, 6),
            "lr": lr,
            "grad_norm": None if grad_norm is None else round(float(grad_norm), 6),
            "samples_per_s": round(self.samples_per_step * self.window_steps / max(elapsed, 1e-9), 3),
            "epoch": epoch,
            "step_s": round(elapsed / self.window_steps, 5),
            "data_wait_s": round(self.window_data_wait / self.window_steps, 5),
        }
        if (compile_s := self._compile_s(last=step == self.total)) is not None:
            row["compile_s"] = compile_s
        if self.count_skipped:  # a collective on every rank, as the config is the same everywhere
            row["skipped_rows"] = int(all_reduce(self.window_skipped).item())
            self.window_skipped.zero_()
        if self.device.type == "cuda":
            window_peak = torch.cuda.max_memory_allocated(self.device) / 2**30
            torch.cuda.reset_peak_memory_stats(self.device)  # the next window's peak is its own
            self.run_peak_gib = max(self.run_peak_gib, window_peak)
            row["gpu_mem_gib"] = round(self.run_peak_gib, 3)
            row["peak_memory_gib"] = round(window_peak, 3)
        left = (self.total - step) * self.samples_per_step / max(row["samples_per_s"], 1e-9)
        if self.trainjob:
            metrics = {
                "step": step,
                "total_steps": self.total,
                "loss": row["loss"],
                "lr": lr,
                "samples_per_s": row["samples_per_s"],
                "epoch": epoch,
            }
            self.trainjob_last = (left, metrics)
            self.trainjob.report(step=step, total=self.total, eta_s=left, metrics=metrics, force=step == self.total)
        if self.progress_lines:
            print(
                format_line(
                    "step",
                    step=step,
                    total=self.total,
                    loss=row["loss"],
                    samples_per_s=row["samples_per_s"],
                    step_s=row["step_s"],
                    data_wait_s=row["data_wait_s"],
                    eta_s=round(left),
                    epoch=epoch,
                ),
                flush=True,
            )
        if self.log_file:
            self.log_file.write(row)
            if self.acc.log_with:
                self.acc.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=step)
        self.progress.update(loss=f"{mean_loss:.4f}")
        self.window_loss.zero_()
        self.window_steps, self.window_start, self.paused_seconds = 0, time.perf_counter(), 0.0
        self.window_data_wait = 0.0
        return row

    def _compile_s(self, last: bool) -> float | None:
        """compile_s, once: the first step's excess over the median of the steps after it."""
        steps = self.first_steps
        if self.compile_reported or len(steps) < 2 or (len(steps) < WARMUP_STEPS and not last):
            return None
        self.compile_reported = True
        return round(max(0.0, steps[0] - statistics.median(steps[1:])), 3)

    def record(self, step: int, values: dict[str, float]) -> None:
        """A row of other measures at `step` (validation's adherence and fidelity), to metrics.jsonl
        (a non-finite value as null) and the tracker (without it)."""
        if self.log_file:
            self.log_file.write({"step": step, **values})
            if self.acc.log_with:
                self.acc.log({k: v for k, v in values.items() if math.isfinite(v)}, step=step)

    def checkpointed(self, step: int, url: str) -> None:
        """A checkpoint was committed: tell status (and publish the metrics written so far)."""
        if self.progress_lines:
            print(format_line("checkpoint", step=step, total=self.total, checkpoint=url), flush=True)
        if self.trainjob and self.trainjob_last:
            # Sent past the 5 s throttle: what the TrainJob's status shows is then never older than
            # the newest checkpoint, also after a preemption (the run's last words before exit 143).
            left, metrics = self.trainjob_last
            self.trainjob.report(step=step, total=self.total, eta_s=left, metrics={**metrics, "step": step}, force=True)
        self.publish()

    def done(self, step: int, controlnet: str) -> None:
        if self.progress_lines:
            print(format_line("done", step=step, total=self.total, controlnet=controlnet), flush=True)

    @contextmanager
    def paused(self):
        """Time spent in here (checkpointing, validation) is not training time."""
        start = time.perf_counter()
        try:
            yield
        finally:
            paused = time.perf_counter() - start
            self.paused_seconds += paused
            self.paused_total += paused

    def publish(self) -> None:
        """Bring the metrics and TensorBoard logs written so far into the output (main process)."""
        if not self.log_file:
            return
        self.output.publish(METRICS_FILE)
        if self.output.local(self.logging_dir).exists():
            self.output.publish(self.logging_dir)

    def close(self) -> str | None:
        """Finish the bar and the log; plot and publish the loss curve. Its URL, if one was drawn."""
        self.progress.close()
        if not self.log_file:
            return None
        self.log_file.close()
        curve = self.log_file.plot_loss(self.output.local(LOSS_CURVE))
        if curve:
            self.output.publish(LOSS_CURVE)
        self.publish()
        return self.output.url_of(LOSS_CURVE) if curve else None
