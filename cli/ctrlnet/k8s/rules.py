"""The rules no schema encodes: what Training Operator v1.9's webhook (pytorchjob_webhook.go),
Kubeflow Trainer or nobody checks, and ctrlnet needs for a job that trains, restarts and resumes.

Each rule is a small function that yields (field path, message) for what it finds; RULES says
which rules look at what, and rule_problems() applies them and names the object.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from typing import Any, get_args

import yaml

from ctrlnet.config.cluster import DNS1035, RESERVED_ENV, ClusterConfig, looks_secret
from ctrlnet.config.contract import CONFIG_DIR, CONFIG_FILE
from ctrlnet.config.loading import validate as validate_model
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet.k8s.jobs import (
    JOB_KINDS,
    PodSite,
    Replica,
    arg,
    gpu_counts,
    mounted_configmaps,
    node_pod,
    patched_pods,
    pod_sites,
    replica_specs,
    replicas,
    run_policy,
    total_pods,
    trainer,
    walk_env,
)
from ctrlnet.k8s.problem import Problem, dig, ident

Finding = tuple[str, str]
"""(field path, message): what a rule yields; rule_problems() adds the object's name."""

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
# The values the chart may render are the config model's; a hand-edited manifest may hold others.
RESTART_POLICIES = get_args(ClusterConfig.model_fields["restart_policy"].annotation)
CLEAN_POD_POLICIES = get_args(ClusterConfig.model_fields["clean_pod_policy"].annotation)
KUEUE_QUEUE_LABEL = "kueue.x-k8s.io/queue-name"


# --- every object --------------------------------------------------------------------------------


def object_name(obj: dict[str, Any]) -> Iterator[Finding]:
    """Jobs need DNS-1035 names (their pods and Services derive from them); other objects DNS-1123."""
    name = str(dig(obj, "metadata", "name", default=""))
    if obj.get("kind") in JOB_KINDS:
        if not DNS1035.match(name) or len(name) > 63:
            yield (
                "metadata.name",
                f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter, at most 63): rename the job",
            )
    elif name and not DNS1123_SUBDOMAIN.match(name):
        yield "metadata.name", f"{name!r} is not a DNS-1123 name (lowercase letters, digits, '-', '.')"


def label_values(obj: dict[str, Any]) -> Iterator[Finding]:
    """Label values the API server accepts."""
    for k, v in (dig(obj, "metadata", "labels", default={}) or {}).items():
        if not LABEL_VALUE.match(str(v)) or len(str(v)) > 63:
            yield (
                f"metadata.labels.{k}",
                f"{v!r} is not a valid label value (at most 63 characters: letters, digits, '-', '_', '.')",
            )


def credentials_by_reference(obj: dict[str, Any]) -> Iterator[Finding]:
    """Credentials by secretKeyRef only, and every reference names its Secret and key."""
    for path, e in walk_env(obj):
        name = str(e.get("name", ""))
        if "value" in e and looks_secret(name):
            yield (
                path,
                f"{name} has an inline value: credentials must come from a Secret (valueFrom.secretKeyRef), never a literal",
            )
        for ref_kind in ("secretKeyRef", "configMapKeyRef"):
            ref = dig(e, "valueFrom", ref_kind)
            if ref is not None and (not ref.get("name") or not ref.get("key")):
                yield f"{path}.valueFrom.{ref_kind}", f"{name}: name the Secret and its key"


def no_secret_objects(obj: dict[str, Any]) -> Iterator[Finding]:
    """A Secret object in manifests puts credentials in the repository."""
    yield (
        "",
        "a Secret in the manifests puts credentials in the repository: create it out of band and reference it by name",
    )


def queued_jobs_start_suspended(job: dict[str, Any]) -> Iterator[Finding]:
    """A job queued in Kueue is created suspended, so no pod starts before admission."""
    if not (dig(job, "metadata", "labels", default={}) or {}).get(KUEUE_QUEUE_LABEL):
        return
    if job.get("kind") == "PyTorchJob" and run_policy(job).get("suspend") is not True:
        yield (
            "spec.runPolicy.suspend",
            "queued in Kueue but not created suspended: set suspend: true so no pod starts before admission",
        )
    elif job.get("kind") == "TrainJob" and dig(job, "spec", "suspend") is not True:
        yield (
            "spec.suspend",
            "queued in Kueue but not created suspended: set suspend: true so no pod starts before admission",
        )


# --- ConfigMap -----------------------------------------------------------------------------------


