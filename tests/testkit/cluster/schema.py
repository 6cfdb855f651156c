"""Structural schemas as the API server uses them: which fields exist, list types, defaults, CEL.

Validation proper (types, enums, required fields, patterns) is `ctrlnet.k8s.validate.schema_problems`
(see registry.py). This module answers the questions the server needs besides "is it valid":

* unknown fields: which paths a schema does not declare (pruned with a warning by default,
  rejected under `fieldValidation=Strict`, an error for server-side apply);
* list semantics for server-side apply and strategic merge patch (`x-kubernetes-list-type`,
  `x-kubernetes-list-map-keys`, `x-kubernetes-patch-merge-key`);
* CRD structural defaults (`default:`);
* a small subset of CEL rules (`x-kubernetes-validations`): `self == oldSelf` (immutability),
  `self.matches('re')` (optionally `self == '' || ...`), `self in [...]`, `has(self.f)`,
  `self.metadata.name.matches('re')` and `size(self.metadata.name) <= N`. Other rules are not
  evaluated (a real server would).

Core kinds use kubernetes-validate's OpenAPI-derived schemas; custom resources the CRD's
openAPIV3Schema, with `metadata` checked as ObjectMeta as the API server does.
"""

from __future__ import annotations

import copy
import functools
import re
from collections.abc import Iterator
from typing import Any

from ctrlnet.k8s.schemas import translate

from .errors import FieldError

ANY: dict[str, Any] = {"x-kubernetes-preserve-unknown-fields": True}
OBJECT_META = "io.k8s.apimachinery.pkg.apis.meta.v1.ObjectMeta"


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:2])


@functools.cache
def core_defs(kube_version: str) -> dict[str, Any]:
    import kubernetes_validate.utils as kv

    versions = [v for v in kv.all_versions() if _vkey(kv.major_minor(v)) <= _vkey(kube_version)]
    folder = f"v{versions[-1]}-local-strict"
    doc = kv.schema_contents(f"kubernetes-json-schema/{folder}/_definitions.json", kube_version)
    return doc.get("$defs") or doc.get("definitions") or {}


class Schema:
    """Navigation over one kind's schema (core definitions or a CRD version's openAPIV3Schema)."""

    def __init__(self, root: dict[str, Any], kube_version: str, crd: bool):
        self.defs = core_defs(kube_version)
        self.root = root
        self.crd = crd

    @classmethod
    def for_core(cls, kind: str, kube_version: str) -> Schema | None:
        defs = core_defs(kube_version)
        name = f"io.k8s.api.core.v1.{kind}"
        if name not in defs:
            return None
        return cls(defs[name], kube_version, crd=False)

    @classmethod
    def for_crd(cls, openapi: dict[str, Any] | None, kube_version: str) -> Schema:
        return cls(openapi or ANY, kube_version, crd=True)

    def resolve(self, node: dict[str, Any] | None) -> dict[str, Any]:
        if node is None:
            return ANY
        seen = 0
        while isinstance(node, dict) and "$ref" in node and seen < 50:
            node = self.defs.get(node["$ref"].rsplit("/", 1)[-1], ANY)
            seen += 1
        if isinstance(node, dict) and "allOf" in node and len(node["allOf"]) == 1 and "properties" not in node:
            return self.resolve(node["allOf"][0])
        return node if isinstance(node, dict) else ANY

    def meta(self) -> dict[str, Any]:
        return self.defs.get(OBJECT_META, ANY)

    def child(self, node: dict[str, Any], key: str, top: bool = False) -> dict[str, Any] | None:
        """The schema of field `key` of an object with schema `node`; None if undeclared."""
        node = self.resolve(node)
        if (top or node.get("x-kubernetes-embedded-resource")) and key in ("apiVersion", "kind", "metadata"):
            if key == "metadata":
                props = node.get("properties") or {}
                m = self.resolve(props.get("metadata"))
                # A CRD's root metadata is `type: object`: the server checks it as ObjectMeta.
                return self.meta() if (self.crd or not m.get("properties")) else m
            return {"type": "string"}
        props = node.get("properties")
        if props and key in props:
            return self.resolve(props[key])
        ap = node.get("additionalProperties")
        if isinstance(ap, dict):
            return self.resolve(ap)
        if ap is True or node.get("x-kubernetes-preserve-unknown-fields"):
            return ANY
        if not props and ap is None and "type" not in node and "items" not in node:
            return ANY  # unconstrained
        if not props and ap is None and _types(node) & {"object"} and self.crd:
            return None  # `type: object` without properties: a CRD prunes everything inside
        if not props and ap is None and _types(node) & {"object"}:
            return ANY
        return None

    def items(self, node: dict[str, Any]) -> dict[str, Any]:
        node = self.resolve(node)
        it = node.get("items")
        return self.resolve(it) if isinstance(it, dict) else ANY

    def is_map(self, node: dict[str, Any]) -> bool:
        node = self.resolve(node)
        return isinstance(node.get("additionalProperties"), dict) or (
            not node.get("properties") and bool(node.get("x-kubernetes-preserve-unknown-fields"))
        )

    def list_type(self, node: dict[str, Any]) -> tuple[str, list[str]]:
        """('map', keys) | ('set', []) | ('atomic', [])."""
        node = self.resolve(node)
        lt = node.get("x-kubernetes-list-type")
        if lt == "map":
            return "map", list(node.get("x-kubernetes-list-map-keys") or [])
        if lt == "set":
            return "set", []
        if lt is None and not self.crd and node.get("x-kubernetes-patch-merge-key"):
            return "map", [node["x-kubernetes-patch-merge-key"]]
        return "atomic", []

    def merge_key(self, node: dict[str, Any]) -> tuple[str | None, str]:
        """Strategic merge patch: (merge key, strategy) of a core list."""
        node = self.resolve(node)
        return node.get("x-kubernetes-patch-merge-key"), node.get("x-kubernetes-patch-strategy", "")


