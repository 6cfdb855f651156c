"""`ctrlnet list`: this tool's runs in a namespace (or all), one row each."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ctrlnet.cluster import draw
from ctrlnet.cluster.kube import Kube
from ctrlnet.cluster.runs import BACKENDS, Run, tool_selector
from ctrlnet.cluster.status import age_seconds, human_duration, job_phase, read_progress

if TYPE_CHECKING:
    from rich.table import Table


def list_runs(kube: Kube, *, all_namespaces: bool = False) -> list[dict]:
    """Rows (run_row) of this tool's runs, oldest first per namespace. The step comes from each
    running job's rank-0 log (one short read per running run)."""
    rows = []
    for backend in BACKENDS.values():
        if not kube.served(backend.resource):
            continue
        for job in kube.list(backend.resource.kind, all_namespaces=all_namespaces, labels=tool_selector()):
            rows.append(run_row(kube, Run(job, backend)))
    rows.sort(key=lambda r: (r["namespace"], r["age_s"] if r["age_s"] is not None else 0))
    return rows


def run_row(kube: Kube, run: Run) -> dict:
    """One run's row: name, namespace, backend, phase, pods (ready/total), step, total, age_s, output."""
    pods = kube.list("Pod", run.namespace, labels=run.backend.pod_selector(run.name))
    ready = sum(
        1 for p in pods if all(cs.get("ready") for cs in (p.get("status") or {}).get("containerStatuses") or [{}])
    )
    phase = job_phase(run.job, run.backend.name)[0]
    progress = read_progress(kube, run, pods) if phase in ("Running", "Restarting", "Succeeded", "Failed") else None
    return {
        "name": run.name,
        "namespace": run.namespace,
        "backend": run.backend.name,
        "phase": phase,
        "pods_ready": ready,
        "pods": len(pods),
        "step": (progress or {}).get("step"),
        "total": (progress or {}).get("total"),
        "age_s": age_seconds(run.job["metadata"].get("creationTimestamp")),
        "output": run.output,
    }


def render_table(rows: list[dict], with_namespace: bool) -> str:
    """The runs as plain text (what `ctrlnet list` prints off a terminal)."""
    return draw.plain(table(rows, with_namespace))


def table(rows: list[dict], with_namespace: bool) -> Table:
    """One row per run: (namespace,) name, backend, phase, pods ready/total, step/total, age."""
    out = draw.table(*(["NAMESPACE"] if with_namespace else []), "NAME", "BACKEND", "PHASE", "PODS", "STEP", "AGE")
    for r in rows:
        step = f"{r['step']}/{r['total']}" if r["step"] is not None else "-"
        age = human_duration(r["age_s"]) if r["age_s"] is not None else "-"
        out.add_row(
            *([r["namespace"]] if with_namespace else []),
            r["name"],
            r["backend"],
            draw.phase(r["phase"]),
            f"{r['pods_ready']}/{r['pods']}",
            step,
            age,
        )
    return out
