"""Field ownership (managedFields), server-side apply, and the three patch formats.

A simplified structured-merge-diff: an object's field set holds its leaves (scalars, atomic lists
and atomic/empty objects), the elements of associative lists (`k:{...}`), set members (`v:...`)
and granular maps (`.`). Lists are associative, sets or atomic as the schema says
(`x-kubernetes-list-type`; a core list with a patch merge key is associative).

Apply (server-side apply):
* a conflict is a leaf that the applied configuration sets to a different value than the live
  object while another manager owns it; without `force` the server answers 409 with the real
  message ("Apply failed with 1 conflict: conflict with \"x\": .spec.a"); with `force` the
  applier takes the field over;
* the configuration is merged into the live object (associative lists by key, everything else
  replaced), and the fields this manager applied before but omits now are removed unless
  another manager owns them.
Update (create, replace, patch): the manager takes ownership of the fields it changed, and the
others lose them.
"""

from __future__ import annotations

import copy
import json
from collections.abc import Iterable
from datetime import UTC, datetime
from typing import Any

from .errors import ApiError, bad_request, unprocessable
from .schema import ANY, Schema

Path = tuple[tuple[str, str], ...]
META_FIELDS = ("labels", "annotations", "finalizers", "ownerReferences")
OWNER_REF_KEYS = ["uid"]


KEY_DEFAULTS = {"protocol": "TCP"}  # list-map key fields the core OpenAPI leaves without a `default`


def _k(d: dict[str, Any], keys: list[str], item: dict[str, Any] | None = None, schema: Schema | None = None) -> str:
    """An associative list element's key; a missing key field takes its default, as structured-merge-diff does."""
    out = {}
    for k in sorted(keys):
        if k in d:
            out[k] = d[k]
            continue
        default = None
        if item is not None and schema is not None:
            sub = schema.child(item, k)
            default = (sub or {}).get("default")
        if default is None:
            default = KEY_DEFAULTS.get(k)
        if default is not None:
            out[k] = default
    return json.dumps(out, sort_keys=True, separators=(",", ":"))


def field_set(
    obj: dict[str, Any], schema: Schema, *, status_only: bool = False, skip_status: bool = False
) -> dict[Path, Any]:
    """path -> value for every member of `obj`'s field set (see module docs)."""
    out: dict[Path, Any] = {}

    def walk(value: Any, node: dict[str, Any], prefix: Path) -> None:
        node = schema.resolve(node) if node is not ANY else ANY
        if isinstance(value, dict):
            if not value or node.get("x-kubernetes-map-type") == "atomic":
                out[prefix] = value
                return
            granular_map = node is ANY or schema.is_map(node)
            if granular_map and prefix:
                out[prefix] = None  # "." membership: the map itself
            for key, v in value.items():
                sub = schema.child(node, key) if node is not ANY else ANY
                walk(v, sub if sub is not None else ANY, prefix + (("f", key),))
            return
        if isinstance(value, list) and node is not ANY:
            lt, keys = schema.list_type(node)
            item = schema.items(node)
            if lt == "map" and all(isinstance(v, dict) for v in value):
                for v in value:
                    p = prefix + (("k", _k(v, keys, item, schema)),)
                    out[p] = None
                    for key, sub_v in v.items():
                        sub = schema.child(item, key)
                        walk(sub_v, sub if sub is not None else ANY, p + (("f", key),))
                return
            if lt == "set":
                for v in value:
                    out[prefix + (("v", json.dumps(v, sort_keys=True)),)] = v
                return
        out[prefix] = value

    root = schema.root
    for key, value in obj.items():
        if key in ("apiVersion", "kind"):
            continue
        if key == "metadata":
            if status_only or not isinstance(value, dict):
                continue
            meta = schema.meta()
            for mk in META_FIELDS:
                if mk in value and value[mk] not in (None, {}, []):
                    if mk == "ownerReferences":
                        for ref in value[mk]:
                            p = (("f", "metadata"), ("f", mk), ("k", _k(ref, OWNER_REF_KEYS)))
                            out[p] = None
                            for rk, rv in ref.items():
                                out[p + (("f", rk),)] = rv
                        continue
                    walk(value[mk], schema.child(meta, mk) or ANY, (("f", "metadata"), ("f", mk)))
            continue
        if status_only and key != "status":
            continue
        if skip_status and key == "status":
            continue
        sub = schema.child(root, key, top=True)
        walk(value, sub if sub is not None else ANY, (("f", key),))
    return out


