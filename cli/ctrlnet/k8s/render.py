"""A job config -> the Kubernetes objects of its run, through the Helm chart (the one template source)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from ctrlnet.config.job import JobConfig
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import chart_dir, chart_values, release_namespace

# Apply order: what a pod needs exists before the job that creates pods.
KIND_ORDER = ["ServiceAccount", "ConfigMap", "PersistentVolumeClaim", "PyTorchJob", "TrainJob"]


def _order(obj: dict[str, Any]) -> tuple[int, str]:
    kind = obj.get("kind", "")
    return (KIND_ORDER.index(kind) if kind in KIND_ORDER else len(KIND_ORDER), str(obj.get("metadata", {}).get("name", "")))


def parse_manifests(texts: list[str]) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for text in texts:
        objs += [d for d in yaml.safe_load_all(text) if d]
    return sorted(objs, key=_order)


def render_objects(cfg: JobConfig, *, how: str | None = None, chart: Path | None = None) -> list[dict[str, Any]]:
    """The chart rendered for `cfg` (release name = job name), as objects in apply order."""
    rendered = helm.render(chart or chart_dir(), chart_values(cfg), release=cfg.cluster.name,
                           namespace=release_namespace(cfg), how=how)
    return parse_manifests([rendered[k] for k in sorted(rendered)])


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks (the ConfigMap's config.yaml stays readable)."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def dump_object(obj: dict[str, Any]) -> str:
    return yaml.dump(obj, Dumper=_Dumper, sort_keys=False, default_flow_style=False, width=10_000)


def dump_objects(objs: list[dict[str, Any]], header: str | None = None) -> str:
    body = "---\n".join(dump_object(o) for o in objs)
    return (header or "") + body


def file_name(obj: dict[str, Any]) -> str:
    """One file per object: `<kind>.yaml` (a render holds at most one object of each kind)."""
    return f"{obj['kind'].lower()}.yaml"


def write_objects(objs: list[dict[str, Any]], out: Path, header: str | None = None) -> list[Path]:
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    for obj in objs:
        p = out / file_name(obj)
        p.write_text((header or "") + dump_object(obj))
        paths.append(p)
    return paths
