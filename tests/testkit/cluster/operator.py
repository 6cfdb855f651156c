"""Training Operator v1.9 (PyTorchJob) and Kueue stand-ins.

The PyTorchJob reconcile follows kubeflow/trainer@v1.9.4 (pkg/controller.v1/common job.go,
pod.go, service.go; pkg/util/status.go; pkg/controller.v1/pytorch), for what ctrlnet's jobs use:
* pods `<job>-<master|worker>-<i>` with the operator's labels, owner reference and env (MASTER_ADDR,
  MASTER_PORT from the `pytorch` container's port `pytorchjob-port` (default 23456), WORLD_SIZE,
  RANK, PET_*); workers get the `init-pytorch` init container that waits for the master's name
  (the kubelet emulates it); a headless Service per pod;
* restart policies: ExitCode (pod restartPolicy Never; exit >= 128, e.g. 143 after SIGTERM, deletes
  and re-creates the pod, 1-127 fails the job with the operator's quirky `job "<name>" is failing
  because "<Type>" replica(s) failed.` and no completionTime), OnFailure/Always (a Failed pod is
  re-created), Never (the job fails);
* conditions Created/Running/Restarting/Succeeded/Failed/Suspended with the operator's reasons and
  messages, replica statuses, and the Events ctrlnet reads (SuccessfulCreatePod,
  ExitedWithCode "Pod: <ns>.<pod> exited with code N", PyTorchJobResumed, ...);
* `runPolicy.suspend` (pods and Services deleted; resumed: re-created), cleanPodPolicy None/Running/All.
Not emulated: backoffLimit, activeDeadlineSeconds, ttlSecondsAfterFinished, elasticPolicy, the
validating webhook, gang scheduling, other job kinds; TrainJobs: trainer_v2.py.

Kueue (v0.19): a PyTorchJob or TrainJob labelled `kueue.x-k8s.io/queue-name` is suspended at
creation (the mutating webhook), gets a Workload `pytorchjob-<name>-<5 hex>` / `trainjob-<name>-<5
hex>` (owner: the job; podSets master and worker with the replica templates, or the JobSet's
replicatedJobs) that stays QuotaReserved=False until the test admits it
(`LoopbackCluster.admit_workload`), which unsuspends the job; Finished when the job ends. No quota
is computed.
"""

from __future__ import annotations

import copy
import hashlib
import json
from typing import TYPE_CHECKING, Any

from . import errors as E
from .errors import ApiError
from .registry import Ctx, ResourceType, ts

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

KIND = "PyTorchJob"
OPERATOR = "pytorchjob-controller"
L_JOB = "training.kubeflow.org/job-name"
L_OP = "training.kubeflow.org/operator-name"
L_TYPE = "training.kubeflow.org/replica-type"
L_INDEX = "training.kubeflow.org/replica-index"
L_ROLE = "training.kubeflow.org/job-role"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_PORT = 23456
PORT_NAME = "pytorchjob-port"


def _order(replicas: dict[str, Any]) -> list[str]:
    known = [r for r in ("Master", "Worker") if r in replicas]
    return known + sorted(r for r in replicas if r not in known)


def _is_true(status: dict[str, Any], t: str) -> bool:
    return any(c.get("type") == t and c.get("status") == "True" for c in status.get("conditions") or [])


def is_finished(status: dict[str, Any]) -> bool:
    return _is_true(status, "Succeeded") or _is_true(status, "Failed")


