"""The resource types the loopback API server serves, and the discovery documents ctrlnet reads.

Core (v1) types are listed by hand; custom resources come from the CRD files that ship with
ctrlnet (cli/ctrlnet/k8s/crds), so names, scope, served versions and the status subresource are
the real ones (TrainingRuntime is the ClusterTrainingRuntime CRD made namespaced; JobSet keeps
its names and status subresource with an open schema: see DERIVED). A CRD that is not
"installed" is absent from discovery and its paths answer 404, as on a cluster without it: that is
how `ctrlnet submit` finds a missing operator or Kueue.

Discovery is served only where a client asks: `GET /api/v1` and `GET /apis/<group>/<version>`
(ctrlnet's `Kube.served`); the group lists, /version and short names are not emulated.
"""

from __future__ import annotations

import copy
import functools
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from typing import Any

import yaml

VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]

# install name -> the CRD files that a real install of that component brings
INSTALLS: dict[str, list[str]] = {
    "pytorchjobs": ["kubeflow.org_pytorchjobs.yaml"],
    # Kubeflow Trainer v2.3.0 installs its CRDs and JobSet's (v0.12.0, its chart's dependency).
    "trainjobs": [
        "trainer.kubeflow.org_trainjobs.yaml",
        "trainer.kubeflow.org_clustertrainingruntimes.yaml",
        "trainer.kubeflow.org_trainingruntimes.yaml",
        "jobset.x-k8s.io_jobsets.yaml",
    ],
    "workloads": [
        "kueue.x-k8s.io_workloads.yaml",
        "kueue.x-k8s.io_localqueues.yaml",
        "kueue.x-k8s.io_clusterqueues.yaml",
        "kueue.x-k8s.io_resourceflavors.yaml",
        "kueue.x-k8s.io_workloadpriorityclasses.yaml",
    ],
}
INSTALLS["kueue"] = INSTALLS["workloads"]


@dataclass
class ResourceType:
    group: str
    versions: list[str]
    storage_version: str
    plural: str
    kind: str
    namespaced: bool
    subresources: set[str] = field(default_factory=set)
    crd: dict[str, Any] | None = None  # the CRD document, for its schema
    delete_returns_object: bool = False  # pods and custom resources answer DELETE with the object

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    @property
    def custom(self) -> bool:
        return self.crd is not None

    def api_version(self, version: str | None = None) -> str:
        v = version or self.storage_version
        return f"{self.group}/{v}" if self.group else v

    def version_schema(self, version: str) -> dict[str, Any] | None:
        for v in (self.crd or {"spec": {"versions": []}})["spec"]["versions"]:
            if v["name"] == version:
                return (v.get("schema") or {}).get("openAPIV3Schema")
        return None

    def discovery_entries(self) -> list[dict[str, Any]]:
        base = {"namespaced": self.namespaced, "kind": self.kind}
        out = [{"name": self.plural, "singularName": self.kind.lower(), **base, "verbs": VERBS}]
        for sub in sorted(self.subresources):
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            out.append({"name": f"{self.plural}/{sub}", "singularName": "", **base, "verbs": verbs})
        return out


def _core(plural: str, kind: str, namespaced: bool = True, subs: set[str] = frozenset(), group: str = ""):
    return ResourceType(
        group, ["v1"], "v1", plural, kind, namespaced, set(subs), delete_returns_object=plural == "pods"
    )


def core_types() -> list[ResourceType]:
    return [
        _core("namespaces", "Namespace", namespaced=False, subs={"status"}),
        _core("pods", "Pod", subs={"status", "log"}),
        _core("services", "Service", subs={"status"}),
        _core("configmaps", "ConfigMap"),
        _core("secrets", "Secret"),
        _core("serviceaccounts", "ServiceAccount"),
        _core("events", "Event"),
        _core("persistentvolumeclaims", "PersistentVolumeClaim", subs={"status"}),
        # Built in, in a named group: stored and schema-checked; not enforced (one loopback network).
        _core("networkpolicies", "NetworkPolicy", group="networking.k8s.io"),
    ]