def _train_config(cm: dict[str, Any]) -> tuple[TrainConfig | None, str | None]:
    """ctrlnet's ConfigMap's config.yaml as the trainer loads it: (config, None) or (None, why not).
    (None, None) when the ConfigMap is not ctrlnet's, or its data is not text (a schema problem)."""
    data = dig(cm, "data", default={}) or {}
    if not isinstance(data, dict) or not isinstance(data.get(CONFIG_FILE), str):
        return None, None
    try:
        parsed = yaml.safe_load(data[CONFIG_FILE]) or {}
    except yaml.YAMLError:
        return None, "is not valid YAML"
    if not isinstance(parsed, dict):
        return None, "must be a mapping (the train section)"
    try:
        return validate_model(TrainConfig, parsed), None
    except UserError as e:
        return None, f"the trainer would reject it: {str(e).removeprefix('invalid config: ')}"


def trainer_config_loads(cm: dict[str, Any]) -> Iterator[Finding]:
    """The config.yaml the trainer reads loads with its TrainConfig (e.g. resolution a multiple of 8)."""
    _, why = _train_config(cm)
    if why:
        yield f"data.{CONFIG_FILE}", why


def restarted_pods_resume(cm: dict[str, Any]) -> Iterator[Finding]:
    """checkpoint.resume is set: a restarted pod (preemption, node loss) finds its own run.json
    and refuses to overwrite it unless it resumes."""
    train, _ = _train_config(cm)
    if train is not None and train.checkpoint.resume is None:
        yield (
            f"data.{CONFIG_FILE}",
            "train.checkpoint.resume is unset: a restarted pod would refuse its own output; set it to latest",
        )


# --- PyTorchJob ----------------------------------------------------------------------------------


def replica_types(job: dict[str, Any]) -> Iterator[Finding]:
    """Only Master and Worker replicas."""
    for rtype in replica_specs(job):
        if rtype not in ("Master", "Worker"):
            yield f"spec.pytorchReplicaSpecs.{rtype}", "unknown replica type: use Master and Worker"


def one_master(job: dict[str, Any]) -> Iterator[Finding]:
    """Exactly one Master pod: it runs rank 0 and the rendezvous."""
    master = replica_specs(job).get("Master")
    if master is None:
        yield "spec.pytorchReplicaSpecs", "no Master: one Master (replicas 1) runs rank 0 and the rendezvous"
    elif master.get("replicas") != 1:
        yield (
            "spec.pytorchReplicaSpecs.Master.replicas",
            f"is {master.get('replicas')}: Master replicas must be 1 (more nodes go in Worker)",
        )


def no_empty_worker(job: dict[str, Any]) -> Iterator[Finding]:
    """A single-node job omits Worker rather than giving it 0 replicas."""
    worker = replica_specs(job).get("Worker")
    if worker is not None and (worker.get("replicas") is None or int(worker.get("replicas")) < 1):
        yield (
            "spec.pytorchReplicaSpecs.Worker.replicas",
            f"is {worker.get('replicas')}: omit Worker for a single node instead of replicas 0",
        )


def no_elastic_policy(job: dict[str, Any]) -> Iterator[Finding]:
    """ctrlnet's launcher runs a fixed-size (static rendezvous) job."""
    if dig(job, "spec", "elasticPolicy") is not None:
        yield "spec.elasticPolicy", "elastic training is not supported by ctrlnet's launcher: remove it"


def clean_pod_policy(job: dict[str, Any]) -> Iterator[Finding]:
    """runPolicy.cleanPodPolicy is one the Training Operator knows."""
    value = run_policy(job).get("cleanPodPolicy")
    if value not in (None, *CLEAN_POD_POLICIES):
        yield "spec.runPolicy.cleanPodPolicy", f"{value!r}: use one of {', '.join(CLEAN_POD_POLICIES)}"


def gang_fits(job: dict[str, Any]) -> Iterator[Finding]:
    """A Volcano gang (minAvailable) no larger than the job."""
    sched = run_policy(job).get("schedulingPolicy") or {}
    total = total_pods(job)
    if sched.get("minAvailable") is not None and total and int(sched["minAvailable"]) > total:
        yield (
            "spec.runPolicy.schedulingPolicy.minAvailable",
            f"{sched['minAvailable']} > {total} pods: the gang can never be scheduled",
        )


def nproc_per_node_is_a_number(job: dict[str, Any]) -> Iterator[Finding]:
    """spec.nprocPerNode gives the number of processes (one per GPU), not auto/gpu/cpu."""
    field = dig(job, "spec", "nprocPerNode")
    if field is not None and not str(field).isdigit():
        yield "spec.nprocPerNode", f"{field!r}: give the number of processes per node (one per GPU)"


