"""kube-controller-manager and kube-scheduler stand-ins: the namespace controller, the garbage
collector (ownerReferences; Background, Foreground and Orphan deletion), a PVC binder, and a
scheduler for the one node (resources, nodeSelector, taints, missing PVCs, test-held pods)."""

from __future__ import annotations

import copy
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from .errors import ApiError
from .kubelet import quantity
from .registry import Ctx, ts

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

PREEMPTION_NOT_HELPFUL = "preemption: 0/1 nodes are available: 1 Preemption is not helpful for scheduling."
NO_VICTIMS = "preemption: 0/1 nodes are available: 1 No preemption victims found for incoming pod."


class ControllerManager(threading.Thread):
    """One loop that runs every controller whenever the store changes (and every 0.2 s)."""

    def __init__(self, cluster: LoopbackCluster, controllers: list[Callable[[], None]]):
        super().__init__(name=f"{cluster.tag}-controllers", daemon=True)
        self.cluster = cluster
        self.controllers = controllers
        self.stop_event = threading.Event()
        self.kick = threading.Event()

    def run(self) -> None:
        store = self.cluster.store
        last = -1
        while not self.stop_event.is_set():
            with store.lock:
                if store.serial == last and not self.kick.is_set():
                    store.changed.wait(0.2)
                last = store.serial
            self.kick.clear()
            for ctl in self.controllers:
                if self.stop_event.is_set():
                    return
                try:
                    ctl()
                except ApiError:
                    pass
                except Exception as exc:  # a bug in a stand-in: keep it visible to the tests
                    self.cluster.server_errors.append(exc)
                    if self.cluster.verbose:
                        import traceback

                        traceback.print_exc()
                    time.sleep(0.05)

    def stop(self) -> None:
        self.stop_event.set()
        with self.cluster.store.lock:
            self.cluster.store.changed.notify_all()
        self.join(10)


class NamespaceController:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster

    def __call__(self) -> None:
        c = self.c
        for ns in c.store.list(("", "namespaces")):
            if not ns["metadata"].get("deletionTimestamp"):
                continue
            name = ns["metadata"]["name"]
            left = 0
            for rt in c.catalog.types:
                if not rt.namespaced:
                    continue
                for o in c.store.list(rt.key, name):
                    left += 1
                    if not o["metadata"].get("deletionTimestamp"):
                        try:
                            c.registry.delete(
                                rt, name, o["metadata"]["name"], Ctx(manager="namespace-controller", internal=True)
                            )
                        except ApiError:
                            pass
            if left == 0:
                c.registry.remove_now(c.catalog.by_key(("", "namespaces")), "", name)


class GarbageCollector:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster

    def __call__(self) -> None:
        c = self.c
        with c.store.lock:
            everything = [(rt, o) for rt in c.catalog.types for o in c.store.iter_raw(rt.key)]
            uids = {o["metadata"]["uid"] for _, o in everything}
            todo = []
            for rt, o in everything:
                refs = o["metadata"].get("ownerReferences") or []
                if refs and not o["metadata"].get("deletionTimestamp") and all(r.get("uid") not in uids for r in refs):
                    todo.append((rt, o["metadata"].get("namespace", ""), o["metadata"]["name"]))
            foreground = [
                (rt, copy.deepcopy(o))
                for rt, o in everything
                if o["metadata"].get("deletionTimestamp")
                and "foregroundDeletion" in (o["metadata"].get("finalizers") or [])
            ]
        for rt, ns, name in todo:
            try:
                c.registry.delete(
                    rt, ns, name, Ctx(manager="garbage-collector", internal=True), propagation="Background"
                )
            except ApiError:
                pass
        for rt, owner in foreground:
            deps = c.registry.dependents(owner["metadata"]["uid"])
            blocking = 0
            for drt, d in deps:
                ref = next(r for r in d["metadata"]["ownerReferences"] if r.get("uid") == owner["metadata"]["uid"])
                if ref.get("blockOwnerDeletion"):
                    blocking += 1
                if not d["metadata"].get("deletionTimestamp"):
                    try:
                        c.registry.delete(
                            drt,
                            d["metadata"].get("namespace", ""),
                            d["metadata"]["name"],
                            Ctx(manager="garbage-collector", internal=True),
                            propagation="Foreground",
                        )
                    except ApiError:
                        pass
            if blocking == 0:
                with c.store.lock:
                    cur = c.store.get(rt.key, owner["metadata"].get("namespace", ""), owner["metadata"]["name"])
                    if cur is not None and cur["metadata"]["uid"] == owner["metadata"]["uid"]:
                        cur["metadata"]["finalizers"] = [
                            f for f in cur["metadata"]["finalizers"] if f != "foregroundDeletion"
                        ]
                        try:
                            c.registry.update(
                                rt,
                                cur["metadata"].get("namespace", ""),
                                cur["metadata"]["name"],
                                cur,
                                Ctx(manager="garbage-collector", internal=True),
                            )
                        except ApiError:
                            pass