@functools.cache
def _load_crd(fname: str) -> dict[str, Any]:
    if fname in DERIVED:
        return DERIVED[fname]()
    text = importlib_resources.files("ctrlnet.k8s.crds").joinpath(fname).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def _trainingruntimes() -> dict[str, Any]:
    """TrainingRuntime: the ClusterTrainingRuntime CRD's schema (the same Go type's spec), namespaced."""
    crd = copy.deepcopy(_load_crd("trainer.kubeflow.org_clustertrainingruntimes.yaml"))
    crd["metadata"]["name"] = "trainingruntimes.trainer.kubeflow.org"
    crd["spec"]["scope"] = "Namespaced"
    crd["spec"]["names"] = {
        "kind": "TrainingRuntime",
        "listKind": "TrainingRuntimeList",
        "plural": "trainingruntimes",
        "singular": "trainingruntime",
    }
    for v in crd["spec"]["versions"]:
        v["schema"]["openAPIV3Schema"]["description"] = "TrainingRuntime represents a training runtime."
    return crd


def _jobsets() -> dict[str, Any]:
    """JobSet v1alpha2 with its names, scope and status subresource, but an open schema: only the
    stand-ins write JobSets here (the real CRD, 800 kB, is in ../shared/crds)."""
    schema = {"type": "object", "x-kubernetes-preserve-unknown-fields": True}
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": "jobsets.jobset.x-k8s.io"},
        "spec": {
            "group": "jobset.x-k8s.io",
            "names": {"kind": "JobSet", "listKind": "JobSetList", "plural": "jobsets", "singular": "jobset"},
            "scope": "Namespaced",
            "versions": [
                {
                    "name": "v1alpha2",
                    "served": True,
                    "storage": True,
                    "schema": {"openAPIV3Schema": schema},
                    "subresources": {"status": {}},
                }
            ],
        },
    }


DERIVED = {"trainer.kubeflow.org_trainingruntimes.yaml": _trainingruntimes, "jobset.x-k8s.io_jobsets.yaml": _jobsets}


def crd_type(crd: dict[str, Any]) -> ResourceType:
    spec, names = crd["spec"], crd["spec"]["names"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    subs = {"status"} if any("status" in (v.get("subresources") or {}) for v in served) else set()
    return ResourceType(
        group=spec["group"],
        versions=[v["name"] for v in served],
        storage_version=next(v["name"] for v in spec["versions"] if v.get("storage")),
        plural=names["plural"],
        kind=names["kind"],
        namespaced=spec["scope"] == "Namespaced",
        subresources=subs,
        crd=crd,
        delete_returns_object=True,
    )


def installed_types(installed: frozenset[str]) -> list[ResourceType]:
    unknown = set(installed) - set(INSTALLS)
    if unknown:
        raise ValueError(f"unknown install {sorted(unknown)}: choose from {sorted(INSTALLS)}")
    files = dict.fromkeys(f for name in sorted(installed) for f in INSTALLS[name])
    return core_types() + [crd_type(_load_crd(f)) for f in files]


class Catalog:
    """Lookup of served resource types by (group, version, plural), and discovery documents."""

    def __init__(self, types: list[ResourceType]):
        self.types = types
        self._by_path = {(t.group, v, t.plural): t for t in types for v in t.versions}

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, group: str, kind: str) -> ResourceType | None:
        return next((t for t in self.types if (t.group, t.kind) == (group, kind)), None)

    def by_key(self, key: tuple[str, str]) -> ResourceType:
        return next(t for t in self.types if t.key == key)

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        types = sorted((t for t in self.types if t.group == group and version in t.versions), key=lambda t: t.plural)
        if not types:
            return None
        gv = f"{group}/{version}" if group else version
        res = [e for t in types for e in t.discovery_entries()]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}
