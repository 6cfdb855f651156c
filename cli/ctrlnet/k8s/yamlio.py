"""Kubernetes objects to and from YAML text: what render prints and writes, what validate reads."""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

import yaml

from ctrlnet.config.loading import BoundedSafeLoader, YamlTooLargeError
from ctrlnet.errors import UserError


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


_SHAPES = {str: "a string", list: "a list", int: "a number", float: "a number", bool: "a boolean"}


class _ManifestLoader(BoundedSafeLoader):
    """A user's manifests: an alias bomb is refused before the rules walk it (CRDs are large, so
    ten times a job file's values per document)."""

    max_nodes = 1_000_000


def parse_manifest_file(text: str, source: str) -> list[dict[str, Any]]:
    """The objects of one file's YAML stream, as parse_manifests; bad input is one UserError
    naming `source` and the line: YAML that does not parse, a document that is not an object."""
    loader = _ManifestLoader(text)
    objs: list[dict[str, Any]] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            doc = loader.construct_document(node)
            if isinstance(doc, dict) and doc.get("kind") == "List":
                objs += doc.get("items") or []
            elif isinstance(doc, dict):
                objs.append(doc)
            elif doc is not None:
                # Named by its type and line, never quoted: it may be a pasted credential.
                raise UserError(
                    f"{source}: the document at line {node.start_mark.line + 1} is {_SHAPES.get(type(doc), 'a scalar')}, "
                    "not a Kubernetes object (a mapping with apiVersion and kind)"
                )
    except YamlTooLargeError as e:
        raise UserError(f"{source} is refused: {e}: write the values out instead of nesting aliases") from None
    except RecursionError:
        raise UserError(f"{source} is refused: its values are nested too deeply") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(e, "problem", None)
        raise UserError(f"{source}: not valid YAML{at}{f' ({problem})' if problem else ''}: fix the syntax") from None
    finally:
        loader.dispose()
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
