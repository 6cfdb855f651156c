"""Views of a training job object that the rules read: its replicas, pod templates, mounts, args.

A PyTorchJob has one pod template per replica type (Master, Worker); a TrainJob has one, split
between `spec.trainer` (image, command, env, resources) and the runtime patch of its `node`
replicated job (the rest of the pod). PodSite puts either into one shape.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from ctrlnet.k8s.problem import dig

JOB_KINDS = ("PyTorchJob", "TrainJob")


@dataclass(frozen=True)
class PodSite:
    """One pod template of a job, wherever it lives in the object."""

    path: str
    spec: dict[str, Any]
    container: dict[str, Any] | None
    """The trainer container (None: the job has none that ctrlnet can find)."""
    env: list[dict[str, Any]]
    resources: dict[str, Any]
    args: list[str]
    procs: int | None
    """Processes per node the job declares (nprocPerNode / numProcPerNode), when it is a number."""


@dataclass(frozen=True)
class Replica:
    """One entry of a PyTorchJob's spec.pytorchReplicaSpecs."""

    type: str
    spec: dict[str, Any]
    job: dict[str, Any]

    @property
    def path(self) -> str:
        return f"spec.pytorchReplicaSpecs.{self.type}"

    @property
    def pod(self) -> dict[str, Any]:
        return dig(self.spec, "template", "spec", default={}) or {}

    @property
    def main(self) -> dict[str, Any] | None:
        """The container named pytorch: the one the Training Operator watches."""
        return next((c for c in self.pod.get("containers") or [] if c.get("name") == "pytorch"), None)


# --- PyTorchJob ----------------------------------------------------------------------------------


def replica_specs(job: dict[str, Any]) -> dict[str, Any]:
    return dig(job, "spec", "pytorchReplicaSpecs", default={}) or {}


def replicas(job: dict[str, Any]) -> list[Replica]:
    return [Replica(rtype, rs, job) for rtype, rs in replica_specs(job).items() if isinstance(rs, dict)]


def total_pods(job: dict[str, Any]) -> int:
    return sum(int(s.get("replicas") or 0) for s in replica_specs(job).values() if isinstance(s, dict))


def run_policy(job: dict[str, Any]) -> dict[str, Any]:
    return dig(job, "spec", "runPolicy", default={}) or {}


def _pytorch_procs(job: dict[str, Any]) -> int | None:
    field = dig(job, "spec", "nprocPerNode")
    return int(field) if str(field).isdigit() else None


def _replica_site(r: Replica) -> PodSite:
    main = r.main or {}
    return PodSite(
        f"{r.path}.template.spec",
        r.pod,
        r.main,
        main.get("env") or [],
        main.get("resources") or {},
        [str(a) for a in main.get("args") or []],
        _pytorch_procs(r.job),
    )


# --- TrainJob ------------------------------------------------------------------------------------


def trainer(job: dict[str, Any]) -> dict[str, Any]:
    return dig(job, "spec", "trainer", default={}) or {}


def patched_pods(job: dict[str, Any]) -> Iterator[tuple[int, int, dict[str, Any], dict[str, Any]]]:
    """(patch index, replicated job index, replicated job, its pod spec) for every runtime patch."""
    for pi, patch in enumerate(dig(job, "spec", "runtimePatches", default=[]) or []):
        for ji, rj in enumerate(
            dig(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", default=[]) or []
        ):
            yield pi, ji, rj, dig(rj, "template", "spec", "template", "spec", default={}) or {}


def node_pod(job: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """The `node` replicated job's pod and trainer container, merged over every patch."""
    pod: dict[str, Any] = {}
    container: dict[str, Any] = {}
    for _, _, rj, p in patched_pods(job):
        if rj.get("name") == "node":
            pod = {**pod, **p}
            for c in p.get("containers") or []:
                container = {**container, **c}
    return pod, container


def _trainjob_site(job: dict[str, Any]) -> PodSite:
    t = trainer(job)
    pod, container = node_pod(job)
    procs = t.get("numProcPerNode")
    return PodSite(
        "spec.trainer",
        pod,
        container or None,
        t.get("env") or [],
        t.get("resourcesPerNode") or {},
        [str(a) for a in t.get("args") or []],
        int(procs) if procs is not None else None,
    )


# --- both ----------------------------------------------------------------------------------------


def pod_sites(job: dict[str, Any]) -> list[PodSite]:
    """Every pod template of a PyTorchJob or TrainJob."""
    if job.get("kind") == "PyTorchJob":
        return [_replica_site(r) for r in replicas(job)]
    if job.get("kind") == "TrainJob":
        return [_trainjob_site(job)]
    return []


def pod_templates(job: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(field path, pod template: metadata and spec) of every pod template of a job (a TrainJob:
    its runtime patches of the `node` replicated job)."""
    if job.get("kind") == "PyTorchJob":
        return [(f"{r.path}.template", r.spec.get("template") or {}) for r in replicas(job)]
    if job.get("kind") == "TrainJob":
        return [
            (f"spec.runtimePatches[{pi}]...replicatedJobs[{ji}].template.spec.template", tpl)
            for pi, ji, rj, _ in patched_pods(job)
            if rj.get("name") == "node" and isinstance(tpl := dig(rj, "template", "spec", "template"), dict)
        ]
    return []


def mounted_configmaps(job: dict[str, Any]) -> list[str]:
    """Names of the ConfigMaps the job's pods mount as volumes."""
    if job.get("kind") == "PyTorchJob":
        pods = [r.pod for r in replicas(job)]
    else:
        pods = [p for _, _, _, p in patched_pods(job)]
    return [v["configMap"]["name"] for p in pods for v in p.get("volumes") or [] if dig(v, "configMap", "name")]


def arg(args: list[str], flag: str) -> str | None:
    """The value of `--flag=value` or `--flag value` in a command line."""
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def gpu_counts(resources: dict[str, Any], which: str) -> dict[str, int]:
    """GPU-like extended resources (`*/gpu`) in resources[which] (limits or requests)."""
    return {k: int(str(v)) for k, v in (resources.get(which) or {}).items() if k.endswith("/gpu") and str(v).isdigit()}


def walk_env(node: Any, path: str = "") -> Iterator[tuple[str, dict[str, Any]]]:
    """(field path, entry) of every env entry anywhere in an object (containers, patches, ...)."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}" if path else str(k)
            if k == "env" and isinstance(v, list):
                for i, e in enumerate(v):
                    if isinstance(e, dict):
                        yield f"{sub}[{i}]", e
            else:
                yield from walk_env(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from walk_env(v, f"{path}[{i}]")