class PVCBinder:
    """A dynamic provisioner: every Pending claim becomes Bound to a volume pvc-<uid>."""

    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster

    def __call__(self) -> None:
        c = self.c
        rt = c.catalog.by_key(("", "persistentvolumeclaims"))
        for pvc in c.store.list(rt.key):
            if (pvc.get("status") or {}).get("phase") == "Bound":
                continue
            meta = pvc["metadata"]
            pvc["spec"]["volumeName"] = f"pvc-{meta['uid']}"
            ctx = Ctx(manager="kube-controller-manager", internal=True)
            try:
                cur = c.registry.update(rt, meta["namespace"], meta["name"], pvc, ctx)
                cur["status"] = {
                    "phase": "Bound",
                    "accessModes": pvc["spec"].get("accessModes", ["ReadWriteOnce"]),
                    "capacity": {
                        "storage": ((pvc["spec"].get("resources") or {}).get("requests") or {}).get("storage", "1Gi")
                    },
                }
                c.registry.update(rt, meta["namespace"], meta["name"], cur, ctx, subresource="status")
            except ApiError:
                pass


def pod_requests(pod: dict[str, Any]) -> dict[str, float]:
    """Effective requests: max(sum of containers, largest init container); limits stand in for missing requests."""

    def one(c: dict[str, Any]) -> dict[str, float]:
        res = c.get("resources") or {}
        out: dict[str, float] = {}
        for k, v in {**(res.get("limits") or {}), **(res.get("requests") or {})}.items():
            try:
                out[k] = quantity(v)
            except ValueError:
                pass
        return out

    spec = pod.get("spec") or {}
    total: dict[str, float] = {}
    for c in spec.get("containers") or []:
        for k, v in one(c).items():
            total[k] = total.get(k, 0.0) + v
    for c in spec.get("initContainers") or []:
        for k, v in one(c).items():
            total[k] = max(total.get(k, 0.0), v)
    return total


