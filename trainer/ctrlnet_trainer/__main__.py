"""`python -m ctrlnet_trainer --config config.yaml [--set key=value ...]` (under torchrun in pods).

The config file holds the `train` section (the job's ConfigMap). Exit codes: 0 done, 2 bad
input (one line on stderr), 143 preempted after checkpointing (retryable)."""

import argparse
import os
import sys

from ctrlnet.errors import UserError
from ctrlnet.log import capture_library_warnings


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m ctrlnet_trainer", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with the train section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. loop.max_steps=10")
    args = parser.parse_args(argv)
    capture_library_warnings(only_verbose=True)  # torch's and diffusers' warnings: with -v (CTRLNET_VERBOSITY=1) only
    try:
        from ctrlnet.config import load_train_config
        from ctrlnet_trainer.preemption import Preempted
        from ctrlnet_trainer.run import train

        cfg = load_train_config(args.config, args.overrides)
        try:
            result = train(cfg)
        except Preempted as p:
            print(
                f"preempted at step {p.step}; checkpoint {p.checkpoint or 'written with rank 0'}; "
                f"exiting {p.exit_code} to be restarted",
                file=sys.stderr,
                flush=True,
            )
            return p.exit_code
    except UserError as e:
        _report(e)
        return e.exit_code
    finally:
        _destroy_process_group()
    if os.environ.get("RANK", "0") == "0":
        print(f"done: {result.steps} steps; controlnet at {result.controlnet}", flush=True)
    return 0


def _report(error: Exception) -> None:
    """One line on stderr; under ctrlnet's launcher the line goes to it, which prints each distinct
    error of its workers once (N processes would otherwise print the same line N times)."""
    folder = os.environ.get("CTRLNET_ERROR_DIR")
    if folder and os.path.isdir(folder):
        with open(os.path.join(folder, f"rank-{os.environ.get('RANK', '0')}.txt"), "w") as f:
            f.write(str(error))
        return
    print(f"error: {error}", file=sys.stderr)


def _destroy_process_group() -> None:
    """The process group lives as long as the process (train() may run twice in it): end it here."""
    if "torch" not in sys.modules:
        return
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
