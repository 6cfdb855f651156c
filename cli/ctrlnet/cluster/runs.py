"""What makes a ctrlnet run findable on a cluster: its labels, its backend, its pods.

Label scheme (set by the chart on every object it renders, and on the pods):

    app.kubernetes.io/part-of: ctrlnet      this tool's objects (`ctrlnet list` selects on it)
    app.kubernetes.io/instance: <run name>  one run's objects: the job, its ConfigMap,
                                            ServiceAccount, PVC and pods (`delete` selects on it)
    app.kubernetes.io/managed-by: ctrlnet   submitted by `ctrlnet submit` (Helm releases say Helm)

and one annotation on the job and its pods:

    ctrlnet.io/output: <URL>                where the run writes (checkpoints, model, metrics)

The operators add their own pod labels, which find a job's pods with their rank:
PyTorchJob `training.kubeflow.org/job-name`, `.../replica-type`, `.../replica-index`;
TrainJob (through JobSet and its Indexed Job) `jobset.sigs.k8s.io/jobset-name`,
`batch.kubernetes.io/job-completion-index` (the node rank) and `jobset.sigs.k8s.io/restart-attempt`.
"""

from __future__ import annotations

from dataclasses import dataclass

from ctrlnet.cluster.kube import RESOURCES, Kube, Resource
from ctrlnet.config.credentials import shown
from ctrlnet.errors import ClusterError, RunNotFound, UserError

PART_OF = "app.kubernetes.io/part-of"
INSTANCE = "app.kubernetes.io/instance"
MANAGED_BY = "app.kubernetes.io/managed-by"
OUTPUT_ANNOTATION = "ctrlnet.io/output"
TOOL = "ctrlnet"

KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


def tool_selector() -> str:
    return f"{PART_OF}={TOOL}"


def run_selector(name: str) -> str:
    return f"{PART_OF}={TOOL},{INSTANCE}={name}"


@dataclass(frozen=True)
class Backend:
    """How one job kind is read: its resource, its pods' labels, where suspend lives."""

    name: str
    resource: Resource
    pod_job_label: str  # pod label whose value is the job name
    suspend_path: tuple[str, ...]

    def pod_selector(self, job: str) -> str:
        return f"{self.pod_job_label}={job}"

    def suspended(self, job: dict) -> bool:
        node = job
        for key in self.suspend_path:
            node = (node or {}).get(key)
        return bool(node)

    def suspend_patch(self, value: bool) -> dict:
        patch: dict = {}
        node = patch
        for key in self.suspend_path[:-1]:
            node = node.setdefault(key, {})
        node[self.suspend_path[-1]] = value
        return patch


PYTORCHJOB = Backend(
    "pytorchjob", RESOURCES["PyTorchJob"], "training.kubeflow.org/job-name", ("spec", "runPolicy", "suspend")
)
TRAINJOB = Backend("trainjob", RESOURCES["TrainJob"], "jobset.sigs.k8s.io/jobset-name", ("spec", "suspend"))
BACKENDS = {b.name: b for b in (PYTORCHJOB, TRAINJOB)}
BY_KIND = {b.resource.kind: b for b in BACKENDS.values()}


@dataclass
class Run:
    job: dict
    backend: Backend

    @property
    def name(self) -> str:
        return self.job["metadata"]["name"]

    @property
    def namespace(self) -> str:
        return self.job["metadata"]["namespace"]

    @property
    def output(self) -> str | None:
        return (self.job["metadata"].get("annotations") or {}).get(OUTPUT_ANNOTATION)

    @property
    def ours(self) -> bool:
        """Whether ctrlnet submitted it (`ctrlnet submit` or the chart): the labels `list` selects on."""
        return (self.job["metadata"].get("labels") or {}).get(PART_OF) == TOOL

    @property
    def nodes(self) -> int | None:
        """How many nodes (ranks 0..N-1) the job asks for, or None when its spec does not say."""
        spec = self.job.get("spec") or {}
        if self.backend is TRAINJOB:
            n = (spec.get("trainer") or {}).get("numNodes")
            return int(n) if n is not None else None
        replicas = spec.get("pytorchReplicaSpecs") or {}
        if not replicas:
            return None
        return sum(int((r or {}).get("replicas") or 0) for r in replicas.values())


