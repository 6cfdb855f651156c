"""SIGTERM (preemption, `kubectl delete`, node drain): finish the step, checkpoint, exit 143.

Exit code 143 = 128 + SIGTERM: PyTorchJob's `restartPolicy: ExitCode` treats 128-255 as
retryable, so the job restarts and resumes from the checkpoint just written."""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT_CODE = 143


class Preempted(Exception):
    def __init__(self, step: int, checkpoint: str | None):
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint = step, checkpoint


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self._previous = None

    def install(self) -> StopFlag:
        try:
            self._previous = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
            self._previous = None
        return self

    def uninstall(self) -> None:
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)

    def _handle(self, signum, frame) -> None:
        self.requested = True

    def agreed(self, device) -> bool:
        """True on every rank when any rank was signalled (ranks must checkpoint together)."""
        from ctrlnet_trainer.accel import all_reduce

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce(flag).item() > 0)