# --- each PyTorchJob replica ---------------------------------------------------------------------


def restart_policy(r: Replica) -> Iterator[Finding]:
    """The replica's restartPolicy is one the Training Operator knows."""
    value = r.spec.get("restartPolicy")
    if value not in (None, *RESTART_POLICIES):
        yield f"{r.path}.restartPolicy", f"{value!r}: use one of {', '.join(RESTART_POLICIES)}"


def container_named_pytorch(r: Replica) -> Iterator[Finding]:
    """The Training Operator requires a container named pytorch and reads its exit code."""
    if r.main is None:
        yield (
            f"{r.path}.template.spec.containers",
            "no container named pytorch: the Training Operator requires that name (and reads its exit code)",
        )


def containers_have_images(r: Replica) -> Iterator[Finding]:
    """Every container names its image."""
    for i, c in enumerate(r.pod.get("containers") or []):
        if not c.get("image"):
            yield f"{r.path}.template.spec.containers[{i}].image", "is required"


def volcano_scheduler(r: Replica) -> Iterator[Finding]:
    """A Volcano queue needs pods scheduled by volcano."""
    if (run_policy(r.job).get("schedulingPolicy") or {}).get("queue") and r.pod.get("schedulerName") != "volcano":
        yield (
            f"{r.path}.template.spec.schedulerName",
            "Volcano queue set but pods are not scheduled by volcano: set schedulerName: volcano",
        )


def nnodes_matches_pods(r: Replica) -> Iterator[Finding]:
    """torchrun's --nnodes is the job's number of pods."""
    if r.main is None:
        return
    args = [str(a) for a in (r.main.get("args") or [])] + [str(a) for a in (r.main.get("command") or [])]
    nn = arg(args, "--nnodes")
    total = total_pods(r.job)
    if nn is not None and nn.isdigit() and total and int(nn) != total:
        yield f"{r.path}.template.spec.containers.args", f"--nnodes={nn} but the job has {total} pods"


def master_port_named(r: Replica) -> Iterator[Finding]:
    """The Master's container has the port named pytorchjob-port: the operator derives MASTER_PORT from it."""
    if (
        r.type == "Master"
        and r.main is not None
        and not any(p.get("name") == "pytorchjob-port" for p in r.main.get("ports") or [])
    ):
        yield (
            f"{r.path}.template.spec.containers.ports",
            "no port named pytorchjob-port: the operator derives MASTER_PORT from it",
        )


def pull_secrets_named(r: Replica) -> Iterator[Finding]:
    """Every imagePullSecrets entry names its Secret."""
    for i, s in enumerate(r.pod.get("imagePullSecrets") or []):
        if not s.get("name"):
            yield f"{r.path}.template.spec.imagePullSecrets[{i}]", "name the pull Secret"


# --- TrainJob ------------------------------------------------------------------------------------


def runtime_named(job: dict[str, Any]) -> Iterator[Finding]:
    """A TrainJob references its (Cluster)TrainingRuntime by name."""
    if not dig(job, "spec", "runtimeRef", "name"):
        yield "spec.runtimeRef.name", "name the (Cluster)TrainingRuntime, e.g. torch-distributed"


def trainer_image(job: dict[str, Any]) -> Iterator[Finding]:
    """spec.trainer names the image."""
    if not trainer(job).get("image"):
        yield "spec.trainer.image", "is required"


def nnodes_matches_num_nodes(job: dict[str, Any]) -> Iterator[Finding]:
    """torchrun's --nnodes is the TrainJob's numNodes."""
    t = trainer(job)
    nn = arg([str(a) for a in t.get("args") or []], "--nnodes")
    nodes = t.get("numNodes")
    if nn is not None and nodes is not None and nn.isdigit() and int(nn) != int(nodes):
        yield "spec.trainer.args", f"--nnodes={nn} but numNodes is {nodes}"


def no_env_in_runtime_patches(job: dict[str, Any]) -> Iterator[Finding]:
    """The trainer container's env goes in spec.trainer.env: Trainer rejects it in runtimePatches."""
    for pi, ji, rj, pod in patched_pods(job):
        if rj.get("name") == "node":
            for c in pod.get("containers") or []:
                if c.get("env"):
                    yield (
                        f"spec.runtimePatches[{pi}]...replicatedJobs[{ji}].containers.env",
                        "env of the trainer container goes in spec.trainer.env (Trainer rejects it in runtimePatches)",
                    )