def leaves(fs: dict[Path, Any]) -> set[Path]:
    """Members that carry a value (not "." map/element memberships)."""
    keys = set(fs)
    return {p for p in keys if not any(q != p and q[: len(p)] == p for q in keys)}


# --- FieldsV1 encoding ---------------------------------------------------------------------------


def encode(paths: Iterable[Path]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    plist = sorted(set(paths), key=lambda p: (len(p), p))
    members = set(plist)
    for p in plist:
        node = root
        for kind, val in p:
            key = f"{kind}:{val}"
            node = node.setdefault(key, {})
        if any(q != p and q[: len(p)] == p for q in members):
            node["."] = {}
    # a member that also has children carries ".": {}; pure leaves are {}
    return _sort(root)


def _sort(d: dict[str, Any]) -> dict[str, Any]:
    return {k: _sort(v) for k, v in sorted(d.items(), key=lambda kv: (kv[0] != ".", kv[0]))}


def decode(fields: dict[str, Any]) -> set[Path]:
    out: set[Path] = set()

    def walk(node: dict[str, Any], prefix: Path) -> None:
        children = [k for k in node if k != "."]
        if "." in node or (not children and prefix):
            out.add(prefix)
        for k in children:
            kind, _, val = k.partition(":")
            walk(node[k] or {}, prefix + ((kind, val),))

    walk(fields or {}, ())
    return out


def path_str(p: Path) -> str:
    """fieldpath.Path.String(): .spec.containers[name="x"].image, .metadata.finalizers[="a"]."""
    out = ""
    for kind, val in p:
        if kind == "f":
            out += "." + val
        elif kind == "k":
            d = json.loads(val)
            out += "[" + ",".join(f"{k}={json.dumps(v)}" for k, v in d.items()) + "]"
        elif kind == "v":
            out += f"[={val}]"
        else:
            out += f"[{val}]"
    return out


# --- managedFields entries -----------------------------------------------------------------------


def now_rfc3339() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


class Managed:
    """An object's managedFields as (manager, operation, subresource) -> entry with decoded paths."""

    def __init__(self, entries: list[dict[str, Any]] | None):
        self.entries: list[dict[str, Any]] = []
        for e in entries or []:
            if not e.get("manager") and not e.get("fieldsV1"):
                continue
            e = copy.deepcopy(e)
            e["_paths"] = decode(e.get("fieldsV1") or {})
            self.entries.append(e)

    def find(self, manager: str, operation: str, subresource: str) -> dict[str, Any] | None:
        for e in self.entries:
            if (
                e.get("manager") == manager
                and e.get("operation") == operation
                and e.get("subresource", "") == subresource
            ):
                return e
        return None

    def touch(self, manager: str, operation: str, subresource: str, api_version: str) -> dict[str, Any]:
        e = self.find(manager, operation, subresource)
        if e is None:
            e = {"manager": manager, "operation": operation, "apiVersion": api_version, "_paths": set()}
            if subresource:
                e["subresource"] = subresource
            self.entries.append(e)
        e["apiVersion"] = api_version
        e["time"] = now_rfc3339()
        return e

    def dump(self) -> list[dict[str, Any]]:
        out = []
        for e in self.entries:
            if not e["_paths"]:
                continue
            d = {
                "manager": e["manager"],
                "operation": e["operation"],
                "apiVersion": e["apiVersion"],
                "time": e.get("time") or now_rfc3339(),
                "fieldsType": "FieldsV1",
                "fieldsV1": encode(e["_paths"]),
            }
            if e.get("subresource"):
                d["subresource"] = e["subresource"]
            out.append(d)
        return out


def record_update(
    managed: Managed, old_fs: dict[Path, Any], new_fs: dict[Path, Any], manager: str, subresource: str, api_version: str
) -> None:
    changed = {p for p, v in new_fs.items() if p not in old_fs or old_fs[p] != v}
    removed = set(old_fs) - set(new_fs)
    if not changed and not removed:
        return
    for e in managed.entries:
        e["_paths"] -= changed | removed
    if changed:
        e = managed.touch(manager, "Update", subresource, api_version)
        e["_paths"] |= changed


# --- server-side apply ---------------------------------------------------------------------------


def _merge(live: Any, cfg: Any, node: dict[str, Any], schema: Schema, top: bool = False) -> Any:
    node = schema.resolve(node) if node is not ANY else ANY
    if isinstance(cfg, dict) and isinstance(live, dict) and node.get("x-kubernetes-map-type") != "atomic":
        out = copy.deepcopy(live)
        for k, v in cfg.items():
            sub = (schema.child(node, k, top=top) if node is not ANY else ANY) or ANY
            out[k] = _merge(live[k], v, sub, schema) if k in live else copy.deepcopy(v)
        return out
    if isinstance(cfg, list) and isinstance(live, list) and node is not ANY:
        lt, keys = schema.list_type(node)
        item = schema.items(node)
        if lt == "map" and all(isinstance(x, dict) for x in cfg + live):
            out = [copy.deepcopy(x) for x in live]
            index = {_k(x, keys, item, schema): i for i, x in enumerate(out)}
            for x in cfg:
                k = _k(x, keys, item, schema)
                if k in index:
                    out[index[k]] = _merge(out[index[k]], x, item, schema)
                else:
                    index[k] = len(out)
                    out.append(copy.deepcopy(x))
            return out
        if lt == "set":
            out = [copy.deepcopy(x) for x in live]
            for x in cfg:
                if x not in out:
                    out.append(copy.deepcopy(x))
            return out
    return copy.deepcopy(cfg)


def _delete_path(obj: Any, p: Path) -> None:
    parent = obj
    for kind, val in p[:-1]:
        parent = _step(parent, kind, val)
        if parent is None:
            return
    kind, val = p[-1]
    if kind == "f" and isinstance(parent, dict):
        parent.pop(val, None)
    elif kind == "k" and isinstance(parent, list):
        keyd = json.loads(val)
        parent[:] = [x for x in parent if not (isinstance(x, dict) and all(x.get(k) == v for k, v in keyd.items()))]
    elif kind == "v" and isinstance(parent, list):
        target = json.loads(val)
        parent[:] = [x for x in parent if x != target]


def _step(cur: Any, kind: str, val: str) -> Any:
    if kind == "f":
        return cur.get(val) if isinstance(cur, dict) else None
    if kind == "k" and isinstance(cur, list):
        keyd = json.loads(val)
        return next((x for x in cur if isinstance(x, dict) and all(x.get(k) == v for k, v in keyd.items())), None)
    return None


def _manager_label(e: dict[str, Any]) -> str:
    s = json.dumps(e["manager"])
    if e.get("subresource"):
        s += f" with subresource {json.dumps(e['subresource'])}"
    if e.get("operation") == "Update":
        s += f" using {e.get('apiVersion')}"
        if e.get("time"):
            s += f" at {e['time']}"
    return s


def apply(
    live: dict[str, Any] | None,
    config: dict[str, Any],
    managed: Managed,
    manager: str,
    force: bool,
    schema: Schema,
    api_version: str,
    subresource: str = "",
    status_subresource: bool = False,
) -> dict[str, Any]:
    """The object after `manager` applies `config` (raises the 409 apply conflict)."""
    skip_status = status_subresource and subresource != "status"
    status_only = subresource == "status"
    cfg_fs = field_set(config, schema, skip_status=skip_status, status_only=status_only)
    live_fs = field_set(live, schema, skip_status=skip_status, status_only=status_only) if live else {}
    cfg_leaves = leaves(cfg_fs)
    conflicts: list[tuple[dict[str, Any], Path]] = []
    for e in managed.entries:
        if e["manager"] == manager and e["operation"] == "Apply" and e.get("subresource", "") == subresource:
            continue
        for p in sorted(e["_paths"] & cfg_leaves):
            if p in live_fs and live_fs[p] != cfg_fs[p]:
                conflicts.append((e, p))
    if conflicts and not force:
        causes = [
            {"reason": "FieldManagerConflict", "message": f"conflict with {_manager_label(e)}", "field": path_str(p)}
            for e, p in conflicts
        ]
        if len(conflicts) == 1:
            msg = f"Apply failed with 1 conflict: conflict with {_manager_label(conflicts[0][0])}: {path_str(conflicts[0][1])}"
        else:
            by: dict[str, list[str]] = {}
            for e, p in conflicts:
                by.setdefault(_manager_label(e), []).append(path_str(p))
            lines = []
            for m in sorted(by):
                lines.append(f"conflicts with {m}:")
                lines += [f"- {p}" for p in by[m]]
            msg = f"Apply failed with {len(conflicts)} conflicts: " + "\n".join(lines)
        raise ApiError(409, "Conflict", msg, {"causes": causes})
    for e, p in conflicts:
        e["_paths"].discard(p)

    mine = managed.find(manager, "Apply", subresource)
    previous = set(mine["_paths"]) if mine else set()
    result = _merge(live or {}, config, schema.root, schema, top=True) if live else copy.deepcopy(config)
    others: set[Path] = set()
    for e in managed.entries:
        if e is not mine:
            others |= e["_paths"]
    removed = previous - set(cfg_fs)
    for p in sorted(removed, key=len, reverse=True):
        if any(q[: len(p)] == p for q in others):
            continue
        if any(q[: len(p)] == p and q != p for q in cfg_fs):
            continue
        _delete_path(result, p)
    e = managed.touch(manager, "Apply", subresource, api_version)
    e["_paths"] = set(cfg_fs)
    return result


# --- patches -------------------------------------------------------------------------------------


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


def strategic_merge_patch(target: Any, patch: Any, node: dict[str, Any], schema: Schema, top: bool = False) -> Any:
    """Strategic merge patch for core kinds: lists merge by their patch merge key; `$patch`,
    `$retainKeys`, `$deleteFromPrimitiveList/...` honoured, `$setElementOrder/...` ignored."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    node = schema.resolve(node) if node is not ANY else ANY
    directive = patch.get("$patch")
    if directive == "replace":
        return {k: copy.deepcopy(v) for k, v in patch.items() if not k.startswith("$")}
    if directive == "delete":
        return None
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    retain = patch.get("$retainKeys")
    for k, v in patch.items():
        if k.startswith("$setElementOrder/") or k in ("$retainKeys", "$patch"):
            continue
        if k.startswith("$deleteFromPrimitiveList/"):
            f = k.split("/", 1)[1]
            if isinstance(out.get(f), list):
                out[f] = [x for x in out[f] if x not in (v or [])]
            continue
        sub = (schema.child(node, k, top=top) if node is not ANY else ANY) or ANY
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict):
            merged = strategic_merge_patch(out.get(k), v, sub, schema)
            if merged is None:
                out.pop(k, None)
            else:
                out[k] = merged
        elif isinstance(v, list) and sub is not ANY:
            out[k] = _smp_list(out.get(k), v, sub, schema)
        else:
            out[k] = copy.deepcopy(v)
    if isinstance(retain, list):
        out = {k: v for k, v in out.items() if k in retain}
    return out


def _smp_list(cur: Any, patch: list[Any], node: dict[str, Any], schema: Schema) -> list[Any]:
    key, strategy = schema.merge_key(node)
    cur = cur if isinstance(cur, list) else []
    if "merge" not in strategy.split(","):
        return [x for x in copy.deepcopy(patch) if not (isinstance(x, dict) and x.get("$patch"))]
    if key is None:  # merge of primitives: union
        out = copy.deepcopy(cur)
        for x in patch:
            if x not in out:
                out.append(copy.deepcopy(x))
        return out
    item = schema.items(node)
    out = copy.deepcopy(cur)
    for x in patch:
        if not isinstance(x, dict):
            continue
        if x.get("$patch") == "replace":
            return [y for y in copy.deepcopy(patch) if isinstance(y, dict) and not y.get("$patch")]
        idx = next((i for i, y in enumerate(out) if isinstance(y, dict) and y.get(key) == x.get(key)), None)
        if x.get("$patch") == "delete":
            if idx is not None:
                out.pop(idx)
            continue
        if idx is None:
            out.append({k: v for k, v in copy.deepcopy(x).items() if not k.startswith("$")})
        else:
            out[idx] = strategic_merge_patch(out[idx], x, item, schema)
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise unprocessable(f"JSON pointer {path!r} must start with '/'")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _resolve(doc: Any, parts: list[str], path: str) -> Any:
    cur = doc
    for p in parts:
        if isinstance(cur, dict) and p in cur:
            cur = cur[p]
        elif isinstance(cur, list) and p.isdigit() and int(p) < len(cur):
            cur = cur[int(p)]
        else:
            raise unprocessable(f"doc is missing path: {path!r}: missing value")
    return cur


def json_patch(doc: Any, ops: Any) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test)."""
    if not isinstance(ops, list):
        raise bad_request("json: cannot unmarshal object into Go value of type jsonpatch.Patch")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op:
            raise bad_request("the JSON patch is not a list of operations")
        kind, path = op["op"], op.get("path", "")
        parts = _pointer(path)

        def put(target: Any, parts: list[str], value: Any, replace: bool, path: str = path) -> Any:
            if not parts:
                return copy.deepcopy(value)
            parent = _resolve(target, parts[:-1], path)
            last = parts[-1]
            if isinstance(parent, dict):
                if replace and last not in parent:
                    raise unprocessable(f"replace operation does not apply: doc is missing key: {path}: missing value")
                parent[last] = copy.deepcopy(value)
            elif isinstance(parent, list):
                if last == "-":
                    parent.append(copy.deepcopy(value))
                elif last.isdigit() and int(last) <= len(parent):
                    if replace:
                        if int(last) >= len(parent):
                            raise unprocessable(
                                f"replace operation does not apply: doc is missing key: {path}: missing value"
                            )
                        parent[int(last)] = copy.deepcopy(value)
                    else:
                        parent.insert(int(last), copy.deepcopy(value))
                else:
                    raise unprocessable(f"add operation does not apply: doc is missing path: {path!r}: missing value")
            else:
                raise unprocessable(f"add operation does not apply: doc is missing path: {path!r}: missing value")
            return target

        def remove(target: Any, parts: list[str], path: str = path) -> Any:
            parent = _resolve(target, parts[:-1], path)
            last = parts[-1]
            if isinstance(parent, dict) and last in parent:
                return parent.pop(last)
            if isinstance(parent, list) and last.isdigit() and int(last) < len(parent):
                return parent.pop(int(last))
            raise unprocessable(f"remove operation does not apply: doc is missing path: {path!r}: missing value")

        if kind == "add":
            doc = put(doc, parts, op.get("value"), replace=False)
        elif kind == "replace":
            doc = put(doc, parts, op.get("value"), replace=True)
        elif kind == "remove":
            remove(doc, parts)
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = copy.deepcopy(_resolve(doc, src, op.get("from", "")))
            if kind == "move":
                remove(doc, src)
            doc = put(doc, parts, value, replace=False)
        elif kind == "test":
            if _resolve(doc, parts, path) != op.get("value"):
                raise unprocessable(f"testing value {path} failed: test failed")
        else:
            raise unprocessable(f"Unexpected kind: {kind}")
    return doc