def update_condition(status: dict[str, Any], ctype: str, cstatus: str, reason: str, message: str) -> None:
    """pkg/util/status.go: one condition per type; Running and Restarting replace each other, a
    finished job's Running turns False, nothing changes once Failed."""
    if _is_true(status, "Failed"):
        return
    conds = status.get("conditions") or []
    cur = next((c for c in conds if c.get("type") == ctype), None)
    if cur is not None and cur.get("status") == cstatus and cur.get("reason") == reason:
        return
    now = ts()
    new = {"type": ctype, "status": cstatus, "reason": reason, "message": message}
    new.update(lastUpdateTime=now, lastTransitionTime=now)
    if cur is not None and cur.get("status") == cstatus:
        new["lastTransitionTime"] = cur.get("lastTransitionTime", now)
    out = []
    for c in conds:
        if c.get("type") == ctype or {ctype, c.get("type")} == {"Running", "Restarting"}:
            continue
        if ctype in ("Failed", "Succeeded") and c.get("type") == "Running":
            c = dict(c, status="False")
        out.append(c)
    status["conditions"] = out + [new]


class PyTorchJobController:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.seen: set[str] = set()
        self.ctx = Ctx(manager="training-operator", internal=True)
        self._serial = -1

    def __call__(self) -> None:
        rt = self.c.catalog.by_kind("kubeflow.org", KIND)
        # The operator reconciles on changes of jobs, pods and services, not on a timer.
        if rt is None or self.c.store.serial == self._serial:
            return
        self._serial = self.c.store.serial
        for job in self.c.store.list(rt.key):
            try:
                self.reconcile(rt, job)
            except ApiError:
                self._serial = -1  # retry on the next pass

    def _event(self, job: dict[str, Any], type_: str, reason: str, message: str) -> None:
        self.c.registry.record_event(job, type_, reason, message, OPERATOR)

    @staticmethod
    def defaulted(job: dict[str, Any]) -> dict[str, Any]:
        """SetDefaults_PyTorchJob, applied in memory as the controller does."""
        job = copy.deepcopy(job)
        spec = job.setdefault("spec", {})
        spec.setdefault("runPolicy", {}).setdefault("cleanPodPolicy", "None")
        for rs in (spec.get("pytorchReplicaSpecs") or {}).values():
            rs.setdefault("replicas", 1)
            rs.setdefault("restartPolicy", "OnFailure")
            for ct in rs.setdefault("template", {}).setdefault("spec", {}).get("containers") or []:
                if ct.get("name") == "pytorch":
                    ports = ct.setdefault("ports", [])
                    if not any(p.get("name") == PORT_NAME for p in ports):
                        ports.append({"name": PORT_NAME, "containerPort": DEFAULT_PORT})
        if (spec.get("elasticPolicy") or {}).get("nProcPerNode") is None:
            spec.setdefault("nprocPerNode", "auto")
        return job

    def _owned(self, kind_key: tuple[str, str], job: dict[str, Any]) -> list[dict[str, Any]]:
        meta = job["metadata"]
        return [
            o
            for o in self.c.store.list(kind_key, meta["namespace"])
            if (o["metadata"].get("labels") or {}).get(L_JOB) == meta["name"]
            and any(
                r.get("controller") and r.get("uid") == meta["uid"] for r in o["metadata"].get("ownerReferences") or []
            )
        ]

    def _delete(self, kind_key: tuple[str, str], obj: dict[str, Any], job: dict[str, Any], what: str) -> None:
        try:
            self.c.registry.delete(
                self.c.catalog.by_key(kind_key), obj["metadata"]["namespace"], obj["metadata"]["name"]
            )
        except ApiError as err:
            if err.code != 404:
                self._event(job, "Warning", f"FailedDelete{what}", f"Error deleting: {err.message}")
            return
        self._event(job, "Normal", f"SuccessfulDelete{what}", f"Deleted {what.lower()}: {obj['metadata']['name']}")

    def _delete_pods_and_services(
        self, job: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]]
    ) -> None:
        policy = job["spec"]["runPolicy"].get("cleanPodPolicy", "None")
        finished = is_finished(status)
        if finished and policy == "None":
            return
        for pod in pods:
            if finished and policy == "Running" and pod["status"].get("phase") not in ("Running", "Pending"):
                continue
            self._delete(("", "pods"), pod, job, "Pod")
            svc = self.c.store.get(("", "services"), pod["metadata"]["namespace"], pod["metadata"]["name"])
            if svc is not None:
                self._delete(("", "services"), svc, job, "Service")

    def reconcile(self, rt: ResourceType, stored: dict[str, Any]) -> None:
        meta = stored["metadata"]
        if meta.get("deletionTimestamp"):
            return
        job, name = self.defaulted(stored), meta["name"]
        status = copy.deepcopy(stored.get("status") or {})
        if meta["uid"] not in self.seen:
            self.seen.add(meta["uid"])
            update_condition(status, "Created", "True", f"{KIND}Created", f"{KIND} {name} is created.")
        old_status = copy.deepcopy(status)
        replicas = job["spec"].get("pytorchReplicaSpecs") or {}
        pods = self._owned(("", "pods"), job)

        if is_finished(status):
            self._delete_pods_and_services(job, status, pods)
            if _is_true(status, "Succeeded"):
                for rs in (status.get("replicaStatuses") or {}).values():
                    if rs.get("active"):
                        rs["succeeded"] = rs.get("succeeded", 0) + rs.pop("active")
        elif job["spec"]["runPolicy"].get("suspend"):
            self._delete_pods_and_services(job, status, pods)
            for rs in (status.get("replicaStatuses") or {}).values():
                rs.pop("active", None)
            msg = f"{KIND} {name} is suspended."
            if _is_true(status, "Running"):
                update_condition(status, "Running", "False", f"{KIND}Suspended", msg)
            if not _is_true(status, "Suspended"):
                update_condition(status, "Suspended", "True", f"{KIND}Suspended", msg)
            self._event(stored, "Normal", f"{KIND}Suspended", msg)
        else:
            if _is_true(status, "Suspended"):
                msg = f"{KIND} {name} is resumed."
                update_condition(status, "Suspended", "False", f"{KIND}Resumed", msg)
                status["startTime"] = ts()
                self._event(stored, "Normal", f"{KIND}Resumed", msg)
            try:
                services = self._owned(("", "services"), job)
                for rtype in _order(replicas):
                    self._reconcile_pods(job, stored, status, pods, rtype, replicas)
                    self._reconcile_services(job, stored, services, rtype, replicas[rtype])
            except ApiError:
                if status != old_status:
                    self._write_status(rt, stored, status)
                raise
            self._update_job_status(stored, job, replicas, status)
        if status != old_status:
            self._write_status(rt, stored, status)

    def _write_status(self, rt: ResourceType, job: dict[str, Any], status: dict[str, Any]) -> None:
        cur = dict(copy.deepcopy(job), status=status)
        cur["metadata"].pop("resourceVersion", None)
        meta = job["metadata"]
        self.c.registry.update(rt, meta["namespace"], meta["name"], cur, self.ctx, subresource="status")

    def _reconcile_pods(
        self,
        job: dict[str, Any],
        stored: dict[str, Any],
        status: dict[str, Any],
        pods: list[dict[str, Any]],
        rtype: str,
        replicas: dict[str, Any],
    ) -> None:
        spec, rt_l, name = replicas[rtype], rtype.lower(), job["metadata"]["name"]
        rstat = status.setdefault("replicaStatuses", {})[rtype] = {}
        n = int(spec.get("replicas", 1))
        slices: dict[int, list[dict[str, Any]]] = {}
        for p in pods:
            labels = p["metadata"].get("labels") or {}
            if labels.get(L_TYPE) == rt_l and labels.get(L_INDEX, "").isdigit():
                slices.setdefault(int(labels[L_INDEX]), []).append(p)
        for index in range(max([n] + [i + 1 for i in slices])):
            got = slices.get(index, [])
            if not got and index < n:
                self._create_pod(job, stored, rtype, index, spec, replicas)
            if len(got) != 1:
                continue
            pod = got[0]
            if index >= n:
                self._delete(("", "pods"), pod, stored, "Pod")
            exit_code = 0xBEEF
            for cs in pod["status"].get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == "pytorch" and term is not None:
                    exit_code = int(term.get("exitCode", 0))
                    msg = f"Pod: {pod['metadata']['namespace']}.{pod['metadata']['name']} exited with code {exit_code}"
                    self._event(stored, "Normal", "ExitedWithCode", msg)
            phase = pod["status"].get("phase")
            if phase == "Failed":
                policy = spec.get("restartPolicy")
                if (policy == "ExitCode" and exit_code >= 128) or policy in ("OnFailure", "Always"):
                    self._delete(("", "pods"), pod, stored, "Pod")
                    msg = f"job {name} is restarting because {rtype} replica(s) failed."
                    self._event(stored, "Warning", f"{KIND}Restarting", msg)
                    update_condition(status, "Restarting", "True", f"{KIND}Restarting", msg)
                elif policy == "ExitCode":
                    msg = f'job "{name}" is failing because "{rtype}" replica(s) failed.'
                    self._event(stored, "Warning", f"{KIND}Failed", msg)
                    update_condition(status, "Failed", "True", f"{KIND}Failed", msg)
            if phase == "Running":
                key = "failed" if pod["metadata"].get("deletionTimestamp") else "active"
            else:
                key = {"Succeeded": "succeeded", "Failed": "failed"}.get(phase)
            if key:
                rstat[key] = rstat.get(key, 0) + 1

    @staticmethod
    def _labels(name: str, rt_l: str, index: int) -> dict[str, str]:
        return {L_OP: OPERATOR, L_JOB: name, L_TYPE: rt_l, L_INDEX: str(index)}

    @staticmethod
    def _owner_ref(job: dict[str, Any]) -> dict[str, Any]:
        meta = job["metadata"]
        return {
            "apiVersion": "kubeflow.org/v1",
            "kind": KIND,
            "name": meta["name"],
            "uid": meta["uid"],
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def _create_pod(
        self,
        job: dict[str, Any],
        stored: dict[str, Any],
        rtype: str,
        index: int,
        spec: dict[str, Any],
        replicas: dict[str, Any],
    ) -> None:
        name, ns, rt_l = job["metadata"]["name"], job["metadata"]["namespace"], rtype.lower()
        labels = self._labels(name, rt_l, index)
        if rtype == "Master" or ("Master" not in replicas and rtype == "Worker" and index == 0):
            labels[L_ROLE] = "master"
        template = copy.deepcopy(spec.get("template") or {})
        tmeta, pspec = template.get("metadata") or {}, template.get("spec") or {}
        self._set_env(job, pspec, rt_l, index, replicas)
        if "Master" in replicas and rt_l == "worker":
            pspec.setdefault("initContainers", []).append(
                {
                    "name": "init-pytorch",
                    "image": "alpine:3.10",
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "limits": {"cpu": "100m", "memory": "20Mi"},
                        "requests": {"cpu": "50m", "memory": "10Mi"},
                    },
                    "command": [
                        "sh",
                        "-c",
                        f"err=1;for i in $(seq 100); do if nslookup {name}-master-0; then err=0 && break; "
                        "fi;echo waiting for master; sleep 2; done; exit $err",
                    ],
                }
            )
        if pspec.get("restartPolicy"):
            msg = "Restart policy in pod template will be overwritten by restart policy in replica spec"
            self._event(stored, "Warning", "SetPodTemplateRestartPolicy", msg)
        policy = spec.get("restartPolicy", "OnFailure")
        pspec["restartPolicy"] = "Never" if policy == "ExitCode" else policy
        pod_meta: dict[str, Any] = {
            "name": f"{name}-{rt_l}-{index}",
            "namespace": ns,
            "labels": {**(tmeta.get("labels") or {}), **labels},
            "ownerReferences": [self._owner_ref(job)],
        }
        if tmeta.get("annotations"):
            pod_meta["annotations"] = dict(tmeta["annotations"])
        pod = {"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": pspec}
        try:
            self.c.registry.create(self.c.catalog.by_key(("", "pods")), ns, pod, self.ctx)
        except ApiError as err:
            self._event(stored, "Warning", "FailedCreatePod", f"Error creating: {err.message}")
            raise
        self._event(stored, "Normal", "SuccessfulCreatePod", f"Created pod: {pod_meta['name']}")

    def _set_env(
        self, job: dict[str, Any], pspec: dict[str, Any], rt_l: str, index: int, replicas: dict[str, Any]
    ) -> None:
        """The env of every container (pkg/controller.v1/pytorch/envvar.go). Does not use `self`:
        testkit.container calls it with None to build the same pods without a cluster."""
        spec, name = job["spec"], job["metadata"]["name"]
        total = sum(int(rs.get("replicas", 1)) for rs in replicas.values())
        nproc = spec.get("nprocPerNode")
        nproc_int = int(nproc) if isinstance(nproc, int) or (isinstance(nproc, str) and nproc.isdigit()) else 1
        for ct in pspec.get("containers") or []:
            env = ct.setdefault("env", [])
            env.append({"name": "PYTHONUNBUFFERED", "value": "1"})
            if "Master" in replicas:
                port = None
                for mc in ((replicas["Master"].get("template") or {}).get("spec") or {}).get("containers") or []:
                    if mc.get("name") == "pytorch":
                        port = next(
                            (p.get("containerPort") for p in mc.get("ports") or [] if p.get("name") == PORT_NAME), None
                        )
                if port is None:
                    raise E.bad_request("port not found")
                rank = index + 1 if rt_l == "worker" else index
                for key, value in (
                    ("MASTER_PORT", port),
                    ("PET_MASTER_PORT", port),
                    ("MASTER_ADDR", f"{name}-master-0"),
                    ("PET_MASTER_ADDR", f"{name}-master-0"),
                    ("WORLD_SIZE", total * nproc_int),
                    ("RANK", rank),
                    ("PET_NODE_RANK", rank),
                ):
                    env.append({"name": key, "value": str(value)})
            if nproc is not None:
                env.append({"name": "PET_NPROC_PER_NODE", "value": str(nproc)})
            if spec.get("elasticPolicy") is None:
                env.append({"name": "PET_NNODES", "value": str(total)})

    def _reconcile_services(
        self,
        job: dict[str, Any],
        stored: dict[str, Any],
        services: list[dict[str, Any]],
        rtype: str,
        spec: dict[str, Any],
    ) -> None:
        rt_l, name, ns = rtype.lower(), job["metadata"]["name"], job["metadata"]["namespace"]
        n = int(spec.get("replicas", 1))
        by_index: dict[int, list[dict[str, Any]]] = {}
        for s in services:
            labels = s["metadata"].get("labels") or {}
            if labels.get(L_TYPE) == rt_l and labels.get(L_INDEX, "").isdigit():
                by_index.setdefault(int(labels[L_INDEX]), []).append(s)
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        pytorch = next((ct for ct in containers if ct.get("name") == "pytorch"), {})
        ports = [{"name": p["name"], "port": p["containerPort"]} for p in pytorch.get("ports") or [] if p.get("name")]
        for index in range(max([n] + [i + 1 for i in by_index])):
            got = by_index.get(index, [])
            if not got and index < n:
                labels = self._labels(name, rt_l, index)
                svc = {
                    "apiVersion": "v1",
                    "kind": "Service",
                    "metadata": {
                        "name": f"{name}-{rt_l}-{index}",
                        "namespace": ns,
                        "labels": labels,
                        "ownerReferences": [self._owner_ref(job)],
                    },
                    "spec": {"clusterIP": "None", "selector": labels, "ports": ports},
                }
                try:
                    self.c.registry.create(self.c.catalog.by_key(("", "services")), ns, svc, self.ctx)
                except ApiError as err:
                    self._event(stored, "Warning", "FailedCreateService", f"Error creating: {err.message}")
                    raise
                self._event(stored, "Normal", "SuccessfulCreateService", f"Created service: {name}-{rt_l}-{index}")
            elif len(got) == 1 and index >= n:
                self._delete(("", "services"), got[0], stored, "Service")

    def _update_job_status(
        self, stored: dict[str, Any], job: dict[str, Any], replicas: dict[str, Any], status: dict[str, Any]
    ) -> None:
        """UpdateJobStatus: Running while the master (or, without one, a worker) runs; Succeeded
        when the master (else every worker) succeeded; Restarting or Failed on failed replicas."""
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        status.setdefault("startTime", ts())
        for rtype in _order(replicas):
            spec = replicas[rtype]
            rs = status.setdefault("replicaStatuses", {}).setdefault(rtype, {})
            rs["selector"] = f"{L_JOB}={name},{L_OP}={OPERATOR},{L_TYPE}={rtype.lower()}"
            succeeded, running, failed = rs.get("succeeded", 0), rs.get("active", 0), rs.get("failed", 0)
            n = int(spec.get("replicas", 1))
            lead = rtype == "Master" or ("Master" not in replicas and rtype == "Worker")
            who = name if "Master" in replicas else f"{ns}/{name}"
            if lead and running > 0 and n - succeeded > 0:
                update_condition(status, "Running", "True", f"{KIND}Running", f"{KIND} {who} is running.")
            if lead and n - succeeded == 0:
                done = "is successfully completed." if "Master" in replicas else "successfully completed."
                msg = f"{KIND} {who} {done}"
                self._event(stored, "Normal", f"{KIND}Succeeded", msg)
                status.setdefault("completionTime", ts())
                update_condition(status, "Succeeded", "True", f"{KIND}Succeeded", msg)
                if rtype == "Master":
                    return
            if failed > 0 and n > succeeded + running:
                if spec.get("restartPolicy") != "Never":
                    msg = f"{KIND} {name} is restarting because {failed} {rtype} replica(s) failed."
                    self._event(stored, "Warning", f"{KIND}Restarting", msg)
                    update_condition(status, "Restarting", "True", f"{KIND}Restarting", msg)
                else:
                    msg = f"{KIND} {name} is failed because {failed} {rtype} replica(s) failed."
                    self._event(stored, "Normal", f"{KIND}Failed", msg)
                    status.setdefault("completionTime", ts())
                    update_condition(status, "Failed", "True", f"{KIND}Failed", msg)


