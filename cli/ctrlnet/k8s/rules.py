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

from ctrlnet.config.cluster import DNS1035, IMAGE_DIGEST, RESERVED_ENV, ClusterConfig
from ctrlnet.config.contract import CONFIG_DIR, CONFIG_FILE, TMP_DIR
from ctrlnet.config.credentials import credential_kind, find_credentials, secret_env_name, shown
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
    pod_templates,
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


def warning(rule):
    """Marks a rule whose findings are hardening advice, not mistakes: `validate` and `submit`
    print them as `warning: ...` and go on (Problem.warning)."""
    rule.warning = True
    return rule


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
                f"{shown(name)} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter, at most 63): rename the job",
            )
    elif name and not DNS1123_SUBDOMAIN.match(name):
        yield "metadata.name", f"{shown(name)} is not a DNS-1123 name (lowercase letters, digits, '-', '.')"


def label_values(obj: dict[str, Any]) -> Iterator[Finding]:
    """Label values the API server accepts."""
    for k, v in (dig(obj, "metadata", "labels", default={}) or {}).items():
        if not LABEL_VALUE.match(str(v)) or len(str(v)) > 63:
            yield (
                f"metadata.labels.{k}",
                f"{shown(v)} is not a valid label value (at most 63 characters: letters, digits, '-', '_', '.')",
            )


def credentials_by_reference(obj: dict[str, Any]) -> Iterator[Finding]:
    """Credentials by secretKeyRef only (by the variable's name: *TOKEN*, *_KEY, *_AUTH, *_PAT,
    DSN, ... or its value's shape), and every reference names its Secret and key."""
    for path, e in walk_env(obj):
        name = str(e.get("name", ""))
        if credential_kind(name, blobs=True):
            name = "a variable whose name looks like a credential"  # reported, unquoted, by no_credentials_in_values
        if "value" in e and secret_env_name(name) and not _names_a_file(e):
            yield (
                path,
                f"{name} has an inline value: credentials must come from a Secret (valueFrom.secretKeyRef), never a literal",
            )
        elif "value" in e and (kind := credential_kind(e["value"])):
            yield (
                f"{path}.value",
                f"{name}'s value looks like {kind} (not shown): credentials must come from a Secret (valueFrom.secretKeyRef), never a literal",
            )
        for ref_kind in ("secretKeyRef", "configMapKeyRef"):
            ref = dig(e, "valueFrom", ref_kind)
            if ref is not None and (not ref.get("name") or not ref.get("key")):
                yield f"{path}.valueFrom.{ref_kind}", f"{name}: name the Secret and its key"


def _names_a_file(e: dict[str, Any]) -> bool:
    """A `*_FILE` / `*_PATH` variable whose value is an absolute path names the file that holds a
    credential (HF_TOKEN_PATH, AWS_SHARED_CREDENTIALS_FILE: cluster.secrets.as_files), not the credential."""
    name, value = str(e.get("name", "")).upper(), str(e.get("value", ""))
    return name.endswith(("_FILE", "_PATH")) and value.startswith("/") and not credential_kind(value)


def no_credentials_in_values(obj: dict[str, Any]) -> Iterator[Finding]:
    """No value outside an env entry looks like a credential (a URL with user:password in an
    annotation or the trainer's config, a token in an argument): objects are readable by anyone
    with read access to the namespace, and land in Git with GitOps. The value is never shown."""
    for path, kind in find_credentials(obj):
        if ".env[" in ".".join(path) and path[-1] == "value":
            continue  # credentials_by_reference reports env entries
        if obj.get("kind") == "Secret":
            continue  # no_secret_objects reports the whole object
        yield ".".join(path), f"holds {kind} (not shown): reference a Secret by name (secretKeyRef) instead"


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


# --- hardening: the pod-security scanner's checks (checkov CKV_K8S_*), as ctrlnet sees them -----
# The chart passes them by default (docs/kubernetes.md#hardening); a job that opts out, or a
# hand-written manifest, gets a warning. Probes are not among them: a batch job has nothing to probe.

_READ_ONLY_SOURCES = ("configMap", "secret", "downwardAPI", "projected")


