"""LoopbackCluster: a Kubernetes API server, controllers and a kubelet on 127.0.0.1, for tests.

    with LoopbackCluster(tmp_path, installed={"pytorchjobs", "trainjobs", "workloads"}) as c:
        subprocess.run(["ctrlnet", "submit", ...], env={**os.environ, "KUBECONFIG": str(c.kubeconfig)})
        c.wait_for(lambda: c.get("pods", "default", "j-master-0")["status"]["phase"] == "Succeeded")

What runs: an HTTP API server (server.py, registry.py, fields.py) that validates what it accepts
against the real schemas and answers errors as Status objects; a controller loop (controllers.py)
with the garbage collector and the scheduler; the Training Operator v1.9 and Kueue stand-ins
(operator.py); the Kubeflow Trainer v2.3, JobSet and Job stand-ins (trainer_v2.py); and a kubelet
(kubelet.py) that runs each pod's containers as local processes.
It serves what ctrlnet and its tests use; each module's docstring says what it does not emulate.
"""

from __future__ import annotations

import copy
import signal as signal_mod
import socket
import threading
import time
import uuid
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import yaml

from . import errors as E
from .controllers import ControllerManager, Scheduler, garbage_collector
from .errors import ApiError
from .kubelet import Kubelet
from .operator import KueueController, PyTorchJobController, kueue_webhook
from .registry import Ctx, Registry, Selector, ts
from .resources import Catalog, ResourceType, installed_types
from .server import _Server
from .store import Store
from .trainer_v2 import JobSetController, TrainJobController

DEFAULT_INSTALLED = frozenset({"pytorchjobs", "trainjobs", "workloads"})
Pod = dict[str, Any]


