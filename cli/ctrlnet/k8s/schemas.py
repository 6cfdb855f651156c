"""Schema checks of Kubernetes objects, offline.

Core kinds are checked against the Kubernetes OpenAPI schemas that kubernetes-validate ships
(strict: unknown fields are problems); custom resources against the CRDs copied in
ctrlnet/k8s/crds (openAPIV3Schema, `x-kubernetes-int-or-string` translated, unknown fields are
problems). CEL rules (`x-kubernetes-validations`) are not evaluated offline.

schema_problems() is also what the test cluster's API server (tests/testkit) checks objects with.
"""

from __future__ import annotations

import functools
import re
from importlib import resources
from typing import Any

import yaml

from ctrlnet.config.credentials import credential_kind
from ctrlnet.errors import UserError
from ctrlnet.extras import needs
from ctrlnet.k8s.problem import Problem, ident

DEFAULT_KUBE_VERSION = "1.30"

CRD_FILES = {
    ("kubeflow.org/v1", "PyTorchJob"): "kubeflow.org_pytorchjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "TrainJob"): "trainer.kubeflow.org_trainjobs.yaml",
    ("trainer.kubeflow.org/v1alpha1", "ClusterTrainingRuntime"): "trainer.kubeflow.org_clustertrainingruntimes.yaml",
    ("kueue.x-k8s.io/v1beta1", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
    ("kueue.x-k8s.io/v1beta2", "LocalQueue"): "kueue.x-k8s.io_localqueues.yaml",
    ("kueue.x-k8s.io/v1beta1", "ClusterQueue"): "kueue.x-k8s.io_clusterqueues.yaml",
    ("kueue.x-k8s.io/v1beta2", "ClusterQueue"): "kueue.x-k8s.io_clusterqueues.yaml",
    ("kueue.x-k8s.io/v1beta1", "ResourceFlavor"): "kueue.x-k8s.io_resourceflavors.yaml",
    ("kueue.x-k8s.io/v1beta2", "ResourceFlavor"): "kueue.x-k8s.io_resourceflavors.yaml",
    ("kueue.x-k8s.io/v1beta1", "WorkloadPriorityClass"): "kueue.x-k8s.io_workloadpriorityclasses.yaml",
    ("kueue.x-k8s.io/v1beta2", "WorkloadPriorityClass"): "kueue.x-k8s.io_workloadpriorityclasses.yaml",
}


def check_kube_version(version: str) -> str:
    """`version` as MAJOR.MINOR when kubernetes-validate has schemas for it; else one UserError
    listing the range it has (an unknown version must not silently check against another)."""
    with needs("k8s"):
        from kubernetes_validate import utils as kv
    known = sorted({kv.major_minor(v) for v in kv.all_versions()}, key=_vkey)
    match = re.fullmatch(r"v?(\d+)\.(\d+)(\.\d+)?", version.strip())
    wanted = f"{match.group(1)}.{match.group(2)}" if match else None
    if wanted not in known:
        raise UserError(
            f"--kube-version {version!r} is not supported: give a Kubernetes version from {known[0]} to "
            f"{known[-1]} (the schemas kubernetes-validate ships), e.g. --kube-version {DEFAULT_KUBE_VERSION}"
        )
    return wanted


def schema_problems(obj: dict[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> list[Problem]:
    """Where `obj` breaks its kind's schema (a CRD ctrlnet knows, else the core kind's at `kube_version`)."""
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    who = ident(obj)
    if not api_version or not kind:
        return [Problem(who, "", "apiVersion and kind are required")]
    validator = _crd_validator(api_version, kind)
    if validator is None:
        validator = _core_validator(api_version, kind, kube_version)
    if validator is None:
        return [Problem(who, "", f"no schema for {kind} {api_version}: not a core kind nor a CRD ctrlnet knows")]
    problems = []
    for err in sorted(validator.iter_errors(obj), key=lambda e: list(map(str, e.absolute_path))):
        path = ".".join(str(p) for p in err.absolute_path)
        problems.append(Problem(who, path, _message(err, secret=kind == "Secret")))
    return problems


# --- custom resources ----------------------------------------------------------------------------


def translate(node: Any, strict: bool = True) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> plain JSON Schema; `strict`: unknown fields
    are problems (an API server would prune them instead)."""
    if isinstance(node, list):
        return [translate(n, strict) for n in node]
    if not isinstance(node, dict):
        return node
    out = {
        k: translate(v, strict)
        for k, v in node.items()
        if k != "x-kubernetes-validations" and not (k == "description" and isinstance(v, str))
    }
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **out}
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if strict and "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@functools.cache
def _crd_schema(api_version: str, kind: str) -> dict[str, Any] | None:
    fname = CRD_FILES.get((api_version, kind))
    if fname is None:
        return None
    text = resources.files("ctrlnet.k8s.crds").joinpath(fname).read_text(encoding="utf-8")
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    crd = yaml.load(text, Loader=loader)
    version = api_version.split("/")[1]
    for v in crd["spec"]["versions"]:
        if v["name"] == version:
            schema = translate(v["schema"]["openAPIV3Schema"])
            # metadata is `type: object` in CRDs: the API server checks it as ObjectMeta (below).
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            return schema
    return None


@functools.cache
def _crd_validator(api_version: str, kind: str):
    schema = _crd_schema(api_version, kind)
    if schema is None:
        return None
    with needs("k8s"):
        import jsonschema
    return jsonschema.Draft7Validator(schema)


# --- core kinds ----------------------------------------------------------------------------------


@functools.cache
def _core_validator(api_version: str, kind: str, kube_version: str):
    """A jsonschema validator for a core kind from kubernetes-validate's strict schemas (None: no schema)."""
    with needs("k8s"):
        import jsonschema
        import referencing
        from kubernetes_validate import utils as kv
    versions = [v for v in kv.all_versions() if _vkey(kv.major_minor(v)) <= _vkey(kube_version)]
    if not versions:
        raise UserError(
            f"--kube-version {kube_version}: kubernetes-validate has schemas for {kv.all_versions()[0]} to {kv.latest_version()}"
        )
    schema_dir = f"v{versions[-1]}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv.schema_contents(
            f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group_version}.json", kube_version
        )
    except FileNotFoundError:
        return None
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", kube_version)
    registry = referencing.Registry().with_resources(
        [
            ("", referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT7)),
            (
                "_definitions.json",
                referencing.Resource.from_contents(defs, default_specification=referencing.jsonschema.DRAFT7),
            ),
        ]
    )
    return jsonschema.Draft7Validator(schema, registry=registry)


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:2])


# Fields whose values may be credentials put there by mistake: a schema message never quotes them
# (nor any field of a Secret).
_SENSITIVE_FIELDS = frozenset({"env", "stringData", "binaryData", "annotations", "args", "command"})


def _message(err: Any, secret: bool = False) -> str:
    if err.validator in ("anyOf", "oneOf") and err.context:
        err = min(err.context, key=lambda e: len(e.absolute_path))
    msg = err.message
    value = err.instance
    if isinstance(value, (str, int, float)) and not isinstance(value, bool):
        sensitive = secret or _SENSITIVE_FIELDS.intersection(map(str, err.absolute_path))
        if sensitive or credential_kind(str(value), blobs=True):
            msg = msg.replace(repr(value), "the value (not shown)")
    return msg if len(msg) <= 240 else msg[:237] + "..."