# --- Kueue ---------------------------------------------------------------------------------------


def workload_name(job_name: str, uid: str, kind: str = KIND, group: str = "kubeflow.org") -> str:
    """jobframework.GetWorkloadNameForOwnerWithGVK (kueue v0.19)."""
    h = hashlib.sha1(f"{kind}\n{group}\n{job_name}\n{uid}".encode()).hexdigest()
    return f"{kind.lower()}-{job_name}"[: 253 - 6] + f"-{h[:5]}"


# The job kinds the Kueue stand-in manages: (group, kind) -> the path of the job's suspend flag.
KUEUE_JOBS = {
    ("kubeflow.org", KIND): ("spec", "runPolicy", "suspend"),
    ("trainer.kubeflow.org", "TrainJob"): ("spec", "suspend"),
}


def _suspend_patch(path: tuple[str, ...], value: bool) -> dict[str, Any]:
    out: dict[str, Any] = {path[-1]: value}
    for k in reversed(path[:-1]):
        out = {k: out}
    return out


def _suspended(job: dict[str, Any], path: tuple[str, ...]) -> bool:
    cur: Any = job
    for k in path:
        cur = (cur or {}).get(k)
    return bool(cur)


def kueue_webhook(rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, ctx: Ctx) -> None:
    """Kueue's mutating webhook: a queued job is created suspended."""
    path = KUEUE_JOBS.get((rt.group, rt.kind))
    if path is not None and old is None and (obj["metadata"].get("labels") or {}).get(QUEUE_LABEL):
        cur = obj
        for k in path[:-1]:
            cur = cur.setdefault(k, {})
        cur[path[-1]] = True


