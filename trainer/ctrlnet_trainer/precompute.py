"""`python -m ctrlnet_trainer.precompute`: the precompute job's command (cache/job.py).

Kept at this name because it is part of the pod contract (ctrlnet.config.contract's
PRECOMPUTE_MODULE): manifests rendered and checked in by earlier versions start this module."""

from ctrlnet_trainer.cache.job import main, precompute

__all__ = ["main", "precompute"]

if __name__ == "__main__":
    raise SystemExit(main())
