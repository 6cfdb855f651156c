"""kube-controller-manager and kube-scheduler stand-ins: the controller loop, the garbage
collector (ownerReferences, background deletion: how `ctrlnet delete` of a job takes its pods,
Services and Workload along) and a scheduler for the one node that binds every pod at once unless
a test holds it (`LoopbackCluster.hold_pending`: PodScheduled=False and a FailedScheduling Event).
Resources, node selectors and taints are not checked: the node fits everything."""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from typing import TYPE_CHECKING

from .errors import ApiError
from .registry import Ctx, ts

if TYPE_CHECKING:
    from .cluster import LoopbackCluster


class ControllerManager(threading.Thread):
    """One loop that runs every controller whenever the store changes (and every 0.2 s)."""

    def __init__(self, cluster: LoopbackCluster, controllers: list[Callable[[], None]]):
        super().__init__(name=f"{cluster.tag}-controllers", daemon=True)
        self.cluster = cluster
        self.controllers = controllers
        self.stop_event = threading.Event()
        self.kick = threading.Event()

    def run(self) -> None:
        store, last = self.cluster.store, -1
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
                        traceback.print_exc()
                    time.sleep(0.05)

    def stop(self) -> None:
        self.stop_event.set()
        with self.cluster.store.lock:
            self.cluster.store.changed.notify_all()
        self.join(10)


def garbage_collector(c: LoopbackCluster) -> None:
    """Delete every object whose owners are all gone."""
    with c.store.lock:
        everything = [(rt, o) for rt in c.catalog.types for o in c.store.iter_raw(rt.key)]
        uids = {o["metadata"]["uid"] for _, o in everything}
        orphans = [
            (rt, o["metadata"].get("namespace", ""), o["metadata"]["name"])
            for rt, o in everything
            if (refs := o["metadata"].get("ownerReferences"))
            and not o["metadata"].get("deletionTimestamp")
            and all(r.get("uid") not in uids for r in refs)
        ]
    for rt, ns, name in orphans:
        try:
            c.registry.delete(rt, ns, name)
        except ApiError:
            pass


class Scheduler:
    def __init__(self, cluster: LoopbackCluster):
        self.c = cluster
        self.reported: dict[str, str] = {}  # pod uid -> the FailedScheduling message already written

    def __call__(self) -> None:
        c = self.c
        if not c.run_pods:
            return
        pods_rt = c.catalog.by_key(("", "pods"))
        pods = [p for p in c.store.list(pods_rt.key) if not p["spec"].get("nodeName")]
        ctx = Ctx(manager="kube-scheduler", internal=True)
        for pod in sorted(pods, key=lambda p: (p["metadata"]["creationTimestamp"], p["metadata"]["name"])):
            meta = pod["metadata"]
            ns, name, uid = meta["namespace"], meta["name"], meta["uid"]
            if meta.get("deletionTimestamp"):
                continue
            held = next(((r, m) for pred, r, m, _ in c.holds if pred(pod)), None)
            try:
                if held is not None:
                    reason, message = held
                    if self.reported.get(uid) != message:
                        self.reported[uid] = message
                        cond = {"type": "PodScheduled", "status": "False", "lastProbeTime": None}
                        cond.update(lastTransitionTime=ts(), reason=reason, message=message)
                        pod["status"] = {**pod.get("status", {}), "phase": "Pending", "conditions": [cond]}
                        c.registry.update(pods_rt, ns, name, pod, ctx, subresource="status")
                        c.registry.record_event(pod, "Warning", "FailedScheduling", message, "default-scheduler")
                    continue
                self.reported.pop(uid, None)
                pod["spec"]["nodeName"] = c.node_name
                cur = c.registry.update(pods_rt, ns, name, pod, ctx)
                cond = {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": ts()}
                cur["status"]["conditions"] = [cond]
                c.registry.update(pods_rt, ns, name, cur, ctx, subresource="status")
                msg = f"Successfully assigned {ns}/{name} to {c.node_name}"
                c.registry.record_event(cur, "Normal", "Scheduled", msg, "default-scheduler")
            except ApiError:
                pass
