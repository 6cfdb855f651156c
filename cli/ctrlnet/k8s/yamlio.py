"""Kubernetes objects to and from YAML text: what render prints and writes, what validate reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml


def parse_manifests(texts: Iterable[str]) -> list[dict[str, Any]]:
    """Every object in YAML texts (multi-document streams; the items of a `kind: List`), in order."""
    objs: list[dict[str, Any]] = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "List":
                objs += doc.get("items") or []
            elif doc:
                objs.append(doc)
    return objs


class _Dumper(yaml.SafeDumper):
    """Block style, multi-line strings as literal blocks (the ConfigMap's config.yaml stays readable)."""


def _str(dumper: yaml.SafeDumper, data: str) -> yaml.ScalarNode:
    if "\n" in data:
        return dumper.represent_scalar("tag:yaml.org,2002:str", data, style="|")
    return dumper.represent_scalar("tag:yaml.org,2002:str", data)


_Dumper.add_representer(str, _str)


def dump_object(obj: Any) -> str:
    """One object (or any YAML-able data) as a YAML document, keys in their order."""
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
