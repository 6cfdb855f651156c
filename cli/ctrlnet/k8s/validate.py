"""Offline checks of rendered objects: schemas, then the rules no schema encodes.

1. Schemas: core kinds against the Kubernetes OpenAPI schemas that kubernetes-validate ships
   (strict: unknown fields are problems); custom resources against the CRDs copied in
   ctrlnet/k8s/crds (openAPIV3Schema, `x-kubernetes-int-or-string` translated, unknown fields
   are problems). CEL rules (`x-kubernetes-validations`) are not evaluated offline.
2. Rules the CRDs leave to webhooks (Training Operator v1.9's pytorchjob_webhook.go) or to
   nobody: DNS-1035 job names, a container named `pytorch`, Master replicas 1, no Worker with
   0 replicas, GPU limit = processes per node, credentials by secretKeyRef only, the trainer's
   config loads (resolution a multiple of 8, ...), queued jobs created suspended, ...

Each problem is one line: `<Kind>/<name>: <field path>: <what is wrong and what to do>`.
"""

from __future__ import annotations

import copy
import functools
import json
import re
from dataclasses import dataclass
from importlib import resources
from typing import Any, Iterator

import yaml

from ctrlnet.config.cluster import DNS1035, RESERVED_ENV, looks_secret

DEFAULT_KUBE_VERSION = "1.30"
CONFIG_KEY = "config.yaml"
CONFIG_MOUNT = "/etc/ctrlnet"
DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")

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
RESTART_POLICIES = ("Always", "OnFailure", "Never", "ExitCode")
CLEAN_POD_POLICIES = ("None", "Running", "All")


@dataclass(frozen=True)
class Problem:
    obj: str
    path: str
    message: str

    def __str__(self) -> str:
        return f"{self.obj}: {self.path}: {self.message}" if self.path else f"{self.obj}: {self.message}"


def _ident(obj: dict[str, Any]) -> str:
    return f"{obj.get('kind', '?')}/{(obj.get('metadata') or {}).get('name', '?')}"


def _need(module: str, package: str):
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError:
        from ctrlnet.errors import UserError

        raise UserError(f"validation needs the Python package {package}: pip install {package}") from None


# --- schemas ---------------------------------------------------------------------------------------


