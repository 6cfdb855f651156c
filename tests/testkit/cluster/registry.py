"""What the API server does with a request once it is routed: the verbs, admission and validation.

Order of a write, as in kube-apiserver: decode (400) -> unknown fields per `fieldValidation`
(Warn: pruned with a Warning header, the default; Strict: 400; Ignore: pruned) -> mutating
admission (NamespaceLifecycle 404/403, ServiceAccount 403, the Kueue webhook) -> the type's
strategy (system metadata, status/spec split, defaults) -> validation (422: the real schemas via
`ctrlnet.k8s.validate.schema_problems`, names, labels, immutable fields, a CEL subset) ->
validating webhooks (the Training Operator's PyTorchJob webhook, 403) -> storage (409).

Controllers and the kubelet write through the same registry (`Ctx(internal=True)`); their
status writes and Events skip the (slow) schema check, everything else they create is validated.
"""

from __future__ import annotations

import base64
import copy
import json
import random
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

import yaml

from . import errors as E
from .errors import FieldError
from .fields import (
    Managed,
    field_set,
    json_patch,
    merge_patch,
    record_update,
    strategic_merge_patch,
)
from .fields import (
    apply as ssa_apply,
)
from .resources import Catalog, ResourceType
from .schema import Schema, apply_defaults, cel_errors, crd_problems, unknown_fields
from .selectors import fields_match, labels_match, parse_field_selector, parse_label_selector
from .store import Store

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035_LABEL = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
LABEL_NAME = re.compile(r"^([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]$")
MSG_SUBDOMAIN = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'example.com', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
MSG_LABEL = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and must start and "
    "end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex used for validation is "
    "'[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
MSG_1035 = (
    "a DNS-1035 label must consist of lower case alphanumeric characters or '-', start with an alphabetic "
    "character, and end with an alphanumeric character (e.g. 'my-name',  or 'abc-123', regex used for validation "
    "is '[a-z]([-a-z0-9]*[a-z0-9])?')"
)
MSG_LABEL_VALUE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
    "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', regex used "
    "for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
GENERATE_CHARS = "bcdfghjklmnpqrstvwxz2456789"
SYSTEM_META = (
    "uid",
    "creationTimestamp",
    "resourceVersion",
    "generation",
    "deletionTimestamp",
    "deletionGracePeriodSeconds",
    "selfLink",
    "managedFields",
)


def now() -> datetime:
    return datetime.now(UTC)


def ts(t: datetime | None = None) -> str:
    return (t or now()).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclass
class Ctx:
    """Who writes and how: the request options that matter to the registry."""

    manager: str = "loopback"
    dry_run: bool = False
    field_validation: str = "Warn"
    internal: bool = False  # a controller or the kubelet, not an API client
    warnings: list[str] = field(default_factory=list)


def _validate_schema(obj: dict[str, Any], rt: ResourceType, kube_version: str) -> list[FieldError]:
    """The real schemas: ctrlnet's validator, or the CRD file directly for CRDs it does not map."""
    from ctrlnet.k8s.validate import schema_problems

    out: list[FieldError] = []
    probs = schema_problems(copy.deepcopy(obj), kube_version)
    pairs = [(p.path, p.message) for p in probs]
    if len(probs) == 1 and not probs[0].path and probs[0].message.startswith("no schema for"):
        openapi = rt.version_schema(obj["apiVersion"].split("/")[-1])
        # No schema ctrlnet knows: check a CRD-backed kind against its CRD file here; a kind with no
        # schema at all (Volcano PodGroup) is accepted as the API server of a schemaless CRD would.
        pairs = list(crd_problems(obj, openapi)) if openapi else []
    for path, message in pairs:
        out.append(_field_error(obj, path, message))
    return out


def _go_path(path: str) -> str:
    return re.sub(r"\.(\d+)(?=\.|$)", r"[\1]", path)


def _value_at(obj: Any, path: str) -> Any:
    cur = obj
    for part in path.split(".") if path else []:
        if isinstance(cur, dict):
            cur = cur.get(part)
        elif isinstance(cur, list) and part.isdigit() and int(part) < len(cur):
            cur = cur[int(part)]
        else:
            return None
    return cur


def _field_error(obj: dict[str, Any], path: str, message: str) -> FieldError:
    gp = _go_path(path)
    m = re.match(r"^'([^']+)' is a required property$", message)
    if m:
        return FieldError(f"{gp}.{m.group(1)}" if gp else m.group(1), "Required value")
    value = _value_at(obj, path)
    m = re.match(r"^.* is not of type (.+)$", message)
    if m:
        want = m.group(1).replace("'", "").split(",")[0].strip()
        got = _type_name(value)
        return FieldError(gp, "Invalid value", f'{gp} in body must be of type {want}: "{got}"', value=got)
    m = re.match(r"^.* is not one of \[(.*)\]$", message)
    if m:
        vals = ", ".join(json.dumps(v.strip().strip("'")) for v in m.group(1).split(","))
        return FieldError(gp, "Unsupported value", f"supported values: {vals}", value=value)
    m = re.match(r"^.* does not match '(.*)'$", message)
    if m:
        return FieldError(gp, "Invalid value", f"{gp} in body should match '{m.group(1)}'", value=value)
    m = re.match(r"^.* is less than the minimum of (.+)$", message)
    if m:
        return FieldError(
            gp, "Invalid value", f"{gp} in body should be greater than or equal to {m.group(1)}", value=value
        )
    m = re.match(r"^.* is greater than the maximum of (.+)$", message)
    if m:
        return FieldError(
            gp, "Invalid value", f"{gp} in body should be less than or equal to {m.group(1)}", value=value
        )
    return FieldError(
        gp, "Invalid value", message, value=value if not isinstance(value, (dict, list)) else _type_name(value)
    )


