"""`train(cfg)`: one training run, in one process or one per GPU under torchrun.

Sets up what lives outside the Trainer (the Accelerator and its process group, the SIGTERM
flag), runs the Trainer, and leaves the process as it found it. The loop itself is
`ctrlnet_trainer.trainer.Trainer`."""

from __future__ import annotations

import os

from ctrlnet.config.contract import METRICS_FILE
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet.log import get_logger
from ctrlnet_trainer import accel, fs, rundir, speed, storage
from ctrlnet_trainer.checkpoints import ResumePoint
from ctrlnet_trainer.preemption import StopFlag
from ctrlnet_trainer.quiet import quiet_library_noise
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.trainer import RunResult, Trainer

log = get_logger(__name__)

__all__ = ["RunResult", "train"]


def train(cfg: TrainConfig) -> RunResult:
    quiet_library_noise()
    use_cuda = accel.check_device_options(cfg)
    if cfg.hub.push:
        from ctrlnet_trainer.hub import hub_token

        hub_token(cfg.hub)  # fail before training, not after
    # Reach every object store the run names once, quickly: no credentials or an unreachable
    # endpoint is one line in seconds, not a traceback after minutes of retries.
    storage.probe(
        outputs=[cfg.output], inputs=[cfg.model.base, cfg.data.dataset, cfg.data.cache, cfg.checkpoint.resume]
    )
    if not storage.is_remote(cfg.output):  # a file in the way, a read-only or full disk: one line now
        fs.check_writable(cfg.output, "--output", cfg.output)
    output = Prefix(cfg.output)
    done = rundir.finished_as_configured(output, cfg)
    if done is not None:  # e.g. a restarted pod of a job that is done: nothing to train, nothing to overwrite
        log.info(f"note: {output.url} holds this run, finished at step {done['step']}: nothing to do")
        return RunResult(
            controlnet=done["controlnet"],
            samples=None,
            loss_curve=None,
            metrics=output.url_of(METRICS_FILE),
            steps=int(done["step"]),
        )
    # Before the Accelerator: an elastic restart may change the gradient accumulation it is built with.
    resume = ResumePoint.find(output, cfg, world=int(os.environ.get("WORLD_SIZE", "1")))
    if resume is not None and resume.accumulation != cfg.loop.gradient_accumulation_steps:
        cfg = cfg.model_copy(deep=True)
        cfg.loop.gradient_accumulation_steps = resume.accumulation
    accelerator = accel.build_accelerator(cfg, output.local(), use_cuda)
    stop = StopFlag().install()
    try:
        with speed.process_settings(cfg, accelerator.device):  # compile cache, SDPA kernels; restored after
            return Trainer(cfg, accelerator, output, stop, resume).train()
    except Exception as e:  # a write that failed anywhere else (metrics, run.json, the final model): one line
        if isinstance(e, UserError) or fs.os_errno(e) is None:
            raise
        error = fs.as_error(e, getattr(e, "filename", None) or output.url)
        raise type(error)(f"{error}; the committed checkpoints are intact: continue with --resume latest") from None
    finally:
        stop.uninstall()
        for tracker in accelerator.trackers:  # not end_training(): the process group outlives a run
            tracker.finish()
        _forget_accelerator_state()


def _forget_accelerator_state() -> None:
    """accelerate keeps process-wide singletons: without this, a second train() in the same
    process (a notebook, a test) with another mixed_precision fails, and inherits the last
    run's gradient-accumulation state. The process group (PartialState) belongs to the process:
    python -m ctrlnet_trainer destroys it on exit, so a second run (DeepSpeed included) can reuse it."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