class LoopbackCluster:
    """A stand-in Kubernetes cluster for tests (see the module docs).

    Args:
        root: a folder for the kubeconfig, pod folders and volumes (e.g. pytest's tmp_path).
        installed: CRD installs: "pytorchjobs" (Training Operator), "trainjobs" (Trainer v2.3:
            TrainJob, ClusterTrainingRuntime, TrainingRuntime, and JobSet), "workloads"/"kueue"
            (the Kueue CRDs). Everything else is absent from discovery and answers 404.
        run_pods: run the scheduler and the kubelet (pods become processes). False: pods stay
            Pending, unscheduled, unless a test sets their state (set_waiting/set_terminated/evict).
        env: extra environment for every pod process (e.g. an S3 endpoint of a local moto).
        max_grace_seconds: cap on terminationGracePeriodSeconds when a pod is deleted.
        tls: must stay False: the API server speaks plain HTTP only.
        watch_history: events kept for watches; an older resourceVersion gets 410 Expired.
        image: a testkit.container.Image: the kubelet runs every pod's containers from the built
            image as the pod spec says (testkit.container), on the host's network, instead of
            their commands as local processes. Needs root.
        trainer_status: Kubeflow Trainer's TrainJobStatus feature gate: TrainJob pods get
            KUBEFLOW_TRAINER_SERVER_URL/_TOKEN and a projected token, and the API server answers
            POST <status path> as Trainer's status server (trainer_v2.py, server.py).

    The kubeconfig has the contexts `loopback` (current; namespace default) and `bad-token` (a
    wrong token: 401). `authorize(verb, group, resource, name, namespace)` is called for every
    request (tests may wrap it); `extra_env` (the `env` argument) applies to pods started from then
    on; `server_errors` collects exceptions inside the stand-ins.
    """

    def __init__(
        self,
        root: str | Path,
        installed: Iterable[str] = DEFAULT_INSTALLED,
        run_pods: bool = True,
        *,
        env: dict[str, str] | None = None,
        max_grace_seconds: float = 3.0,
        tls: bool = False,
        watch_history: int = 1000,
        image=None,
        verbose: bool = False,
        trainer_status: bool = True,
    ):
        if tls:
            raise ValueError("the loopback API server speaks plain HTTP only")
        self.root = Path(root) / "loopback-cluster"
        self.tag = "loopback-" + uuid.uuid4().hex[:6]  # prefix of this cluster's thread names
        self.installed = frozenset(installed)
        self.run_pods = run_pods
        self.extra_env = dict(env or {})
        self.max_grace_seconds = max_grace_seconds
        self.image = image
        self.verbose = verbose
        self.trainer_status = trainer_status
        self._sa_tokens: dict[str, tuple[str, str]] = {}  # projected token -> (namespace, audience)
        self.user = "loopback"
        self.token = "loopback-" + uuid.uuid4().hex
        self.node_name = "loopback-node"
        self.store = Store(history=watch_history)
        self.server_errors: list[BaseException] = []
        self.holds: list[tuple[Callable[[Pod], bool], str, str, str]] = []  # (pred, reason, message, ns)
        self.frozen_pods: set[str] = set()
        self.kubeconfig = self.root / "kubeconfig"
        self.url = ""
        self._denies: list[dict[str, Any]] = []
        self._ports: dict[tuple[str, str, int], int] = {}
        self._port_lock = threading.Lock()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle -------------------------------------------------------------------------------

    def __enter__(self) -> LoopbackCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        self.stop()

    def start(self) -> LoopbackCluster:
        self.root.mkdir(parents=True, exist_ok=True)
        self.catalog = Catalog(installed_types(self.installed))
        self.registry = Registry(self.store, self.catalog)
        self.registry.mutators.append(kueue_webhook)
        sys_ctx = Ctx(manager="kube-apiserver", internal=True)
        for ns in ("default", "kube-system"):
            self.registry.create(
                self.rt("namespaces"), "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}, sys_ctx
            )
        self.kubelet = Kubelet(self, self.node_name)
        self.kueue = KueueController(self)
        self.scheduler = Scheduler(self)
        loop = [
            lambda: garbage_collector(self),
            PyTorchJobController(self),
            TrainJobController(self),
            JobSetController(self),
            self.kueue,
            self.scheduler,
            self.kubelet.sync,
        ]
        self.controllers = ControllerManager(self, loop)
        self._server = _Server(("127.0.0.1", 0), self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(
            target=self._server.serve_forever, kwargs={"poll_interval": 0.1}, name=f"{self.tag}-apiserver", daemon=True
        )
        self._thread.start()
        self.controllers.start()
        users = [
            {"name": self.user, "user": {"token": self.token}},
            {"name": "intruder", "user": {"token": "not-the-token"}},
        ]
        contexts = [
            {"name": "loopback", "context": {"cluster": "loopback", "user": self.user, "namespace": "default"}},
            {"name": "bad-token", "context": {"cluster": "loopback", "user": "intruder", "namespace": "default"}},
        ]
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "loopback", "cluster": {"server": self.url}}],
            "users": users,
            "contexts": contexts,
            "current-context": "loopback",
        }
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if getattr(self, "controllers", None) is not None and self.controllers.is_alive():
            self.controllers.stop()
        if getattr(self, "kubelet", None) is not None:
            self.kubelet.stop()
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
        self._server.close_connections()
        self._server.server_close()
        self._server = None

    def service_account_token(self, namespace: str, audience: str) -> str:
        """A projected service-account token for a pod of `namespace` (what the kubelet writes
        for a serviceAccountToken volume source); the status server checks its audience."""
        token = "loopback-sa-" + uuid.uuid4().hex
        with self._port_lock:
            self._sa_tokens[token] = (namespace, audience)
        return token

    def token_claims(self, token: str) -> tuple[str, str] | None:
        """(namespace, audience) of a token service_account_token issued, else None."""
        return self._sa_tokens.get(token)

    def job_port(self, namespace: str, job: str, port: int) -> int:
        """The loopback port that stands in for `port` of a PyTorchJob's master or a JobSet's
        first pod (one per job)."""
        with self._port_lock:
            if (namespace, job, port) not in self._ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self._ports[(namespace, job, port)] = s.getsockname()[1]
            return self._ports[(namespace, job, port)]

    def wake(self) -> None:
        """Run the controllers now (they also run on every store change)."""
        if getattr(self, "controllers", None) is not None:
            self.controllers.kick.set()
            with self.store.lock:
                self.store.changed.notify_all()

    def unserve(self, group: str, plural: str) -> None:
        """Stop serving a resource type, as a cluster with that API disabled: absent from
        discovery, its paths 404 (e.g. `unserve("networking.k8s.io", "networkpolicies")`)."""
        t = next(t for t in self.catalog.types if (t.group, t.plural) == (group, plural))
        self.catalog.types.remove(t)
        for v in t.versions:
            self.catalog._by_path.pop((group, v, plural), None)

    # --- direct store access (assertions, setup) -------------------------------------------------

    def rt(self, resource: str) -> ResourceType:
        """A served resource type by plural (or `plural.group`) or kind."""
        plural, _, group = resource.partition(".")
        for t in self.catalog.types:
            if (t.plural == plural and (not group or t.group == group)) or t.kind == resource:
                return t
        raise KeyError(f"{resource!r} is not served by this cluster (installed: {sorted(self.installed)})")

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object (a copy), or None."""
        t = self.rt(resource)
        obj = self.store.get(t.key, namespace if t.namespaced else "", name)
        return self.registry.present(t, obj) if obj is not None else None

    def list(self, resource: str, namespace: str | None = None, label_selector: str | None = None) -> list[dict]:
        return self.registry.list(self.rt(resource), namespace, Selector(label_selector))

    def create(self, obj: dict[str, Any]) -> dict[str, Any]:
        """Create `obj` (validated like an API request) as manager "loopback-test"."""
        t = self.catalog.by_kind(obj["apiVersion"].rpartition("/")[0], obj["kind"])
        ns = obj.get("metadata", {}).get("namespace") or ("default" if t.namespaced else "")
        out = self.registry.create(t, ns, obj, Ctx(manager="loopback-test"))
        self.wake()
        return out

    def events(self, namespace: str, involved: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        """Events in `namespace`, optionally about the object named `involved` / with `reason`."""
        out = [
            e
            for e in self.list("events", namespace)
            if involved in (None, (e.get("involvedObject") or {}).get("name")) and reason in (None, e.get("reason"))
        ]
        return sorted(out, key=lambda e: (e.get("firstTimestamp") or "", int(e["metadata"]["resourceVersion"])))

    def logs(self, namespace: str, pod: str, container: str | None = None) -> str:
        """A container's log as the API would return it (raises ApiError like the API)."""
        chunks = self.kubelet.logs(namespace, pod, {"container": container}, threading.Event())
        return b"".join(chunks).decode(errors="replace")

    def wait_for(self, predicate: Callable[[], Any], timeout: float = 30.0, message: str = "condition") -> Any:
        """Poll `predicate` until it returns something truthy (returned); AssertionError with the
        cluster's state on timeout. KeyError/IndexError/TypeError/AttributeError/ApiError in the
        predicate count as "not yet"."""
        deadline, last = time.monotonic() + timeout, None
        while True:
            try:
                last = predicate()
                if last:
                    return last
            except (KeyError, IndexError, TypeError, AttributeError, ApiError) as e:
                last = e
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"timed out after {timeout}s waiting for {message} (last: {last!r})\n{self.describe()}"
                )
            time.sleep(0.05)

    def describe(self) -> str:
        """A short text dump of jobs, pods and recent events (for failure messages)."""
        lines = []
        for t in self.catalog.types:
            if t.kind in ("PyTorchJob", "Pod", "Workload", "TrainJob", "JobSet"):
                for o in self.list(t.plural):
                    st = o.get("status") or {}
                    conds = [
                        f"{c.get('type')}={c.get('status')}({c.get('reason', '')})" for c in st.get("conditions") or []
                    ]
                    meta = o["metadata"]
                    lines.append(
                        f"{t.kind} {meta.get('namespace', '')}/{meta['name']} phase={st.get('phase')} {' '.join(conds)}"
                    )
        for e in self.list("events")[-25:]:
            lines.append(
                f"Event {e['involvedObject'].get('name')} {e.get('type')} {e.get('reason')}: {e.get('message')}"
            )
        if self.server_errors:
            lines.append(f"stand-in errors: {self.server_errors!r}")
        return "\n".join(lines)

    # --- RBAC stand-in ---------------------------------------------------------------------------

    def deny(self, verb: str, resource: str, namespace: str | None = None) -> None:
        """Answer matching API requests with 403 Forbidden, as RBAC would. `verb` is an RBAC verb
        (get, list, watch, create, update, patch, delete) or "*"; `resource` a plural, a
        "pods/log"-style subresource or "*"."""
        self._denies.append({"verb": verb, "resource": resource, "namespace": namespace})

    def allow_all(self) -> None:
        self._denies.clear()

    def authorize(self, verb: str, group: str, resource: str, name: str | None, namespace: str | None) -> None:
        for rule in self._denies:
            if (
                rule["verb"] in ("*", verb)
                and rule["resource"] in ("*", resource)
                and rule["namespace"] in (None, namespace)
            ):
                raise E.rbac_forbidden(self.user, verb, group, resource, name, namespace)

    # --- scheduling ------------------------------------------------------------------------------

    def hold_pending(
        self,
        namespace: str,
        pod: str | Callable[[Pod], bool],
        reason: str = "Unschedulable",
        message: str = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu.",
    ) -> None:
        """Keep matching pods (by name or predicate, also ones created later) unscheduled: Pending
        with PodScheduled=False and a FailedScheduling Event, until release()."""
        match = pod if callable(pod) else lambda p: p["metadata"]["name"] == pod
        self.holds.append(
            (lambda p: p["metadata"]["namespace"] == namespace and bool(match(p)), reason, message, namespace)
        )
        self.wake()

    def release(self, namespace: str | None = None) -> None:
        """Drop every hold (those of `namespace` only, if given)."""
        self.holds = [h for h in self.holds if namespace is not None and h[3] != namespace]
        self.scheduler.reported.clear()
        self.wake()

    # --- pod state injection ---------------------------------------------------------------------

    def signal_pod(self, namespace: str, pod: str, sig: int = signal_mod.SIGTERM) -> None:
        """Send `sig` to the main process of the pod's containers (e.g. SIGTERM: preemption)."""
        rt = self.kubelet.runtime(namespace, pod)
        if rt is None:
            raise KeyError(f"pod {namespace}/{pod} has no running process")
        rt.signal(sig)

    def _freeze(self, namespace: str, pod: str) -> dict[str, Any]:
        """Take the pod away from the kubelet (its processes are killed); returns the pod."""
        with self.kubelet.lock:  # no runtime can start for it in between
            cur = self.get("pods", namespace, pod)
            if cur is None:
                raise KeyError(f"pod {namespace}/{pod} not found")
            self.frozen_pods.add(cur["metadata"]["uid"])
            rt = self.kubelet.runtimes.get(cur["metadata"]["uid"])
            if rt is not None:
                with rt.lock:  # waits for a status write in flight
                    rt.frozen = True
        if rt is not None:
            rt.terminate(0)
            rt.finished.wait(10)
        with self.store.lock:
            cur = self.get("pods", namespace, pod)
            if not cur["spec"].get("nodeName"):  # bound, as it would be to get a container state
                cur["spec"]["nodeName"] = self.node_name
                cur = self.registry.update(
                    self.rt("pods"), namespace, pod, cur, Ctx(manager="kube-scheduler", internal=True)
                )
        return cur

    def _set_status(self, namespace: str, pod: str, phase: str, state: dict[str, Any], **extra: Any) -> dict[str, Any]:
        """Write a frozen pod's status: `phase`, every container in `state`, `extra` fields."""
        cur = self._freeze(namespace, pod)
        now = ts()
        st = {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": now, **extra}
        st["conditions"] = [
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now}
        ]
        st["conditions"] += extra.get("conditions", [])
        st["containerStatuses"] = [
            {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": 0, "ready": False}
            | {"started": False, "lastState": {}, "state": copy.deepcopy(state)}
            for c in cur["spec"].get("containers") or []
        ]
        cur["status"] = st
        cur["metadata"].pop("resourceVersion")  # over whatever the scheduler wrote since the freeze
        ctx = Ctx(manager="kubelet", internal=True)
        out = self.registry.update(self.rt("pods"), namespace, pod, cur, ctx, subresource="status")
        self.wake()
        return out

    def set_waiting(self, namespace: str, pod: str, reason: str, message: str | None = None) -> dict[str, Any]:
        """Put the pod's containers in `state.waiting` (e.g. ImagePullBackOff, CreateContainerConfigError);
        the kubelet stops managing the pod."""
        return self._set_status(
            namespace, pod, "Pending", {"waiting": {"reason": reason, **({"message": message} if message else {})}}
        )

    def _terminated(self, exit_code: int, reason: str | None) -> dict[str, Any]:
        term = {"exitCode": exit_code, "reason": reason or ("Completed" if exit_code == 0 else "Error")}
        term.update(startedAt=ts(), finishedAt=ts(), containerID="containerd://" + uuid.uuid4().hex)
        return {"terminated": term}

    def set_terminated(self, namespace: str, pod: str, exit_code: int, reason: str | None = None) -> dict[str, Any]:
        """Terminate the pod's containers with `exit_code` (phase Succeeded if 0 else Failed); the
        kubelet stops managing the pod."""
        phase = "Succeeded" if exit_code == 0 else "Failed"
        return self._set_status(namespace, pod, phase, self._terminated(exit_code, reason))

    def evict(self, namespace: str, pod: str) -> dict[str, Any]:
        """Node-pressure eviction: processes killed, phase Failed, reason Evicted, DisruptionTarget."""
        message = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 10Mi. "
        cond = {"type": "DisruptionTarget", "status": "True", "lastProbeTime": None, "lastTransitionTime": ts()}
        cond.update(reason="TerminationByKubelet", message=message)
        return self._set_status(
            namespace, pod, "Failed", self._terminated(137, None), reason="Evicted", message=message, conditions=[cond]
        )

    # --- Kueue -----------------------------------------------------------------------------------

    def admit_workload(self, namespace: str, job: str, cluster_queue: str = "cluster-queue") -> dict[str, Any]:
        """Admit the Workload of PyTorchJob or TrainJob `job` (QuotaReserved and Admitted True);
        Kueue then unsuspends the job."""
        return self.kueue.admit(namespace, job, cluster_queue)

    def workload_for(self, namespace: str, job: str) -> dict[str, Any] | None:
        """The Workload of PyTorchJob or TrainJob `job`, or None."""
        return self.kueue.workload_for(namespace, job)