def _writable_mounts(pod: PodSite) -> list[str]:
    """Mount paths of the container's writable volumes (emptyDir, PVC, ...; not read-only ones)."""
    volumes = {v.get("name"): v for v in pod.spec.get("volumes") or []}
    out = []
    for m in _mounts(pod):
        v = volumes.get(m.get("name"))
        if not v or m.get("readOnly") or any(k in v for k in _READ_ONLY_SOURCES):
            continue
        if dig(v, "persistentVolumeClaim", "readOnly"):
            continue
        out.append(str(m.get("mountPath", "")).rstrip("/") or "/")
    return out


def _under(path: str, mounts: list[str]) -> bool:
    return any(path == m or path.startswith(m.rstrip("/") + "/") for m in mounts)


def _env_value(pod: PodSite, name: str) -> str | None:
    return next((str(e["value"]) for e in pod.env if e.get("name") == name and "value" in e), None)


def _read_only_root(pod: PodSite) -> bool:
    return pod.container is not None and _security_contexts(pod)[1].get("readOnlyRootFilesystem") is True


def writable_scratch(pod: PodSite) -> Iterator[Finding]:
    """With a read-only root filesystem, TMPDIR (/tmp) and HOME are on writable volumes: torchrun,
    the staging of object-storage outputs and every cache (hub, torch, triton) write there."""
    if not _read_only_root(pod):
        return
    writable = _writable_mounts(pod)
    for var, path in (("TMPDIR", _env_value(pod, "TMPDIR") or TMP_DIR), ("HOME", _env_value(pod, "HOME"))):
        if path and not _under(path, writable):
            yield (
                f"{pod.path}.containers.volumeMounts",
                f"the root filesystem is read-only but {var} ({path}) is on no writable volume: mount an "
                "emptyDir there (the chart mounts its scratch volume at /tmp and HOME)",
            )


def _local_absolute(url: str) -> str | None:
    path = url[len("file://") :] if url.startswith("file://") else url
    return path if "://" not in path and path.startswith("/") else None


def local_paths_writable(job: dict[str, Any], objs: list[dict[str, Any]]) -> Iterator[Finding]:
    """With a read-only root filesystem, the trainer's local train.output and model.cache_dir are
    on writable volumes (else the first checkpoint fails, hours in)."""
    cms = {(o.get("metadata") or {}).get("name"): o for o in objs if o.get("kind") == "ConfigMap"}
    for name in mounted_configmaps(job):
        train, _ = _train_config(cms[name]) if name in cms else (None, None)
        if train is None:
            continue
        for key, value in (("output", train.output), ("model.cache_dir", train.model.cache_dir)):
            path = _local_absolute(value) if value else None
            pod = next((p for p in pod_sites(job) if _read_only_root(p) and path), None)
            writable = [m for m in _writable_mounts(pod) if m != "/dev/shm"] if pod is not None else []
            if pod is not None and path and not _under(path, writable):
                yield (
                    f"{pod.path}.containers.volumeMounts",
                    f"train.{key} {shown(path)} is on the read-only root filesystem: write to object storage "
                    f"(s3://...) or under a writable volume ({', '.join(writable) or 'none mounted'})",
                )


@warning
def read_only_root_filesystem(pod: PodSite) -> Iterator[Finding]:
    """(warning, checkov CKV_K8S_22) The container's root filesystem is read-only: nothing in the
    pod can rewrite the image's files; the trainer writes to its volumes only."""
    if pod.container is not None and not _read_only_root(pod):
        yield (
            f"{pod.path}.containers.securityContext.readOnlyRootFilesystem",
            "is not true: set it, with /tmp and HOME on an emptyDir (as the chart does)",
        )


@warning
def uid_at_least_10000(pod: PodSite) -> Iterator[Finding]:
    """(warning, checkov CKV_K8S_40) runAsUser is at least 10000, so the trainer shares its uid
    with no user of the node (the image's ctrlnet user is 10001)."""
    pod_sc, c_sc = _security_contexts(pod)
    uid = c_sc.get("runAsUser", pod_sc.get("runAsUser"))
    if pod.container is not None and uid != 0 and (uid is None or int(uid) < 10000):
        yield (
            f"{pod.path}.securityContext.runAsUser",
            f"{'is unset' if uid is None else f'is {uid}'}: run as a uid of at least 10000 (cluster.security, "
            "default 10001, the image's ctrlnet user), which no user of the node has",
        )


