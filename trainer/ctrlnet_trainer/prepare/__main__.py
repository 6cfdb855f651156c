"""`python -m ctrlnet_trainer.prepare --config config.yaml [--set key=value ...]`: the prepare job's
command (job.py). The same config and command line as `python -m ctrlnet_trainer`, and the same
launcher in a pod; part of the pod contract (ctrlnet.config.contract's PREPARE_MODULE)."""

from __future__ import annotations

import argparse
import sys


def main(argv: list[str] | None = None) -> int:
    from ctrlnet.errors import UserError
    from ctrlnet.log import capture_library_warnings
    from ctrlnet_trainer.__main__ import _destroy_process_group, _report
    from ctrlnet_trainer.preemption import Preempted
    from ctrlnet_trainer.shards import ranks

    parser = argparse.ArgumentParser(prog="python -m ctrlnet_trainer.prepare", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with the train section")
    parser.add_argument(
        "--set", dest="overrides", action="append", default=[], help="override, e.g. prepare.max_rows=100"
    )
    args = parser.parse_args(argv)
    capture_library_warnings(only_verbose=True)
    try:
        from ctrlnet.config import load_train_config
        from ctrlnet_trainer.prepare.job import prepare

        result = prepare(load_train_config(args.config, args.overrides))
    except Preempted as p:
        print(f"stopped after {p.step} shard(s); the same command continues where it stopped", file=sys.stderr)
        return p.exit_code
    except UserError as e:
        _report(e)
        return e.exit_code
    finally:
        _destroy_process_group()
    if ranks().rank == 0:
        print(
            f"done: {result.rows} rows ({result.skipped} skipped) in {result.shards} shards at {result.dataset} "
            f"({result.seconds:.1f} s)",
            flush=True,
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
