"""Silence import-time warnings from dependencies that say nothing about the user's run, and, under
`ctrlnet -q`, the libraries' own progress bars and notes."""

import logging
import os

from ctrlnet.log import verbosity

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
    if verbosity() < 0:
        # -q: warnings and errors only; transformers' "Loading weights" bars and diffusers' notes are neither.
        from diffusers.utils import logging as diffusers_logging
        from transformers.utils import logging as transformers_logging

        for library in (transformers_logging, diffusers_logging):
            library.set_verbosity_error()
            library.disable_progress_bar()
