"""Kubeflow Trainer v2.3.0 (TrainJob), JobSet v0.12 and Job controller stand-ins.

TrainJob -> JobSet follows kubeflow/trainer@v2.3.0 (pkg/controller/trainjob_controller.go,
pkg/runtime/core/{trainingruntime,clustertrainingruntime,snapshot}.go, pkg/runtime/framework/
plugins/{torch,jobset,trainjobstatus}), for what ctrlnet's runtime uses:
* the runtime (spec.runtimeRef: a ClusterTrainingRuntime, or a TrainingRuntime of the namespace)
  is read once and kept in the ConfigMap `<trainjob>-runtime-snapshot` (owned by the TrainJob); a
  missing one: the Warning Event `TrainJobResourcesCreationFailed` and no JobSet (another kind: the
  Failed condition `TrainingRuntimeNotSupported`);
* `spec.runtimePatches[].trainingRuntimeSpec` merged into the runtime's JobSet spec the strategic-
  merge way (replicatedJobs, containers, env, volumes by name; volumeMounts by mountPath; ports by
  containerPort; other lists replaced) and their template metadata into the JobSet's labels;
* the trainer step (the replicatedJob labelled `trainer.kubeflow.org/trainjob-ancestor-step:
  trainer`, container `node`): parallelism = completions = numNodes (the TrainJob's, else the
  runtime's mlPolicy), image/command/args, resourcesPerNode, the TrainJob's env, then the torch
  plugin's PET_NNODES, PET_NPROC_PER_NODE (numProcPerNode, else "auto": GPUs, else the CPU request),
  PET_NODE_RANK (fieldRef to the job-completion-index annotation), PET_MASTER_ADDR
  `<trainjob>-node-0-0.<trainjob>`, PET_MASTER_PORT 29500 (and container port 29500);
* the TrainJobStatus plugin (on with `LoopbackCluster(trainer_status=True)`):
  KUBEFLOW_TRAINER_SERVER_URL (the loopback API server's URL + the status path, which the server
  answers as Trainer's status server does: server.py), KUBEFLOW_TRAINER_SERVER_TOKEN and the
  projected volume `kubeflow-trainer-token` at /var/run/secrets/kubeflow/trainer with a
  serviceAccountToken (audience: that TrainJob's status path) that the kubelet writes as a token
  the cluster issued. No TLS here: no CA variable, no `<trainjob>-tls-config` ConfigMap;
* the JobSet `<trainjob>` (owner: the TrainJob), written again only while either is suspended;
* status: Suspended True/False (Suspended/Resumed), Complete and Failed copied from the JobSet's
  Completed/Failed conditions, jobsStatus from its replicatedJobsStatus; trainerStatus is only
  written by the status server.

JobSet (kubernetes-sigs/jobset@v0.12.0 pkg/controllers/{jobset_controller,failure_policy}.go and its
webhook's defaults): one Job `<jobset>-<replicatedJob>-<i>` per replica, labels and annotations
jobset-name/-uid, replicatedjob-name/-replicas, job-index, restart-attempt, job-key, ...; a headless
Service `<jobset>` (pods get hostname `<job>-<index>` and that subdomain); success when every Job
completed (successPolicy All); a failed Job applies `failurePolicy` (rules matched in order on
onJobFailureReasons/targetReplicatedJobs/onJobFailureMessagePatterns: FailJobSet, RestartJobSet
(counts towards maxRestarts; default when no rule matches), RestartJobSetAndIgnoreMaxRestarts;
without a failurePolicy any failed Job fails the JobSet): a restart deletes every pod of the
attempt and creates new ones with restart-attempt + 1; suspend deletes the pods; the conditions
and Events (Completed, Failed, Suspended, Restarting with their reasons and messages).

The Jobs (k8s Job controller, Indexed) are emulated inside this controller: no batch/v1 object is
stored. Pods are `<job>-<index>-<5 random>`, owned by the JobSet (so the garbage collector takes
them with the TrainJob), labelled as the Job controller labels them (job-name, controller-uid,
job-completion-index label and annotation); Events SuccessfulCreate/SuccessfulDelete/
BackoffLimitExceeded/PodFailurePolicy/Completed are recorded about a `batch/v1 Job` reference.
A failed pod goes through `podFailurePolicy` (FailJob, Ignore, Count; onExitCodes and
onPodConditions), then `backoffLimit` (default 6); a failed Job deletes its running pods.
The TrainJob's activeDeadlineSeconds (from creation or the last resume: Failed DeadlineExceeded,
the JobSet deleted) is checked on a timer. Not emulated: backoff delays, backoffLimitPerIndex, the
Job's successPolicy and activeDeadlineSeconds, TTLs, startupPolicy/dependsOn, in-place restarts, RestartJob actions, Trainer's validating webhooks,
initializers and other ML policies (MPI, JAX, XGBoost, torchtune), envInjection, the PodGroup.
"""

from __future__ import annotations

import copy
import hashlib
import json
import random
import re
import uuid
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any

from .errors import ApiError
from .registry import Ctx, ResourceType, ts

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

