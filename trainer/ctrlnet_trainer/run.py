"""`train(cfg)`: one training run, in one process or one per GPU under torchrun.

Sets up what lives outside the Trainer (the Accelerator and its process group, the SIGTERM
flag), runs the Trainer, and leaves the process as it found it. The loop itself is
`ctrlnet_trainer.trainer.Trainer`."""

from __future__ import annotations

from ctrlnet.config.train import TrainConfig
from ctrlnet_trainer import accel
from ctrlnet_trainer.preemption import StopFlag
from ctrlnet_trainer.quiet import quiet_library_noise
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.trainer import RunResult, Trainer

__all__ = ["RunResult", "train"]


def train(cfg: TrainConfig) -> RunResult:
    quiet_library_noise()
    use_cuda = accel.check_device_options(cfg)
    if cfg.hub.push:
        from ctrlnet_trainer.hub import hub_token

        hub_token(cfg.hub)  # fail before training, not after
    output = Prefix(cfg.output)
    accelerator = accel.build_accelerator(cfg, output.local(), use_cuda)
    stop = StopFlag().install()
    try:
        return Trainer(cfg, accelerator, output, stop).train()
    finally:
        stop.uninstall()
        accelerator.end_training()
        _forget_accelerator_state()


def _forget_accelerator_state() -> None:
    """accelerate keeps process-wide singletons: without this, a second train() in the same
    process (a notebook, a test) with another mixed_precision fails, and inherits the last
    run's gradient-accumulation state. The process group (PartialState) is left alone."""
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state()
    GradientState._reset_state()
