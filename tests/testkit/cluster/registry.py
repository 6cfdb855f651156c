"""What the API server does with a request once it is routed: the verbs, admission and validation.

A write, as in kube-apiserver: decode and kind check (400) -> namespace exists (404) -> system
metadata, the status/spec split of a status subresource, a few core defaults -> mutating admission
(the Kueue webhook) -> validation (422: the name, and the real schemas through ctrlnet's own
`ctrlnet.k8s.validate.schema_problems`; unknown fields are schema problems there) -> storage (409).

Controllers and the kubelet write through the same registry (`Ctx(internal=True)`); their status
writes and Events skip the (slow) schema check, everything else they create is validated.

What ctrlnet and its tests send is what is served: get, list and watch with equality label
selectors and `metadata.name`/`metadata.namespace` field selectors; create; replace; merge patch
and server-side apply (fields.py; `dryRun=All`); delete, graceful for running pods, with the
garbage collector removing dependents (Background propagation, whatever the request asks).
Not emulated: set-based selectors, pagination, strategic merge and JSON patches (415),
`fieldValidation`, finalizers, namespace deletion, CEL rules, CRD defaulting, version conversion
(an object read at another served version only changes its apiVersion).
"""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from . import errors as E
from .errors import FieldError
from .fields import Managed, apply, merge_patch
from .resources import Catalog, ResourceType
from .store import Store

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
MSG_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
KEPT_META = ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds")
SYSTEM_META = KEPT_META + ("resourceVersion", "managedFields")  # what a client cannot set
APPLY = "application/apply-patch+yaml"
MERGE = "application/merge-patch+json"


def ts(t: datetime | None = None) -> str:
    return (t or datetime.now(UTC)).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Ctx:
    """Who writes and how: the request options that matter to the registry."""

    manager: str = "loopback"
    dry_run: bool = False
    internal: bool = False  # a controller or the kubelet, not an API client


# Field selectors the real server allows on every kind, and on Events (`ctrlnet logs` asks for the
# Events of one pod by involvedObject.uid); other kinds' own fields (a pod's status.phase) are not served.
FIELDS = {"metadata.name", "metadata.namespace"}
EVENT_FIELDS = FIELDS | {f"involvedObject.{f}" for f in ("kind", "namespace", "name", "uid", "apiVersion")}


class Selector:
    """Equality label selectors (`a=b,c!=d`) and field selectors (`metadata.name=x`)."""

    def __init__(self, labels: str | None = None, fields: str | None = None, plural: str = ""):
        known = EVENT_FIELDS if plural == "events" else FIELDS
        self.reqs = [("l",) + self._term(t, None) for t in (labels or "").split(",") if t.strip()]
        self.reqs += [("f",) + self._term(t, known) for t in (fields or "").split(",") if t.strip()]

    @staticmethod
    def _term(term: str, known: set[str] | None) -> tuple[str, bool, str]:
        m = re.match(r"^\s*([^=!\s]+)\s*(==|=|!=)\s*([^=!\s]*)\s*$", term)
        if not m:
            what = "field selector" if known else "label selector (set-based selectors are not emulated)"
            raise E.bad_request(f"unable to parse requirement: {term!r}: not an equality {what}")
        if known is not None and m.group(1) not in known:
            raise E.bad_request(f"field label not supported: {m.group(1)}")
        return m.group(1), m.group(2) != "!=", m.group(3)

    def matches(self, obj: dict[str, Any] | None) -> bool:
        if obj is None:
            return False
        for kind, key, equal, value in self.reqs:
            if kind == "l":
                got = (obj["metadata"].get("labels") or {}).get(key)
            else:
                section, _, field = key.partition(".")
                got = str((obj.get(section) or {}).get(field, ""))
            if (got == value) != equal:
                return False
        return True


def _field_error(obj: dict[str, Any], path: str, message: str) -> FieldError:
    """A jsonschema message as the API server's field error."""
    gp = re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)
    m = re.match(r"^'([^']+)' is a required property$", message)
    if m:
        return FieldError(f"{gp}.{m.group(1)}" if gp else m.group(1), "Required value")
    value: Any = obj
    for part in path.split(".") if path else []:
        value = value[int(part)] if isinstance(value, list) else (value or {}).get(part)
    if isinstance(value, (dict, list)):
        value = "object" if isinstance(value, dict) else "array"
    m = re.match(r"^.* is not one of \[(.*)\]$", message)
    if m:
        vals = ", ".join(json.dumps(v.strip().strip("'")) for v in m.group(1).split(","))
        return FieldError(gp, "Unsupported value", f"supported values: {vals}", value=value)
    m = re.match(r"^.* is less than the minimum of (.+)$", message)
    if m:
        return FieldError(gp, "Invalid value", f"{gp} in body should be greater than or equal to {m.group(1)}", value)
    return FieldError(gp, "Invalid value", message, value=value)