@warning
def image_pinned_by_digest(job: dict[str, Any]) -> Iterator[Finding]:
    """(warning, checkov CKV_K8S_43) The trainer image is pinned by digest: a tag can be moved,
    so the pods of one job, or a pod restarted hours later, could run different images."""
    if job.get("kind") == "TrainJob":
        images = [("spec.trainer.image", trainer(job).get("image"))]
    else:
        images = [
            (f"{r.path}.template.spec.containers[{i}].image", c.get("image"))
            for r in replicas(job)
            for i, c in enumerate(r.pod.get("containers") or [])
        ]
    seen: set[str] = set()
    for path, image in images:
        if isinstance(image, str) and image and not IMAGE_DIGEST.search(image) and image not in seen:
            seen.add(image)
            yield (
                path,
                f"{image} is a tag the registry can move: pin its digest (cluster.image: "
                f"{image.split('@')[0]}@sha256:<digest>; `docker buildx imagetools inspect {image}` prints it)",
            )


def _selects(selector: dict[str, Any], labels: dict[str, Any]) -> bool:
    """Whether a LabelSelector matches `labels` (an empty selector matches every pod)."""
    if any(labels.get(k) != v for k, v in (selector.get("matchLabels") or {}).items()):
        return False
    for ex in selector.get("matchExpressions") or []:
        key, op, values = ex.get("key"), ex.get("operator"), ex.get("values") or []
        if (
            (op == "In" and labels.get(key) not in values)
            or (op == "NotIn" and key in labels and labels[key] in values)
            or (op == "Exists" and key not in labels)
            or (op == "DoesNotExist" and key in labels)
        ):
            return False
    return True


@warning
def pods_have_a_network_policy(job: dict[str, Any], objs: list[dict[str, Any]]) -> Iterator[Finding]:
    """(warning, checkov CKV2_K8S_6) A NetworkPolicy among the objects selects the job's pods:
    without one any pod of the cluster can reach their rendezvous port and collectives, and
    they can reach anything."""
    ns = dig(job, "metadata", "namespace")
    policies = [
        dig(o, "spec", "podSelector", default={}) or {}
        for o in objs
        if o.get("kind") == "NetworkPolicy" and (ns is None or dig(o, "metadata", "namespace") in (None, ns))
    ]
    for path, tpl in pod_templates(job):
        labels = dig(tpl, "metadata", "labels", default={}) or {}
        if not any(_selects(sel, labels) for sel in policies):
            yield (
                f"{path}.metadata.labels",
                "no NetworkPolicy selects these pods: keep cluster.network_policy.enabled (the chart's "
                "policy lets them reach each other, DNS and object storage only)",
            )
            return


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
    "*": [object_name, label_values, credentials_by_reference, no_credentials_in_values],
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
        image_pinned_by_digest,
    ],
    "TrainJob": [
        runtime_named,
        trainer_image,
        nnodes_matches_num_nodes,
        queued_jobs_start_suspended,
        no_env_in_runtime_patches,
        node_container_patched,
        image_pinned_by_digest,
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
        writable_scratch,
        read_only_root_filesystem,
        uid_at_least_10000,
    ],
    # rule(job, every object), after every object's own rules.
    "job, across objects": [mounted_configmaps_present, local_paths_writable, pods_have_a_network_policy],
}


def _apply(rules: list[Rule], who: str, *subject: Any) -> list[Problem]:
    return [
        Problem(who, path, message, rule.__name__, warning=getattr(rule, "warning", False))
        for rule in rules
        for path, message in rule(*subject)
    ]


def referenced_secrets(obj: dict[str, Any]) -> set[str]:
    """Names of the Secrets an object's env references (by secretKeyRef with a name and key) and
    its pods mount (cluster.secrets.as_files)."""
    refs = (dig(e, "valueFrom", "secretKeyRef") for _, e in walk_env(obj))
    names = {r["name"] for r in refs if r is not None and r.get("name") and r.get("key")}
    for site in pod_sites(obj):
        names |= {n for v in site.spec.get("volumes") or [] if (n := dig(v, "secret", "secretName"))}
    return names


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