def _types(node: dict[str, Any]) -> set[str]:
    t = node.get("type")
    if isinstance(t, list):
        return set(t)
    return {t} if t else set()


def fmt_path(parts: list[Any]) -> str:
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


# --- unknown fields ------------------------------------------------------------------------------


def unknown_fields(obj: dict[str, Any], schema: Schema, prune: bool = False) -> list[str]:
    """Paths `schema` does not declare, in the order the server reports them; removed if `prune`."""
    found: list[str] = []

    def walk(value: Any, node: dict[str, Any], parts: list[Any], top: bool = False) -> None:
        node = schema.resolve(node)
        if node is ANY or node.get("x-kubernetes-preserve-unknown-fields") and not node.get("properties"):
            return
        if isinstance(value, dict):
            for key in list(value.keys()):
                sub = schema.child(node, key, top=top)
                if sub is None:
                    found.append(fmt_path(parts + [key]))
                    if prune:
                        del value[key]
                    continue
                walk(value[key], sub, parts + [key])
        elif isinstance(value, list):
            item = schema.items(node)
            for i, v in enumerate(value):
                walk(v, item, parts + [i])

    walk(obj, schema.root, [], top=True)
    return found


# --- defaults ------------------------------------------------------------------------------------


def apply_defaults(obj: dict[str, Any], schema: Schema) -> None:
    """CRD structural defaulting: fill `default:` values for absent fields of present objects."""

    def walk(value: Any, node: dict[str, Any], top: bool = False) -> None:
        node = schema.resolve(node)
        if isinstance(value, dict):
            for key, sub in (node.get("properties") or {}).items():
                if top and key == "metadata":
                    continue
                sub = schema.resolve(sub)
                if key not in value and "default" in sub:
                    value[key] = copy.deepcopy(sub["default"])
            for key in list(value.keys()):
                if top and key == "metadata":
                    continue
                sub = schema.child(node, key, top=top)
                if sub is not None and sub is not ANY:
                    walk(value[key], sub)
        elif isinstance(value, list):
            item = schema.items(node)
            if item is not ANY:
                for v in value:
                    walk(v, item)

    walk(obj, schema.root, top=True)


# --- CEL subset ----------------------------------------------------------------------------------