def _schema_errors(rt: ResourceType, obj: dict[str, Any]) -> list[FieldError]:
    """The real schemas: ctrlnet's validator, or the CRD file directly for a CRD it does not map
    (Kueue's Workload, which only the stand-ins write)."""
    from ctrlnet.k8s.validate import schema_problems

    probs = schema_problems(copy.deepcopy(obj))
    pairs = [(p.path, p.message) for p in probs]
    if len(probs) == 1 and probs[0].message.startswith("no schema for") and rt.custom:
        errs = _crd_validator(rt, obj["apiVersion"]).iter_errors(obj)
        pairs = [(".".join(map(str, e.absolute_path)), e.message) for e in errs]
    return [_field_error(obj, path, message) for path, message in pairs]


_VALIDATORS: dict[tuple[str, str], Any] = {}


def _crd_validator(rt: ResourceType, api_version: str) -> Any:
    """A validator straight from the CRD's schema (unknown fields allowed: the server prunes them)."""
    if (api_version, rt.kind) not in _VALIDATORS:
        import jsonschema

        from ctrlnet.k8s.schemas import translate

        schema = translate(rt.version_schema(api_version.split("/")[-1]), strict=False)
        schema.setdefault("properties", {})["metadata"] = {"type": "object"}
        _VALIDATORS[(api_version, rt.kind)] = jsonschema.Draft7Validator(schema)
    return _VALIDATORS[(api_version, rt.kind)]


