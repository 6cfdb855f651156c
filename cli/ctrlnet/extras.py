"""ctrlnet's optional parts, and the one message that says how to get one.

The base install is the CLI and the config model. `ctrlnet[k8s]` adds the workstation's
Kubernetes tooling (the Helm engine, schema validation, the kubernetes client) and
`ctrlnet[train]` the trainer (torch, diffusers, ...). Code that needs an extra's package imports
it plainly, inside `with needs("train"):`, so a missing package is one line naming the install
command, not a traceback:

    with needs("train"):
        from ctrlnet_trainer.run import train
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator
from contextlib import contextmanager

from ctrlnet.errors import UserError

EXTRAS = ("k8s", "train")
OURS = ("ctrlnet", "ctrlnet_trainer")


@contextmanager
def needs(extra: str, *, alternative: str = "") -> Iterator[None]:
    """Around imports of what the `extra` provides (its packages, or modules of ours that import
    them). If a third-party package is missing: a UserError naming `pip install
    'ctrlnet[<extra>]'` (and `alternative`, another way out, when there is one). A missing module
    of ours is a broken install or a bug: it keeps its traceback."""
    if extra not in EXTRAS:
        raise ValueError(f"unknown extra {extra!r}: one of {', '.join(EXTRAS)}")
    try:
        yield
    except ModuleNotFoundError as e:
        if e.name is None or e.name.split(".")[0] in OURS:
            raise  # ours, or not an import that failed: keep the traceback
        raise _missing(extra, e.name, alternative) from None


def _missing(extra: str, module: str, alternative: str = "") -> UserError:
    """The one-line error for a missing `module` that `extra` provides."""
    or_else = f", or {alternative}" if alternative else ""
    return UserError(f"the Python module {module!r} is not installed: pip install 'ctrlnet[{extra}]'{or_else}")


def check_installed(extra: str, *packages: str) -> None:
    """Like `needs`, without importing: for a command that checks its input before it imports
    the heavy packages it will need (a typo should fail in a second, a missing extra too)."""
    for package in packages:
        try:
            found = importlib.util.find_spec(package) is not None
        except (ImportError, ValueError):  # ValueError: in sys.modules without a spec (blocked)
            found = False
        if not found:
            raise _missing(extra, package)
