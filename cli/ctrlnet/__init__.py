"""ctrlnet: train ControlNet adapters for Stable Diffusion, locally or on Kubernetes.

The Python API (docs/python-api.md): `ctrlnet.Client` (submit, get, list, status, logs, watch,
wait, suspend, resume, delete), `ctrlnet.JobConfig` (`from_file`, `with_overrides`),
`ctrlnet.render`, and the typed errors. Each is imported on first use, so `import ctrlnet` loads
nothing heavy (no torch, kubernetes or diffusers until a call needs them).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# name -> the module it lives in
_EXPORTS = {
    "Client": "ctrlnet.client",
    "Submitted": "ctrlnet.client",
    "RunRow": "ctrlnet.client",
    "Deleted": "ctrlnet.client",
    "render": "ctrlnet.client",
    "JobConfig": "ctrlnet.config",
    "RunStatus": "ctrlnet.cluster.status",
    "LogLine": "ctrlnet.cluster.logs",
    "UserError": "ctrlnet.errors",
    "ClusterError": "ctrlnet.errors",
    "StorageError": "ctrlnet.errors",
    "IntegrityError": "ctrlnet.errors",
    "RunNotFound": "ctrlnet.errors",
    "ObjectsInvalid": "ctrlnet.errors",
    "RunFailed": "ctrlnet.errors",
    "WaitTimeout": "ctrlnet.errors",
    "DeleteIncomplete": "ctrlnet.errors",
}

__all__ = [
    "Client",
    "ClusterError",
    "DeleteIncomplete",
    "Deleted",
    "IntegrityError",
    "JobConfig",
    "LogLine",
    "ObjectsInvalid",
    "RunFailed",
    "RunNotFound",
    "RunRow",
    "RunStatus",
    "StorageError",
    "Submitted",
    "UserError",
    "WaitTimeout",
    "__version__",
    "render",
]

if TYPE_CHECKING:
    from ctrlnet.client import Client, Deleted, RunRow, Submitted, render
    from ctrlnet.cluster.logs import LogLine
    from ctrlnet.cluster.status import RunStatus
    from ctrlnet.config import JobConfig
    from ctrlnet.errors import (
        ClusterError,
        DeleteIncomplete,
        IntegrityError,
        ObjectsInvalid,
        RunFailed,
        RunNotFound,
        StorageError,
        UserError,
        WaitTimeout,
    )


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'ctrlnet' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # once imported, a plain attribute
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_EXPORTS})