class Registry:
    def __init__(self, store: Store, catalog: Catalog):
        self.store = store
        self.catalog = catalog
        # mutating admission webhooks: fn(rt, obj, old or None, ctx) (the cluster adds Kueue's)
        self.mutators: list[Callable[[ResourceType, dict[str, Any], dict[str, Any] | None, Ctx], None]] = []

    # --- reads -----------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str, version: str | None = None) -> dict[str, Any]:
        obj = self.store.get(rt.key, namespace if rt.namespaced else "", name)
        if obj is None:
            raise E.not_found(rt.group, rt.plural, name)
        return self.present(rt, obj, version)

    @staticmethod
    def present(rt: ResourceType, obj: dict[str, Any], version: str | None = None) -> dict[str, Any]:
        obj["apiVersion"], obj["kind"] = rt.api_version(version), rt.kind
        return obj

    def list(
        self, rt: ResourceType, namespace: str | None, sel: Selector | None = None, version: str | None = None
    ) -> list[dict[str, Any]]:
        objs = self.store.list(rt.key, namespace if rt.namespaced else None)
        return [self.present(rt, o, version) for o in objs if sel is None or sel.matches(o)]

    # --- create ----------------------------------------------------------------------------------

    def create(
        self,
        rt: ResourceType,
        namespace: str,
        body: Any,
        ctx: Ctx,
        version: str | None = None,
        managed: Managed | None = None,
    ) -> dict[str, Any]:
        obj = self._decode(rt, body, version)
        with self.store.lock:
            meta = obj.setdefault("metadata", {})
            self._check_namespace(rt, meta, namespace)
            name = meta.get("name") or ""
            if rt.namespaced and not self.store.exists(("", "namespaces"), "", namespace):
                raise E.not_found("", "namespaces", namespace)  # NamespaceLifecycle admission
            for k in SYSTEM_META:
                meta.pop(k, None)
            meta.update(uid=str(uuid.uuid4()), creationTimestamp=ts())
            if rt.custom:
                meta["generation"] = 1
            self._prepare_create(rt, obj, ctx)
            for m in self.mutators:
                m(rt, obj, None, ctx)
            self._validate(rt, obj, ctx, new=True)
            if self.store.exists(rt.key, meta.get("namespace", ""), name):
                raise E.already_exists(rt.group, rt.plural, name)
            if managed is None:  # server-side apply brings its own
                managed = Managed()
                managed.record_update(None, obj, ctx.manager, obj["apiVersion"])
            meta["managedFields"] = managed.dump()
            obj["apiVersion"] = rt.api_version()
            if ctx.dry_run:
                return self.present(rt, obj, version)
            return self.present(rt, self.store.put(rt.key, obj), version)

    def _prepare_create(self, rt: ResourceType, obj: dict[str, Any], ctx: Ctx) -> None:
        if "status" in rt.subresources and not ctx.internal:
            obj.pop("status", None)  # a create cannot set the status of a resource with a status subresource
        if rt.kind == "Pod" and not rt.custom:
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            obj.setdefault("status", {"phase": "Pending"})
        elif rt.kind == "Namespace" and not rt.custom:
            obj["status"] = {"phase": "Active"}
            obj["metadata"].setdefault("labels", {})["kubernetes.io/metadata.name"] = obj["metadata"]["name"]

    # --- update (PUT) ----------------------------------------------------------------------------

    def update(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        body: Any,
        ctx: Ctx,
        subresource: str = "",
        version: str | None = None,
    ) -> dict[str, Any]:
        new = self._decode(rt, body, version)
        with self.store.lock:
            old = self.store.get(rt.key, namespace if rt.namespaced else "", name)
            if old is None:
                raise E.not_found(rt.group, rt.plural, name)
            meta = new.setdefault("metadata", {})
            if meta.get("name") not in (None, name):
                raise E.bad_request(
                    f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
                )
            if meta.get("resourceVersion") not in (None, old["metadata"]["resourceVersion"]):
                raise E.conflict(rt.group, rt.plural, name)
            return self._update(rt, old, new, ctx, subresource, version)

    def _update(
        self,
        rt: ResourceType,
        old: dict[str, Any],
        new: dict[str, Any],
        ctx: Ctx,
        subresource: str,
        version: str | None,
        managed: Managed | None = None,
    ) -> dict[str, Any]:
        if subresource == "status":  # only the status changes
            new = dict(copy.deepcopy(old), status=new.get("status"))
            if new["status"] is None:
                del new["status"]
        else:  # system metadata and (with a status subresource) the status stay as they are
            meta = new.setdefault("metadata", {})
            for k in KEPT_META + ("name", "namespace"):
                if k in old["metadata"]:
                    meta[k] = old["metadata"][k]
                else:
                    meta.pop(k, None)
            if "status" in rt.subresources:
                new.pop("status", None)
                if "status" in old:
                    new["status"] = copy.deepcopy(old["status"])
            if managed is None:
                managed = Managed(old["metadata"].get("managedFields"))
                managed.record_update(old, new, ctx.manager, rt.api_version(version))
            meta["managedFields"] = managed.dump()
        new["apiVersion"], new["kind"] = rt.api_version(), rt.kind
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        for m in self.mutators:
            m(rt, new, old, ctx)
        self._validate(rt, new, ctx, subresource=subresource)
        if new == old:  # a no-op write keeps its resourceVersion, as on a real server
            return self.present(rt, old, version)
        body = [{k: v for k, v in o.items() if k not in ("metadata", "status")} for o in (old, new)]
        if rt.custom and body[0] != body[1]:
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        if ctx.dry_run:
            return self.present(rt, new, version)
        return self.present(rt, self.store.put(rt.key, new), version)

    # --- patch -----------------------------------------------------------------------------------

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        raw: bytes,
        ctx: Ctx,
        force: bool = False,
        subresource: str = "",
        version: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Server-side apply or merge patch; returns (object, created)."""
        ptype = (content_type or "").split(";")[0].strip().lower()
        if ptype not in (APPLY, MERGE):  # strategic merge and JSON patches: no product code sends them
            raise E.unsupported_media_type([APPLY, MERGE])
        if ptype == APPLY and not ctx.manager:
            err = FieldError("fieldManager", "Required value", "is required for apply patch")
            raise E.invalid("meta.k8s.io", "PatchOptions", "", [err])
        try:
            doc = yaml.safe_load(raw.decode()) if ptype == APPLY else json.loads(raw.decode() or "null")
        except (ValueError, yaml.YAMLError) as e:
            raise E.bad_request(f"error decoding patch: {e}") from None
        ns = namespace if rt.namespaced else ""
        with self.store.lock:
            old = self.store.get(rt.key, ns, name)
            if ptype == MERGE:
                if old is None:
                    raise E.not_found(rt.group, rt.plural, name)
                new = merge_patch(self.present(rt, copy.deepcopy(old), version), doc)
                if not isinstance(new, dict) or (new.get("metadata") or {}).get("name") != name:
                    raise E.bad_request("the patched object is not an object of the same name")
                return self._update(rt, old, new, ctx, subresource, version), False
            cfg = self._decode(rt, doc, version)
            meta = cfg.setdefault("metadata", {})
            if meta.setdefault("name", name) != name:
                raise E.bad_request(
                    f"the name of the object ({meta['name']}) does not match the name on the URL ({name})"
                )
            self._check_namespace(rt, meta, namespace)
            managed = Managed(old["metadata"].get("managedFields") if old else None)
            new = apply(old, cfg, managed, ctx.manager, force, rt.api_version(version))
            if old is None:
                return self.create(rt, namespace, new, ctx, version, managed=managed), True
            return self._update(rt, old, new, ctx, subresource, version, managed=managed), False

    # --- delete ----------------------------------------------------------------------------------

    def delete(
        self, rt: ResourceType, namespace: str, name: str, grace: int | None = None, version: str | None = None
    ) -> dict[str, Any]:
        """Delete now, or (a pod bound to the node and not finished) start its graceful termination:
        deletionTimestamp set, the kubelet stops the containers and then removes the pod."""
        ns = namespace if rt.namespaced else ""
        with self.store.lock:
            obj = self.store.get(rt.key, ns, name)
            if obj is None:
                raise E.not_found(rt.group, rt.plural, name)
            meta = obj["metadata"]
            phase = (obj.get("status") or {}).get("phase")
            if (
                rt.key == ("", "pods")
                and obj["spec"].get("nodeName")
                and phase not in ("Succeeded", "Failed")
                and grace != 0
            ):
                g = grace if grace is not None else int(obj["spec"].get("terminationGracePeriodSeconds", 30))
                if not meta.get("deletionTimestamp") or int(meta.get("deletionGracePeriodSeconds") or 0) > g:
                    meta["deletionTimestamp"] = ts(datetime.now(UTC) + timedelta(seconds=g))
                    meta["deletionGracePeriodSeconds"] = g
                    obj = self.store.put(rt.key, obj)
                return self.present(rt, obj, version)
            final = self.store.remove(rt.key, ns, name)
            if rt.delete_returns_object:
                return self.present(rt, final, version)
            details = {"name": name, **({"group": rt.group} if rt.group else {}), "kind": rt.plural, "uid": meta["uid"]}
            return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    # --- pieces of the write path ----------------------------------------------------------------

    @staticmethod
    def _decode(rt: ResourceType, body: Any, version: str | None) -> dict[str, Any]:
        want = rt.api_version(version)
        if not isinstance(body, dict) or body.get("kind") != rt.kind or body.get("apiVersion") not in (None, want):
            kind = body.get("kind") if isinstance(body, dict) else None
            raise E.bad_request(f'{kind} in version "{version or rt.storage_version}" cannot be handled as a {rt.kind}')
        return copy.deepcopy(body)

    @staticmethod
    def _check_namespace(rt: ResourceType, meta: dict[str, Any], namespace: str) -> None:
        if rt.namespaced and meta.get("namespace") not in (None, "", namespace):
            raise E.bad_request("the namespace of the provided object does not match the namespace sent on the request")
        if rt.namespaced:
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)

    def _validate(
        self, rt: ResourceType, obj: dict[str, Any], ctx: Ctx, new: bool = False, subresource: str = ""
    ) -> None:
        name = obj["metadata"].get("name") or ""
        errs: list[FieldError] = []
        if new and not name:
            errs.append(FieldError("metadata.name", "Required value", "name or generateName is required"))
        elif new and (len(name) > 253 or not DNS1123_SUBDOMAIN.match(name)):
            errs.append(FieldError("metadata.name", "Invalid value", MSG_SUBDOMAIN, value=name))
        if not (ctx.internal and (subresource == "status" or rt.key == ("", "events"))):
            errs += _schema_errors(rt, obj)
        if errs:
            raise E.invalid(rt.group, rt.kind, name, errs)

    # --- events ----------------------------------------------------------------------------------

    def record_event(
        self,
        involved: dict[str, Any],
        type_: str,
        reason: str,
        message: str,
        component: str,
        host: str | None = None,
        field_path: str | None = None,
    ) -> None:
        """An Event about `involved`, aggregated like client-go's recorder (same event: count + 1)."""
        meta = involved["metadata"]
        ns = meta.get("namespace") or "default"
        ref = {
            "kind": involved.get("kind"),
            "namespace": meta.get("namespace", ""),
            "name": meta["name"],
            "uid": meta.get("uid"),
            "apiVersion": involved.get("apiVersion"),
            "resourceVersion": meta.get("resourceVersion"),
        }
        if field_path:
            ref["fieldPath"] = field_path
        source = {"component": component, **({"host": host} if host else {})}
        rt = self.catalog.by_key(("", "events"))
        with self.store.lock:
            for ev in self.store.iter_raw(rt.key, ns):
                same = [(ev.get("involvedObject") or {}).get("uid")] + [
                    ev.get(k) for k in ("reason", "message", "type")
                ]
                if same == [ref["uid"], reason, message, type_] and ev.get("source") == source:
                    ev = copy.deepcopy(ev)
                    ev.update(count=int(ev.get("count") or 1) + 1, lastTimestamp=ts())
                    self.store.put(rt.key, ev)
                    return
            ev = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:16]}", "namespace": ns},
                "involvedObject": ref,
                "reason": reason,
                "message": message,
                "source": source,
                "firstTimestamp": ts(),
                "lastTimestamp": ts(),
                "count": 1,
                "type": type_,
                "reportingComponent": component,
                "reportingInstance": host or "",
            }
            try:
                self.create(rt, ns, ev, Ctx(manager=component, internal=True))
            except E.ApiError:
                pass  # recorders drop what they cannot write