class KueueController:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.ctx = Ctx(manager="kueue", internal=True)

    def __call__(self) -> None:
        wl_rt = self.c.catalog.by_kind("kueue.x-k8s.io", "Workload")
        if wl_rt is None:
            return
        for group, kind in KUEUE_JOBS:
            jobs_rt = self.c.catalog.by_kind(group, kind)
            if jobs_rt is None:
                continue
            for job in self.c.store.list(jobs_rt.key):
                queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)
                if queue and not job["metadata"].get("deletionTimestamp"):
                    try:
                        self._reconcile(jobs_rt, wl_rt, self.c.registry.present(jobs_rt, job), queue)
                    except ApiError:
                        pass

    def _pod_sets(self, jobs_rt: ResourceType, job: dict[str, Any]) -> list[dict[str, Any]] | None:
        """The Workload's podSets: a PyTorchJob's replicas; a TrainJob's JobSet's replicatedJobs
        (None until the Trainer stand-in made it)."""
        if jobs_rt.kind == KIND:
            replicas = job["spec"].get("pytorchReplicaSpecs") or {}
            return [
                {
                    "name": r.lower(),
                    "count": int(replicas[r].get("replicas", 1)),
                    "template": replicas[r].get("template") or {},
                }
                for r in _order(replicas)
            ]
        js_rt = self.c.catalog.by_kind("jobset.x-k8s.io", "JobSet")
        meta = job["metadata"]
        js = self.c.store.get(js_rt.key, meta["namespace"], meta["name"]) if js_rt else None
        if js is None:
            return None
        return [
            {
                "name": r["name"],
                "count": int(r.get("replicas", 1)) * int(r["template"]["spec"].get("parallelism", 1)),
                "template": r["template"]["spec"].get("template") or {},
            }
            for r in js["spec"].get("replicatedJobs") or []
        ]

    def _write_status(self, wl_rt: ResourceType, wl: dict[str, Any], conds: list[dict[str, Any]], **extra) -> dict:
        gen = wl["metadata"].get("generation", 1)
        wl["status"] = dict(wl.get("status") or {}, **extra)
        wl["status"]["conditions"] = [{"lastTransitionTime": ts(), **x, "observedGeneration": gen} for x in conds]
        meta = wl["metadata"]
        return self.c.registry.update(wl_rt, meta["namespace"], meta["name"], wl, self.ctx, subresource="status")

    def _reconcile(self, jobs_rt: ResourceType, wl_rt: ResourceType, job: dict[str, Any], queue: str) -> None:
        c, meta = self.c, job["metadata"]
        ns, name = meta["namespace"], workload_name(meta["name"], meta["uid"], jobs_rt.kind, jobs_rt.group)
        path = KUEUE_JOBS[(jobs_rt.group, jobs_rt.kind)]
        wl = c.store.get(wl_rt.key, ns, name)
        if wl is None:
            pod_sets = self._pod_sets(jobs_rt, job)
            if pod_sets is None:
                return
            owner = {
                "apiVersion": jobs_rt.api_version(),
                "kind": jobs_rt.kind,
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
            wl_meta = {"name": name, "namespace": ns, "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]}}
            wl = {
                "apiVersion": wl_rt.api_version(),
                "kind": "Workload",
                "metadata": {**wl_meta, "ownerReferences": [owner]},
                "spec": {"queueName": queue, "podSets": pod_sets, "active": True},
            }
            wl = c.registry.create(wl_rt, ns, wl, self.ctx)
            c.registry.record_event(
                job, "Normal", "CreatedWorkload", f"Created Workload: {ns}/{name}", "kueue-job-controller"
            )
        conds = (wl.get("status") or {}).get("conditions") or []
        admitted = _is_true({"conditions": conds}, "Admitted")
        if not conds:
            lq = c.catalog.by_kind("kueue.x-k8s.io", "LocalQueue")
            if lq is None or not c.store.exists(lq.key, ns, queue):
                reason, message = "Inadmissible", f"LocalQueue {queue} doesn't exist"
            else:
                first = wl["spec"]["podSets"][0]["name"]
                reason, message = "Pending", f"couldn't assign flavors to pod set {first}: insufficient unused quota"
            wl = self._write_status(
                wl_rt, wl, [{"type": "QuotaReserved", "status": "False", "reason": reason, "message": message}]
            )
            c.registry.record_event(wl, "Warning", reason, message, "kueue-admission")
        if admitted and _suspended(job, path):
            body = json.dumps(_suspend_patch(path, False)).encode()
            c.registry.patch(jobs_rt, ns, meta["name"], "application/merge-patch+json", body, self.ctx)
            cq = wl["status"]["admission"]["clusterQueue"]
            c.registry.record_event(job, "Normal", "Started", f"Admitted by clusterQueue {cq}", "kueue-job-controller")
        ended = [
            x
            for x in (job.get("status") or {}).get("conditions") or []
            if x["type"] in ("Succeeded", "Complete", "Failed")
        ]
        if any(x["status"] == "True" for x in ended) and not any(x.get("type") == "Finished" for x in conds):
            done = next(x for x in ended if x["status"] == "True")
            finished = {
                "type": "Finished",
                "status": "True",
                "reason": "Failed" if done["type"] == "Failed" else "Succeeded",
                "message": done.get("message", ""),
            }
            self._write_status(wl_rt, wl, conds + [finished])

    def find_job(self, namespace: str, name: str) -> tuple[dict[str, Any] | None, ResourceType | None]:
        """The PyTorchJob, else the TrainJob, named `name` (and its type)."""
        for group, kind in KUEUE_JOBS:
            rt = self.c.catalog.by_kind(group, kind)
            obj = self.c.store.get(rt.key, namespace, name) if rt else None
            if obj is not None:
                return self.c.registry.present(rt, obj), rt
        return None, None

    def workload_for(self, namespace: str, name: str) -> dict[str, Any] | None:
        job, rt = self.find_job(namespace, name)
        wl_rt = self.c.catalog.by_kind("kueue.x-k8s.io", "Workload")
        if job is None or wl_rt is None:
            return None
        wl = self.c.store.get(wl_rt.key, namespace, workload_name(name, job["metadata"]["uid"], rt.kind, rt.group))
        return self.c.registry.present(wl_rt, wl) if wl else None

    def admit(self, namespace: str, job_name: str, cluster_queue: str = "cluster-queue") -> dict[str, Any]:
        c = self.c
        wl_rt = c.catalog.by_kind("kueue.x-k8s.io", "Workload")
        job, jobs_rt = self.find_job(namespace, job_name)
        if job is None or wl_rt is None:
            raise E.not_found("kubeflow.org", "pytorchjobs", job_name)
        with c.store.lock:
            wname = workload_name(job_name, job["metadata"]["uid"], jobs_rt.kind, jobs_rt.group)
            wl = c.registry.get(wl_rt, namespace, wname)
            reserved = f"Quota reserved in ClusterQueue {cluster_queue}"
            conds = [
                {"type": "QuotaReserved", "status": "True", "reason": "QuotaReserved", "message": reserved},
                {"type": "Admitted", "status": "True", "reason": "Admitted", "message": "The workload is admitted"},
            ]
            assignments = [
                {"name": ps["name"], "count": ps.get("count", 1), "flavors": {}} for ps in wl["spec"]["podSets"]
            ]
            admission = {"clusterQueue": cluster_queue, "podSetAssignments": assignments}
            out = self._write_status(wl_rt, wl, conds, admission=admission)
            msg = f"Admitted by ClusterQueue {cluster_queue}, wait time since reservation was 0s"
            c.registry.record_event(out, "Normal", "Admitted", msg, "kueue-admission")
        c.wake()
        return out
