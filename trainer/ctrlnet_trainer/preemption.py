"""SIGTERM (preemption, `kubectl delete`, node drain) or SIGINT (Ctrl-C): finish the step,
checkpoint, exit 143 (SIGTERM) or 130 (SIGINT). A second Ctrl-C interrupts at once.

Exit code 143 = 128 + SIGTERM: PyTorchJob's `restartPolicy: ExitCode` treats 128-255 as
retryable, so the job restarts and resumes from the checkpoint just written."""

from __future__ import annotations

import signal

import torch

PREEMPTED_EXIT_CODE = 143
INTERRUPTED_EXIT_CODE = 130
SIGNALS = (signal.SIGTERM, signal.SIGINT)


def exit_code_of(signum: int | None) -> int:
    """128 + the signal that stopped the run (143 for SIGTERM, the default; 130 for SIGINT)."""
    return INTERRUPTED_EXIT_CODE if signum == signal.SIGINT else PREEMPTED_EXIT_CODE


class Preempted(Exception):
    def __init__(self, step: int, checkpoint: str | None, signum: int | None = None):
        super().__init__(f"preempted at step {step}; checkpoint {checkpoint}")
        self.step, self.checkpoint, self.signum = step, checkpoint, signum
        self.exit_code = exit_code_of(signum)


class StopFlag:
    def __init__(self) -> None:
        self.requested = False
        self.signum: int | None = None
        self._previous: dict = {}

    def install(self) -> StopFlag:
        for signum in SIGNALS:
            try:
                self._previous[signum] = signal.signal(signum, self._handle)
            except ValueError:  # not the main thread (e.g. inside a test runner thread): no handler
                pass
        return self

    def uninstall(self) -> None:
        for signum, previous in self._previous.items():
            if previous is not None:
                signal.signal(signum, previous)
        self._previous = {}

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.requested:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without the checkpoint
        self.requested = True
        self.signum = self.signum or signum

    def agreed(self, device) -> bool:
        """True on every rank when any rank was signalled (ranks must checkpoint together)."""
        from ctrlnet_trainer.accel import all_reduce

        flag = torch.tensor([1.0 if self.requested else 0.0], device=device)
        return bool(all_reduce(flag).item() > 0)