GROUP = "trainer.kubeflow.org"
JS_GROUP = "jobset.x-k8s.io"
JS_API = "jobset.x-k8s.io/v1alpha2"
TRAINER_API = "trainer.kubeflow.org/v1alpha1"
MANAGED_BY = "trainer.kubeflow.org/trainjob-controller"
L_ANCESTOR = "trainer.kubeflow.org/trainjob-ancestor-step"
L_JOBSET = "jobset.sigs.k8s.io/jobset-name"
L_JOBSET_UID = "jobset.sigs.k8s.io/jobset-uid"
L_RJOB = "jobset.sigs.k8s.io/replicatedjob-name"
L_RJOB_REPLICAS = "jobset.sigs.k8s.io/replicatedjob-replicas"
L_GLOBAL_REPLICAS = "jobset.sigs.k8s.io/global-replicas"
L_JOB_INDEX = "jobset.sigs.k8s.io/job-index"
L_JOB_KEY = "jobset.sigs.k8s.io/job-key"
L_JOB_GLOBAL_INDEX = "jobset.sigs.k8s.io/job-global-index"
L_GROUP = "jobset.sigs.k8s.io/group-name"
L_GROUP_REPLICAS = "jobset.sigs.k8s.io/group-replicas"
L_JOB_GROUP_INDEX = "jobset.sigs.k8s.io/job-group-index"
L_RESTART = "jobset.sigs.k8s.io/restart-attempt"
L_COMPLETION_INDEX = "batch.kubernetes.io/job-completion-index"
L_JOB_NAME = "batch.kubernetes.io/job-name"
L_CONTROLLER_UID = "batch.kubernetes.io/controller-uid"
NODE = "node"
TRAINER_PORT = 29500
STATUS_ENV_URL = "KUBEFLOW_TRAINER_SERVER_URL"
STATUS_ENV_TOKEN = "KUBEFLOW_TRAINER_SERVER_TOKEN"
STATUS_ENV_CA = "KUBEFLOW_TRAINER_SERVER_CA_CERT"
STATUS_MOUNT = "/var/run/secrets/kubeflow/trainer"
STATUS_VOLUME = "kubeflow-trainer-token"
SNAPSHOT_SUFFIX = "-runtime-snapshot"
POD_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s utilrand
SMP_KEYS = {
    "replicatedJobs": "name",
    "containers": "name",
    "initContainers": "name",
    "ephemeralContainers": "name",
    "env": "name",
    "volumes": "name",
    "volumeMounts": "mountPath",
    "volumeDevices": "devicePath",
    "ports": "containerPort",
    "imagePullSecrets": "name",
    "hostAliases": "ip",
    "resourceClaims": "name",
}


def status_path(namespace: str, name: str) -> str:
    """statusserver.StatusUrl."""
    return f"/apis/trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"


def token_audience(namespace: str, name: str) -> str:
    """statusserver.TokenAudience."""
    return f"trainer.kubeflow.org/v1alpha1/namespaces/{namespace}/trainjobs/{name}/status"


def strategic_merge(base: Any, patch: Any, key: str = "") -> Any:
    """A strategic merge patch of `patch` onto `base` for the JobSet spec's types: maps merge
    (null deletes), lists of SMP_KEYS merge by their key, other lists are replaced."""
    if isinstance(patch, dict) and isinstance(base, dict):
        out = copy.deepcopy(base)
        for k, v in patch.items():
            if v is None:
                out.pop(k, None)
            elif k in out:
                out[k] = strategic_merge(out[k], v, k)
            else:
                out[k] = copy.deepcopy(v)
        return out
    if isinstance(patch, list) and isinstance(base, list) and key in SMP_KEYS:
        mk, out = SMP_KEYS[key], copy.deepcopy(base)
        for item in patch:
            at = next((i for i, b in enumerate(out) if isinstance(item, dict) and b.get(mk) == item.get(mk)), None)
            if at is None:
                out.append(copy.deepcopy(item))
            else:
                out[at] = strategic_merge(out[at], item, "")
        return out
    return copy.deepcopy(patch)


def upsert(items: list[dict[str, Any]], new: list[dict[str, Any]], key: str = "name") -> None:
    """apply.UpsertEnvVars & co.: replace the item with the same key in place, else append."""
    for item in new:
        at = next((i for i, x in enumerate(items) if x.get(key) == item.get(key)), None)
        if at is None:
            items.append(copy.deepcopy(item))
        else:
            items[at] = copy.deepcopy(item)


