"""Which job kind a submit creates: `cluster.backend`, with `auto` resolved against the cluster.

Kubeflow's main line is Trainer v2 (TrainJob → JobSet → pods); the Training Operator v1
(PyTorchJob) is legacy. So `auto` (the default) submits a TrainJob where the cluster can run one —
it serves trainer.kubeflow.org/v1alpha1 TrainJobs and has the runtime the job names
(`cluster.trainjob.runtime`, default ctrlnet's `ctrlnet-torch`, manifests/runtime/) — and a
PyTorchJob where it cannot but serves kubeflow.org/v1. A config with a PyTorchJob-only setting is a
PyTorchJob (ClusterConfig.backend_candidates).

The runtime: left at its default and missing, ctrlnet-torch gives way to Trainer's own
`torch-distributed` (installed with Trainer) with a note, as its restart policy differs (any failed
pod fails the job: no retry after a preemption). A runtime the config names that is missing is an
error for an explicit `backend: trainjob`, and for `auto` a reason to use PyTorchJob. When RBAC
does not let the user read ClusterTrainingRuntimes (cluster-scoped: a namespaced Role cannot grant
it; manifests/rbac/runtime-reader.yaml does), the runtime is assumed present and the note says so.
"""

from __future__ import annotations

from ctrlnet.cluster.kube import RESOURCES, Forbidden, Kube
from ctrlnet.config.cluster import with_cluster
from ctrlnet.config.job import JobConfig
from ctrlnet.errors import ClusterError

TRAINER_RUNTIME = "torch-distributed"
"""The runtime Kubeflow Trainer installs: the fallback for ctrlnet's own when that is missing."""
RUNTIME_MANIFEST = "manifests/runtime/ctrlnet-torch.yaml"
KINDS = {"pytorchjob": "PyTorchJob", "trainjob": "TrainJob"}


def choose_backend(kube: Kube, cfg: JobConfig) -> tuple[JobConfig, str | None]:
    """(the config with a concrete backend and runtime, a note for the user or None).
    Raises ClusterError (one line: what is missing, what to install) when none can run."""
    if cfg.cluster.backend != "auto":
        kube.require(RESOURCES[KINDS[cfg.cluster.backend]])
        if cfg.cluster.backend == "pytorchjob":
            return cfg, None
        chosen, note, missing = _runtime(kube, cfg)
        if chosen is None:
            raise ClusterError(f"{missing} (cluster of context {kube.conn.context})")
        return chosen, note
    reasons: list[str] = []
    for backend in cfg.cluster.backend_candidates():
        res = RESOURCES[KINDS[backend]]
        if not kube.served(res):
            reasons.append(f"{res.what} is not served (install {res.installed_by})")
            continue
        if backend == "pytorchjob":
            return with_cluster(cfg, backend=backend), (
                f"backend auto: PyTorchJob, as {reasons[0]}" if reasons else None
            )
        chosen, note, missing = _runtime(kube, cfg)
        if chosen is not None:
            return with_cluster(chosen, backend=backend), note
        reasons.append(missing)
    raise ClusterError(
        f"no training operator can run this job on the cluster of context {kube.conn.context}: " + "; ".join(reasons)
    )


def _runtime(kube: Kube, cfg: JobConfig) -> tuple[JobConfig | None, str | None, str]:
    """(config to submit or None, note, why not) for the TrainJob's runtime."""
    tj = cfg.cluster.trainjob
    kind, name = tj.runtime_kind, tj.runtime
    namespace = cfg.cluster.namespace or kube.namespace
    try:
        present = kube.get(kind, name, namespace) is not None
    except Forbidden:
        return cfg, f"cannot read {kind}s (RBAC): assuming {kind} {name} is installed", ""
    if present:
        return cfg, None, ""
    where = "" if kind == "ClusterTrainingRuntime" else f" in namespace {namespace}"
    missing = f"{kind} {name}{where} is not installed"
    defaulted = "runtime" not in tj.model_fields_set and "runtime_kind" not in tj.model_fields_set
    if defaulted:
        try:
            fallback = kube.get("ClusterTrainingRuntime", TRAINER_RUNTIME) is not None
        except Forbidden:
            fallback = False
        if fallback:
            trainjob = tj.model_copy(update={"runtime": TRAINER_RUNTIME})
            chosen = with_cluster(cfg, trainjob=trainjob)
            note = (
                f"{missing}: using Kubeflow's {TRAINER_RUNTIME}, which fails the job on any pod failure "
                f"(no retry after a preemption); kubectl apply -f {RUNTIME_MANIFEST} gives ctrlnet's restart policy"
            )
            return chosen, note, ""
    return None, None, f"{missing}: kubectl apply -f {RUNTIME_MANIFEST}, or set cluster.trainjob.runtime"
