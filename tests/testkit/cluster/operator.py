"""Training Operator v1.9 (PyTorchJob) and Kueue stand-ins.

The PyTorchJob reconcile follows kubeflow/trainer@v1.9.4: pkg/controller.v1/common/job.go
(ReconcileJobs), pod.go (ReconcilePods, createNewPod), service.go, pkg/core (backoff limit,
replica statuses, restart policy), pkg/util/status.go (condition bookkeeping),
pkg/controller.v1/pytorch (env vars, the worker init container, UpdateJobStatus) and the
validating webhook pkg/webhooks/pytorch. That includes the operator's quirks, kept on purpose:
* ExitCode + exit code 1-127: the job fails with `job "<name>" is failing because "<Type>"
  replica(s) failed.` and no completionTime (the ExitedWithCode Event names the pod and code);
* `runPolicy.backoffLimit` counts container restarts of Running pods (OnFailure/Always/ExitCode
  replicas), plus any new failure when the limit is 0 (its NumRequeues is always 0): pods that
  ExitCode recreates do not count against a limit above 0;
* every container gets the env, the Master's port comes from the `pytorch` container's port named
  `pytorchjob-port` (defaulted to 23456), PET_NPROC_PER_NODE defaults to "auto".
Not emulated: elasticPolicy (PET_RDZV_*), HPA, activeDeadlineSeconds is honoured only on
reconciles (no timer), gang scheduling other than Volcano's PodGroup, MPI/TF/XGBoost jobs.

Kueue (v0.19): a PyTorchJob labelled `kueue.x-k8s.io/queue-name` is suspended at creation (the
mutating webhook), gets a Workload `pytorchjob-<name>-<5 hex>` (owner: the job; podSets master
and worker with the replica templates) that stays QuotaReserved=False until the test admits it
(`LoopbackCluster.admit_workload`), which unsuspends the job. No quota is computed.
"""

from __future__ import annotations

import copy
import hashlib
import time
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from . import errors as E
from .errors import ApiError, FieldError
from .registry import DNS1035_LABEL, MSG_1035, Ctx, ResourceType, ts
from .selectors import format_selector

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

KIND = "PyTorchJob"
OPERATOR = "pytorchjob-controller"
MANAGER = "training-operator"
L_JOB = "training.kubeflow.org/job-name"
L_OP = "training.kubeflow.org/operator-name"
L_TYPE = "training.kubeflow.org/replica-type"
L_INDEX = "training.kubeflow.org/replica-index"
L_ROLE = "training.kubeflow.org/job-role"
QUEUE_LABEL = "kueue.x-k8s.io/queue-name"
DEFAULT_PORT = 23456
PORT_NAME = "pytorchjob-port"
INIT_IMAGE = "alpine:3.10"
INIT_TRIES = 100


def _order(replicas: dict[str, Any]) -> list[str]:
    known = [r for r in ("Master", "Worker") if r in replicas]
    return known + sorted(r for r in replicas if r not in known)


