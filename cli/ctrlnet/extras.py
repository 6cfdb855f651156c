"""ctrlnet's optional parts, and the one message that says how to get one.

The base install is the CLI and the config model. `ctrlnet[k8s]` adds the workstation's
Kubernetes tooling (the Helm engine, schema validation, the kubernetes client) and
`ctrlnet[train]` the trainer (torch, diffusers, ...). Code that needs an extra's package imports
it through require(), so a missing package is one line naming the install command, not a traceback.
"""

from __future__ import annotations

import importlib
import importlib.util
from types import ModuleType

from ctrlnet.errors import UserError

EXTRAS = ("k8s", "train")
OURS = ("ctrlnet", "ctrlnet_trainer")


def require(extra: str, module: str, *, alternative: str = "") -> ModuleType:
    """Import `module`, which the `extra` provides (directly, or because `module` is ours and
    imports it). If a third-party package is missing: a UserError naming `pip install
    'ctrlnet[<extra>]'` (and `alternative`, another way out, when there is one)."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: one of {', '.join(EXTRAS)}")
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        missing = e.name or module
        if missing.split(".")[0] in OURS:
            raise  # a module of ours is missing: a broken install or a bug, keep the traceback
        or_else = f", or {alternative}" if alternative else ""
        raise UserError(
            f"the Python module {missing!r} is not installed: pip install 'ctrlnet[{extra}]'{or_else}"
        ) from None


def check_installed(extra: str, *packages: str) -> None:
    """Like require(), without importing: for a command that checks its input before it imports
    the heavy packages it will need (a typo should fail in a second, a missing extra too)."""
    for package in packages:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # ValueError: in sys.modules without a spec (blocked)
            found = False
        if not found:
            raise UserError(f"the Python module {package!r} is not installed: pip install 'ctrlnet[{extra}]'")