def require_ours(kube: Kube, run: Run, verb: str) -> None:
    """Refuse to change a job ctrlnet did not submit (same name, someone else's)."""
    if not run.ours:
        kind = run.backend.resource.kind
        raise UserError(
            f"{kind} {run.name!r} in namespace {run.namespace} was not submitted by ctrlnet (it has no "
            f"{PART_OF}={TOOL} label): ctrlnet does not {verb} it; use kubectl if you mean to "
            f"(kubectl {verb if verb == 'delete' else 'edit'} {kind.lower()} {run.name} -n {run.namespace})"
        )


def namespace_missing(kube: Kube, namespace: str) -> bool:
    """True only when the API server says the namespace does not exist (a list in a missing
    namespace answers an empty list); False when it exists or may not be read."""
    from ctrlnet.errors import UserError as _UserError

    try:
        return kube.get("Namespace", namespace, namespace) is None
    except _UserError as e:  # 403 (namespaced Roles cannot read Namespaces), or get's own 404 wording
        return "does not exist" in str(e)


COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
RESTART_ATTEMPT = "jobset.sigs.k8s.io/restart-attempt"


def pod_rank(pod: dict) -> tuple[int, str]:
    """(global node rank, short name): master-0 -> (0, "master-0"), worker-2 -> (3, "worker-2");
    a TrainJob's pods (all in the one Indexed Job `node`, so all with JobSet job-index 0) by
    their completion index, which is what Trainer's PET_NODE_RANK reads: node-0, node-1, ..."""
    meta = pod["metadata"]
    labels = meta.get("labels") or {}
    rtype = labels.get("training.kubeflow.org/replica-type")
    if rtype:
        index = int(labels.get("training.kubeflow.org/replica-index", "0"))
        rank = index if rtype == "master" else index + 1
        return rank, f"{rtype}-{index}"
    value = labels.get(COMPLETION_INDEX) or (meta.get("annotations") or {}).get(COMPLETION_INDEX)
    if value is None or not str(value).isdigit():
        value = labels.get("jobset.sigs.k8s.io/job-index", "0")
    index = int(value) if str(value).isdigit() else 0
    return index, f"node-{index}"


def restart_attempt(pod: dict) -> int:
    """The JobSet restart a TrainJob's pod belongs to (0 for the first run; PyTorchJob pods: 0)."""
    value = (pod["metadata"].get("labels") or {}).get(RESTART_ATTEMPT, "0")
    return int(value) if str(value).isdigit() else 0


def find_run(kube: Kube, name: str, namespace: str | None = None) -> Run:
    """The run called `name` in the namespace, whichever backend it was submitted with."""
    ns = namespace or kube.namespace
    served = [b for b in BACKENDS.values() if kube.served(b.resource)]
    if not served:
        raise no_training_operator(kube)
    for backend in served:
        job = kube.get(backend.resource.kind, name, ns)
        if job is not None:
            job.setdefault("kind", backend.resource.kind)
            return Run(job, backend)
    if namespace_missing(kube, ns):
        raise no_such_namespace(kube, ns)
    raise RunNotFound(
        f"no ctrlnet run {shown(name)} in namespace {ns} (context {kube.conn.context}): "
        f"`ctrlnet list -n {ns}` shows the runs there"
    )


def no_such_namespace(kube: Kube, namespace: str) -> UserError:
    return UserError(
        f"namespace {namespace!r} does not exist on the cluster of context {kube.conn.context}: "
        "check -n (kubectl get namespaces lists them)"
    )


def no_training_operator(kube: Kube) -> ClusterError:
    return ClusterError(
        f"neither PyTorchJob (kubeflow.org/v1) nor TrainJob (trainer.kubeflow.org/v1alpha1) is "
        f"installed on the cluster of context {kube.conn.context}: install "
        f"{PYTORCHJOB.resource.installed_by} or {TRAINJOB.resource.installed_by}"
    )