def _cpu_count(q: Any) -> int:
    """resource.Quantity.Value() of a CPU quantity (rounded up)."""
    s = str(q)
    if s.endswith("m"):
        return -(-int(s[:-1]) // 1000)
    try:
        return int(-(-float(s) // 1))
    except ValueError:
        return 0


def _gpus(res: dict[str, Any]) -> int:
    """runtime.GetNumGPUPerNode: the first *gpu* limit."""
    for k, v in (res.get("limits") or {}).items():
        if k.endswith("gpu") or "gpu" in k.split("/")[-1]:
            try:
                return int(v)
            except ValueError:
                return 0
    return 0


def set_condition(conds: list[dict[str, Any]], ctype: str, status: str, reason: str, message: str) -> bool:
    """meta.SetStatusCondition (metav1.Condition): one per type; the transition time changes with
    the status only. Whether anything changed."""
    cur = next((c for c in conds if c.get("type") == ctype), None)
    if cur is None:
        conds.append(
            {"type": ctype, "status": status, "reason": reason, "message": message, "lastTransitionTime": ts()}
        )
        return True
    if (cur.get("status"), cur.get("reason"), cur.get("message")) == (status, reason, message):
        return False
    if cur.get("status") != status:
        cur["lastTransitionTime"] = ts()
    cur.update(status=status, reason=reason, message=message)
    return True


def _true(conds: list[dict[str, Any]] | None, ctype: str) -> bool:
    return any(c.get("type") == ctype and c.get("status") == "True" for c in conds or [])


def _owner(obj: dict[str, Any]) -> dict[str, Any]:
    meta = obj["metadata"]
    return {
        "apiVersion": obj["apiVersion"],
        "kind": obj["kind"],
        "name": meta["name"],
        "uid": meta["uid"],
        "controller": True,
        "blockOwnerDeletion": True,
    }


def _owned_by(obj: dict[str, Any], uid: str) -> bool:
    return any(r.get("controller") and r.get("uid") == uid for r in obj["metadata"].get("ownerReferences") or [])


# --- TrainJob ------------------------------------------------------------------------------------


class TrainJobController:
    """Trainer v2.3.0's TrainJob reconciler with the torch, jobset and trainjobstatus plugins."""

    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.ctx = Ctx(manager="trainer", internal=True)
        self._serial = -1
        self._deadlines = False

    def __call__(self) -> None:
        rt = self.c.catalog.by_kind(GROUP, "TrainJob")
        if rt is None:
            return
        # On changes, and on a timer while a deadline runs (reconcileDeadline's RequeueAfter).
        if self.c.store.serial == self._serial and not self._deadlines:
            return
        self._serial = self.c.store.serial
        self._deadlines = False
        for job in self.c.store.list(rt.key):
            try:
                self.reconcile(rt, job)
            except ApiError:
                self._serial = -1

    def _event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.c.registry.record_event(job, type_, reason, message, "trainjob-controller")

    def reconcile(self, rt: ResourceType, stored: dict[str, Any]) -> None:
        meta = stored["metadata"]
        if meta.get("deletionTimestamp") or (stored["spec"].get("managedBy") or MANAGED_BY) != MANAGED_BY:
            return
        job = self.c.registry.present(rt, copy.deepcopy(stored))
        status = copy.deepcopy(stored.get("status") or {})
        old = copy.deepcopy(status)
        conds = status.setdefault("conditions", [])
        failed = next((c for c in conds if c["type"] == "Failed"), None)
        if failed is not None and failed.get("reason") != "DeadlineExceeded":
            conds.remove(failed)  # removeFailedCondition: the JobSet's state puts it back
        ref = job["spec"].get("runtimeRef") or {}
        kind, group = ref.get("kind") or "ClusterTrainingRuntime", ref.get("apiGroup") or GROUP
        finished = _true(old.get("conditions"), "Complete") or _true(old.get("conditions"), "Failed")
        if group != GROUP or kind not in ("ClusterTrainingRuntime", "TrainingRuntime"):
            set_condition(
                conds, "Failed", "True", "TrainingRuntimeNotSupported", f"unsupported runtime: {kind}.{group}"
            )
        elif not finished:
            try:
                self._objects(job, kind, ref.get("name") or "")
            except _ReconcileError as err:
                msg = f"TrainJob resources reconciliation failed: {str(err)[:950]}"
                self._event(stored, "Warning", "TrainJobResourcesCreationFailed", msg)
        if job["spec"].get("suspend"):
            set_condition(conds, "Suspended", "True", "Suspended", "TrainJob is suspended")
        elif _true(conds, "Suspended"):
            set_condition(conds, "Suspended", "False", "Resumed", "TrainJob is resumed")
        self._status_from_jobset(job, status)
        self._deadline(job, status)
        if not status.get("conditions"):
            status.pop("conditions", None)
        if status != old:
            cur = dict(copy.deepcopy(stored), status=status)
            cur["metadata"].pop("resourceVersion", None)
            self.c.registry.update(rt, meta["namespace"], meta["name"], cur, self.ctx, subresource="status")

    def _deadline(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        """reconcileDeadline: activeDeadlineSeconds from creation (or the last resume) passed: Failed
        DeadlineExceeded, and the JobSet (so the pods) deleted."""
        seconds = int(job["spec"].get("activeDeadlineSeconds") or 0)
        conds = status.get("conditions") or []
        if not seconds or job["spec"].get("suspend") or _true(conds, "Complete") or _true(conds, "Failed"):
            return
        start = job["metadata"]["creationTimestamp"]
        resumed = next((x for x in conds if x["type"] == "Suspended" and x["status"] == "False"), None)
        if resumed is not None:
            start = resumed["lastTransitionTime"]
        began = datetime.strptime(start, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC)
        if datetime.now(UTC) < began + timedelta(seconds=seconds):
            self._deadlines = True  # look again soon
            return
        set_condition(
            status.setdefault("conditions", []),
            "Failed",
            "True",
            "DeadlineExceeded",
            "TrainJob exceeded its active deadline",
        )
        js_rt = self.c.catalog.by_kind(JS_GROUP, "JobSet")
        try:
            if js_rt is not None:
                self.c.registry.delete(js_rt, job["metadata"]["namespace"], job["metadata"]["name"])
        except ApiError:
            pass

    # --- objects ---------------------------------------------------------------------------------

    def _runtime(self, job: dict[str, Any], kind: str, name: str) -> dict[str, Any]:
        """The runtime from the TrainJob's snapshot ConfigMap, else from the API (then snapshotted)."""
        c, meta = self.c, job["metadata"]
        cm_rt = c.catalog.by_key(("", "configmaps"))
        snap = c.store.get(cm_rt.key, meta["namespace"], meta["name"] + SNAPSHOT_SUFFIX)
        if snap is not None:
            if not _owned_by(snap, meta["uid"]):
                raise _ReconcileError(
                    "getting runtime snapshot: invalid runtime snapshot: a snapshot configmap exists but is owned by "
                    "another object"
                )
            return json.loads(snap["data"]["runtime"])
        plural = "clustertrainingruntimes" if kind == "ClusterTrainingRuntime" else "trainingruntimes"
        rrt = c.catalog.by_kind(GROUP, kind)
        obj = None
        if rrt is not None:
            obj = c.store.get(rrt.key, meta["namespace"] if rrt.namespaced else "", name)
        if obj is None:
            what = (
                "not found ClusterTrainingRuntime specified in TrainJob"
                if kind == "ClusterTrainingRuntime"
                else "TrainingRuntime specified in TrainJob is not found"
            )
            raise _ReconcileError(f'{what}: {plural}.{GROUP} "{name}" not found')
        obj = c.registry.present(rrt, copy.deepcopy(obj))
        cm = {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {
                "name": meta["name"] + SNAPSHOT_SUFFIX,
                "namespace": meta["namespace"],
                "ownerReferences": [_owner(job)],
            },
            "data": {"runtime": json.dumps(obj)},  # JSON is YAML
        }
        c.registry.create(cm_rt, meta["namespace"], cm, self.ctx)
        return obj

    def _objects(self, job: dict[str, Any], kind: str, runtime_name: str) -> None:
        c, meta = self.c, job["metadata"]
        js_rt = c.catalog.by_kind(JS_GROUP, "JobSet")
        runtime = self._runtime(job, kind, runtime_name)
        if js_rt is None:
            raise _ReconcileError('no matches for kind "JobSet" in version "jobset.x-k8s.io/v1alpha2"')
        old = c.store.get(js_rt.key, meta["namespace"], meta["name"])
        suspend = bool(job["spec"].get("suspend"))
        if old is not None and not suspend and not old["spec"].get("suspend"):
            return  # the jobset plugin leaves a running JobSet alone
        jobset = build_jobset(c, job, runtime)
        if old is None:
            c.registry.create(js_rt, meta["namespace"], jobset, self.ctx)
        else:
            cur = copy.deepcopy(old)
            cur["metadata"]["labels"] = jobset["metadata"].get("labels") or {}
            cur["metadata"]["annotations"] = jobset["metadata"].get("annotations") or {}
            cur["spec"] = jobset["spec"]
            cur["metadata"].pop("resourceVersion", None)
            c.registry.update(js_rt, meta["namespace"], meta["name"], cur, self.ctx)

    def _status_from_jobset(self, job: dict[str, Any], status: dict[str, Any]) -> None:
        """The jobset plugin's Status: Completed/Failed copied, jobsStatus from replicatedJobsStatus."""
        js_rt = self.c.catalog.by_kind(JS_GROUP, "JobSet")
        meta = job["metadata"]
        js = self.c.store.get(js_rt.key, meta["namespace"], meta["name"]) if js_rt else None
        if js is None:
            return
        jst = js.get("status") or {}
        for src, dst in (("Completed", "Complete"), ("Failed", "Failed")):
            cond = next((x for x in jst.get("conditions") or [] if x["type"] == src and x["status"] == "True"), None)
            if cond is not None:
                set_condition(status.setdefault("conditions", []), dst, "True", cond["reason"], cond["message"])
        rjs = jst.get("replicatedJobsStatus")
        if rjs is not None:
            status["jobsStatus"] = [
                {k: r.get(k, 0) for k in ("ready", "succeeded", "failed", "active", "suspended")} | {"name": r["name"]}
                for r in rjs
            ]


class _ReconcileError(Exception):
    pass


def build_jobset(c: LoopbackCluster, job: dict[str, Any], runtime: dict[str, Any]) -> dict[str, Any]:
    """The JobSet Trainer v2.3.0 applies for `job` on `runtime` (see the module docs)."""
    meta, spec = job["metadata"], job["spec"]
    name, ns = meta["name"], meta["namespace"]
    rspec = runtime.get("spec") or {}
    template = copy.deepcopy(rspec.get("template") or {})
    js_spec = template.get("spec") or {}
    labels = dict((template.get("metadata") or {}).get("labels") or {})
    annotations = dict((template.get("metadata") or {}).get("annotations") or {})
    order = {r["name"]: i for i, r in enumerate(js_spec.get("replicatedJobs") or [])}
    for patch in spec.get("runtimePatches") or []:
        tpl = (patch.get("trainingRuntimeSpec") or {}).get("template") or {}
        labels.update((tpl.get("metadata") or {}).get("labels") or {})
        annotations.update((tpl.get("metadata") or {}).get("annotations") or {})
        if tpl.get("spec") is not None:
            js_spec = strategic_merge(js_spec, tpl["spec"])
    js_spec["replicatedJobs"] = sorted(js_spec.get("replicatedJobs") or [], key=lambda r: order.get(r["name"], 1 << 30))
    trainer = spec.get("trainer")
    ml = rspec.get("mlPolicy")
    for rjob in js_spec["replicatedJobs"]:
        jt = rjob.setdefault("template", {})
        jspec = jt.setdefault("spec", {})
        pspec = jspec.setdefault("template", {}).setdefault("spec", {})
        containers = pspec.setdefault("containers", [])
        if ((jt.get("metadata") or {}).get("labels") or {}).get(L_ANCESTOR) != "trainer":
            continue
        count = int((ml or {}).get("numNodes", 1)) if ml is not None else int(jspec.get("parallelism", 1))
        node = next((ct for ct in containers if ct.get("name") == NODE), None)
        if trainer and trainer.get("resourcesPerNode") is not None and ml is not None and node is not None:
            res = node.setdefault("resources", {})
            for k in ("limits", "requests"):
                if trainer["resourcesPerNode"].get(k):
                    res[k] = {**(res.get(k) or {}), **trainer["resourcesPerNode"][k]}
        if (ml or {}).get("torch") is not None:
            if trainer and trainer.get("numNodes") is not None:
                count = int(trainer["numNodes"])
            nproc: Any = "auto"
            if trainer and trainer.get("numProcPerNode") is not None:
                nproc = int(trainer["numProcPerNode"])
            res = (trainer or {}).get("resourcesPerNode") or (node or {}).get("resources") or {}
            if nproc == "auto" and _gpus(res) == 0:
                req = (res.get("requests") or {}).get("cpu")
                cpus = (
                    _cpu_count(req) if req not in (None, "0") else _cpu_count((res.get("limits") or {}).get("cpu", 0))
                )
                nproc = max(1, cpus)
            if trainer and node is not None:
                env = node.setdefault("env", [])
                upsert(env, trainer.get("env") or [])
                upsert(
                    env,
                    [
                        {"name": "PET_NNODES", "value": str(count)},
                        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
                        {
                            "name": "PET_NODE_RANK",
                            "valueFrom": {"fieldRef": {"fieldPath": f"metadata.annotations['{L_COMPLETION_INDEX}']"}},
                        },
                        {"name": "PET_MASTER_ADDR", "value": f"{name}-{NODE}-0-0.{name}"},
                        {"name": "PET_MASTER_PORT", "value": str(TRAINER_PORT)},
                    ],
                )
                upsert(node.setdefault("ports", []), [{"containerPort": TRAINER_PORT}], key="containerPort")
        if c.trainer_status:  # the TrainJobStatus plugin: every container of the trainer step
            for ct in containers:
                upsert(
                    ct.setdefault("env", []),
                    [
                        {"name": STATUS_ENV_URL, "value": c.url + status_path(ns, name)},
                        {"name": STATUS_ENV_TOKEN, "value": f"{STATUS_MOUNT}/token"},
                    ],
                )
                mounts = [{"name": STATUS_VOLUME, "mountPath": STATUS_MOUNT, "readOnly": True}]
                upsert(ct.setdefault("volumeMounts", []), mounts)
            token = {"audience": token_audience(ns, name), "expirationSeconds": 3600, "path": "token"}
            vol = {"name": STATUS_VOLUME, "projected": {"sources": [{"serviceAccountToken": token}]}}
            upsert(pspec.setdefault("volumes", []), [vol])
        jspec["parallelism"] = jspec["completions"] = count
        rjob["replicas"] = 1
        for ct in containers:  # builder.Trainer
            if ct.get("name") == NODE and trainer:
                for k in ("image", "command", "args"):
                    if trainer.get(k) is not None:
                        ct[k] = copy.deepcopy(trainer[k])
                upsert(ct.setdefault("env", []), trainer.get("env") or [])
    js_spec["suspend"] = bool(spec.get("suspend"))
    jobset = {
        "apiVersion": JS_API,
        "kind": "JobSet",
        "metadata": {"name": name, "namespace": ns, "ownerReferences": [_owner(job)]},
        "spec": jobset_defaults(js_spec),
    }
    if labels:
        jobset["metadata"]["labels"] = labels
    if annotations:
        jobset["metadata"]["annotations"] = annotations
    return jobset


def jobset_defaults(spec: dict[str, Any]) -> dict[str, Any]:
    """The JobSet webhook's Default()."""
    spec.setdefault("successPolicy", {"operator": "All"})
    spec.setdefault("startupPolicy", {"startupPolicyOrder": "AnyOrder"})
    for rjob in spec.get("replicatedJobs") or []:
        rjob.setdefault("replicas", 1)
        rjob.setdefault("groupName", "default")
        jspec = rjob.setdefault("template", {}).setdefault("spec", {})
        jspec.setdefault("completionMode", "Indexed")
        jspec.setdefault("template", {}).setdefault("spec", {}).setdefault("restartPolicy", "OnFailure")
    net = spec.setdefault("network", {})
    net.setdefault("enableDNSHostnames", True)
    net.setdefault("publishNotReadyAddresses", True)
    for i, rule in enumerate((spec.get("failurePolicy") or {}).get("rules") or []):
        rule.setdefault("name", f"failurePolicyRule{i}")
    return spec


# --- JobSet and its Jobs ------------------------------------------------------------------------


class JobState:
    """One emulated batch/v1 Job (Indexed) of a JobSet restart attempt."""

    def __init__(self, name: str, namespace: str, spec: dict[str, Any]):
        self.name, self.namespace, self.uid = name, namespace, str(uuid.uuid4())
        self.spec = spec
        self.counted: set[str] = set()  # failed pod uids already judged
        self.failed = 0
        self.condition: dict[str, Any] | None = None  # {type: Complete|Failed, reason, message, lastTransitionTime}
        self.succeeded: set[int] = set()

    @property
    def ref(self) -> dict[str, Any]:
        meta = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        return {"apiVersion": "batch/v1", "kind": "Job", "metadata": meta}

    def finished(self) -> str | None:
        return self.condition["type"] if self.condition else None


class JobSetController:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.ctx = Ctx(manager="jobset", internal=True)
        self.jobs: dict[tuple[str, str, int], JobState] = {}  # (jobset uid, job name, restart attempt)
        self._serial = -1

    def __call__(self) -> None:
        rt = self.c.catalog.by_kind(JS_GROUP, "JobSet")
        if rt is None or self.c.store.serial == self._serial:
            return
        self._serial = self.c.store.serial
        live = set()
        for js in self.c.store.list(rt.key):
            live.add(js["metadata"]["uid"])
            try:
                self.reconcile(rt, js)
            except ApiError:
                self._serial = -1
        for key in [k for k in self.jobs if k[0] not in live]:
            del self.jobs[key]

    def _event(self, obj: dict[str, Any], type_: str, reason: str, message: str, component: str = "jobset") -> None:
        self.c.registry.record_event(obj, type_, reason, message, component)

    def _delete_pod(self, pod: dict[str, Any], job: JobState | None) -> None:
        if pod["metadata"].get("deletionTimestamp"):
            return
        try:
            self.c.registry.delete(self.c.rt("pods"), pod["metadata"]["namespace"], pod["metadata"]["name"])
        except ApiError:
            return
        if job is not None:
            self._event(
                job.ref, "Normal", "SuccessfulDelete", f"Deleted pod: {pod['metadata']['name']}", "job-controller"
            )

    def reconcile(self, rt: ResourceType, stored: dict[str, Any]) -> None:
        meta = stored["metadata"]
        if meta.get("deletionTimestamp"):
            return
        js = self.c.registry.present(rt, copy.deepcopy(stored))
        ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
        status = copy.deepcopy(stored.get("status") or {})
        old = copy.deepcopy(status)
        status.setdefault("restarts", 0)
        conds = status.setdefault("conditions", [])
        events: list[tuple[str, str, str]] = []

        def cond(ctype: str, cstatus: str, reason: str, message: str, etype: str = "Normal") -> None:
            """setCondition: an exclusive True condition turns the other False; an Event per change."""
            cur = next((x for x in conds if x["type"] == ctype), None)
            if cur is None and cstatus != "True":
                return
            if set_condition(conds, ctype, cstatus, reason, message):
                events.append((etype, reason, message))
                if cstatus == "True":
                    for x in conds:
                        excl = {x["type"], ctype} in ({"Completed", "Failed"}, {"Suspended", "Restarting"})
                        if excl and x["status"] == "True" and x["type"] != ctype:
                            x["status"] = "False"

        spec = js["spec"]
        restarts = int(status["restarts"])
        pods = [p for p in self.c.store.list(("", "pods"), ns) if _owned_by(p, uid)]
        suspended = bool(spec.get("suspend"))
        finished = _true(conds, "Completed") or _true(conds, "Failed")

        # The Jobs of this attempt, and the pods of older attempts (being deleted).
        jobs: list[tuple[dict[str, Any], int, JobState]] = []
        for rjob in spec.get("replicatedJobs") or []:
            for i in range(int(rjob.get("replicas", 1))):
                jname = f"{name}-{rjob['name']}-{i}"
                key = (uid, jname, restarts)
                if key not in self.jobs:
                    self.jobs[key] = JobState(jname, ns, rjob["template"].get("spec") or {})
                jobs.append((rjob, i, self.jobs[key]))
        for key in [k for k in self.jobs if k[0] == uid and k[2] < restarts]:
            del self.jobs[key]
        stale = [p for p in pods if int((p["metadata"].get("labels") or {}).get(L_RESTART, "0") or 0) < restarts]
        for p in stale:
            self._delete_pod(p, None)

        if not finished:  # the headless Service before the Jobs (and so before any pod)
            self._headless_service(js)
        for rjob, i, job in jobs:
            jpods = [
                p for p in pods if (p["metadata"].get("labels") or {}).get(L_JOB_NAME) == job.name and p not in stale
            ]
            self._sync_job(js, rjob, i, job, jpods, restarts, suspended or finished, stale)

        # replicatedJobsStatus
        rstat = []
        for rjob in spec.get("replicatedJobs") or []:
            s = {"name": rjob["name"], "ready": 0, "succeeded": 0, "failed": 0, "active": 0, "suspended": 0}
            for r, _, job in jobs:
                if r is not rjob:
                    continue
                state = job.finished()
                if state == "Complete":
                    s["succeeded"] += 1
                elif state == "Failed":
                    s["failed"] += 1
                else:
                    jpods = [
                        p
                        for p in self.c.store.list(("", "pods"), ns)
                        if (p["metadata"].get("labels") or {}).get(L_JOB_NAME) == job.name
                        and (p["metadata"].get("labels") or {}).get(L_RESTART) == str(restarts)
                    ]
                    active = [
                        p
                        for p in jpods
                        if p["status"].get("phase") not in ("Succeeded", "Failed")
                        and not p["metadata"].get("deletionTimestamp")
                    ]
                    ready = sum(
                        1
                        for p in active
                        if any(
                            x["type"] == "Ready" and x["status"] == "True" for x in p["status"].get("conditions") or []
                        )
                    )
                    n = min(int(job.spec.get("parallelism", 1)), int(job.spec.get("completions", 1)))
                    if len(job.succeeded) + ready >= n:
                        s["ready"] += 1
                    if active:
                        s["active"] += 1
                    if suspended:
                        s["suspended"] += 1
            rstat.append(s)
        status["replicatedJobsStatus"] = rstat

        if not finished:
            failed = [job for _, _, job in jobs if job.finished() == "Failed"]
            done = [job for _, _, job in jobs if job.finished() == "Complete"]
            total = sum(int(r.get("replicas", 1)) for r in spec.get("replicatedJobs") or [])
            if not suspended and sum(r["ready"] + r["succeeded"] for r in rstat) == total:
                cond("Restarting", "False", "JobsReady", "all jobs are ready")
            if failed:
                self._failure_policy(js, spec, status, failed, jobs, cond, events)
            elif done and self._succeeded(spec, jobs):
                cond("Completed", "True", "AllJobsCompleted", "jobset completed successfully")
                cond("Restarting", "False", "JobSetCompleted", "jobset completed successfully")
                status["terminalState"] = "Completed"
            else:
                if suspended:
                    cond("Suspended", "True", "SuspendedJobs", "jobset is suspended")
                    cond("Restarting", "False", "JobSetSuspended", "jobset is suspended")
                else:
                    cond("Suspended", "False", "ResumeJobs", "jobset is resumed")
        if not status.get("conditions"):
            status.pop("conditions", None)
        if status != old:
            cur = dict(copy.deepcopy(stored), status=status)
            cur["metadata"].pop("resourceVersion", None)
            self.c.registry.update(rt, ns, name, cur, self.ctx, subresource="status")
            for etype, reason, message in events:
                self._event(js, etype, reason, message)

    @staticmethod
    def _succeeded(spec: dict[str, Any], jobs: list[tuple[dict[str, Any], int, JobState]]) -> bool:
        policy = spec.get("successPolicy") or {"operator": "All"}
        targets = policy.get("targetReplicatedJobs") or [r["name"] for r in spec.get("replicatedJobs") or []]
        relevant = [job for r, _, job in jobs if r["name"] in targets]
        done = [job for job in relevant if job.finished() == "Complete"]
        return len(done) >= (1 if policy.get("operator") == "Any" else len(relevant))

    def _failure_policy(self, js, spec, status, failed: list[JobState], jobs, cond, events) -> None:
        fp = spec.get("failurePolicy")
        first = min(failed, key=lambda j: j.condition["lastTransitionTime"])
        rjob_of = {job.name: r["name"] for r, _, job in jobs}

        def fail(reason: str, message: str) -> None:
            cond("Failed", "True", reason, message, "Warning")
            cond("Restarting", "False", "JobSetFailed", "jobset failed")
            status["terminalState"] = "Failed"

        if fp is None:
            return fail("FailedJobs", f"jobset failed due to one or more job failures (first failed job: {first.name})")
        rule, matched = None, first
        for r in fp.get("rules") or []:
            hits = [
                j
                for j in failed
                if (not r.get("onJobFailureReasons") or j.condition["reason"] in r["onJobFailureReasons"])
                and (
                    not r.get("onJobFailureMessagePatterns")
                    or any(re.search(p, j.condition["message"]) for p in r["onJobFailureMessagePatterns"])
                )
                and (not r.get("targetReplicatedJobs") or rjob_of[j.name] in r["targetReplicatedJobs"])
            ]
            if hits:
                rule, matched = r, min(hits, key=lambda j: j.condition["lastTransitionTime"])
                break
        action = rule["action"] if rule else "RestartJobSet"
        if action == "FailJobSet":
            return fail(
                "FailJobSetFailurePolicyAction",
                f"applying FailJobSet failure policy action (first failed job: {matched.name})",
            )
        if action == "RestartJobSet" and int(status.get("restartsCountTowardsMax", 0)) >= int(fp.get("maxRestarts", 0)):
            return fail(
                "ReachedMaxRestarts",
                f"jobset failed due to reaching max number of restarts (first failed job: {matched.name})",
            )
        if action not in ("RestartJobSet", "RestartJobSetAndIgnoreMaxRestarts"):
            return  # RestartJob & co.: behind a feature gate that is off by default
        reason = {
            "RestartJobSet": "RestartJobSetFailurePolicyAction",
            "RestartJobSetAndIgnoreMaxRestarts": "RestartJobSetAndIgnoreMaxRestartsFailurePolicyAction",
        }[action]
        message = {
            "RestartJobSet": "applying RestartJobSet failure policy action",
            "RestartJobSetAndIgnoreMaxRestarts": "applying RestartJobSetAndIgnoreMaxRestarts failure policy action",
        }[action] + f" (first failed job: {matched.name})"
        status["restarts"] = int(status.get("restarts", 0)) + 1
        if action == "RestartJobSet":
            status["restartsCountTowardsMax"] = int(status.get("restartsCountTowardsMax", 0)) + 1
        events.append(("Warning", reason, message))
        cond_reason = f"FailurePolicy_{rule['name']}" if rule else "DefaultFailurePolicy"
        cond("Restarting", "True", cond_reason, message, "Warning")

    def _headless_service(self, js: dict[str, Any]) -> None:
        net = js["spec"].get("network") or {}
        if not net.get("enableDNSHostnames"):
            return
        ns, sub = js["metadata"]["namespace"], net.get("subdomain") or js["metadata"]["name"]
        if self.c.store.exists(("", "services"), ns, sub):
            return
        svc = {
            "apiVersion": "v1",
            "kind": "Service",
            "metadata": {"name": sub, "namespace": ns, "ownerReferences": [_owner(js)]},
            "spec": {
                "clusterIP": "None",
                "selector": {L_JOBSET: js["metadata"]["name"]},
                "publishNotReadyAddresses": bool(net.get("publishNotReadyAddresses", True)),
            },
        }
        try:
            self.c.registry.create(self.c.rt("services"), ns, svc, self.ctx)
        except ApiError as err:
            self._event(js, "Warning", "HeadlessServiceCreationFailed", err.message)

    # --- the Job controller --------------------------------------------------------------------

    def _sync_job(
        self,
        js: dict[str, Any],
        rjob: dict[str, Any],
        idx: int,
        job: JobState,
        pods: list[dict[str, Any]],
        restarts: int,
        stop: bool,
        stale: list[dict[str, Any]],
    ) -> None:
        completions = int(job.spec.get("completions", 1))
        for p in pods:
            if p["status"].get("phase") == "Succeeded":
                job.succeeded.add(int(p["metadata"]["labels"].get(L_COMPLETION_INDEX, -1)))
            if p["status"].get("phase") == "Failed" and p["metadata"]["uid"] not in job.counted and not job.finished():
                job.counted.add(p["metadata"]["uid"])
                self._judge_failure(job, p)
        if not job.finished() and len(job.succeeded) >= completions:
            job.condition = {
                "type": "Complete",
                "reason": "CompletionsReached",
                "message": "Reached expected number of succeeded pods",
                "lastTransitionTime": ts(),
            }
            self._event(job.ref, "Normal", "Completed", "Job completed", "job-controller")
        active = [p for p in pods if p["status"].get("phase") not in ("Succeeded", "Failed")]
        if job.finished() or stop:
            for p in active:
                self._delete_pod(p, job)
            return
        older = [p for p in stale if (p["metadata"].get("labels") or {}).get(L_JOB_NAME) == job.name]
        if older:
            return  # the previous attempt's Job is still being deleted (foreground): same name
        busy = {
            int(p["metadata"]["labels"].get(L_COMPLETION_INDEX, -1))
            for p in pods
            if p["status"].get("phase") not in ("Succeeded", "Failed")
        }
        for index in range(completions):
            if index not in job.succeeded and index not in busy:
                self._create_pod(js, rjob, idx, job, index, restarts)

    def _judge_failure(self, job: JobState, pod: dict[str, Any]) -> None:
        """podFailurePolicy, then backoffLimit (pkg/controller/job/pod_failure_policy.go)."""
        pname = f"{pod['metadata']['namespace']}/{pod['metadata']['name']}"
        action = None
        for i, rule in enumerate((job.spec.get("podFailurePolicy") or {}).get("rules") or []):
            msg = None
            req = rule.get("onExitCodes")
            if req:
                for cs in pod["status"].get("containerStatuses") or []:
                    term = (cs.get("state") or {}).get("terminated")
                    if term is None or (req.get("containerName") and req["containerName"] != cs["name"]):
                        continue
                    code = int(term.get("exitCode", 0))
                    if code != 0 and (code in req.get("values", [])) == (req.get("operator") == "In"):
                        msg = f"Container {cs['name']} for pod {pname} failed with exit code {code} matching {rule['action']} rule at index {i}"
                        break
            for pc in rule.get("onPodConditions") or []:
                for x in pod["status"].get("conditions") or []:
                    if x.get("type") == pc.get("type") and x.get("status") == pc.get("status", "True"):
                        msg = f"Pod {pname} has condition {pc['type']} matching {rule['action']} rule at index {i}"
            if msg is not None:
                action = rule["action"]
                break
        if action == "Ignore":
            return
        if action == "FailJob":
            job.condition = {"type": "Failed", "reason": "PodFailurePolicy", "message": msg, "lastTransitionTime": ts()}
            self._event(job.ref, "Warning", "PodFailurePolicy", msg, "job-controller")
            return
        job.failed += 1
        if job.failed > int(job.spec.get("backoffLimit", 6)):
            message = "Job has reached the specified backoff limit"
            job.condition = {
                "type": "Failed",
                "reason": "BackoffLimitExceeded",
                "message": message,
                "lastTransitionTime": ts(),
            }
            self._event(job.ref, "Warning", "BackoffLimitExceeded", message, "job-controller")

    def _create_pod(
        self, js: dict[str, Any], rjob: dict[str, Any], idx: int, job: JobState, index: int, restarts: int
    ) -> None:
        ns, jsname, jsuid = js["metadata"]["namespace"], js["metadata"]["name"], js["metadata"]["uid"]
        spec = js["spec"]
        replicas = [(r["name"], int(r.get("replicas", 1))) for r in spec.get("replicatedJobs") or []]
        before = 0
        for rname, n in replicas:
            if rname == rjob["name"]:
                break
            before += n
        group = rjob.get("groupName", "default")
        group_jobs = [
            (r["name"], int(r.get("replicas", 1)))
            for r in spec["replicatedJobs"]
            if r.get("groupName", "default") == group
        ]
        gbefore = 0
        for rname, n in group_jobs:
            if rname == rjob["name"]:
                break
            gbefore += n
        js_keys = {
            L_JOBSET: jsname,
            L_JOBSET_UID: jsuid,
            L_RJOB: rjob["name"],
            L_RESTART: str(restarts),
            L_RJOB_REPLICAS: str(rjob.get("replicas", 1)),
            L_GLOBAL_REPLICAS: str(sum(n for _, n in replicas)),
            L_JOB_INDEX: str(idx),
            L_JOB_KEY: hashlib.sha1(f"{ns}/{job.name}".encode()).hexdigest(),
            L_JOB_GLOBAL_INDEX: str(before + idx),
            L_GROUP: group,
            L_GROUP_REPLICAS: str(sum(n for _, n in group_jobs)),
            L_JOB_GROUP_INDEX: str(gbefore + idx),
        }
        job_keys = {
            L_CONTROLLER_UID: job.uid,
            L_JOB_NAME: job.name,
            "controller-uid": job.uid,
            "job-name": job.name,
            L_COMPLETION_INDEX: str(index),
        }
        tpl = copy.deepcopy((rjob.get("template") or {}).get("spec", {}).get("template") or {})
        tmeta, pspec = tpl.get("metadata") or {}, tpl.get("spec") or {}
        labels = {**(tmeta.get("labels") or {}), **js_keys, **job_keys}
        annotations = {**(tmeta.get("annotations") or {}), **js_keys, L_COMPLETION_INDEX: str(index)}
        # The Job's own labels (the trainjob-ancestor-step) are not the pod template's: not on the pod.
        suffix = "".join(random.choice(POD_SUFFIX_ALPHABET) for _ in range(5))
        pod_name = f"{job.name}-{index}-{suffix}"
        pspec["hostname"] = f"{job.name}-{index}"
        if (spec.get("network") or {}).get("enableDNSHostnames"):
            pspec["subdomain"] = (spec.get("network") or {}).get("subdomain") or jsname
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {
                "name": pod_name,
                "namespace": ns,
                "labels": labels,
                "annotations": annotations,
                "ownerReferences": [_owner(js)],
            },
            "spec": pspec,
        }
        try:
            self.c.registry.create(self.c.rt("pods"), ns, pod, self.ctx)
        except ApiError as err:
            self._event(job.ref, "Warning", "FailedCreate", f"Error creating: {err.message}", "job-controller")
            raise
        self._event(job.ref, "Normal", "SuccessfulCreate", f"Created pod: {pod_name}", "job-controller")