def _translate(node: Any) -> Any:
    """OpenAPI v3 (Kubernetes structural schema) -> plain JSON Schema, strict about unknown fields."""
    if isinstance(node, list):
        return [_translate(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: _translate(v) for k, v in node.items()
           if k != "x-kubernetes-validations" and not (k == "description" and isinstance(v, str))}
    if out.pop("x-kubernetes-int-or-string", False):
        out.pop("type", None)
        out = {"anyOf": [{"type": "integer"}, {"type": "string"}], **out}
    preserve = out.pop("x-kubernetes-preserve-unknown-fields", False)
    if out.get("nullable"):
        out.pop("nullable")
        if "type" in out:
            out["type"] = [out["type"], "null"]
    if "properties" in out and "additionalProperties" not in out and not preserve:
        out["additionalProperties"] = False
    return out


@functools.lru_cache(maxsize=None)
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
            schema = _translate(v["schema"]["openAPIV3Schema"])
            # metadata is `type: object` in CRDs: the API server checks it as ObjectMeta (below).
            schema.setdefault("properties", {})["metadata"] = {"type": "object"}
            return schema
    return None


@functools.lru_cache(maxsize=None)
def _core_validator(api_version: str, kind: str, kube_version: str):
    """A jsonschema validator for a core kind from kubernetes-validate's strict schemas (None: no schema)."""
    kv = _need("kubernetes_validate.utils", "kubernetes-validate")
    jsonschema = _need("jsonschema", "jsonschema")
    referencing = _need("referencing", "jsonschema")
    versions = [v for v in kv.all_versions() if _vkey(kv.major_minor(v)) <= _vkey(kube_version)]
    if not versions:
        from ctrlnet.errors import UserError

        raise UserError(f"--kube-version {kube_version}: kubernetes-validate has schemas for {kv.all_versions()[0]} to {kv.latest_version()}")
    schema_dir = f"v{versions[-1]}-local-strict"
    group_version = re.sub(r"^([^./]*)(?:\.[^/]*)?/", r"\1-", api_version)
    try:
        schema = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/{kind.lower()}-{group_version}.json", kube_version)
    except FileNotFoundError:
        return None
    defs = kv.schema_contents(f"kubernetes-json-schema/{schema_dir}/_definitions.json", kube_version)
    registry = referencing.Registry().with_resources([
        ("", referencing.Resource.from_contents(schema, default_specification=referencing.jsonschema.DRAFT7)),
        ("_definitions.json", referencing.Resource.from_contents(defs, default_specification=referencing.jsonschema.DRAFT7)),
    ])
    return jsonschema.Draft7Validator(schema, registry=registry)


@functools.lru_cache(maxsize=None)
def _crd_validator(api_version: str, kind: str):
    schema = _crd_schema(api_version, kind)
    if schema is None:
        return None
    jsonschema = _need("jsonschema", "jsonschema")
    return jsonschema.Draft7Validator(schema)


def _vkey(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", v)[:2])


def _message(err: Any) -> str:
    if err.validator in ("anyOf", "oneOf") and err.context:
        err = min(err.context, key=lambda e: len(e.absolute_path))
    msg = err.message
    return msg if len(msg) <= 240 else msg[:237] + "..."


def schema_problems(obj: dict[str, Any], kube_version: str = DEFAULT_KUBE_VERSION) -> list[Problem]:
    api_version, kind = obj.get("apiVersion"), obj.get("kind")
    who = _ident(obj)
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
        problems.append(Problem(who, path, _message(err)))
    return problems


# --- rules -----------------------------------------------------------------------------------------


@dataclass
class PodSite:
    """One pod template to check, wherever it lives in the job."""

    path: str
    spec: dict[str, Any]
    container: dict[str, Any] | None
    env: list[dict[str, Any]]
    resources: dict[str, Any]
    args: list[str]


def _get(d: Any, *keys: Any, default: Any = None) -> Any:
    for k in keys:
        if isinstance(d, dict):
            d = d.get(k)
        elif isinstance(d, list) and isinstance(k, int) and -len(d) <= k < len(d):
            d = d[k]
        else:
            return default
        if d is None:
            return default
    return d


def _arg(args: list[str], flag: str) -> str | None:
    for i, a in enumerate(args):
        if a.startswith(flag + "="):
            return a.split("=", 1)[1]
        if a == flag and i + 1 < len(args):
            return args[i + 1]
    return None


def _gpu_limits(res: dict[str, Any]) -> dict[str, int]:
    return {k: int(str(v)) for k, v in (res.get("limits") or {}).items()
            if k.endswith("/gpu") and str(v).isdigit()}


def _rule_names(obj: dict[str, Any], who: str, out: list[Problem]) -> None:
    name = str(_get(obj, "metadata", "name", default=""))
    kind = obj.get("kind")
    if kind in ("PyTorchJob", "TrainJob"):
        if not DNS1035.match(name) or len(name) > 63:
            out.append(Problem(who, "metadata.name", f"{name!r} is not a DNS-1035 label (lowercase letters, digits, '-', starting with a letter, at most 63): rename the job"))
    elif name and not DNS1123_SUBDOMAIN.match(name):
        out.append(Problem(who, "metadata.name", f"{name!r} is not a DNS-1123 name (lowercase letters, digits, '-', '.')"))
    for k, v in (_get(obj, "metadata", "labels", default={}) or {}).items():
        if not LABEL_VALUE.match(str(v)) or len(str(v)) > 63:
            out.append(Problem(who, f"metadata.labels.{k}", f"{v!r} is not a valid label value (at most 63 characters: letters, digits, '-', '_', '.')"))


def _rule_pod(site: PodSite, who: str, procs: int | None, out: list[Problem]) -> None:
    p = site.path
    spec = site.spec
    for i, e in enumerate(site.env):
        name = str(e.get("name", ""))
        if name in RESERVED_ENV:
            out.append(Problem(who, f"{p}.env[{i}]", f"{name} is injected by the Training Operator / Trainer: do not set it"))
    # GPUs = processes per node
    gpus = _gpu_limits(site.resources)
    requests = {k: int(str(v)) for k, v in (site.resources.get("requests") or {}).items() if k.endswith("/gpu") and str(v).isdigit()}
    for k, n in requests.items():
        if gpus.get(k) != n:
            out.append(Problem(who, f"{p}.resources", f"{k} request {n} != limit {gpus.get(k)}: extended resources need request = limit"))
    nproc = _arg(site.args, "--nproc-per-node") or _arg(site.args, "--nproc_per_node")
    total_gpus = sum(gpus.values())
    expected = procs if procs is not None else (int(nproc) if nproc and nproc.isdigit() else None)
    if nproc is None and site.container is not None:
        out.append(Problem(who, f"{p}.args", "no --nproc-per-node: pass one process per GPU"))
    elif nproc is not None and nproc.isdigit() and expected is not None and int(nproc) != expected:
        out.append(Problem(who, f"{p}.args", f"--nproc-per-node={nproc} but the job says {expected} processes per node"))
    if expected is not None and total_gpus and total_gpus != expected:
        out.append(Problem(who, f"{p}.resources.limits", f"GPU limit {total_gpus} != {expected} processes per node: set one process per GPU"))
    # /dev/shm
    mounts = (site.container or {}).get("volumeMounts") or []
    shm = next((m for m in mounts if m.get("mountPath") == "/dev/shm"), None)
    vols = {v.get("name"): v for v in spec.get("volumes") or []}
    if site.container is not None:
        if shm is None:
            out.append(Problem(who, f"{p}.containers", "no /dev/shm mount: mount an emptyDir with medium Memory (the default 64Mi shm breaks NCCL and DataLoader workers)"))
        else:
            ed = _get(vols.get(shm.get("name")), "emptyDir")
            if not ed or ed.get("medium") != "Memory" or not ed.get("sizeLimit"):
                out.append(Problem(who, f"{p}.volumes", "/dev/shm must be an emptyDir with medium: Memory and a sizeLimit"))
        cfg_mount = next((m for m in mounts if m.get("mountPath") == CONFIG_MOUNT), None)
        if cfg_mount is None:
            out.append(Problem(who, f"{p}.containers", f"the trainer config is not mounted at {CONFIG_MOUNT}"))
    # non-root
    pod_sc = spec.get("securityContext") or {}
    c_sc = (site.container or {}).get("securityContext") or {}
    if not (pod_sc.get("runAsNonRoot") or c_sc.get("runAsNonRoot")):
        out.append(Problem(who, f"{p}.securityContext", "runAsNonRoot is not set: the trainer must run as a non-root user"))
    if pod_sc.get("runAsUser") == 0 or c_sc.get("runAsUser") == 0:
        out.append(Problem(who, f"{p}.securityContext.runAsUser", "0 is root: run as a non-root uid"))
    if c_sc.get("privileged") or c_sc.get("allowPrivilegeEscalation", False):
        out.append(Problem(who, f"{p}.containers.securityContext", "privileged / allowPrivilegeEscalation: the trainer needs neither"))
    grace = spec.get("terminationGracePeriodSeconds")
    if grace is not None and int(grace) < 30:
        out.append(Problem(who, f"{p}.terminationGracePeriodSeconds", f"{grace}s is too short to finish a step and checkpoint after SIGTERM: use at least 30 (default 600)"))


def _pytorchjob(obj: dict[str, Any], who: str, out: list[Problem]) -> tuple[list[PodSite], list[str]]:
    specs = _get(obj, "spec", "pytorchReplicaSpecs", default={}) or {}
    sites: list[PodSite] = []
    configmaps: list[str] = []
    for rtype in specs:
        if rtype not in ("Master", "Worker"):
            out.append(Problem(who, f"spec.pytorchReplicaSpecs.{rtype}", "unknown replica type: use Master and Worker"))
    master = specs.get("Master")
    if master is None:
        out.append(Problem(who, "spec.pytorchReplicaSpecs", "no Master: one Master (replicas 1) runs rank 0 and the rendezvous"))
    elif master.get("replicas") != 1:
        out.append(Problem(who, "spec.pytorchReplicaSpecs.Master.replicas", f"is {master.get('replicas')}: Master replicas must be 1 (more nodes go in Worker)"))
    worker = specs.get("Worker")
    if worker is not None and (worker.get("replicas") is None or int(worker.get("replicas")) < 1):
        out.append(Problem(who, "spec.pytorchReplicaSpecs.Worker.replicas", f"is {worker.get('replicas')}: omit Worker for a single node instead of replicas 0"))
    total = sum(int(s.get("replicas") or 0) for s in specs.values() if isinstance(s, dict))
    nproc_field = _get(obj, "spec", "nprocPerNode")
    procs = int(nproc_field) if str(nproc_field).isdigit() else None
    if _get(obj, "spec", "elasticPolicy") is not None:
        out.append(Problem(who, "spec.elasticPolicy", "elastic training is not supported by ctrlnet's launcher: remove it"))
    run_policy = _get(obj, "spec", "runPolicy", default={}) or {}
    if run_policy.get("cleanPodPolicy") not in (None, *CLEAN_POD_POLICIES):
        out.append(Problem(who, "spec.runPolicy.cleanPodPolicy", f"{run_policy.get('cleanPodPolicy')!r}: use one of {', '.join(CLEAN_POD_POLICIES)}"))
    labels = _get(obj, "metadata", "labels", default={}) or {}
    if labels.get("kueue.x-k8s.io/queue-name") and run_policy.get("suspend") is not True:
        out.append(Problem(who, "spec.runPolicy.suspend", "queued in Kueue but not created suspended: set suspend: true so no pod starts before admission"))
    sched = run_policy.get("schedulingPolicy") or {}
    if sched.get("minAvailable") is not None and total and int(sched["minAvailable"]) > total:
        out.append(Problem(who, "spec.runPolicy.schedulingPolicy.minAvailable", f"{sched['minAvailable']} > {total} pods: the gang can never be scheduled"))
    for rtype, rs in specs.items():
        if not isinstance(rs, dict):
            continue
        base = f"spec.pytorchReplicaSpecs.{rtype}"
        if rs.get("restartPolicy") not in (None, *RESTART_POLICIES):
            out.append(Problem(who, f"{base}.restartPolicy", f"{rs.get('restartPolicy')!r}: use one of {', '.join(RESTART_POLICIES)}"))
        pod = _get(rs, "template", "spec", default={}) or {}
        containers = pod.get("containers") or []
        main = next((c for c in containers if c.get("name") == "pytorch"), None)
        if main is None:
            out.append(Problem(who, f"{base}.template.spec.containers", "no container named pytorch: the Training Operator requires that name (and reads its exit code)"))
        for i, c in enumerate(containers):
            if not c.get("image"):
                out.append(Problem(who, f"{base}.template.spec.containers[{i}].image", "is required"))
        if sched.get("queue") and pod.get("schedulerName") != "volcano":
            out.append(Problem(who, f"{base}.template.spec.schedulerName", "Volcano queue set but pods are not scheduled by volcano: set schedulerName: volcano"))
        if main is not None:
            args = [str(a) for a in (main.get("args") or [])] + [str(a) for a in (main.get("command") or [])]
            nn = _arg(args, "--nnodes")
            if nn is not None and nn.isdigit() and total and int(nn) != total:
                out.append(Problem(who, f"{base}.template.spec.containers.args", f"--nnodes={nn} but the job has {total} pods"))
            if master is not None and rtype == "Master":
                ports = [p for p in main.get("ports") or [] if p.get("name") == "pytorchjob-port"]
                if not ports:
                    out.append(Problem(who, f"{base}.template.spec.containers.ports", "no port named pytorchjob-port: the operator derives MASTER_PORT from it"))
        sites.append(PodSite(f"{base}.template.spec", pod, main, (main or {}).get("env") or [], (main or {}).get("resources") or {},
                             [str(a) for a in ((main or {}).get("args") or [])]))
        configmaps += [v["configMap"]["name"] for v in pod.get("volumes") or [] if _get(v, "configMap", "name")]
        for i, s in enumerate(pod.get("imagePullSecrets") or []):
            if not s.get("name"):
                out.append(Problem(who, f"{base}.template.spec.imagePullSecrets[{i}]", "name the pull Secret"))
    for s in sites:
        _rule_pod(s, who, procs, out)
    if procs is None and nproc_field is not None:
        out.append(Problem(who, "spec.nprocPerNode", f"{nproc_field!r}: give the number of processes per node (one per GPU)"))
    return sites, configmaps


def _trainjob(obj: dict[str, Any], who: str, out: list[Problem]) -> list[str]:
    trainer = _get(obj, "spec", "trainer", default={}) or {}
    if not _get(obj, "spec", "runtimeRef", "name"):
        out.append(Problem(who, "spec.runtimeRef.name", "name the (Cluster)TrainingRuntime, e.g. torch-distributed"))
    if not trainer.get("image"):
        out.append(Problem(who, "spec.trainer.image", "is required"))
    procs = trainer.get("numProcPerNode")
    nodes = trainer.get("numNodes")
    args = [str(a) for a in trainer.get("args") or []]
    nn = _arg(args, "--nnodes")
    if nn is not None and nodes is not None and nn.isdigit() and int(nn) != int(nodes):
        out.append(Problem(who, "spec.trainer.args", f"--nnodes={nn} but numNodes is {nodes}"))
    labels = _get(obj, "metadata", "labels", default={}) or {}
    if labels.get("kueue.x-k8s.io/queue-name") and _get(obj, "spec", "suspend") is not True:
        out.append(Problem(who, "spec.suspend", "queued in Kueue but not created suspended: set suspend: true so no pod starts before admission"))
    configmaps: list[str] = []
    patches = _get(obj, "spec", "runtimePatches", default=[]) or []
    pod: dict[str, Any] = {}
    container: dict[str, Any] = {}
    for pi, patch in enumerate(patches):
        for ji, rj in enumerate(_get(patch, "trainingRuntimeSpec", "template", "spec", "replicatedJobs", default=[]) or []):
            p = _get(rj, "template", "spec", "template", "spec", default={}) or {}
            if rj.get("name") == "node":
                pod = {**pod, **p}
                for c in p.get("containers") or []:
                    if c.get("env"):
                        out.append(Problem(who, f"spec.runtimePatches[{pi}]...replicatedJobs[{ji}].containers.env", "env of the trainer container goes in spec.trainer.env (Trainer rejects it in runtimePatches)"))
                    container = {**container, **c}
            configmaps += [v["configMap"]["name"] for v in p.get("volumes") or [] if _get(v, "configMap", "name")]
    site = PodSite("spec.trainer", pod, container or None, trainer.get("env") or [], trainer.get("resourcesPerNode") or {}, args)
    if not container:
        out.append(Problem(who, "spec.runtimePatches", "no patch of the node container: the trainer config and /dev/shm are not mounted"))
    _rule_pod(site, who, int(procs) if procs is not None else None, out)
    return configmaps


def _configmap(obj: dict[str, Any], who: str, out: list[Problem]) -> None:
    data = _get(obj, "data", default={}) or {}
    if not isinstance(data, dict) or not isinstance(data.get(CONFIG_KEY), str):
        return  # absent (not ctrlnet's ConfigMap), or not text (the schema check reports it)
    from ctrlnet.config.loading import validate as validate_model
    from ctrlnet.config.train import TrainConfig
    from ctrlnet.errors import UserError

    try:
        parsed = yaml.safe_load(data[CONFIG_KEY]) or {}
    except yaml.YAMLError:
        out.append(Problem(who, f"data.{CONFIG_KEY}", "is not valid YAML"))
        return
    if not isinstance(parsed, dict):
        out.append(Problem(who, f"data.{CONFIG_KEY}", "must be a mapping (the train section)"))
        return
    try:
        train = validate_model(TrainConfig, parsed)
    except UserError as e:
        out.append(Problem(who, f"data.{CONFIG_KEY}", f"the trainer would reject it: {str(e).removeprefix('invalid config: ')}"))
        return
    if train.checkpoint.resume is None:
        # A restarted pod (preemption, node loss) finds its own run.json and refuses to overwrite it.
        out.append(Problem(who, f"data.{CONFIG_KEY}", "train.checkpoint.resume is unset: a restarted pod would "
                           "refuse its own output; set it to latest"))


def _walk_env(node: Any, path: str) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every env entry anywhere in an object (all containers, init containers, patches)."""
    if isinstance(node, dict):
        for k, v in node.items():
            sub = f"{path}.{k}" if path else str(k)
            if k == "env" and isinstance(v, list):
                for i, e in enumerate(v):
                    if isinstance(e, dict):
                        yield f"{sub}[{i}]", e
            else:
                yield from _walk_env(v, sub)
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk_env(v, f"{path}[{i}]")


def _rule_secrets(obj: dict[str, Any], who: str, out: list[Problem], secrets_seen: set[str]) -> None:
    """Credentials by secretKeyRef only, and every reference names its Secret and key."""
    for path, e in _walk_env(obj, ""):
        name = str(e.get("name", ""))
        if "value" in e and looks_secret(name):
            out.append(Problem(who, path, f"{name} has an inline value: credentials must come from a Secret (valueFrom.secretKeyRef), never a literal"))
        for ref_kind in ("secretKeyRef", "configMapKeyRef"):
            ref = _get(e, "valueFrom", ref_kind)
            if ref is None:
                continue
            if not ref.get("name") or not ref.get("key"):
                out.append(Problem(who, f"{path}.valueFrom.{ref_kind}", f"{name}: name the Secret and its key"))
            elif ref_kind == "secretKeyRef":
                secrets_seen.add(ref["name"])


def rule_problems(objs: list[dict[str, Any]], secrets_seen: set[str] | None = None) -> list[Problem]:
    """Problems no schema catches. `secrets_seen` collects the Secrets the objects reference."""
    out: list[Problem] = []
    secrets_seen = set() if secrets_seen is None else secrets_seen
    wanted_cms: list[tuple[str, str]] = []
    for obj in objs:
        who = _ident(obj)
        kind = obj.get("kind")
        _rule_names(obj, who, out)
        _rule_secrets(obj, who, out, secrets_seen)
        if kind == "Secret":
            out.append(Problem(who, "", "a Secret in the manifests puts credentials in the repository: create it out of band and reference it by name"))
        elif kind == "PyTorchJob":
            _, cms = _pytorchjob(obj, who, out)
            wanted_cms += [(who, c) for c in cms]
        elif kind == "TrainJob":
            wanted_cms += [(who, c) for c in _trainjob(obj, who, out)]
        elif kind == "ConfigMap":
            _configmap(obj, who, out)
    have = {(o.get("metadata") or {}).get("name") for o in objs if o.get("kind") == "ConfigMap"}
    for who, name in wanted_cms:
        if name not in have:
            out.append(Problem(who, "volumes", f"mounts ConfigMap {name}, which is not among the rendered objects"))
    return list(dict.fromkeys(out))


def validate_objects(objs: list[dict[str, Any]], kube_version: str = DEFAULT_KUBE_VERSION,
                     secrets_seen: set[str] | None = None) -> list[Problem]:
    """Every problem in `objs`: schema problems first, then rules; [] when all is well."""
    problems: list[Problem] = []
    for obj in objs:
        if not isinstance(obj, dict):
            problems.append(Problem("?", "", f"not a Kubernetes object: {json.dumps(obj)[:80]}"))
            continue
        problems += schema_problems(copy.deepcopy(obj), kube_version)
    return problems + rule_problems([o for o in objs if isinstance(o, dict)], secrets_seen)


def iter_yaml_objects(texts: Iterator[str] | list[str]) -> list[dict[str, Any]]:
    objs: list[dict[str, Any]] = []
    for text in texts:
        for doc in yaml.safe_load_all(text):
            if isinstance(doc, dict) and doc.get("kind") == "List":
                objs += doc.get("items") or []
            elif doc:
                objs.append(doc)
    return objs