_MATCHES = re.compile(r"^(?:self\s*==\s*''\s*\|\|\s*)?self\.matches\('((?:[^'\\]|\\.)*)'\)$")
_IN = re.compile(r"^self\s+in\s+\[(.*)\]$")
_HAS = re.compile(r"^has\(self\.(\w+)\)$")
_NAME_MATCHES = re.compile(r"^self\.metadata\.name\.matches\('((?:[^'\\]|\\.)*)'\)$")
_NAME_SIZE = re.compile(r"^size\(self\.metadata\.name\)\s*<=\s*(\d+)$")


def _cel_type(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    return "array" if isinstance(v, list) else "object"


def _eval_rule(rule: str, new: Any, old: Any, has_old: bool) -> bool | None:
    """True (holds), False (violated) or None (not understood / not applicable)."""
    r = " ".join(rule.split())
    if r == "self == oldSelf":
        return None if not has_old else new == old
    m = _MATCHES.match(r)
    if m and isinstance(new, str):
        pattern = m.group(1).replace("\\\\", "\\")
        return (r.startswith("self ==") and new == "") or re.search(pattern, new) is not None
    m = _IN.match(r)
    if m:
        items = [s.strip().strip("'\"") for s in m.group(1).split(",") if s.strip()]
        return str(new) in items
    m = _HAS.match(r)
    if m and isinstance(new, dict):
        return m.group(1) in new
    m = _NAME_MATCHES.match(r)
    if m and isinstance(new, dict):
        name = (new.get("metadata") or {}).get("name", "")
        return re.search(m.group(1).replace("\\\\", "\\"), name) is not None
    m = _NAME_SIZE.match(r)
    if m and isinstance(new, dict):
        return len((new.get("metadata") or {}).get("name", "")) <= int(m.group(1))
    return None


def cel_errors(new: dict[str, Any], old: dict[str, Any] | None, schema: Schema) -> list[FieldError]:
    errors: list[FieldError] = []

    def walk(value: Any, oldv: Any, has_old: bool, node: dict[str, Any], parts: list[Any], top: bool = False) -> None:
        node = schema.resolve(node)
        for rule in node.get("x-kubernetes-validations") or []:
            ok = _eval_rule(rule.get("rule", ""), value, oldv, has_old)
            if ok is False:
                path = fmt_path(parts)
                if rule.get("fieldPath"):
                    path = (path + rule["fieldPath"]) if path else rule["fieldPath"].lstrip(".")
                msg = rule.get("message") or f"failed rule: {rule.get('rule')}"
                errors.append(FieldError(path, "Invalid value", msg, value=_cel_type(value)))
        if isinstance(value, dict):
            for key in value:
                if top and key in ("apiVersion", "kind", "metadata"):
                    continue
                sub = schema.child(node, key, top=top)
                if sub is None or sub is ANY:
                    continue
                o_has = has_old and isinstance(oldv, dict) and key in oldv
                walk(value[key], oldv.get(key) if o_has else None, o_has, sub, parts + [key])
        elif isinstance(value, list):
            item = schema.items(node)
            if item is ANY:
                return
            lt, keys = schema.list_type(node)
            old_by_key: dict[Any, Any] = {}
            if has_old and isinstance(oldv, list) and lt == "map":
                for o in oldv:
                    if isinstance(o, dict):
                        old_by_key[tuple(o.get(k) for k in keys)] = o
            for i, v in enumerate(value):
                if lt == "map" and isinstance(v, dict):
                    k = tuple(v.get(kk) for kk in keys)
                    walk(v, old_by_key.get(k), k in old_by_key, item, parts + [i])
                else:
                    walk(v, None, False, item, parts + [i])

    walk(new, old, old is not None, schema.root, [], top=True)
    return errors


# --- jsonschema fallback for CRDs ctrlnet's validator does not map -------------------------------


_FALLBACK: dict[tuple[str, str], Any] = {}


def crd_problems(obj: dict[str, Any], openapi: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(path, message) schema problems of a custom resource, straight from its CRD's schema."""
    import jsonschema

    key = (obj.get("apiVersion", ""), obj.get("kind", ""))
    validator = _FALLBACK.get(key)
    if validator is None:
        schema = translate(openapi, strict=False)  # the server prunes unknown fields
        schema.setdefault("properties", {})["metadata"] = {"type": "object"}
        validator = _FALLBACK[key] = jsonschema.Draft7Validator(schema)
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        yield ".".join(str(p) for p in err.absolute_path), err.message