def node_container_patched(job: dict[str, Any]) -> Iterator[Finding]:
    """A runtime patch of the node container mounts the trainer config and /dev/shm."""
    _, container = node_pod(job)
    if not container:
        yield "spec.runtimePatches", "no patch of the node container: the trainer config and /dev/shm are not mounted"


# --- each pod template of a job ------------------------------------------------------------------


def no_reserved_env(pod: PodSite) -> Iterator[Finding]:
    """PET_* and the rendezvous variables are injected by the Training Operator / Trainer."""
    for i, e in enumerate(pod.env):
        name = str(e.get("name", ""))
        if name in RESERVED_ENV:
            yield f"{pod.path}.env[{i}]", f"{name} is injected by the Training Operator / Trainer: do not set it"


def gpu_request_equals_limit(pod: PodSite) -> Iterator[Finding]:
    """Extended resources (GPUs) need request = limit."""
    limits = gpu_counts(pod.resources, "limits")
    for k, n in gpu_counts(pod.resources, "requests").items():
        if limits.get(k) != n:
            yield (
                f"{pod.path}.resources",
                f"{k} request {n} != limit {limits.get(k)}: extended resources need request = limit",
            )


def one_process_per_gpu(pod: PodSite) -> Iterator[Finding]:
    """--nproc-per-node = the job's processes per node = the GPU limit."""
    nproc = arg(pod.args, "--nproc-per-node") or arg(pod.args, "--nproc_per_node")
    expected = pod.procs if pod.procs is not None else (int(nproc) if nproc and nproc.isdigit() else None)
    if nproc is None and pod.container is not None:
        yield f"{pod.path}.args", "no --nproc-per-node: pass one process per GPU"
    elif nproc is not None and nproc.isdigit() and expected is not None and int(nproc) != expected:
        yield f"{pod.path}.args", f"--nproc-per-node={nproc} but the job says {expected} processes per node"
    total_gpus = sum(gpu_counts(pod.resources, "limits").values())
    if expected is not None and total_gpus and total_gpus != expected:
        yield (
            f"{pod.path}.resources.limits",
            f"GPU limit {total_gpus} != {expected} processes per node: set one process per GPU",
        )


def _mounts(pod: PodSite) -> list[dict[str, Any]]:
    return (pod.container or {}).get("volumeMounts") or []


def dev_shm_in_memory(pod: PodSite) -> Iterator[Finding]:
    """/dev/shm is a memory emptyDir with a sizeLimit (the default 64Mi breaks NCCL and DataLoader workers)."""
    if pod.container is None:
        return
    shm = next((m for m in _mounts(pod) if m.get("mountPath") == "/dev/shm"), None)
    if shm is None:
        yield (
            f"{pod.path}.containers",
            "no /dev/shm mount: mount an emptyDir with medium Memory (the default 64Mi shm breaks NCCL and DataLoader workers)",
        )
        return
    volumes = {v.get("name"): v for v in pod.spec.get("volumes") or []}
    ed = dig(volumes.get(shm.get("name")), "emptyDir")
    if not ed or ed.get("medium") != "Memory" or not ed.get("sizeLimit"):
        yield f"{pod.path}.volumes", "/dev/shm must be an emptyDir with medium: Memory and a sizeLimit"


def config_mounted(pod: PodSite) -> Iterator[Finding]:
    """The trainer's config is mounted where the launcher's --config points."""
    if pod.container is not None and not any(m.get("mountPath") == CONFIG_DIR for m in _mounts(pod)):
        yield f"{pod.path}.containers", f"the trainer config is not mounted at {CONFIG_DIR}"


def _security_contexts(pod: PodSite) -> tuple[dict[str, Any], dict[str, Any]]:
    return pod.spec.get("securityContext") or {}, (pod.container or {}).get("securityContext") or {}


def runs_as_non_root(pod: PodSite) -> Iterator[Finding]:
    """runAsNonRoot is set, on the pod or the container."""
    pod_sc, c_sc = _security_contexts(pod)
    if not (pod_sc.get("runAsNonRoot") or c_sc.get("runAsNonRoot")):
        yield f"{pod.path}.securityContext", "runAsNonRoot is not set: the trainer must run as a non-root user"


def uid_is_not_root(pod: PodSite) -> Iterator[Finding]:
    """runAsUser is not 0."""
    pod_sc, c_sc = _security_contexts(pod)
    if pod_sc.get("runAsUser") == 0 or c_sc.get("runAsUser") == 0:
        yield f"{pod.path}.securityContext.runAsUser", "0 is root: run as a non-root uid"


