"""Silence import-time warnings from dependencies that say nothing about the user's run."""

import logging
import os

_NOISE = (
    # bitsandbytes' optional CPU 4-bit kernel; we never use 4-bit layers.
    "bitsandbytes.backends.cpu.ops",
    # transformers falling back to PIL image processors when torchvision is absent (by design).
    "transformers.utils.import_utils",
)


def quiet_library_noise() -> None:
    for name in _NOISE:
        logging.getLogger(name).setLevel(logging.ERROR)
    import torch

    if not torch.cuda.is_available():
        # DeepSpeed (imported by accelerate whenever installed) warns when it has to guess the CPU.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