class Scheduler:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.reported: dict[str, str] = {}

    def _unschedulable(self, pod: dict[str, Any]) -> tuple[str, str] | None:
        c = self.c
        uid = pod["metadata"]["uid"]
        for pred, reason, message, _ in c.holds:
            if pred(pod):
                return reason, message
        spec = pod.get("spec") or {}
        ns = pod["metadata"]["namespace"]
        for v in spec.get("volumes") or []:
            claim = (v.get("persistentVolumeClaim") or {}).get("claimName")
            if claim and not c.store.exists(("", "persistentvolumeclaims"), ns, claim):
                return (
                    "Unschedulable",
                    f'0/1 nodes are available: persistentvolumeclaim "{claim}" not found. {PREEMPTION_NOT_HELPFUL}',
                )
        labels = c.node_labels
        for k, v in (spec.get("nodeSelector") or {}).items():
            if labels.get(k) != v:
                return "Unschedulable", (
                    "0/1 nodes are available: 1 node(s) didn't match Pod's node affinity/selector. "
                    + PREEMPTION_NOT_HELPFUL
                )
        for taint in c.node_taints:
            if taint.get("effect") not in ("NoSchedule", "NoExecute"):
                continue
            if not any(_tolerates(t, taint) for t in spec.get("tolerations") or []):
                desc = (
                    f"{{{taint['key']}: {taint.get('value', '')}}}" if taint.get("value") else f"{{{taint['key']}: }}"
                )
                return "Unschedulable", (
                    f"0/1 nodes are available: 1 node(s) had untolerated taint {desc}. " + PREEMPTION_NOT_HELPFUL
                )
        want = pod_requests(pod)
        used: dict[str, float] = {}
        for other in c.store.list(("", "pods")):
            if other["metadata"]["uid"] == uid or (other.get("spec") or {}).get("nodeName") != c.node_name:
                continue
            if (other.get("status") or {}).get("phase") in ("Succeeded", "Failed"):
                continue
            for k, v in pod_requests(other).items():
                used[k] = used.get(k, 0.0) + v
        short = []
        for k, v in sorted(want.items()):
            cap = quantity(c.node_allocatable.get(k, "0"))
            if v > 0 and used.get(k, 0.0) + v > cap + 1e-9:
                short.append(k)
        if short:
            parts = ", ".join(f"1 Insufficient {k}" for k in short)
            return "Unschedulable", f"0/1 nodes are available: {parts}. {NO_VICTIMS}"
        return None

    def __call__(self) -> None:
        c = self.c
        if not c.run_scheduler:
            return
        pods_rt = c.catalog.by_key(("", "pods"))
        pods = [
            p
            for p in c.store.list(pods_rt.key)
            if not (p.get("spec") or {}).get("nodeName") and not p["metadata"].get("deletionTimestamp")
        ]
        pods.sort(key=lambda p: (p["metadata"].get("creationTimestamp", ""), p["metadata"]["name"]))
        for pod in pods:
            if (pod.get("spec") or {}).get("schedulerName", "default-scheduler") not in (
                "default-scheduler",
                "volcano",
            ):
                continue
            meta = pod["metadata"]
            ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
            why = self._unschedulable(pod)
            ctx = Ctx(manager="kube-scheduler", internal=True)
            if why is not None:
                reason, message = why
                if self.reported.get(uid) == message:
                    continue
                self.reported[uid] = message
                st = pod.get("status") or {}
                st["phase"] = "Pending"
                st["conditions"] = [
                    {
                        "type": "PodScheduled",
                        "status": "False",
                        "lastProbeTime": None,
                        "lastTransitionTime": ts(),
                        "reason": reason,
                        "message": message,
                    }
                ]
                pod["status"] = st
                try:
                    c.registry.update(pods_rt, ns, name, pod, ctx, subresource="status")
                    c.registry.record_event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
                except ApiError:
                    pass
                continue
            self.reported.pop(uid, None)
            pod["spec"]["nodeName"] = c.node_name
            try:
                cur = c.registry.update(pods_rt, ns, name, pod, ctx)
                st = cur.get("status") or {}
                st["conditions"] = [cond for cond in st.get("conditions") or [] if cond.get("type") != "PodScheduled"]
                st["conditions"].append(
                    {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": ts()}
                )
                cur["status"] = st
                c.registry.update(pods_rt, ns, name, cur, ctx, subresource="status")
                c.registry.record_event(
                    cur,
                    "Normal",
                    "Scheduled",
                    f"Successfully assigned {ns}/{name} to {c.node_name}",
                    "default-scheduler",
                )
            except ApiError:
                pass


def _tolerates(t: dict[str, Any], taint: dict[str, Any]) -> bool:
    if t.get("effect") and t["effect"] != taint.get("effect"):
        return False
    if t.get("operator") == "Exists":
        return not t.get("key") or t["key"] == taint["key"]
    return t.get("key") == taint["key"] and t.get("value", "") == taint.get("value", "")
