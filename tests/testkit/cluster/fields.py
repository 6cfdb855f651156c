"""Field ownership (managedFields), server-side apply, and JSON merge patch.

ctrlnet writes with server-side apply (field manager `ctrlnet`, one fresh object per run) and
merge patches (suspend/resume); it relies on one piece of ownership: applying over an object whose
fields another manager set is refused with 409 "Apply failed with N conflict(s): conflict with
\"<manager>\" ...", which `ctrlnet submit` reports as "<kind> '<name>' is managed by <manager>".

So this is a simplified structured-merge-diff: an object's field set is its leaves, where every
map is granular (one member per key) and every list, scalar and empty map is one atomic leaf;
`status` is not tracked (the stand-ins write it through /status). A real server also merges
associative lists by key (containers by name); ctrlnet never re-applies a list onto a different
one, so here an applied list replaces the live one.

* apply: a conflict is a leaf the configuration sets to a value different from the live one while
  another manager owns it: 409 without `force`, taken over with it. The configuration is merged
  into the live object, and leaves this manager applied before but omits now are removed unless
  another manager owns them.
* any other write (create, update, merge patch): the writer takes ownership of the leaves it
  changed, and the other managers lose them.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError

Path = tuple[str, ...]


def field_set(obj: dict[str, Any] | None) -> dict[Path, Any]:
    """path -> value of every leaf of `obj` (labels and annotations of its metadata; not status)."""
    out: dict[Path, Any] = {}

    def walk(value: Any, prefix: Path) -> None:
        if isinstance(value, dict) and value:
            for k, v in value.items():
                walk(v, prefix + (k,))
        else:
            out[prefix] = value

    for key, value in (obj or {}).items():
        if key == "metadata":
            for mk in ("labels", "annotations"):
                if (value or {}).get(mk):
                    walk(value[mk], ("metadata", mk))
        elif key not in ("apiVersion", "kind", "status"):
            walk(value, (key,))
    return out


def _encode(paths: set[Path]) -> dict[str, Any]:
    """FieldsV1: {"f:spec": {"f:replicas": {}}}."""
    root: dict[str, Any] = {}
    for p in sorted(paths):
        node = root
        for part in p:
            node = node.setdefault(f"f:{part}", {})
    return root


def _decode(fields: dict[str, Any], prefix: Path = ()) -> set[Path]:
    if not fields:
        return {prefix} if prefix else set()
    return {p for k, sub in fields.items() for p in _decode(sub, prefix + (k[2:],))}


def path_str(p: Path) -> str:
    return "".join("." + part for part in p)


class Managed:
    """An object's managedFields as entries with their leaf paths decoded."""

    def __init__(self, entries: list[dict[str, Any]] | None = None):
        self.entries = [dict(e, _paths=_decode(e.get("fieldsV1") or {})) for e in entries or []]

    def entry(self, manager: str, operation: str, api_version: str) -> dict[str, Any]:
        e = next((e for e in self.entries if (e["manager"], e["operation"]) == (manager, operation)), None)
        if e is None:
            e = {"manager": manager, "operation": operation, "_paths": set()}
            self.entries.append(e)
        e.update(apiVersion=api_version, time=datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ"))
        return e

    def dump(self) -> list[dict[str, Any]]:
        keys = ("manager", "operation", "apiVersion", "time")
        return [
            {**{k: e[k] for k in keys}, "fieldsType": "FieldsV1", "fieldsV1": _encode(e["_paths"])}
            for e in self.entries
            if e["_paths"]
        ]

    def record_update(self, old: dict[str, Any] | None, new: dict[str, Any], manager: str, api_version: str) -> None:
        old_fs, new_fs = field_set(old), field_set(new)
        changed = {p for p, v in new_fs.items() if p not in old_fs or old_fs[p] != v}
        removed = set(old_fs) - set(new_fs)
        if not changed and not removed:
            return
        for e in self.entries:
            e["_paths"] -= changed | removed
        if changed:
            self.entry(manager, "Update", api_version)["_paths"] |= changed


def _label(e: dict[str, Any]) -> str:
    return json.dumps(e["manager"]) + (f" using {e['apiVersion']}" if e["operation"] == "Update" else "")


def apply(
    live: dict[str, Any] | None, config: dict[str, Any], managed: Managed, manager: str, force: bool, api_version: str
) -> dict[str, Any]:
    """The object after `manager` applies `config` (raises the 409 apply conflict)."""
    cfg_fs, live_fs = field_set(config), field_set(live)
    mine = next((e for e in managed.entries if (e["manager"], e["operation"]) == (manager, "Apply")), None)
    conflicts = [
        (e, p)
        for e in managed.entries
        if e is not mine
        for p in sorted(e["_paths"] & set(cfg_fs))
        if p in live_fs and live_fs[p] != cfg_fs[p]
    ]
    if conflicts and not force:
        causes = [
            {"reason": "FieldManagerConflict", "message": f"conflict with {_label(e)}", "field": path_str(p)}
            for e, p in conflicts
        ]
        n = len(conflicts)
        text = "; ".join(f"conflict with {_label(e)}: {path_str(p)}" for e, p in conflicts)
        raise ApiError(
            409, "Conflict", f"Apply failed with {n} conflict{'s' if n > 1 else ''}: {text}", {"causes": causes}
        )
    for e, p in conflicts:  # forced: the applier takes them over
        e["_paths"].discard(p)
    result = _merge(live, config) if live else copy.deepcopy(config)
    others = set().union(*(e["_paths"] for e in managed.entries if e is not mine))
    for p in sorted(set(mine["_paths"] if mine else ()) - set(cfg_fs) - others, key=len, reverse=True):
        parent = result
        for part in p[:-1]:
            parent = parent.get(part) if isinstance(parent, dict) else None
        if isinstance(parent, dict):
            parent.pop(p[-1], None)
    managed.entry(manager, "Apply", api_version)["_paths"] = set(cfg_fs)
    return result


def _merge(live: Any, cfg: Any) -> Any:
    if isinstance(live, dict) and isinstance(cfg, dict):
        return {
            **copy.deepcopy(live),
            **{k: _merge(live[k], v) if k in live else copy.deepcopy(v) for k, v in cfg.items()},
        }
    return copy.deepcopy(cfg)


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out
