"""The pod's entrypoint: `torchrun`, with exit codes that Kubeflow's restart policy can act on.

    python -m ctrlnet_trainer.launch --nnodes=2 --nproc-per-node=8 -m ctrlnet_trainer --config /etc/ctrlnet/config.yaml

It takes exactly torchrun's command line (rendezvous from the PET_* variables the Training
Operator / Trainer inject) and runs torchrun's own code in-process. Why not plain torchrun:
torchrun exits 1 whenever it is stopped by SIGTERM, and 1 whenever a worker fails, whatever the
worker's own exit code. With PyTorchJob `restartPolicy: ExitCode`, 1-127 fail the job for good
and 128-255 restart the pod, so a preempted pod (SIGTERM: the trainer checkpoints and exits 143)
would end the job instead of resuming it. Here:

* torchrun stopped by a signal (after its workers finished, within TORCH_ELASTIC_SHUTDOWN_TIMEOUT
  seconds, which the chart sets just under terminationGracePeriodSeconds) -> 128 + signal (143);
* a worker exited 128-255 or was killed by a signal (e.g. SIGKILL by the OOM killer -> 137) ->
  that code, retryable;
* a worker exited 1-127 (a bug, bad config, bad data) -> that code: permanent, no retry loop;
* success -> 0.

It lives in the trainer package because it runs in the trainer image (which installs only
ctrlnet[train]). It imports torch only inside main(), so importing it (tests, the image's
import check) is cheap.
"""

from __future__ import annotations

import os
import signal
import sys
from collections.abc import Iterable
from pathlib import Path

RETRYABLE_MIN = 128


def exit_code_for(worker_codes: Iterable[int]) -> int:
    """One exit code for the pod from the workers' exit codes (negative: killed by that signal).

    A retryable code wins over a permanent one: when one rank is preempted, the others fail
    with collective errors that are consequences, not causes. A worker killed by a bare SIGTERM
    (-15: it had no handler, or died before installing it) is torchrun tearing the group down
    after another worker failed: a consequence too, so it counts only when nothing else failed."""
    raw = [c for c in worker_codes if c != 0]
    causes = [c for c in raw if c != -signal.SIGTERM] or raw
    codes = [128 - c if c < 0 else c for c in causes]
    failed = [c for c in codes if c != 0]
    if not failed:
        return 0
    retryable = [c for c in failed if c >= RETRYABLE_MIN]
    if retryable:
        return max(retryable, key=lambda c: (c == 143, c))
    return min(failed)


def _early_sigterm(signum: int, frame: object) -> None:
    # Before torchrun installs its own handlers (e.g. while torch imports): PID 1 ignores signals
    # that have no handler, so without this a pod would linger until SIGKILL.
    raise SystemExit(128 + signum)


ERROR_DIR_ENV = "CTRLNET_ERROR_DIR"
"""Where the workers leave their one-line errors (ctrlnet_trainer.__main__), so the pod (or
`ctrlnet train --nproc`) prints each distinct error once, last, instead of once per process."""


def main(argv: list[str] | None = None) -> int:
    signal.signal(signal.SIGTERM, _early_sigterm)
    import tempfile

    from torch.distributed.elastic.multiprocessing.api import SignalException
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.run import parse_args, run

    args = parse_args(sys.argv[1:] if argv is None else argv)
    with tempfile.TemporaryDirectory(prefix="ctrlnet-errors-") as errors:
        os.environ[ERROR_DIR_ENV] = errors  # the workers inherit it
        try:
            run(args)
        except SignalException as e:
            _say(f"stopped by signal {int(e.sigval)}; exiting {128 + int(e.sigval)} (retryable)", errors)
            return 128 + int(e.sigval)
        except ChildFailedError as e:
            code = exit_code_for(f.exitcode for f in e.failures.values())
            kind = "retryable" if code >= RETRYABLE_MIN else "permanent"
            _say(
                f"worker(s) failed with {sorted(f.exitcode for f in e.failures.values())}; exiting {code} ({kind})",
                errors,
            )
            return code or 1
    return 0


def _say(summary: str, errors: str) -> None:
    """The launcher's summary, then each distinct worker error once: the error is the last line."""
    print(f"ctrlnet_trainer.launch: {summary}", file=sys.stderr, flush=True)
    seen: list[str] = []
    for path in sorted(Path(errors).glob("rank-*.txt")):
        message = path.read_text().strip()
        if message and message not in seen:
            seen.append(message)
    for message in seen:
        print(f"error: {message}", file=sys.stderr, flush=True)


if __name__ == "__main__":
    sys.exit(main())
