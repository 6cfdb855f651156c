"""What the offline checks report: one Problem per line, `<Kind>/<name>: <field path>: <message>`."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class Problem:
    obj: str
    path: str
    message: str
    rule: str = field(default="", compare=False)
    """The rule that found it (ctrlnet.k8s.rules; "" for schema problems): for tests, not shown."""
    warning: bool = field(default=False, compare=False)
    """A hardening advice rather than a mistake (a mutable image tag, no NetworkPolicy, ...):
    printed as `warning: <line>` on stderr, never failing `validate` or `submit`."""

    def __str__(self) -> str:
        return f"{self.obj}: {self.path}: {self.message}" if self.path else f"{self.obj}: {self.message}"


def ident(obj: dict[str, Any]) -> str:
    """`Kind/name` of an object, as problems name it."""
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def dig(d: Any, *keys: Any, default: Any = None) -> Any:
    """d[k1][k2]... through dicts and lists; `default` where a step is missing or None."""
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
        if d is None:
            return default
    return d