def _type_name(v: Any) -> str:
    if isinstance(v, bool):
        return "boolean"
    if isinstance(v, int):
        return "integer"
    if isinstance(v, float):
        return "number"
    if isinstance(v, str):
        return "string"
    if v is None:
        return "null"
    return "array" if isinstance(v, list) else "object"


def _image_pull_policy(image: str) -> str:
    last = image.rsplit("/", 1)[-1]
    if "@" in last:
        return "IfNotPresent"
    tag = last.split(":", 1)[1] if ":" in last else ""
    return "Always" if tag in ("", "latest") else "IfNotPresent"


class Registry:
    def __init__(self, store: Store, catalog: Catalog, kube_version: str):
        self.store = store
        self.catalog = catalog
        self.kube_version = kube_version
        self._schemas: dict[tuple[str, str, str], Schema] = {}
        self._ip = 10
        self.mutators: list[Callable[[ResourceType, dict[str, Any], dict[str, Any] | None, Ctx], None]] = []
        self.webhooks: list[Callable[[ResourceType, dict[str, Any], dict[str, Any] | None, Ctx], None]] = []
        self.node_name = "loopback-node"
        self.validate_internal = False
        self.errors_sink: list[BaseException] = []

    # --- schemas ---------------------------------------------------------------------------------

    def schema(self, rt: ResourceType, version: str | None = None) -> Schema:
        version = version or rt.storage_version
        key = (rt.group, rt.plural, version)
        s = self._schemas.get(key)
        if s is None:
            if rt.custom:
                s = Schema.for_crd(rt.version_schema(version), self.kube_version)
            else:
                s = Schema.for_core(rt.kind, self.kube_version) or Schema.for_crd(None, self.kube_version)
            self._schemas[key] = s
        return s

    # --- reads -----------------------------------------------------------------------------------

    def get(self, rt: ResourceType, namespace: str, name: str, version: str | None = None) -> dict[str, Any]:
        obj = self.store.get(rt.key, namespace if rt.namespaced else "", name)
        if obj is None:
            raise E.not_found(rt.group, rt.plural, name)
        return self.present(rt, obj, version)

    def present(self, rt: ResourceType, obj: dict[str, Any], version: str | None) -> dict[str, Any]:
        obj["apiVersion"] = rt.api_version(version)
        obj.setdefault("kind", rt.kind)
        return obj

    def list(
        self,
        rt: ResourceType,
        namespace: str | None,
        label_selector: str | None = None,
        field_selector: str | None = None,
        version: str | None = None,
    ) -> list[dict[str, Any]]:
        lreqs = parse_label_selector(label_selector)
        freqs = parse_field_selector(field_selector, rt.group, rt.plural, rt.custom)
        out = []
        for obj in self.store.list(rt.key, namespace if rt.namespaced else None):
            if labels_match(lreqs, obj["metadata"].get("labels")) and fields_match(freqs, obj, rt.group, rt.plural):
                out.append(self.present(rt, obj, version))
        return out

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
        version = version or rt.storage_version
        obj = self._decode(rt, body, version)
        with self.store.lock:
            if managed is None:  # server-side apply checked the fields already
                self._unknown_fields(rt, obj, version, ctx)
            meta = obj.setdefault("metadata", {})
            if not isinstance(meta, dict):
                raise E.bad_request("metadata must be an object")
            self._check_namespace_match(rt, meta, namespace)
            if rt.namespaced:
                meta["namespace"] = namespace
            else:
                meta.pop("namespace", None)
            if not meta.get("name") and meta.get("generateName"):
                meta["name"] = meta["generateName"] + "".join(random.choice(GENERATE_CHARS) for _ in range(5))
            name = meta.get("name") or ""
            self._namespace_lifecycle(rt, namespace, name)
            for k in SYSTEM_META:
                meta.pop(k, None)
            meta["uid"] = str(uuid.uuid4())
            meta["creationTimestamp"] = ts()
            if rt.custom and rt.crd is not None:
                meta["generation"] = 1
            obj["apiVersion"], obj["kind"] = rt.api_version(version), rt.kind
            self._default(rt, obj, version)
            for m in self.mutators:
                m(rt, obj, None, ctx)
            self._prepare_create(rt, obj, ctx)
            self._validate(rt, obj, None, ctx, version)
            for w in self.webhooks:
                w(rt, obj, None, ctx)
            if self.store.exists(rt.key, namespace if rt.namespaced else "", name):
                raise E.already_exists(rt.group, rt.plural, name)
            sub = ""
            if managed is None:
                managed = Managed(None)
                record_update(
                    managed,
                    {},
                    field_set(obj, self.schema(rt, version), skip_status=self._has_status(rt)),
                    ctx.manager,
                    sub,
                    obj["apiVersion"],
                )
            obj["metadata"]["managedFields"] = managed.dump()
            obj["apiVersion"] = rt.api_version(rt.storage_version)
            if ctx.dry_run:
                return self.present(rt, obj, version)
            stored = self.store.put(rt.key, obj)
            self._after_create(rt, stored, ctx)
            return self.present(rt, stored, version)

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
        version = version or rt.storage_version
        new = self._decode(rt, body, version)
        with self.store.lock:
            old = self.store.get(rt.key, namespace if rt.namespaced else "", name)
            if old is None:
                raise E.not_found(rt.group, rt.plural, name)
            meta = new.setdefault("metadata", {})
            if meta.get("name") not in (None, name):
                raise E.bad_request(
                    f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
                )
            self._check_namespace_match(rt, meta, namespace)
            rv = meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise E.conflict(rt.group, rt.plural, name)
            if meta.get("uid") and meta["uid"] != old["metadata"]["uid"]:
                raise E.conflict(
                    rt.group,
                    rt.plural,
                    name,
                    f"Precondition failed: UID in precondition: {meta['uid']}, UID in object meta: {old['metadata']['uid']}",
                )
            self._unknown_fields(rt, new, version, ctx)
            return self._update(rt, old, new, ctx, subresource, version, managed=None)

    def _update(
        self,
        rt: ResourceType,
        old: dict[str, Any],
        new: dict[str, Any],
        ctx: Ctx,
        subresource: str,
        version: str,
        managed: Managed | None,
    ) -> dict[str, Any]:
        new["apiVersion"], new["kind"] = rt.api_version(version), rt.kind
        new = self._prepare_update(rt, new, old, subresource)
        self._default(rt, new, version)
        for m in self.mutators:
            m(rt, new, old, ctx)
        self._validate(rt, new, old, ctx, version, subresource=subresource)
        for w in self.webhooks:
            w(rt, new, old, ctx)
        if managed is None:
            managed = Managed(old["metadata"].get("managedFields"))
            schema = self.schema(rt, version)
            status_sub = self._has_status(rt)
            kw = {"status_only": True} if subresource == "status" else {"skip_status": status_sub}
            record_update(
                managed,
                field_set(old, schema, **kw),
                field_set(new, schema, **kw),
                ctx.manager,
                subresource,
                new["apiVersion"],
            )
        body_mf = new["metadata"].get("managedFields")
        new["metadata"]["managedFields"] = [] if body_mf == [{}] else managed.dump()
        new["metadata"]["resourceVersion"] = old["metadata"]["resourceVersion"]
        if self._same(old, new):
            return self.present(rt, old, version)
        if rt.custom and rt.crd is not None and self._spec_changed(old, new):
            new["metadata"]["generation"] = int(old["metadata"].get("generation") or 1) + 1
        new["apiVersion"] = rt.api_version(rt.storage_version)
        if ctx.dry_run:
            return self.present(rt, new, version)
        stored = self.store.put(rt.key, new)
        self._maybe_finalize(rt, stored)
        return self.present(rt, stored, version)

    @staticmethod
    def _same(a: dict[str, Any], b: dict[str, Any]) -> bool:
        def strip(o: dict[str, Any]) -> dict[str, Any]:
            o = copy.deepcopy(o)
            o["metadata"].pop("managedFields", None)
            o.pop("apiVersion", None)
            return o

        if strip(a) != strip(b):
            return False

        # managedFields changes alone (a new manager of the same values) are writes too
        def mf(o: dict[str, Any]) -> Any:
            return [{k: v for k, v in e.items() if k != "time"} for e in o["metadata"].get("managedFields") or []]

        return mf(a) == mf(b)

    @staticmethod
    def _spec_changed(old: dict[str, Any], new: dict[str, Any]) -> bool:
        def body(o: dict[str, Any]) -> dict[str, Any]:
            return {k: v for k, v in o.items() if k not in ("metadata", "status", "apiVersion", "kind")}

        return body(old) != body(new)

    # --- patch -----------------------------------------------------------------------------------

    PATCH_TYPES = (
        "application/json-patch+json",
        "application/merge-patch+json",
        "application/strategic-merge-patch+json",
        "application/apply-patch+yaml",
    )

    def patch(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        content_type: str,
        raw: bytes,
        ctx: Ctx,
        subresource: str = "",
        force: bool | None = None,
        version: str | None = None,
    ) -> tuple[dict[str, Any], bool]:
        """Returns (object, created)."""
        version = version or rt.storage_version
        ptype = (content_type or "").split(";")[0].strip().lower()
        if ptype == "application/apply-patch+cbor":
            ptype = ""
        accepted = [t for t in self.PATCH_TYPES if not (rt.custom and "strategic" in t)]
        if ptype not in accepted:
            raise E.unsupported_media_type(ptype, accepted)
        is_apply = ptype == "application/apply-patch+yaml"
        errs: list[FieldError] = []
        if not is_apply and force is not None:
            errs.append(FieldError("force", "Forbidden", "may not be specified for non-apply patch"))
        if is_apply and not ctx.manager:
            errs.append(FieldError("fieldManager", "Required value", "is required for apply patch"))
        if errs:
            raise E.invalid("meta.k8s.io", "PatchOptions", "", errs)
        try:
            patch_doc = yaml.safe_load(raw.decode("utf-8")) if is_apply else json.loads(raw.decode("utf-8") or "null")
        except (ValueError, yaml.YAMLError) as e:
            raise E.bad_request(f"error decoding {'YAML' if is_apply else 'patch'}: {e}") from None
        with self.store.lock:
            old = self.store.get(rt.key, namespace if rt.namespaced else "", name)
            if old is None and not is_apply:
                raise E.not_found(rt.group, rt.plural, name)
            schema = self.schema(rt, version)
            if is_apply:
                cfg = patch_doc
                if not isinstance(cfg, dict):
                    raise E.bad_request("error decoding YAML: the apply configuration must be an object")
                if not cfg.get("apiVersion") or not cfg.get("kind"):
                    raise E.bad_request(
                        f"invalid object type: {cfg.get('apiVersion', '')}, Kind={cfg.get('kind', '')}"
                        if cfg.get("kind")
                        else "Object 'Kind' is missing in apply configuration"
                    )
                self._check_kind(rt, cfg, version)
                cmeta = cfg.setdefault("metadata", {})
                if cmeta.get("name") not in (None, name):
                    raise E.bad_request(
                        f"the name of the object ({cmeta.get('name')}) does not match the name on the URL ({name})"
                    )
                cmeta["name"] = name
                self._check_namespace_match(rt, cmeta, namespace)
                if rt.namespaced:
                    cmeta["namespace"] = namespace
                undeclared = unknown_fields(cfg, schema) if (rt.crd is not None or not rt.custom) else []
                if undeclared:
                    gv = rt.api_version(version) if rt.group else f"/{version}"
                    nn = f"{namespace}/{name}" if rt.namespaced else name
                    raise E.internal(
                        f"failed to create typed patch object ({nn}; {gv}, Kind={rt.kind}): "
                        f".{undeclared[0]}: field not declared in schema"
                    )
                managed = Managed(old["metadata"].get("managedFields") if old else None)
                if (
                    old is not None
                    and cmeta.get("resourceVersion")
                    and cmeta["resourceVersion"] != old["metadata"]["resourceVersion"]
                ):
                    raise E.conflict(rt.group, rt.plural, name)
                base = copy.deepcopy(old) if old else None
                new = ssa_apply(
                    base,
                    cfg,
                    managed,
                    ctx.manager,
                    bool(force),
                    schema,
                    rt.api_version(version),
                    subresource=subresource,
                    status_subresource=self._has_status(rt),
                )
                if old is None:
                    return self.create(rt, namespace, new, ctx, version, managed=managed), True
                new.setdefault("metadata", {})
                return self._update(rt, old, new, ctx, subresource, version, managed=managed), False
            current = self.present(rt, copy.deepcopy(old), version)
            if ptype == "application/json-patch+json":
                new = json_patch(current, patch_doc)
            elif ptype == "application/merge-patch+json":
                new = merge_patch(current, patch_doc)
            else:
                if not isinstance(patch_doc, dict):
                    raise E.bad_request("error decoding patch: the strategic merge patch must be an object")
                new = strategic_merge_patch(current, patch_doc, schema.root, schema, top=True)
            if not isinstance(new, dict):
                raise E.bad_request("the patched object is not an object")
            meta = new.setdefault("metadata", {})
            if meta.get("name") != name:
                raise E.bad_request(
                    f"the name of the object ({meta.get('name')}) does not match the name on the URL ({name})"
                )
            rv = meta.get("resourceVersion")
            if rv and rv != old["metadata"]["resourceVersion"]:
                raise E.conflict(rt.group, rt.plural, name)
            self._check_kind(rt, new, version)
            self._unknown_fields(rt, new, version, ctx)
            return self._update(rt, old, new, ctx, subresource, version, managed=None), False

    # --- delete ----------------------------------------------------------------------------------

    def delete(
        self,
        rt: ResourceType,
        namespace: str,
        name: str,
        ctx: Ctx,
        propagation: str | None = None,
        grace: int | None = None,
        preconditions: dict[str, Any] | None = None,
        graceful_pods: bool = True,
        version: str | None = None,
    ) -> tuple[int, dict[str, Any]]:
        ns = namespace if rt.namespaced else ""
        with self.store.lock:
            obj = self.store.get(rt.key, ns, name)
            if obj is None:
                raise E.not_found(rt.group, rt.plural, name)
            pre = preconditions or {}
            if pre.get("uid") and pre["uid"] != obj["metadata"]["uid"]:
                raise E.conflict(
                    rt.group,
                    rt.plural,
                    name,
                    f"Precondition failed: UID in precondition: {pre['uid']}, UID in object meta: {obj['metadata']['uid']}",
                )
            if pre.get("resourceVersion") and pre["resourceVersion"] != obj["metadata"]["resourceVersion"]:
                raise E.conflict(
                    rt.group,
                    rt.plural,
                    name,
                    f"Precondition failed: ResourceVersion in precondition: {pre['resourceVersion']}, "
                    f"ResourceVersion in object meta: {obj['metadata']['resourceVersion']}",
                )
            if propagation not in (None, "Orphan", "Background", "Foreground"):
                raise E.invalid(
                    "meta.k8s.io",
                    "DeleteOptions",
                    "",
                    [
                        FieldError(
                            "propagationPolicy",
                            "Unsupported value",
                            'supported values: "Foreground", "Background", "Orphan", "nil"',
                            value=propagation,
                        )
                    ],
                )
            if ctx.dry_run:
                return 200, self.present(rt, obj, version)
            meta = obj["metadata"]
            if rt.key == ("", "namespaces"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = ts()
                    meta["deletionGracePeriodSeconds"] = 0
                    obj.setdefault("status", {})["phase"] = "Terminating"
                    obj = self.store.put(rt.key, obj)
                return 200, self.present(rt, obj, version)
            if propagation == "Orphan":
                self._orphan(meta["uid"])
            if (
                rt.key == ("", "pods")
                and graceful_pods
                and obj.get("spec", {}).get("nodeName")
                and obj.get("status", {}).get("phase") not in ("Succeeded", "Failed")
                and grace != 0
            ):
                g = grace if grace is not None else int(obj["spec"].get("terminationGracePeriodSeconds", 30))
                if meta.get("deletionTimestamp") and int(meta.get("deletionGracePeriodSeconds") or 0) <= g:
                    return 200, self.present(rt, obj, version)
                meta["deletionTimestamp"] = ts(now() + timedelta(seconds=g))
                meta["deletionGracePeriodSeconds"] = g
                if propagation == "Foreground":
                    self._add_finalizer(meta, "foregroundDeletion")
                obj = self.store.put(rt.key, obj)
                return 200, self.present(rt, obj, version)
            if propagation == "Foreground" and self.dependents(meta["uid"]):
                self._add_finalizer(meta, "foregroundDeletion")
            if meta.get("finalizers"):
                if not meta.get("deletionTimestamp"):
                    meta["deletionTimestamp"] = ts()
                    meta["deletionGracePeriodSeconds"] = 0
                    obj = self.store.put(rt.key, obj)
                return 200, self.present(rt, obj, version)
            final = self.store.remove(rt.key, ns, name)
            assert final is not None
            return 200, self.deleted_body(rt, final, version)

    def deleted_body(self, rt: ResourceType, final: dict[str, Any], version: str | None) -> dict[str, Any]:
        if rt.delete_returns_object:
            return self.present(rt, final, version)
        details = {"name": final["metadata"]["name"], "kind": rt.plural, "uid": final["metadata"]["uid"]}
        if rt.group:
            details["group"] = rt.group
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success", "details": details}

    def remove_now(self, rt: ResourceType, namespace: str, name: str) -> dict[str, Any] | None:
        """Final removal (kubelet confirming a pod's termination, a finalizer-free object)."""
        return self.store.remove(rt.key, namespace if rt.namespaced else "", name)

    @staticmethod
    def _add_finalizer(meta: dict[str, Any], f: str) -> None:
        fins = meta.setdefault("finalizers", [])
        if f not in fins:
            fins.append(f)

    def _maybe_finalize(self, rt: ResourceType, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        if meta.get("deletionTimestamp") and not meta.get("finalizers") and rt.key not in (("", "namespaces"),):
            if (
                rt.key == ("", "pods")
                and obj.get("spec", {}).get("nodeName")
                and obj.get("status", {}).get("phase") not in ("Succeeded", "Failed")
            ):
                return  # the kubelet confirms the deletion
            self.store.remove(rt.key, meta.get("namespace", ""), meta["name"])

    def dependents(self, uid: str) -> list[tuple[ResourceType, dict[str, Any]]]:
        """Objects with an ownerReference to `uid` (copies)."""
        out = []
        with self.store.lock:
            for rt in self.catalog.types:
                for o in self.store.iter_raw(rt.key):
                    if any(r.get("uid") == uid for r in o["metadata"].get("ownerReferences") or []):
                        out.append((rt, copy.deepcopy(o)))
        return out

    def _orphan(self, uid: str) -> None:
        for rt, o in self.dependents(uid):
            o = copy.deepcopy(o)
            o["metadata"]["ownerReferences"] = [r for r in o["metadata"]["ownerReferences"] if r.get("uid") != uid]
            if not o["metadata"]["ownerReferences"]:
                del o["metadata"]["ownerReferences"]
            self.store.put(rt.key, o)

    # --- pieces of the write path ----------------------------------------------------------------

    def _decode(self, rt: ResourceType, body: Any, version: str) -> dict[str, Any]:
        if not isinstance(body, dict):
            raise E.bad_request(
                f'{rt.kind} in version "{version}" cannot be handled as a {rt.kind}: '
                "json: cannot unmarshal the body into a Go value of type map[string]interface {}"
            )
        obj = copy.deepcopy(body)
        if not obj.get("kind"):
            raise E.bad_request(f"Object 'Kind' is missing in '{json.dumps(body, separators=(',', ':'))[:200]}'")
        self._check_kind(rt, obj, version)
        return obj

    def _check_kind(self, rt: ResourceType, obj: dict[str, Any], version: str) -> None:
        want = rt.api_version(version)
        if obj.get("kind") != rt.kind or (obj.get("apiVersion") and obj.get("apiVersion") != want):
            raise E.bad_request(
                f"the API version in the data ({obj.get('apiVersion')}) does not match the expected API "
                f"version ({want})"
                if obj.get("kind") == rt.kind
                else f'{obj.get("kind")} in version "{version}" cannot be handled as a {rt.kind}: '
                f'no kind "{obj.get("kind")}" is registered for version "{want}"'
            )

    @staticmethod
    def _check_namespace_match(rt: ResourceType, meta: dict[str, Any], namespace: str) -> None:
        if rt.namespaced and meta.get("namespace") and meta["namespace"] != namespace:
            raise E.bad_request("the namespace of the provided object does not match the namespace sent on the request")

    def _unknown_fields(self, rt: ResourceType, obj: dict[str, Any], version: str, ctx: Ctx) -> None:
        if rt.custom and rt.crd is None:
            return
        mode = ctx.field_validation or "Warn"
        if mode not in ("Ignore", "Warn", "Strict"):
            raise E.bad_request(
                f'fieldValidation: Unsupported value: "{mode}": supported values: "Ignore", "Strict", "Warn"'
            )
        found = unknown_fields(obj, self.schema(rt, version), prune=mode != "Strict")
        if not found:
            return
        if mode == "Strict":
            raise E.bad_request(
                f'{rt.kind} in version "{version}" cannot be handled as a {rt.kind}: strict decoding error: '
                + ", ".join(f'unknown field "{p}"' for p in found)
            )
        if mode == "Warn":
            ctx.warnings += [f'unknown field "{p}"' for p in found]

    def _namespace_lifecycle(self, rt: ResourceType, namespace: str, name: str) -> None:
        if not rt.namespaced:
            return
        ns = self.store.get(("", "namespaces"), "", namespace)
        if ns is None:
            raise E.not_found("", "namespaces", namespace)
        if ns["metadata"].get("deletionTimestamp"):
            err = E.forbidden(
                rt.group,
                rt.plural,
                name or None,
                f"unable to create new content in namespace {namespace} because it is being terminated",
            )
            err.details = dict(
                err.details or {},
                causes=[
                    {
                        "reason": "NamespaceTerminating",
                        "field": "metadata.namespace",
                        "message": f"namespace {namespace} is being terminated",
                    }
                ],
            )
            raise err

    def _has_status(self, rt: ResourceType) -> bool:
        return "status" in rt.subresources

    def _default(self, rt: ResourceType, obj: dict[str, Any], version: str) -> None:
        if rt.custom:
            if rt.crd is not None:
                apply_defaults(obj, self.schema(rt, version))
            return
        kind = rt.kind
        if kind == "Pod":
            spec = obj.setdefault("spec", {})
            spec.setdefault("restartPolicy", "Always")
            spec.setdefault("terminationGracePeriodSeconds", 30)
            spec.setdefault("dnsPolicy", "ClusterFirst")
            spec.setdefault("securityContext", {})
            spec.setdefault("schedulerName", "default-scheduler")
            spec.setdefault("enableServiceLinks", True)
            spec.setdefault("preemptionPolicy", "PreemptLowerPriority")
            spec.setdefault("priority", 0)
            for c in (spec.get("initContainers") or []) + (spec.get("containers") or []):
                if not isinstance(c, dict):
                    continue
                if c.get("image"):
                    c.setdefault("imagePullPolicy", _image_pull_policy(c["image"]))
                c.setdefault("terminationMessagePath", "/dev/termination-log")
                c.setdefault("terminationMessagePolicy", "File")
                c.setdefault("resources", {})
                for p in c.get("ports") or []:
                    if isinstance(p, dict):
                        p.setdefault("protocol", "TCP")
                for e in c.get("env") or []:
                    fr = ((e or {}).get("valueFrom") or {}).get("fieldRef")
                    if isinstance(fr, dict):
                        fr.setdefault("apiVersion", "v1")
            for v in spec.get("volumes") or []:
                for src in ("configMap", "secret"):
                    if isinstance((v or {}).get(src), dict):
                        v[src].setdefault("defaultMode", 420)
        elif kind == "Service":
            spec = obj.setdefault("spec", {})
            spec.setdefault("type", "ClusterIP")
            spec.setdefault("sessionAffinity", "None")
            spec.setdefault("internalTrafficPolicy", "Cluster")
            for p in spec.get("ports") or []:
                if isinstance(p, dict):
                    p.setdefault("protocol", "TCP")
                    p.setdefault("targetPort", p.get("port"))
        elif kind == "Secret":
            obj.setdefault("type", "Opaque")
        elif kind == "Namespace":
            obj.setdefault("spec", {}).setdefault("finalizers", ["kubernetes"])
        elif kind == "PersistentVolumeClaim":
            spec = obj.setdefault("spec", {})
            spec.setdefault("volumeMode", "Filesystem")
            spec.setdefault("storageClassName", "standard")

    def _prepare_create(self, rt: ResourceType, obj: dict[str, Any], ctx: Ctx) -> None:
        if rt.custom and self._has_status(rt) and not ctx.internal:
            obj.pop("status", None)  # create cannot set status of a resource with a status subresource
        kind = None if rt.custom else rt.kind
        meta = obj["metadata"]
        if kind == "Pod":
            if not ctx.internal or "status" not in obj:
                obj["status"] = {"phase": "Pending", "qosClass": _qos(obj.get("spec") or {})}
            spec = obj.setdefault("spec", {})
            sa = spec.get("serviceAccountName") or spec.get("serviceAccount") or "default"
            spec["serviceAccountName"] = spec["serviceAccount"] = sa
            if not self.store.exists(("", "serviceaccounts"), meta["namespace"], sa):
                raise E.forbidden(
                    "",
                    "pods",
                    meta.get("name") or None,
                    f'error looking up service account {meta["namespace"]}/{sa}: serviceaccount "{sa}" not found',
                )
            tols = spec.setdefault("tolerations", [])
            for key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
                if not any(isinstance(t, dict) and t.get("key") == key for t in tols):
                    tols.append({"key": key, "operator": "Exists", "effect": "NoExecute", "tolerationSeconds": 300})
        elif kind == "Namespace":
            obj["status"] = {"phase": "Active"}
            meta.setdefault("labels", {})["kubernetes.io/metadata.name"] = meta["name"]
        elif kind == "Service":
            spec = obj.setdefault("spec", {})
            if spec.get("clusterIP") in (None, "") and spec.get("type") != "ExternalName":
                self._ip += 1
                spec["clusterIP"] = f"10.96.{self._ip // 250}.{self._ip % 250 + 1}"
            if spec.get("clusterIP"):
                spec["clusterIPs"] = [spec["clusterIP"]]
                spec.setdefault("ipFamilies", ["IPv4"])
                spec.setdefault("ipFamilyPolicy", "SingleStack")
            obj["status"] = {"loadBalancer": {}}
        elif kind == "PersistentVolumeClaim":
            obj["status"] = {"phase": "Pending"}
        elif kind == "Secret":
            _fold_string_data(obj)

    def _prepare_update(
        self, rt: ResourceType, new: dict[str, Any], old: dict[str, Any], subresource: str
    ) -> dict[str, Any]:
        meta = new.setdefault("metadata", {})
        ometa = old["metadata"]
        if subresource == "status":
            out = copy.deepcopy(old)
            if "status" in new:
                out["status"] = new["status"]
            else:
                out.pop("status", None)
            out["metadata"]["managedFields"] = meta.get("managedFields", ometa.get("managedFields"))
            return out
        for k in ("uid", "creationTimestamp", "generation", "deletionTimestamp", "deletionGracePeriodSeconds"):
            if k in ometa:
                meta[k] = ometa[k]
            else:
                meta.pop(k, None)
        meta["name"] = ometa["name"]
        if "namespace" in ometa:
            meta["namespace"] = ometa["namespace"]
        if meta.get("deletionTimestamp"):
            added = set(meta.get("finalizers") or []) - set(ometa.get("finalizers") or [])
            if added:
                raise E.invalid(
                    rt.group,
                    rt.kind,
                    ometa["name"],
                    [
                        FieldError(
                            "metadata.finalizers",
                            "Forbidden",
                            f"no new finalizers can be added if the object is being deleted, "
                            f"found new finalizers {json.dumps(sorted(added))}",
                        )
                    ],
                )
        if self._has_status(rt):
            if "status" in old:
                new["status"] = copy.deepcopy(old["status"])
            else:
                new.pop("status", None)
        if rt.kind == "Secret" and not rt.custom:
            _fold_string_data(new)
        return new

    def _validate(
        self,
        rt: ResourceType,
        obj: dict[str, Any],
        old: dict[str, Any] | None,
        ctx: Ctx,
        version: str,
        subresource: str = "",
    ) -> None:
        meta = obj["metadata"]
        name = meta.get("name") or ""
        errs: list[FieldError] = []
        if old is None:
            if not name:
                errs.append(FieldError("metadata.name", "Required value", "name or generateName is required"))
            else:
                pattern, msg = DNS1123_SUBDOMAIN, MSG_SUBDOMAIN
                if rt.kind == "Namespace" and not rt.custom:
                    pattern, msg = DNS1123_LABEL, MSG_LABEL
                elif rt.kind == "Service" and not rt.custom:
                    pattern, msg = DNS1035_LABEL, MSG_1035
                limit = 63 if pattern is not DNS1123_SUBDOMAIN else 253
                if len(name) > limit:
                    errs.append(
                        FieldError(
                            "metadata.name", "Invalid value", f"must be no more than {limit} characters", value=name
                        )
                    )
                elif not pattern.match(name):
                    errs.append(FieldError("metadata.name", "Invalid value", msg, value=name))
        for k, v in (meta.get("labels") or {}).items():
            kn = k.split("/")[-1]
            if not LABEL_NAME.match(kn) or len(kn) > 63 or k.count("/") > 1:
                errs.append(
                    FieldError(
                        "metadata.labels",
                        "Invalid value",
                        "name part must consist of alphanumeric "
                        "characters, '-', '_' or '.', and must start and end with an alphanumeric character",
                        value=k,
                    )
                )
            if not isinstance(v, str) or len(v) > 63 or not LABEL_VALUE.match(v):
                detail = "must be no more than 63 characters" if isinstance(v, str) and len(v) > 63 else MSG_LABEL_VALUE
                errs.append(FieldError("metadata.labels", "Invalid value", detail, value=v))
        for i, ref in enumerate(meta.get("ownerReferences") or []):
            for f in ("apiVersion", "kind", "name", "uid"):
                if not (ref or {}).get(f):
                    errs.append(
                        FieldError(
                            f"metadata.ownerReferences[{i}].{f}", "Invalid value", f"{f} must not be empty", value=""
                        )
                    )
        if sum(1 for r in meta.get("ownerReferences") or [] if (r or {}).get("controller")) > 1:
            errs.append(
                FieldError(
                    "metadata.ownerReferences",
                    "Invalid value",
                    "Only one reference can have Controller set to true",
                    value="array",
                )
            )
        stand_in_write = ctx.internal and (subresource == "status" or rt.key == ("", "events"))
        if not stand_in_write or self.validate_internal:
            errs += _validate_schema(obj, rt, self.kube_version)
        if rt.key == ("", "pods") and subresource != "status":
            errs += _pod_rules(obj)
        if rt.custom and rt.crd is not None:
            errs += cel_errors(obj, old, self.schema(rt, version))
        if old is not None:
            errs += self._immutable(rt, obj, old)
        if errs:
            err = E.invalid(rt.group, rt.kind, name, errs)
            if stand_in_write:
                self.errors_sink.append(err)  # what the stand-ins write themselves must be valid
            raise err

    def _immutable(self, rt: ResourceType, new: dict[str, Any], old: dict[str, Any]) -> list[FieldError]:
        if rt.custom:
            return []
        errs: list[FieldError] = []
        if rt.kind == "Pod":

            def strip(spec: dict[str, Any]) -> dict[str, Any]:
                s = copy.deepcopy(spec or {})
                for c in (s.get("containers") or []) + (s.get("initContainers") or []):
                    c.pop("image", None)
                for k in ("activeDeadlineSeconds", "tolerations", "terminationGracePeriodSeconds", "schedulingGates"):
                    s.pop(k, None)
                if not (spec or {}).get("nodeName"):
                    s.pop("nodeName", None)
                return s

            a, b = strip(old.get("spec")), strip(new.get("spec"))
            if old.get("spec", {}).get("nodeName") is None:
                b.pop("nodeName", None)
            if a != b:
                errs.append(
                    FieldError(
                        "spec",
                        "Forbidden",
                        "pod updates may not change fields other than "
                        "`spec.containers[*].image`,`spec.initContainers[*].image`,`spec.activeDeadlineSeconds`,"
                        "`spec.tolerations` (only additions to existing tolerations),"
                        "`spec.terminationGracePeriodSeconds` (allow it to be set to 1 if it was previously negative)",
                    )
                )
        elif rt.kind == "Service":
            o, n = (old.get("spec") or {}).get("clusterIP"), (new.get("spec") or {}).get("clusterIP")
            if o and n != o:
                errs.append(FieldError("spec.clusterIPs[0]", "Invalid value", "may not change once set", value=n or ""))
        elif rt.kind in ("ConfigMap", "Secret") and old.get("immutable"):
            for f in ("data", "binaryData"):
                if old.get(f) != new.get(f):
                    errs.append(FieldError(f, "Forbidden", "field is immutable when `immutable` is set"))
            if not new.get("immutable"):
                errs.append(FieldError("immutable", "Forbidden", "field is immutable when `immutable` is set"))
        elif rt.kind == "PersistentVolumeClaim":
            o = {k: v for k, v in (old.get("spec") or {}).items() if k not in ("resources", "volumeName")}
            n = {k: v for k, v in (new.get("spec") or {}).items() if k not in ("resources", "volumeName")}
            if o != n:
                errs.append(
                    FieldError(
                        "spec",
                        "Forbidden",
                        "spec is immutable after creation except resources.requests and "
                        "volumeAttributesClassName for bound claims",
                    )
                )
        return errs

    def _after_create(self, rt: ResourceType, obj: dict[str, Any], ctx: Ctx) -> None:
        if rt.key == ("", "namespaces"):
            ns = obj["metadata"]["name"]
            sa = {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": "default", "namespace": ns}}
            self.create(
                self.catalog.by_key(("", "serviceaccounts")),
                ns,
                sa,
                Ctx(manager="kube-controller-manager", internal=True),
            )
            cm = {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": "kube-root-ca.crt", "namespace": ns},
                "data": {"ca.crt": "-----BEGIN CERTIFICATE-----\nloopback\n-----END CERTIFICATE-----\n"},
            }
            self.create(
                self.catalog.by_key(("", "configmaps")), ns, cm, Ctx(manager="kube-controller-manager", internal=True)
            )

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
        if not meta.get("namespace"):
            ref.pop("namespace")
        if field_path:
            ref["fieldPath"] = field_path
        source = {"component": component}
        if host:
            source["host"] = host
        rt = self.catalog.by_key(("", "events"))
        with self.store.lock:
            for ev in self.store.iter_raw(rt.key, ns):
                io = ev.get("involvedObject") or {}
                if (
                    io.get("uid") == ref["uid"]
                    and ev.get("reason") == reason
                    and ev.get("message") == message
                    and ev.get("type") == type_
                    and ev.get("source") == source
                ):
                    ev = copy.deepcopy(ev)
                    ev["count"] = int(ev.get("count") or 1) + 1
                    ev["lastTimestamp"] = ts()
                    ev["involvedObject"]["resourceVersion"] = ref["resourceVersion"]
                    self.store.put(rt.key, ev)
                    return
            name = f"{meta['name']}.{uuid.uuid4().hex[:16]}"
            ev = {
                "apiVersion": "v1",
                "kind": "Event",
                "metadata": {"name": name, "namespace": ns},
                "involvedObject": ref,
                "reason": reason,
                "message": message,
                "source": source,
                "firstTimestamp": ts(),
                "lastTimestamp": ts(),
                "count": 1,
                "type": type_,
                "eventTime": None,
                "reportingComponent": component,
                "reportingInstance": host or "",
            }
            try:
                self.create(rt, ns, ev, Ctx(manager=component, internal=True))
            except E.ApiError:
                pass  # recorders drop what they cannot write (e.g. into a terminating namespace)


def _pod_rules(pod: dict[str, Any]) -> list[FieldError]:
    """What core/v1 validation checks beyond the OpenAPI schema (a few of its rules)."""
    spec = pod.get("spec") or {}
    errs: list[FieldError] = []
    seen: set[str] = set()
    for kind in ("initContainers", "containers"):
        for i, c in enumerate(spec.get(kind) or []):
            name = (c or {}).get("name")
            if not isinstance(name, str) or not name:
                continue  # the schema reports it
            if not DNS1123_LABEL.match(name) or len(name) > 63:
                errs.append(FieldError(f"spec.{kind}[{i}].name", "Invalid value", MSG_LABEL, value=name))
            elif name in seen:
                errs.append(FieldError(f"spec.{kind}[{i}].name", "Duplicate value", value=name))
            seen.add(name)
    rp = spec.get("restartPolicy")
    if rp is not None and rp not in ("Always", "OnFailure", "Never"):
        errs.append(
            FieldError(
                "spec.restartPolicy", "Unsupported value", 'supported values: "Always", "OnFailure", "Never"', value=rp
            )
        )
    return errs


def _qos(spec: dict[str, Any]) -> str:
    containers = (spec.get("containers") or []) + (spec.get("initContainers") or [])
    reqs = [((c or {}).get("resources") or {}) for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in reqs):
        return "BestEffort"
    guaranteed = all(
        (r.get("limits") or {}).get(res) is not None
        and str((r.get("requests") or {}).get(res, (r.get("limits") or {}).get(res)))
        == str((r.get("limits") or {}).get(res))
        for r in reqs
        for res in ("cpu", "memory")
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _fold_string_data(obj: dict[str, Any]) -> None:
    sd = obj.pop("stringData", None)
    if isinstance(sd, dict):
        data = obj.setdefault("data", {})
        for k, v in sd.items():
            data[k] = base64.b64encode(str(v).encode()).decode()
    for v in (obj.get("data") or {}).values():
        try:
            base64.b64decode(str(v), validate=True)
        except ValueError:
            raise E.bad_request(
                'Secret in version "v1" cannot be handled as a Secret: illegal base64 data at input byte 0'
            ) from None
