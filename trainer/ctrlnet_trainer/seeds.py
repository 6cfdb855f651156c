"""Every random stream of a run derives from the run's one seed through a formula named here.

The formulas are part of the resume contract: a resumed run re-derives the same streams from the
seed in the checkpoint, so changing one breaks exact resume of existing checkpoints. Integer mixes,
never `hash()` (salted per process for strings).
"""

from __future__ import annotations

import random

_ROW_PRIME = 1_000_003
_MIX_PRIME = 7919


def epoch_order_seed(seed: int, epoch: int) -> int:
    """The permutation of a map-style dataset in one epoch (the same on every rank)."""
    return seed + epoch


def row_rng(seed: int, epoch: int, index: int) -> random.Random:
    """One row's randomness in one epoch (which caption of several): fixed, so a resume repeats it."""
    return random.Random(seed * _ROW_PRIME + epoch * _MIX_PRIME + index)


def synthetic_row_rng(seed: int, index: int) -> random.Random:
    """Colours and circle of synthetic fill row `index`: a pure function of (seed, index)."""
    return random.Random(seed * _ROW_PRIME + index)


def sample_seed(seed: int, epoch: int, index: int) -> int:
    """Every random draw of one training example in one epoch: its VAE latent sample, noise,
    timestep and prompt dropout. Keyed by the example, not by the process that happens to train
    it, so a run resumed on another number of processes draws exactly the same."""
    return ((seed * _ROW_PRIME + epoch * _MIX_PRIME + index) * 2 + 1) % 2**63