def unprivileged(pod: PodSite) -> Iterator[Finding]:
    """No privileged container, no privilege escalation."""
    _, c_sc = _security_contexts(pod)
    if c_sc.get("privileged") or c_sc.get("allowPrivilegeEscalation", False):
        yield (
            f"{pod.path}.containers.securityContext",
            "privileged / allowPrivilegeEscalation: the trainer needs neither",
        )


def grace_period_fits_a_checkpoint(pod: PodSite) -> Iterator[Finding]:
    """terminationGracePeriodSeconds leaves time to finish a step and checkpoint after SIGTERM."""
    grace = pod.spec.get("terminationGracePeriodSeconds")
    if grace is not None and int(grace) < 30:
        yield (
            f"{pod.path}.terminationGracePeriodSeconds",
            f"{grace}s is too short to finish a step and checkpoint after SIGTERM: use at least 30 (default 600)",
        )


# --- across objects ------------------------------------------------------------------------------


def mounted_configmaps_present(job: dict[str, Any], objs: list[dict[str, Any]]) -> Iterator[Finding]:
    """Every ConfigMap a job's pods mount is among the objects checked."""
    have = {(o.get("metadata") or {}).get("name") for o in objs if o.get("kind") == "ConfigMap"}
    for name in mounted_configmaps(job):
        if name not in have:
            yield "volumes", f"mounts ConfigMap {name}, which is not among the rendered objects"


# --- which rules look at what --------------------------------------------------------------------

Rule = Callable[..., Iterator[Finding]]
RULES: dict[str, list[Rule]] = {
    # Keys: "*" (every object) or a kind: rule(obj). In the order they report.
    "*": [object_name, label_values, credentials_by_reference],
    "Secret": [no_secret_objects],
    "ConfigMap": [trainer_config_loads, restarted_pods_resume],
    "PyTorchJob": [
        replica_types,
        one_master,
        no_empty_worker,
        no_elastic_policy,
        clean_pod_policy,
        queued_jobs_start_suspended,
        gang_fits,
        nproc_per_node_is_a_number,
    ],
    "TrainJob": [
        runtime_named,
        trainer_image,
        nnodes_matches_num_nodes,
        queued_jobs_start_suspended,
        no_env_in_runtime_patches,
        node_container_patched,
    ],
    # Parts of jobs, after the job's own rules: rule(Replica) for each PyTorchJob replica, then
    # rule(PodSite) for each pod template (a PyTorchJob's replicas, a TrainJob's node).
    "PyTorchJob replica": [
        restart_policy,
        container_named_pytorch,
        containers_have_images,
        volcano_scheduler,
        nnodes_matches_pods,
        master_port_named,
        pull_secrets_named,
    ],
    "job pod": [
        no_reserved_env,
        gpu_request_equals_limit,
        one_process_per_gpu,
        dev_shm_in_memory,
        config_mounted,
        runs_as_non_root,
        uid_is_not_root,
        unprivileged,
        grace_period_fits_a_checkpoint,
    ],
    # rule(job, every object), after every object's own rules.
    "job, across objects": [mounted_configmaps_present],
}


def _apply(rules: list[Rule], who: str, *subject: Any) -> list[Problem]:
    return [Problem(who, path, message, rule.__name__) for rule in rules for path, message in rule(*subject)]


def referenced_secrets(obj: dict[str, Any]) -> set[str]:
    """Names of the Secrets an object's env references (by secretKeyRef with a name and key)."""
    refs = (dig(e, "valueFrom", "secretKeyRef") for _, e in walk_env(obj))
    return {r["name"] for r in refs if r is not None and r.get("name") and r.get("key")}


def rule_problems(objs: list[dict[str, Any]], secrets_seen: set[str] | None = None) -> list[Problem]:
    """Problems no schema catches. `secrets_seen` collects the Secrets the objects reference."""
    out: list[Problem] = []
    for obj in objs:
        who, kind = ident(obj), obj.get("kind")
        # Kinds are identifiers; the table's other keys (with spaces) name parts of jobs.
        kind_rules = RULES.get(kind, []) if str(kind).isidentifier() else []
        out += _apply(RULES["*"] + kind_rules, who, obj)
        if kind == "PyTorchJob":
            for r in replicas(obj):
                out += _apply(RULES["PyTorchJob replica"], who, r)
        for pod in pod_sites(obj):
            out += _apply(RULES["job pod"], who, pod)
        if secrets_seen is not None:
            secrets_seen |= referenced_secrets(obj)
    for job in (o for o in objs if o.get("kind") in JOB_KINDS):
        out += _apply(RULES["job, across objects"], ident(job), job, objs)
    return list(dict.fromkeys(out))
