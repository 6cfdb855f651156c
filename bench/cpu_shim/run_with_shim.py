"""Run a script with bench/cpu_shim/torchvision_shim standing in for `torchvision`.

diffusers and transformers are imported first, so they see no torchvision and keep their
PIL code paths; only then is the shim registered for the script's own `from torchvision import
transforms`. usage: python run_with_shim.py SCRIPT [args...]"""

import runpy
import sys
from pathlib import Path

import diffusers  # noqa: F401  (decide "no torchvision" before the shim exists)
import diffusers.loaders  # noqa: F401
import transformers  # noqa: F401

sys.path.insert(0, str(Path(__file__).resolve().parent))
import torchvision_shim  # noqa: E402
import torchvision_shim.transforms  # noqa: E402

sys.modules["torchvision"] = torchvision_shim
sys.modules["torchvision.transforms"] = torchvision_shim.transforms

script = sys.argv[1]
sys.argv = sys.argv[1:]
runpy.run_path(script, run_name="__main__")
