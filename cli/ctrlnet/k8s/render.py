"""A job config -> the Kubernetes objects of its run, through the Helm chart (the one template source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from ctrlnet.config.cluster import with_cluster
from ctrlnet.config.job import JobConfig
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import chart_dir, chart_values, release_namespace
from ctrlnet.k8s.yamlio import dump_objects, parse_manifests

__all__ = ["KIND_ORDER", "apply_order", "dump_objects", "render_objects", "rendered_objects"]
# dump_objects (from yamlio) is re-exported for callers that render and print in one place.

# Apply order: what a pod needs exists before the job that creates pods.
KIND_ORDER = ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "NetworkPolicy", "PyTorchJob", "TrainJob"]


def apply_order(obj: dict[str, Any]) -> tuple[int, str]:
    """Sort key: KIND_ORDER, then name (other kinds last)."""
    kind = obj.get("kind", "")
    return (
        KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER),
        str(obj.get("metadata", {}).get("name", "")),
    )


def rendered_objects(rendered: dict[str, str]) -> list[dict[str, Any]]:
    """Helm's output (template path -> text) as objects in apply order."""
    return sorted(parse_manifests(rendered[k] for k in sorted(rendered)), key=apply_order)


def render_objects(cfg: JobConfig, *, how: str | None = None, chart: Path | None = None) -> list[dict[str, Any]]:
    """The chart rendered for `cfg` (release name = job name), as objects in apply order.
    `cluster.backend: auto` renders what it would be without a cluster to ask (TrainJob, unless a
    PyTorchJob-only setting is set); `ctrlnet submit` resolves it against the cluster first."""
    if cfg.cluster.backend == "auto":
        cfg = with_cluster(cfg, backend=cfg.cluster.offline_backend)
    rendered = helm.render(
        chart or chart_dir(), chart_values(cfg), release=cfg.cluster.name, namespace=release_namespace(cfg), how=how
    )
    return rendered_objects(rendered)
