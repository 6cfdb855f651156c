"""The resource types the loopback API server serves, and its discovery documents.

Core (v1) types are listed by hand; custom resources come from the CRD files that ship with
ctrlnet (cli/ctrlnet/k8s/crds), so names, scope, short names, served versions, subresources and
printer columns are the real ones. A CRD that is not "installed" is simply absent from
discovery and its paths answer 404, as on a cluster without it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from importlib import resources as importlib_resources
from typing import Any

import yaml

CORE_VERBS = ["create", "delete", "deletecollection", "get", "list", "patch", "update", "watch"]

# install name -> the CRD files that a real install of that component brings
INSTALLS: dict[str, list[str]] = {
    "pytorchjobs": ["kubeflow.org_pytorchjobs.yaml"],
    "trainjobs": ["trainer.kubeflow.org_trainjobs.yaml", "trainer.kubeflow.org_clustertrainingruntimes.yaml"],
    "kueue": [
        "kueue.x-k8s.io_workloads.yaml",
        "kueue.x-k8s.io_localqueues.yaml",
        "kueue.x-k8s.io_clusterqueues.yaml",
        "kueue.x-k8s.io_resourceflavors.yaml",
        "kueue.x-k8s.io_workloadpriorityclasses.yaml",
    ],
    "podgroups": [],  # Volcano: no CRD file is shipped, so PodGroup is served without a schema
}
ALIASES = {
    "clustertrainingruntimes": "trainjobs",
    "workloads": "kueue",
    "localqueues": "kueue",
    "clusterqueues": "kueue",
    "resourceflavors": "kueue",
    "workloadpriorityclasses": "kueue",
    "volcano": "podgroups",
}


@dataclass
class ResourceType:
    group: str
    versions: list[str]
    storage_version: str
    plural: str
    singular: str
    kind: str
    namespaced: bool
    short_names: list[str] = field(default_factory=list)
    categories: list[str] = field(default_factory=list)
    subresources: set[str] = field(default_factory=set)
    crd: dict[str, Any] | None = None  # the CRD document, for schemas and printer columns
    custom: bool = False  # a custom resource (CRD-backed or schemaless)
    delete_returns_object: bool = False  # pods and custom resources answer DELETE with the object
    verbs: list[str] = field(default_factory=lambda: list(CORE_VERBS))

    @property
    def key(self) -> tuple[str, str]:
        return (self.group, self.plural)

    def api_version(self, version: str | None = None) -> str:
        v = version or self.storage_version
        return f"{self.group}/{v}" if self.group else v

    @property
    def list_kind(self) -> str:
        return self.kind + "List"

    def version_schema(self, version: str) -> dict[str, Any] | None:
        if self.crd is None:
            return None
        for v in self.crd["spec"]["versions"]:
            if v["name"] == version:
                return (v.get("schema") or {}).get("openAPIV3Schema")
        return None

    def printer_columns(self, version: str) -> list[dict[str, Any]]:
        if self.crd is None:
            return []
        for v in self.crd["spec"]["versions"]:
            if v["name"] == version:
                return v.get("additionalPrinterColumns") or []
        return []

    def discovery_entries(self, version: str) -> list[dict[str, Any]]:
        entry: dict[str, Any] = {
            "name": self.plural,
            "singularName": self.singular,
            "namespaced": self.namespaced,
            "kind": self.kind,
            "verbs": self.verbs,
        }
        if self.short_names:
            entry["shortNames"] = self.short_names
        if self.categories:
            entry["categories"] = self.categories
        out = [entry]
        for sub in sorted(self.subresources):
            verbs = ["get"] if sub == "log" else ["get", "patch", "update"]
            out.append(
                {
                    "name": f"{self.plural}/{sub}",
                    "singularName": "",
                    "namespaced": self.namespaced,
                    "kind": self.kind if sub != "log" else "Pod",
                    "verbs": verbs,
                }
            )
        return out


def _core(
    plural: str,
    kind: str,
    namespaced: bool = True,
    short: list[str] | None = None,
    subs: set[str] | None = None,
    categories: list[str] | None = None,
    returns_object: bool = False,
    group: str = "",
) -> ResourceType:
    return ResourceType(
        group=group,
        versions=["v1"],
        storage_version="v1",
        plural=plural,
        singular=kind.lower(),
        kind=kind,
        namespaced=namespaced,
        short_names=short or [],
        categories=categories or [],
        subresources=subs or set(),
        delete_returns_object=returns_object,
    )


def core_types() -> list[ResourceType]:
    return [
        _core("namespaces", "Namespace", namespaced=False, short=["ns"], subs={"status"}),
        _core("nodes", "Node", namespaced=False, short=["no"], subs={"status"}),
        _core("pods", "Pod", short=["po"], subs={"status", "log"}, categories=["all"], returns_object=True),
        _core("services", "Service", short=["svc"], subs={"status"}, categories=["all"], returns_object=True),
        _core("configmaps", "ConfigMap", short=["cm"]),
        _core("secrets", "Secret"),
        _core("serviceaccounts", "ServiceAccount", short=["sa"]),
        _core("events", "Event", short=["ev"]),
        _core("persistentvolumeclaims", "PersistentVolumeClaim", short=["pvc"], subs={"status"}),
        # Built in, in a named group: stored and schema-checked like the core kinds; not enforced
        # (the pods share the loopback interface).
        _core("networkpolicies", "NetworkPolicy", short=["netpol"], group="networking.k8s.io"),
    ]


@functools.cache
def _load_crd(fname: str) -> dict[str, Any]:
    text = importlib_resources.files("ctrlnet.k8s.crds").joinpath(fname).read_text(encoding="utf-8")
    return yaml.load(text, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))


def crd_type(crd: dict[str, Any]) -> ResourceType:
    spec = crd["spec"]
    names = spec["names"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    storage = next(v["name"] for v in spec["versions"] if v.get("storage"))
    subs: set[str] = set()
    for v in served:
        subs |= set((v.get("subresources") or {}).keys()) & {"status"}
    return ResourceType(
        group=spec["group"],
        versions=[v["name"] for v in served],
        storage_version=storage,
        plural=names["plural"],
        singular=names.get("singular", names["kind"].lower()),
        kind=names["kind"],
        namespaced=spec["scope"] == "Namespaced",
        short_names=names.get("shortNames") or [],
        categories=names.get("categories") or [],
        subresources=subs,
        crd=crd,
        custom=True,
        delete_returns_object=True,
    )


def podgroup_type() -> ResourceType:
    return ResourceType(
        group="scheduling.volcano.sh",
        versions=["v1beta1"],
        storage_version="v1beta1",
        plural="podgroups",
        singular="podgroup",
        kind="PodGroup",
        namespaced=True,
        short_names=["pg", "podgroup-v1beta1"],
        subresources={"status"},
        custom=True,
        delete_returns_object=True,
    )


def installed_types(installed: set[str] | frozenset[str]) -> list[ResourceType]:
    out = core_types()
    names = set()
    for name in installed:
        canonical = ALIASES.get(name, name)
        if canonical not in INSTALLS:
            raise ValueError(f"unknown install {name!r}: choose from {sorted(set(INSTALLS) | set(ALIASES))}")
        names.add(canonical)
    for name in sorted(names):
        for fname in INSTALLS[name]:
            out.append(crd_type(_load_crd(fname)))
        if name == "podgroups":
            out.append(podgroup_type())
    return out


class Catalog:
    """Lookup of served resource types by (group, version, plural) and discovery documents."""

    def __init__(self, types: list[ResourceType], server_address: str, kube_version: str):
        self.types = types
        self.server_address = server_address
        self.kube_version = kube_version
        self._by_path = {(t.group, v, t.plural): t for t in types for v in t.versions}
        self._by_kind = {(t.group, t.kind): t for t in types}

    def lookup(self, group: str, version: str, plural: str) -> ResourceType | None:
        return self._by_path.get((group, version, plural))

    def by_kind(self, group: str, kind: str) -> ResourceType | None:
        return self._by_kind.get((group, kind))

    def by_key(self, key: tuple[str, str]) -> ResourceType:
        return next(t for t in self.types if t.key == key)

    def has_group(self, group: str) -> bool:
        return any(t.group == group for t in self.types)

    # --- discovery -----------------------------------------------------------------------------

    def api_versions(self) -> dict[str, Any]:
        return {
            "kind": "APIVersions",
            "versions": ["v1"],
            "serverAddressByClientCIDRs": [{"clientCIDR": "0.0.0.0/0", "serverAddress": self.server_address}],
        }

    def _groups(self) -> dict[str, list[str]]:
        groups: dict[str, list[str]] = {}
        for t in self.types:
            if t.group:
                vs = groups.setdefault(t.group, [])
                for v in t.versions:
                    if v not in vs:
                        vs.append(v)
        return groups

    def _preferred(self, group: str, versions: list[str]) -> str:
        storage = {t.storage_version for t in self.types if t.group == group}
        return next((v for v in versions if v in storage), versions[0])

    def api_group(self, group: str) -> dict[str, Any] | None:
        versions = self._groups().get(group)
        if not versions:
            return None
        pref = self._preferred(group, versions)
        return {
            "kind": "APIGroup",
            "apiVersion": "v1",
            "name": group,
            "versions": [{"groupVersion": f"{group}/{v}", "version": v} for v in versions],
            "preferredVersion": {"groupVersion": f"{group}/{pref}", "version": pref},
        }

    def api_group_list(self) -> dict[str, Any]:
        groups = []
        for g in sorted(self._groups()):
            doc = self.api_group(g)
            assert doc is not None
            doc = {k: v for k, v in doc.items() if k not in ("kind", "apiVersion")}
            groups.append(doc)
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": groups}

    def resource_list(self, group: str, version: str) -> dict[str, Any] | None:
        types = [t for t in self.types if t.group == group and version in t.versions]
        if not types:
            return None
        gv = f"{group}/{version}" if group else version
        res = [e for t in sorted(types, key=lambda t: t.plural) for e in t.discovery_entries(version)]
        return {"kind": "APIResourceList", "apiVersion": "v1", "groupVersion": gv, "resources": res}

    def version(self) -> dict[str, Any]:
        major, minor = self.kube_version.split(".")[:2]
        return {
            "major": major,
            "minor": minor,
            "gitVersion": f"v{major}.{minor}.0",
            "gitCommit": "loopback",
            "gitTreeState": "clean",
            "buildDate": "2024-01-01T00:00:00Z",
            "goVersion": "go1.22.0",
            "compiler": "gc",
            "platform": "linux/amd64",
        }