def _parse_ts(s: str | None) -> float | None:
    if not s:
        return None
    return datetime.strptime(s, "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=UTC).timestamp()


# --- conditions (pkg/util/status.go) -------------------------------------------------------------


def _is_true(status: dict[str, Any], t: str) -> bool:
    return any(c.get("type") == t and c.get("status") == "True" for c in status.get("conditions") or [])


def is_finished(status: dict[str, Any]) -> bool:
    return _is_true(status, "Succeeded") or _is_true(status, "Failed")


def update_condition(status: dict[str, Any], ctype: str, cstatus: str, reason: str, message: str) -> None:
    if _is_true(status, "Failed"):
        return
    conds = status.get("conditions") or []
    cur = next((c for c in conds if c.get("type") == ctype), None)
    if cur is not None and cur.get("status") == cstatus and cur.get("reason") == reason:
        return
    now = ts()
    new = {
        "type": ctype,
        "status": cstatus,
        "reason": reason,
        "message": message,
        "lastUpdateTime": now,
        "lastTransitionTime": now,
    }
    if cur is not None and cur.get("status") == cstatus:
        new["lastTransitionTime"] = cur.get("lastTransitionTime", now)
    out = []
    for c in conds:
        if ctype == "Restarting" and c.get("type") == "Running":
            continue
        if ctype == "Running" and c.get("type") == "Restarting":
            continue
        if c.get("type") == ctype:
            continue
        if ctype in ("Failed", "Succeeded") and c.get("type") == "Running":
            c = dict(c, status="False")
        out.append(c)
    out.append(new)
    status["conditions"] = out


# --- the webhook ---------------------------------------------------------------------------------


def pytorchjob_webhook(rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, ctx: Ctx) -> None:
    """validator.pytorchjob.training-operator.kubeflow.org (create and update)."""
    if (rt.group, rt.kind) != ("kubeflow.org", KIND) or (ctx.internal and old is not None):
        return
    errs: list[FieldError] = []
    name = obj["metadata"].get("name", "")
    if not DNS1035_LABEL.match(name) or len(name) > 63:
        detail = "must be no more than 63 characters" if len(name) > 63 else MSG_1035
        errs.append(FieldError("metadata.name", "Invalid value", f"should match: {detail}", value=name))
    spec = obj.get("spec") or {}
    managed_by = (spec.get("runPolicy") or {}).get("managedBy")
    if managed_by is not None and managed_by not in ("kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"):
        errs.append(
            FieldError(
                "spec.runPolicy.managedBy",
                "Unsupported value",
                'supported values: "kubeflow.org/training-operator", "kueue.x-k8s.io/multikueue"',
                value=managed_by,
            )
        )
    if spec.get("elasticPolicy") is not None:
        if "Worker" not in (spec.get("pytorchReplicaSpecs") or {}):
            errs.append(
                FieldError(
                    "spec.pytorchReplicaSpecs[Worker]", "Required value", "must be configured if elastic policy is used"
                )
            )
        if spec["elasticPolicy"].get("nProcPerNode") is not None and spec.get("nprocPerNode") is not None:
            errs.append(
                FieldError("spec.elasticPolicy.nProcPerNode", "Forbidden", "must not be used with spec.nprocPerNode")
            )
    rspecs = spec.get("pytorchReplicaSpecs")
    if rspecs is None:
        errs.append(FieldError("spec.pytorchReplicaSpecs", "Required value", "must be required"))
    for rtype, rs in (rspecs or {}).items():
        role = f"spec.pytorchReplicaSpecs[{rtype}]"
        cpath = f"{role}.template.spec.containers"
        if rtype not in ("Master", "Worker"):
            errs.append(FieldError(role, "Unsupported value", 'supported values: "Master", "Worker"', value=rtype))
        containers = (((rs or {}).get("template") or {}).get("spec") or {}).get("containers") or []
        if not containers:
            errs.append(FieldError(cpath, "Required value", "must be specified"))
        for i, c in enumerate(containers):
            if not c.get("image"):
                errs.append(FieldError(f"{cpath}[{i}].image", "Required value", "must be required"))
        if not any(c.get("name") == "pytorch" for c in containers):
            errs.append(FieldError(cpath, "Required value", "must have at least one container with name pytorch"))
        replicas = (rs or {}).get("replicas")
        if rtype == "Master":
            if replicas is None or int(replicas) != 1:
                errs.append(FieldError(f"{role}.replicas", "Forbidden", "must be 1"))
        elif replicas is not None and int(replicas) < 1:
            errs.append(FieldError(f"{role}.replicas", "Forbidden", "must be at least 1"))
    if errs:
        texts = [str(e) for e in errs]
        agg = texts[0] if len(texts) == 1 else "[" + ", ".join(texts) + "]"
        raise ApiError(
            403,
            "Forbidden",
            f'admission webhook "validator.pytorchjob.training-operator.kubeflow.org" denied the request: {agg}',
        )


class PyTorchJobController:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.seen: set[str] = set()
        self.ctx = Ctx(manager=MANAGER, internal=True)
        self._serial = -1

    def __call__(self) -> None:
        c = self.c
        rt = c.catalog.by_kind("kubeflow.org", KIND)
        if rt is None or not c.run_operator:
            return
        # The operator reconciles on changes of jobs, pods and services (not on a timer), except for
        # the jobs whose ttlSecondsAfterFinished / activeDeadlineSeconds need the clock.
        changed = c.store.serial != self._serial
        self._serial = c.store.serial
        for job in c.store.list(rt.key):
            rp = (job.get("spec") or {}).get("runPolicy") or {}
            if not changed and rp.get("ttlSecondsAfterFinished") is None and rp.get("activeDeadlineSeconds") is None:
                continue
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
        rp = spec.setdefault("runPolicy", {})
        rp.setdefault("cleanPodPolicy", "None")
        for rs in (spec.get("pytorchReplicaSpecs") or {}).values():
            rs.setdefault("replicas", 1)
            rs.setdefault("restartPolicy", "OnFailure")
            pspec = rs.setdefault("template", {}).setdefault("spec", {})
            for ct in pspec.get("containers") or []:
                if ct.get("name") == "pytorch":
                    ports = ct.setdefault("ports", [])
                    if not any(p.get("name") == PORT_NAME for p in ports):
                        ports.append({"name": PORT_NAME, "containerPort": DEFAULT_PORT})
                    break
        if spec.get("elasticPolicy") is None or spec["elasticPolicy"].get("nProcPerNode") is None:
            spec.setdefault("nprocPerNode", "auto")
        return job

    def _owned(self, kind_key: tuple[str, str], job: dict[str, Any]) -> list[dict[str, Any]]:
        meta = job["metadata"]
        out = []
        for o in self.c.store.list(kind_key, meta["namespace"]):
            labels = o["metadata"].get("labels") or {}
            if labels.get(L_JOB) != meta["name"] or labels.get(L_OP) != OPERATOR:
                continue
            refs = o["metadata"].get("ownerReferences") or []
            if any(r.get("controller") and r.get("uid") == meta["uid"] for r in refs):
                out.append(o)
        return out

    def _write_status(self, rt: ResourceType, job: dict[str, Any], status: dict[str, Any]) -> None:
        cur = copy.deepcopy(job)
        cur["status"] = status
        cur["metadata"].pop("resourceVersion", None)
        self.c.registry.update(
            rt, job["metadata"]["namespace"], job["metadata"]["name"], cur, self.ctx, subresource="status"
        )

    def _delete(self, kind_key: tuple[str, str], obj: dict[str, Any], job: dict[str, Any], what: str) -> None:
        rt = self.c.catalog.by_key(kind_key)
        try:
            self.c.registry.delete(rt, obj["metadata"]["namespace"], obj["metadata"]["name"], self.ctx)
        except ApiError as err:
            if err.code != 404:
                self._event(job, "Warning", f"FailedDelete{what}", f"Error deleting: {err.message}")
            return
        self._event(job, "Normal", f"SuccessfulDelete{what}", f"Deleted {what.lower()}: {obj['metadata']['name']}")

    def _delete_pods_and_services(
        self, job: dict[str, Any], status: dict[str, Any], pods: list[dict[str, Any]]
    ) -> None:
        policy = job["spec"]["runPolicy"].get("cleanPodPolicy", "None")
        if not pods:
            return
        finished = is_finished(status)
        if finished and policy == "None":
            return
        for pod in pods:
            phase = (pod.get("status") or {}).get("phase")
            if finished and policy == "Running" and phase not in ("Running", "Pending"):
                continue
            self._delete(("", "pods"), pod, job, "Pod")
            svc = self.c.store.get(("", "services"), pod["metadata"]["namespace"], pod["metadata"]["name"])
            if svc is not None:
                self._delete(("", "services"), svc, job, "Service")

    def _cleanup_job(self, rt: ResourceType, job: dict[str, Any], status: dict[str, Any]) -> bool:
        """TTL after finished; True when the job was deleted."""
        ttl = job["spec"]["runPolicy"].get("ttlSecondsAfterFinished")
        if ttl is None or job["spec"]["runPolicy"].get("suspend"):
            return False
        done = _parse_ts(status.get("completionTime"))
        if done is None:
            return False  # "job completion time is nil, cannot cleanup"
        if time.time() >= done + int(ttl):
            try:
                self.c.registry.delete(rt, job["metadata"]["namespace"], job["metadata"]["name"], self.ctx)
                self._event(job, "Normal", "SuccessfulDeletePod", f"Deleted job: {job['metadata']['name']}")
            except ApiError:
                pass
            return True
        return False

    def reconcile(self, rt: ResourceType, stored: dict[str, Any]) -> None:
        meta = stored["metadata"]
        if meta.get("deletionTimestamp"):
            return
        managed_by = ((stored.get("spec") or {}).get("runPolicy") or {}).get("managedBy")
        if managed_by and managed_by != "kubeflow.org/training-operator":
            return
        job = self.defaulted(stored)
        name = meta["name"]
        status = copy.deepcopy(stored.get("status") or {})
        if meta["uid"] not in self.seen:
            self.seen.add(meta["uid"])
            update_condition(status, "Created", "True", f"{KIND}Created", f"{KIND} {name} is created.")
        old_status = copy.deepcopy(status)
        replicas = job["spec"].get("pytorchReplicaSpecs") or {}
        run_policy = job["spec"]["runPolicy"]
        pods = self._owned(("", "pods"), job)
        services = self._owned(("", "services"), job)

        if is_finished(status):
            self._delete_pods_and_services(job, status, pods)
            if self._cleanup_job(rt, job, status):
                return
            if _is_true(status, "Succeeded"):
                for rs in (status.get("replicaStatuses") or {}).values():
                    if rs.get("active"):
                        rs["succeeded"] = rs.get("succeeded", 0) + rs.pop("active")
            if status != old_status:
                self._write_status(rt, stored, status)
            return

        if run_policy.get("suspend"):
            self._delete_pods_and_services(job, status, pods)
            for rs in (status.get("replicaStatuses") or {}).values():
                rs.pop("active", None)
            msg = f"{KIND} {name} is suspended."
            if _is_true(status, "Running"):
                update_condition(status, "Running", "False", f"{KIND}Suspended", msg)
            if not _is_true(status, "Suspended"):
                update_condition(status, "Suspended", "True", f"{KIND}Suspended", msg)
            self._event(stored, "Normal", f"{KIND}Suspended", msg)
            if status != old_status:
                self._write_status(rt, stored, status)
            return
        if _is_true(status, "Suspended"):
            msg = f"{KIND} {name} is resumed."
            update_condition(status, "Suspended", "False", f"{KIND}Resumed", msg)
            status["startTime"] = ts()
            self._event(stored, "Normal", f"{KIND}Resumed", msg)

        active = [
            p
            for p in pods
            if (p.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
            and not p["metadata"].get("deletionTimestamp")
        ]
        self._record_abnormal(stored, active)
        failed = sum(1 for p in pods if (p.get("status") or {}).get("phase") == "Failed")
        total = sum(int(rs.get("replicas", 1)) for rs in replicas.values())
        prev_failed = sum(int(rs.get("failed", 0)) for rs in (status.get("replicaStatuses") or {}).values())
        exceeds = past = False
        limit = run_policy.get("backoffLimit")
        if limit is not None:
            exceeds = failed > prev_failed and len(active) != total and (0 + 1 > int(limit))
            past = self._past_backoff_limit(int(limit), replicas, pods)
        failure = None
        if exceeds or past:
            failure = f"Job {name} has failed because it has reached the specified backoff limit"
        elif run_policy.get("activeDeadlineSeconds") is not None and status.get("startTime"):
            started = _parse_ts(status["startTime"]) or time.time()
            if time.time() - started >= int(run_policy["activeDeadlineSeconds"]):
                failure = f"Job {name} has failed because it was active longer than specified deadline"
        if failure:
            status.setdefault("completionTime", ts())
            self._event(stored, "Normal", f"{KIND}Failed", failure)
            update_condition(status, "Failed", "True", f"{KIND}Failed", failure)
            self._delete_pods_and_services(job, status, pods)
            self._cleanup_job(rt, job, status)
            self._write_status(rt, stored, status)
            return

        if self.c.gang_scheduler == "volcano":
            self._sync_podgroup(job, total)
        try:
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

    def _record_abnormal(self, job: dict[str, Any], active: list[dict[str, Any]]) -> None:
        for pod in active:
            st = pod.get("status") or {}
            statuses = st.get("containerStatuses") or st.get("initContainerStatuses") or []
            for cs in statuses:
                term = (cs.get("state") or {}).get("terminated")
                wait = (cs.get("state") or {}).get("waiting")
                if term and term.get("exitCode"):
                    self._event(
                        job,
                        "Warning",
                        term.get("reason") or "Error",
                        f"Error pod {pod['metadata']['name']} container {cs['name']} exitCode: {term['exitCode']} "
                        f"terminated message: {term.get('message', '')}",
                    )
                if wait and wait.get("message"):
                    self._event(
                        job,
                        "Warning",
                        wait.get("reason") or "",
                        f"Error pod {pod['metadata']['name']} container {cs['name']} waiting message: {wait['message']}",
                    )
            if statuses or not st.get("conditions"):
                continue
            last = sorted(st["conditions"], key=lambda c: c.get("lastTransitionTime") or "")[-1]
            if last.get("status") != "True":
                self._event(
                    job,
                    "Warning",
                    last.get("reason") or "",
                    f"Error pod {pod['metadata']['name']} condition message: {last.get('message', '')}",
                )

    @staticmethod
    def _past_backoff_limit(limit: int, replicas: dict[str, Any], pods: list[dict[str, Any]]) -> bool:
        result = 0
        for rtype, rs in replicas.items():
            if rs.get("restartPolicy") not in ("OnFailure", "Always", "ExitCode"):
                continue
            for p in pods:
                if (p["metadata"].get("labels") or {}).get(L_TYPE) != rtype.lower():
                    continue
                st = p.get("status") or {}
                if st.get("phase") != "Running":
                    continue
                for cs in (st.get("initContainerStatuses") or []) + (st.get("containerStatuses") or []):
                    result += int(cs.get("restartCount") or 0)
        return result > 0 if limit == 0 else result >= limit

    def _reconcile_pods(
        self,
        job: dict[str, Any],
        stored: dict[str, Any],
        status: dict[str, Any],
        pods: list[dict[str, Any]],
        rtype: str,
        replicas: dict[str, Any],
    ) -> None:
        spec = replicas[rtype]
        rt_l = rtype.lower()
        name = job["metadata"]["name"]
        mine = [p for p in pods if (p["metadata"].get("labels") or {}).get(L_TYPE) == rt_l]
        status.setdefault("replicaStatuses", {})[rtype] = {}
        rstat = status["replicaStatuses"][rtype]
        n = int(spec.get("replicas", 1))
        slices: dict[int, list[dict[str, Any]]] = {}
        for p in mine:
            try:
                idx = int((p["metadata"].get("labels") or {}).get(L_INDEX, ""))
            except ValueError:
                continue
            slices.setdefault(idx, []).append(p)
        for index in range(max([n] + [i + 1 for i in slices])):
            got = slices.get(index, [])
            if len(got) > 1:
                continue
            if not got:
                if index < n:
                    self._create_pod(job, stored, rtype, index, spec, replicas)
                continue
            pod = got[0]
            if index >= n:
                self._delete(("", "pods"), pod, stored, "Pod")
            exit_code = 0xBEEF
            for cs in (pod.get("status") or {}).get("containerStatuses") or []:
                term = (cs.get("state") or {}).get("terminated")
                if cs.get("name") == "pytorch" and term is not None:
                    exit_code = int(term.get("exitCode", 0))
                    self._event(
                        stored,
                        "Normal",
                        "ExitedWithCode",
                        f"Pod: {pod['metadata']['namespace']}.{pod['metadata']['name']} exited with code {exit_code}",
                    )
            if (pod.get("status") or {}).get("phase") == "Failed":
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
            phase = (pod.get("status") or {}).get("phase")
            if phase == "Running":
                key = "failed" if pod["metadata"].get("deletionTimestamp") else "active"
                rstat[key] = rstat.get(key, 0) + 1
            elif phase == "Succeeded":
                rstat["succeeded"] = rstat.get("succeeded", 0) + 1
            elif phase == "Failed":
                rstat["failed"] = rstat.get("failed", 0) + 1

    def _labels(self, name: str, rt_l: str, index: int) -> dict[str, str]:
        return {L_OP: OPERATOR, L_JOB: name.replace("/", "-"), L_TYPE: rt_l, L_INDEX: str(index)}

    def _owner_ref(self, job: dict[str, Any]) -> dict[str, Any]:
        return {
            "apiVersion": "kubeflow.org/v1",
            "kind": KIND,
            "name": job["metadata"]["name"],
            "uid": job["metadata"]["uid"],
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
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        rt_l = rtype.lower()
        labels = self._labels(name, rt_l, index)
        if "Master" in replicas:
            master_role = rtype == "Master"
        else:
            master_role = rtype == "Worker" and index == 0
        if master_role:
            labels[L_ROLE] = "master"
        template = copy.deepcopy(spec.get("template") or {})
        tmeta = template.get("metadata") or {}
        pod_labels = dict(tmeta.get("labels") or {})
        pod_labels.update(labels)
        pspec = template.get("spec") or {}
        self._set_env(job, pspec, rt_l, index, replicas)
        if "Master" in replicas and rt_l == "worker":
            master = f"{name}-master-0"
            pspec.setdefault("initContainers", []).append(
                {
                    "name": "init-pytorch",
                    "image": INIT_IMAGE,
                    "imagePullPolicy": "IfNotPresent",
                    "resources": {
                        "limits": {"cpu": "100m", "memory": "20Mi"},
                        "requests": {"cpu": "50m", "memory": "10Mi"},
                    },
                    "command": [
                        "sh",
                        "-c",
                        f"err=1;for i in $(seq {INIT_TRIES}); do if nslookup {master}; then err=0 && break; "
                        f"fi;echo waiting for master; sleep 2; done; exit $err",
                    ],
                }
            )
        if pspec.get("restartPolicy"):
            self._event(
                stored,
                "Warning",
                "SetPodTemplateRestartPolicy",
                "Restart policy in pod template will be overwritten by restart policy in replica spec",
            )
        policy = spec.get("restartPolicy", "OnFailure")
        pspec["restartPolicy"] = "Never" if policy == "ExitCode" else policy
        annotations = dict(tmeta.get("annotations") or {})
        if self.c.gang_scheduler == "volcano":
            pspec.setdefault("schedulerName", "volcano")
            annotations["scheduling.k8s.io/group-name"] = name
            annotations["volcano.sh/task-spec"] = rt_l
        pod_meta: dict[str, Any] = {
            "name": f"{name}-{rt_l}-{index}".replace("/", "-"),
            "namespace": ns,
            "labels": pod_labels,
            "ownerReferences": [self._owner_ref(job)],
        }
        if annotations:
            pod_meta["annotations"] = annotations
        for k in ("finalizers",):
            if tmeta.get(k):
                pod_meta[k] = tmeta[k]
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
        spec = job["spec"]
        total = sum(int(rs.get("replicas", 1)) for rs in replicas.values())
        nproc = spec.get("nprocPerNode")
        nproc_int = (
            int(nproc) if isinstance(nproc, str) and nproc.isdigit() else (nproc if isinstance(nproc, int) else 1)
        )
        name = job["metadata"]["name"]
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
                addr = f"{name}-master-0"
                env += [
                    {"name": "MASTER_PORT", "value": str(port)},
                    {"name": "PET_MASTER_PORT", "value": str(port)},
                    {"name": "MASTER_ADDR", "value": addr},
                    {"name": "PET_MASTER_ADDR", "value": addr},
                ]
                rank = index + 1 if rt_l == "worker" else index
                env += [
                    {"name": "WORLD_SIZE", "value": str(total * nproc_int)},
                    {"name": "RANK", "value": str(rank)},
                    {"name": "PET_NODE_RANK", "value": str(rank)},
                ]
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
        rt_l = rtype.lower()
        name, ns = job["metadata"]["name"], job["metadata"]["namespace"]
        n = int(spec.get("replicas", 1))
        by_index: dict[int, list[dict[str, Any]]] = {}
        for s in services:
            labels = s["metadata"].get("labels") or {}
            if labels.get(L_TYPE) != rt_l:
                continue
            try:
                by_index.setdefault(int(labels.get(L_INDEX, "")), []).append(s)
            except ValueError:
                continue
        ports = []
        for ct in ((spec.get("template") or {}).get("spec") or {}).get("containers") or []:
            if ct.get("name") == "pytorch":
                ports = [
                    {"name": p["name"], "port": p["containerPort"]} for p in ct.get("ports") or [] if p.get("name")
                ]
        for index in range(max([n] + [i + 1 for i in by_index])):
            got = by_index.get(index, [])
            if len(got) > 1:
                continue
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
            elif got and index >= n:
                self._delete(("", "services"), got[0], stored, "Service")

    def _update_job_status(
        self, stored: dict[str, Any], job: dict[str, Any], replicas: dict[str, Any], status: dict[str, Any]
    ) -> None:
        name = job["metadata"]["name"]
        if not status.get("startTime"):
            status["startTime"] = ts()
        for rtype in _order(replicas):
            spec = replicas[rtype]
            rs = status.setdefault("replicaStatuses", {}).setdefault(rtype, {})
            rs["selector"] = format_selector({L_OP: OPERATOR, L_JOB: name, L_TYPE: rtype.lower()})
            succeeded, running, failed = rs.get("succeeded", 0), rs.get("active", 0), rs.get("failed", 0)
            n = int(spec.get("replicas", 1))
            expected = n - succeeded
            if "Master" in replicas:
                if rtype == "Master":
                    if running > 0:
                        update_condition(status, "Running", "True", f"{KIND}Running", f"{KIND} {name} is running.")
                    if expected == 0:
                        msg = f"{KIND} {name} is successfully completed."
                        self._event(stored, "Normal", f"{KIND}Succeeded", msg)
                        status.setdefault("completionTime", ts())
                        update_condition(status, "Succeeded", "True", f"{KIND}Succeeded", msg)
                        return
            elif rtype == "Worker":
                if expected == 0:
                    msg = f"{KIND} {job['metadata']['namespace']}/{name} successfully completed."
                    self._event(stored, "Normal", f"{KIND}Succeeded", msg)
                    status.setdefault("completionTime", ts())
                    update_condition(status, "Succeeded", "True", f"{KIND}Succeeded", msg)
                elif running > 0:
                    update_condition(
                        status,
                        "Running",
                        "True",
                        f"{KIND}Running",
                        f"{KIND} {job['metadata']['namespace']}/{name} is running.",
                    )
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

    def _sync_podgroup(self, job: dict[str, Any], total: int) -> None:
        rt = self.c.catalog.by_key(("scheduling.volcano.sh", "podgroups"))
        meta = job["metadata"]
        if self.c.store.exists(rt.key, meta["namespace"], meta["name"]):
            return
        sp = job["spec"]["runPolicy"].get("schedulingPolicy") or {}
        pg = {
            "apiVersion": "scheduling.volcano.sh/v1beta1",
            "kind": "PodGroup",
            "metadata": {
                "name": meta["name"],
                "namespace": meta["namespace"],
                "ownerReferences": [self._owner_ref(job)],
            },
            "spec": {"minMember": int(sp.get("minAvailable") or total), "queue": sp.get("queue") or "default"},
        }
        if sp.get("priorityClass"):
            pg["spec"]["priorityClassName"] = sp["priorityClass"]
        self.c.registry.create(rt, meta["namespace"], pg, self.ctx)


# --- Kueue ---------------------------------------------------------------------------------------


def workload_name(job_name: str, uid: str, kind: str = KIND, group: str = "kubeflow.org") -> str:
    """jobframework.GetWorkloadNameForOwnerWithGVK (kueue v0.19, long names)."""
    prefix = f"{kind.lower()}-{job_name}"[: 253 - 6]
    h = hashlib.sha1(f"{kind}\n{group}\n{job_name}\n{uid}".encode()).hexdigest()
    return f"{prefix}-{h[:5]}"


def kueue_webhook(rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, ctx: Ctx) -> None:
    """Kueue's mutating webhook: a queued job is created suspended."""
    if (rt.group, rt.kind) != ("kubeflow.org", KIND) or old is not None:
        return
    if (obj["metadata"].get("labels") or {}).get(QUEUE_LABEL):
        obj.setdefault("spec", {}).setdefault("runPolicy", {})["suspend"] = True


class KueueController:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.ctx = Ctx(manager="kueue", internal=True)

    def workload_type(self) -> ResourceType | None:
        return self.c.catalog.by_kind("kueue.x-k8s.io", "Workload")

    def __call__(self) -> None:
        c = self.c
        jobs_rt = c.catalog.by_kind("kubeflow.org", KIND)
        wl_rt = self.workload_type()
        if jobs_rt is None or wl_rt is None:
            return
        for job in c.store.list(jobs_rt.key):
            queue = (job["metadata"].get("labels") or {}).get(QUEUE_LABEL)
            if not queue or job["metadata"].get("deletionTimestamp"):
                continue
            try:
                self._reconcile(jobs_rt, wl_rt, job, queue)
            except ApiError:
                pass

    def _pending(self, job: dict[str, Any], queue: str) -> tuple[str, str]:
        ns = job["metadata"]["namespace"]
        if self.c.kueue_pending is not None:
            return self.c.kueue_pending
        lq = self.c.catalog.by_kind("kueue.x-k8s.io", "LocalQueue")
        if lq is None or not self.c.store.exists(lq.key, ns, queue):
            return "Inadmissible", f"LocalQueue {queue} doesn't exist"
        from .controllers import pod_requests

        for rtype in _order(job["spec"].get("pytorchReplicaSpecs") or {}):
            rs = job["spec"]["pytorchReplicaSpecs"][rtype]
            req = pod_requests({"spec": (rs.get("template") or {}).get("spec") or {}})
            res = next((k for k in sorted(req) if k.endswith("/gpu")), "cpu" if "cpu" in req else None)
            if res is not None:
                need = req[res] * int(rs.get("replicas", 1))
                amount = str(int(need)) if float(need).is_integer() else f"{int(need * 1000)}m"
                return "Pending", (
                    f"couldn't assign flavors to pod set {rtype.lower()}: insufficient unused quota for "
                    f"{res} in flavor default-flavor, {amount} more needed"
                )
        return (
            "Pending",
            "couldn't assign flavors to pod set master: insufficient unused quota for cpu in flavor default-flavor, 1 more needed",
        )

    def _reconcile(self, jobs_rt: ResourceType, wl_rt: ResourceType, job: dict[str, Any], queue: str) -> None:
        c = self.c
        meta = job["metadata"]
        ns = meta["namespace"]
        name = workload_name(meta["name"], meta["uid"])
        wl = c.store.get(wl_rt.key, ns, name)
        if wl is None:
            replicas = job["spec"].get("pytorchReplicaSpecs") or {}
            pod_sets = [
                {
                    "name": r.lower(),
                    "count": int(replicas[r].get("replicas", 1)),
                    "template": copy.deepcopy(replicas[r].get("template") or {}),
                }
                for r in _order(replicas)
            ]
            wl = {
                "apiVersion": wl_rt.api_version(),
                "kind": "Workload",
                "metadata": {
                    "name": name,
                    "namespace": ns,
                    "labels": {"kueue.x-k8s.io/job-uid": meta["uid"]},
                    "ownerReferences": [
                        {
                            "apiVersion": "kubeflow.org/v1",
                            "kind": KIND,
                            "name": meta["name"],
                            "uid": meta["uid"],
                            "controller": True,
                            "blockOwnerDeletion": True,
                        }
                    ],
                },
                "spec": {"queueName": queue, "podSets": pod_sets, "active": True},
            }
            wl = c.registry.create(wl_rt, ns, wl, self.ctx)
            c.registry.record_event(
                job, "Normal", "CreatedWorkload", f"Created Workload: {ns}/{name}", "kueue-job-controller"
            )
        st = wl.get("status") or {}
        conds = st.get("conditions") or []
        admitted = any(x.get("type") == "Admitted" and x.get("status") == "True" for x in conds)
        if not admitted and not any(x.get("type") == "QuotaReserved" for x in conds):
            reason, message = self._pending(job, queue)
            st["conditions"] = conds + [
                {
                    "type": "QuotaReserved",
                    "status": "False",
                    "reason": reason,
                    "message": message,
                    "lastTransitionTime": ts(),
                    "observedGeneration": wl["metadata"].get("generation", 1),
                }
            ]
            wl["status"] = st
            c.registry.update(wl_rt, ns, name, wl, Ctx(manager="kueue-admission", internal=True), subresource="status")
            c.registry.record_event(wl, "Warning", reason, message, "kueue-admission")
        if admitted and (job["spec"].get("runPolicy") or {}).get("suspend"):
            body = {"spec": {"runPolicy": {"suspend": False}}}
            import json

            c.registry.patch(
                jobs_rt, ns, meta["name"], "application/merge-patch+json", json.dumps(body).encode(), self.ctx
            )
            cq = (st.get("admission") or {}).get("clusterQueue", "cluster-queue")
            c.registry.record_event(job, "Normal", "Started", f"Admitted by clusterQueue {cq}", "kueue-job-controller")
        jst = job.get("status") or {}
        for ctype in ("Succeeded", "Failed"):
            done = next(
                (x for x in jst.get("conditions") or [] if x.get("type") == ctype and x.get("status") == "True"), None
            )
            if done and not any(x.get("type") == "Finished" for x in conds):
                wl = c.store.get(wl_rt.key, ns, name) or wl
                st = wl.get("status") or {}
                st["conditions"] = (st.get("conditions") or []) + [
                    {
                        "type": "Finished",
                        "status": "True",
                        "reason": ctype,
                        "message": done.get("message", ""),
                        "lastTransitionTime": ts(),
                        "observedGeneration": wl["metadata"].get("generation", 1),
                    }
                ]
                wl["status"] = st
                c.registry.update(wl_rt, ns, name, wl, self.ctx, subresource="status")

    def admit(
        self, namespace: str, job_name: str, cluster_queue: str = "cluster-queue", flavor: str = "default-flavor"
    ) -> dict[str, Any]:
        c = self.c
        jobs_rt = c.catalog.by_kind("kubeflow.org", KIND)
        wl_rt = self.workload_type()
        if jobs_rt is None or wl_rt is None:
            raise RuntimeError("admit_workload needs the pytorchjobs and kueue installs")
        job = c.store.get(jobs_rt.key, namespace, job_name)
        if job is None:
            raise E.not_found("kubeflow.org", "pytorchjobs", job_name)
        name = workload_name(job_name, job["metadata"]["uid"])
        from .controllers import pod_requests

        with c.store.lock:
            wl = c.store.get(wl_rt.key, namespace, name)
            if wl is None:
                raise E.not_found("kueue.x-k8s.io", "workloads", name)
            assignments = []
            for ps in wl["spec"]["podSets"]:
                req = pod_requests({"spec": (ps.get("template") or {}).get("spec") or {}})
                assignments.append(
                    {
                        "name": ps["name"],
                        "count": ps.get("count", 1),
                        "flavors": {k: flavor for k in sorted(req)},
                        "resourceUsage": {k: _fmt_q(v * ps.get("count", 1)) for k, v in sorted(req.items())},
                    }
                )
            st = wl.get("status") or {}
            now = ts()
            conds = [x for x in st.get("conditions") or [] if x.get("type") not in ("QuotaReserved", "Admitted")]
            conds += [
                {
                    "type": "QuotaReserved",
                    "status": "True",
                    "reason": "QuotaReserved",
                    "message": f"Quota reserved in ClusterQueue {cluster_queue}",
                    "lastTransitionTime": now,
                    "observedGeneration": wl["metadata"].get("generation", 1),
                },
                {
                    "type": "Admitted",
                    "status": "True",
                    "reason": "Admitted",
                    "message": "The workload is admitted",
                    "lastTransitionTime": now,
                    "observedGeneration": wl["metadata"].get("generation", 1),
                },
            ]
            st["conditions"] = conds
            st["admission"] = {"clusterQueue": cluster_queue, "podSetAssignments": assignments}
            wl["status"] = st
            out = c.registry.update(
                wl_rt, namespace, name, wl, Ctx(manager="kueue-admission", internal=True), subresource="status"
            )
            c.registry.record_event(
                out,
                "Normal",
                "QuotaReserved",
                f"Quota reserved in ClusterQueue {cluster_queue}, wait time since queued was 0s",
                "kueue-admission",
            )
            c.registry.record_event(
                out,
                "Normal",
                "Admitted",
                f"Admitted by ClusterQueue {cluster_queue}, wait time since reservation was 0s",
                "kueue-admission",
            )
        c.wake()
        return out


def _fmt_q(v: float) -> str:
    if float(v).is_integer():
        return str(int(v))
    return f"{int(round(v * 1000))}m"
