"""Server-side printing (meta.k8s.io/v1 Table) for `kubectl get`: the real Pod columns, a CRD's
additionalPrinterColumns, and NAME/AGE for everything else."""

from __future__ import annotations

import re
import time
from typing import Any

from .resources import ResourceType


def _age(created: str | None) -> str:
    if not created:
        return "<unknown>"
    from .server import parse_time

    s = max(0, int(time.time() - parse_time(created)))
    if s < 120:
        return f"{s}s"
    m = s // 60
    if m < 10:
        return f"{m}m{s % 60}s" if s % 60 else f"{m}m"
    if m < 180:
        return f"{m}m"
    h = m // 60
    return f"{h}h" if h < 48 else f"{h // 24}d"


def _pod_row(o: dict[str, Any]) -> list[Any]:
    st = o.get("status") or {}
    spec = o.get("spec") or {}
    cs = st.get("containerStatuses") or []
    ready = sum(1 for c in cs if c.get("ready"))
    total = len(spec.get("containers") or [])
    restarts = sum(int(c.get("restartCount") or 0) for c in cs)
    reason = st.get("reason") or st.get("phase") or "Unknown"
    for i, c in enumerate(st.get("initContainerStatuses") or []):
        s = c.get("state") or {}
        if (s.get("terminated") or {}).get("exitCode") == 0:
            continue
        if s.get("terminated"):
            reason = f"Init:{s['terminated'].get('reason') or 'Error'}"
        elif s.get("waiting") and s["waiting"].get("reason") not in (None, "PodInitializing"):
            reason = f"Init:{s['waiting']['reason']}"
        else:
            reason = f"Init:{i}/{len(spec.get('initContainers') or [])}"
        break
    else:
        for c in reversed(cs):
            s = c.get("state") or {}
            if s.get("waiting", {}).get("reason"):
                reason = s["waiting"]["reason"]
            elif s.get("terminated", {}).get("reason"):
                reason = s["terminated"]["reason"]
            elif s.get("terminated"):
                reason = f"ExitCode:{s['terminated'].get('exitCode')}"
        if o["metadata"].get("deletionTimestamp"):
            reason = "Terminating"
    return [
        o["metadata"]["name"],
        f"{ready}/{total}",
        reason,
        restarts,
        _age(o["metadata"].get("creationTimestamp")),
        st.get("podIP") or "<none>",
        spec.get("nodeName") or "<none>",
        "<none>",
        "<none>",
    ]


POD_COLUMNS = [
    ("Name", "string", "name", 0),
    ("Ready", "string", "", 0),
    ("Status", "string", "", 0),
    ("Restarts", "string", "", 0),
    ("Age", "string", "", 0),
    ("IP", "string", "", 1),
    ("Node", "string", "", 1),
    ("Nominated Node", "string", "", 1),
    ("Readiness Gates", "string", "", 1),
]


def _jsonpath(o: Any, path: str) -> Any:
    """The JSONPath subset printer columns use: .a.b, [n], [-1:]."""
    cur: Any = o
    for tok in re.findall(r"\.([A-Za-z0-9_-]+)|\[(-?\d+):?\]", path):
        key, idx = tok
        if key:
            cur = cur.get(key) if isinstance(cur, dict) else None
        elif isinstance(cur, list) and cur:
            try:
                cur = cur[int(idx)]
            except IndexError:
                cur = None
        else:
            cur = None
        if cur is None:
            return None
    return cur


def to_table(rt: ResourceType, version: str, items: list[dict[str, Any]], meta: dict[str, Any]) -> dict[str, Any]:
    if rt.kind == "Pod" and not rt.group:
        cols = POD_COLUMNS
        rows = [_pod_row(o) for o in items]
    else:
        pcs = rt.printer_columns(version)
        cols = [("Name", "string", "name", 0)]
        if pcs:
            cols += [(pc["name"], pc.get("type", "string"), pc.get("format", ""), pc.get("priority", 0)) for pc in pcs]
            rows = [[o["metadata"]["name"]] + [_jsonpath(o, pc["jsonPath"]) for pc in pcs] for o in items]
        else:
            cols.append(("Age", "string", "", 0))
            rows = [[o["metadata"]["name"], _age(o["metadata"].get("creationTimestamp"))] for o in items]
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": meta,
        "columnDefinitions": [
            {"name": n, "type": t, "format": f, "description": n, "priority": p} for n, t, f, p in cols
        ],
        "rows": [
            {
                "cells": cells,
                "object": {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1", "metadata": o["metadata"]},
            }
            for cells, o in zip(rows, items, strict=False)
        ],
    }
