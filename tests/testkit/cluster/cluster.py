"""LoopbackCluster: a Kubernetes API server, controllers and a kubelet on 127.0.0.1, for tests.

    with LoopbackCluster(tmp_path, installed={"pytorchjobs", "trainjobs", "workloads"}) as c:
        api = kubernetes.config.new_client_from_config(config_file=str(c.kubeconfig))
        ...                                   # the real client, over HTTP, through the kubeconfig
        c.wait_for(lambda: c.get("pods", "default", "j-master-0")["status"]["phase"] == "Succeeded")

What runs: an HTTP API server (server.py, registry.py) that validates what it accepts against the
real schemas and answers errors as Status objects; a controller loop (controllers.py) with the
namespace controller, garbage collector, PVC binder and scheduler; the Training Operator v1.9 and
Kueue stand-ins (operator.py); and a kubelet (kubelet.py) that runs each pod's containers as local
processes. See each module's docstring for what it does and does not emulate.
"""

from __future__ import annotations

import base64
import copy
import os
import signal as signal_mod
import socket
import ssl
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

from .controllers import ControllerManager, GarbageCollector, NamespaceController, PVCBinder, Scheduler
from .errors import ApiError
from .kubelet import Kubelet
from .operator import KueueController, PyTorchJobController, kueue_webhook, pytorchjob_webhook
from .registry import Ctx, Registry, ts
from .resources import Catalog, ResourceType, installed_types
from .server import Handler, _Server
from .store import Store
from .tls import make_certs

DEFAULT_INSTALLED = frozenset({"pytorchjobs", "trainjobs", "workloads"})
DEFAULT_ALLOCATABLE = {"cpu": "64", "memory": "512Gi", "nvidia.com/gpu": "8", "pods": "110", "ephemeral-storage": "1Ti"}


class LoopbackCluster:
    """A stand-in Kubernetes cluster for tests (see the module docs).

    Args:
        root: a folder for the kubeconfig, pod folders and volumes (e.g. pytest's tmp_path).
        installed: CRD installs: "pytorchjobs" (Training Operator), "trainjobs" (Trainer v2:
            TrainJob, ClusterTrainingRuntime), "workloads"/"kueue" (all Kueue CRDs), "podgroups"
            (Volcano, schemaless). Everything else is absent from discovery and answers 404.
        run_pods: run the scheduler and the kubelet (pods become processes). False: pods stay
            Pending, unscheduled, unless a test sets their state (set_waiting/set_terminated).
        env: extra environment for every pod process (e.g. an S3 endpoint of a local moto).
        max_grace_seconds: cap on terminationGracePeriodSeconds when a pod is deleted.
        restart_backoff: seconds of CrashLoopBackOff before an in-place restart (doubles, up to x8).
        node_allocatable / node_labels / node_taints: the one node, `loopback-node`.
        gang_scheduler: "volcano" to have the operator create a PodGroup per job (needs "podgroups").
        validate_internal: also schema-check the status writes and Events of the stand-ins (slower);
            a rejected one lands in `server_errors`.
        tls: also listen with HTTPS (`https_url`, kubeconfig context "loopback-tls"): kubectl sends
            bearer tokens over TLS only. Needs `cryptography` or an `openssl` binary.
        watch_history: events kept for watches; an older resourceVersion gets 410 Gone.
        image: a testkit.container.Image: the kubelet runs every pod's containers from the built
            image as the pod spec says (testkit.container), on the host's network, instead of
            their commands as local processes. Needs root.

    Attributes tests may set: `request_hook(method, path)` is called before each API request is
    routed (raise an `ApiError` to fail it, e.g. a 500 or 429); `kueue_pending = (reason, message)`
    overrides the QuotaReserved=False condition of new Workloads; `extra_env` (the `env` argument)
    applies to pods started from then on. `server_errors` collects exceptions inside the stand-ins.
    """

    def __init__(
        self,
        root: str | os.PathLike[str],
        installed: Iterable[str] = DEFAULT_INSTALLED,
        run_pods: bool = True,
        *,
        env: dict[str, str] | None = None,
        kube_version: str = "1.30",
        user: str = "loopback",
        max_grace_seconds: float = 3.0,
        restart_backoff: float = 0.2,
        watch_history: int = 1000,
        node_allocatable: dict[str, str] | None = None,
        node_labels: dict[str, str] | None = None,
        node_taints: list[dict[str, str]] | None = None,
        gang_scheduler: str | None = None,
        validate_internal: bool = False,
        tls: bool = True,
        verbose: bool = False,
        image=None,
    ):
        self.root = Path(root) / "loopback-cluster"
        # A testkit.container.Image: the kubelet runs each pod's container from it (host network),
        # instead of the container's command as a local process.
        self.image = image
        self.tag = "loopback-" + uuid.uuid4().hex[:6]  # prefix of this cluster's thread names
        self.installed = frozenset(installed)
        self.run_pods = run_pods
        self.run_scheduler = run_pods
        self.run_operator = True
        self.extra_env = dict(env or {})
        self.kube_version = kube_version
        self.user = user
        self.token = "loopback-" + uuid.uuid4().hex
        self.max_grace_seconds = max_grace_seconds
        self.restart_backoff = restart_backoff
        self.retry_seconds = 0.2
        self.init_poll_seconds = 0.2
        self.shutdown_grace = 1.0
        self.node_name = "loopback-node"
        self.node_allocatable = dict(node_allocatable or DEFAULT_ALLOCATABLE)
        self.node_labels = {
            "kubernetes.io/hostname": self.node_name,
            "kubernetes.io/os": "linux",
            "kubernetes.io/arch": "amd64",
            **(node_labels or {}),
        }
        self.node_taints = list(node_taints or [])
        self.gang_scheduler = gang_scheduler
        self.validate_internal = validate_internal
        self.verbose = verbose
        self.store = Store(history=watch_history)
        self.server_errors: list[BaseException] = []
        self.request_hook: Callable[[str, str], None] | None = None
        self.holds: list[tuple[Callable[[dict[str, Any]], bool], str, str, str]] = []  # (pred, reason, message, ns)
        self.frozen_pods: set[str] = set()
        self.kueue_pending: tuple[str, str] | None = None
        self._denies: list[dict[str, Any]] = []
        self._ports: dict[tuple[str, str, int], int] = {}
        self._port_lock = threading.Lock()
        self._server: _Server | None = None
        self._threads: list[threading.Thread] = []
        self._serving: list[_Server] = []
        self.kubeconfig = self.root / "kubeconfig"
        self.url = ""
        self.https_url = ""
        self.ca_pem = b""
        self.tls = tls
        self._tls_server: _Server | None = None

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
        self._server = _Server(("127.0.0.1", 0), Handler, self)
        host, port = self._server.server_address[:2]
        self.url = f"http://{host}:{port}"
        self.catalog = Catalog(installed_types(self.installed), f"{host}:{port}", self.kube_version)
        self.registry = Registry(self.store, self.catalog, self.kube_version)
        self.registry.node_name = self.node_name
        self.registry.validate_internal = self.validate_internal
        self.registry.errors_sink = self.server_errors
        self.registry.mutators.append(self._kueue_mutator)
        self.registry.webhooks.append(pytorchjob_webhook)
        sys_ctx = Ctx(manager="kube-apiserver", internal=True)
        for ns in ("default", "kube-system", "kube-public", "kube-node-lease"):
            self.registry.create(
                self.rt("namespaces"), "", {"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": ns}}, sys_ctx
            )
        self.registry.create(self.rt("nodes"), "", self._node_object(), sys_ctx)
        self.kubelet = Kubelet(self, self.root, self.node_name)
        self.kueue = KueueController(self)
        self.operator = PyTorchJobController(self)
        self.controllers = ControllerManager(
            self,
            [
                NamespaceController(self),
                GarbageCollector(self),
                PVCBinder(self),
                self.operator,
                self.kueue,
                Scheduler(self),
                self.kubelet.sync,
            ],
        )
        self._tls_server = None
        certs = make_certs(self.root / "pki") if self.tls else None
        if certs is not None:
            cert, key, self.ca_pem = certs
            self._tls_server = _Server(("127.0.0.1", 0), Handler, self)
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            ctx.load_cert_chain(str(cert), str(key))
            self._tls_server.socket = ctx.wrap_socket(
                self._tls_server.socket, server_side=True, do_handshake_on_connect=False
            )
            self.https_url = f"https://127.0.0.1:{self._tls_server.server_address[1]}"
        for srv in (self._server, self._tls_server):
            if srv is None:
                continue
            t = threading.Thread(
                target=srv.serve_forever, kwargs={"poll_interval": 0.1}, name=f"{self.tag}-apiserver", daemon=True
            )
            t.start()
            self._threads.append(t)
            self._serving.append(srv)
        self.controllers.start()
        self._write_kubeconfig()
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if getattr(self, "controllers", None) is not None and self.controllers.is_alive():
            self.controllers.stop()
        if getattr(self, "kubelet", None) is not None:
            self.kubelet.stop()
        for srv in (self._server, self._tls_server):
            if srv is None:
                continue
            if srv in self._serving:
                srv.shutdown()
            srv.close_connections()
            srv.server_close()
        self._serving = []
        for t in self._threads:
            t.join(5)
        self._server = None

    def _kueue_mutator(self, rt: ResourceType, obj: dict[str, Any], old: dict[str, Any] | None, ctx: Ctx) -> None:
        if self.catalog.by_kind("kueue.x-k8s.io", "Workload") is not None:
            kueue_webhook(rt, obj, old, ctx)

    def _node_object(self) -> dict[str, Any]:
        return {
            "apiVersion": "v1",
            "kind": "Node",
            "metadata": {"name": self.node_name, "labels": dict(self.node_labels)},
            "spec": {"taints": copy.deepcopy(self.node_taints)} if self.node_taints else {},
            "status": {
                "capacity": dict(self.node_allocatable),
                "allocatable": dict(self.node_allocatable),
                "conditions": [
                    {
                        "type": "Ready",
                        "status": "True",
                        "reason": "KubeletReady",
                        "message": "kubelet is posting ready status",
                        "lastHeartbeatTime": ts(),
                        "lastTransitionTime": ts(),
                    }
                ],
                "addresses": [
                    {"type": "InternalIP", "address": "127.0.0.1"},
                    {"type": "Hostname", "address": self.node_name},
                ],
                "nodeInfo": {
                    "architecture": "amd64",
                    "bootID": "loopback",
                    "containerRuntimeVersion": "loopback://1.0",
                    "kernelVersion": os.uname().release,
                    "kubeProxyVersion": f"v{self.kube_version}.0",
                    "kubeletVersion": f"v{self.kube_version}.0",
                    "machineID": "loopback",
                    "operatingSystem": "linux",
                    "osImage": "loopback",
                    "systemUUID": "loopback",
                },
            },
        }

    def _write_kubeconfig(self) -> None:
        cfg = {
            "apiVersion": "v1",
            "kind": "Config",
            "preferences": {},
            "clusters": [{"name": "loopback", "cluster": {"server": self.url}}],  # the TLS one is added below
            "users": [
                {"name": self.user, "user": {"token": self.token}},
                {"name": "intruder", "user": {"token": "not-the-token"}},
            ],
            "contexts": [
                {"name": "loopback", "context": {"cluster": "loopback", "user": self.user, "namespace": "default"}},
                {"name": "bad-token", "context": {"cluster": "loopback", "user": "intruder", "namespace": "default"}},
            ],
            "current-context": "loopback",
        }
        if self.https_url:
            cfg["clusters"].append(
                {
                    "name": "loopback-tls",
                    "cluster": {
                        "server": self.https_url,
                        "certificate-authority-data": base64.b64encode(self.ca_pem).decode(),
                    },
                }
            )
            cfg["contexts"].append(
                {
                    "name": "loopback-tls",
                    "context": {"cluster": "loopback-tls", "user": self.user, "namespace": "default"},
                }
            )
        self.kubeconfig.write_text(yaml.safe_dump(cfg, sort_keys=False))

    def job_port(self, namespace: str, job: str, port: int) -> int:
        """The loopback port that stands in for `port` of a PyTorchJob's master (one per job)."""
        with self._port_lock:
            key = (namespace, job, port)
            if key not in self._ports:
                with socket.socket() as s:
                    s.bind(("127.0.0.1", 0))
                    self._ports[key] = s.getsockname()[1]
            return self._ports[key]

    def wake(self) -> None:
        """Run the controllers now (they also run on every store change)."""
        ctl = getattr(self, "controllers", None)
        if ctl is not None:
            ctl.kick.set()
            with self.store.lock:
                self.store.changed.notify_all()

    # --- clients ---------------------------------------------------------------------------------

    def api_client(self, context: str | None = None) -> Any:
        """A `kubernetes.client.ApiClient` for this cluster through the kubeconfig (close it when done)."""
        from kubernetes import config

        return config.new_client_from_config(config_file=str(self.kubeconfig), context=context)

    def kubectl(
        self, *args: str, namespace: str | None = None, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        """Run kubectl against this cluster (context loopback-tls; its own discovery cache)."""
        if not self.https_url:
            raise RuntimeError("kubectl needs the TLS listener (tls=True with cryptography or openssl)")
        cmd = [
            "kubectl",
            "--kubeconfig",
            str(self.kubeconfig),
            "--context",
            "loopback-tls",
            "--cache-dir",
            str(self.root / "kubectl-cache"),
        ]
        if namespace:
            cmd += ["-n", namespace]
        env = dict(os.environ, HOME=str(self.root), KUBECONFIG=str(self.kubeconfig))
        return subprocess.run(cmd + list(args), capture_output=True, text=True, timeout=timeout, env=env)

    # --- direct store access (assertions, setup) -------------------------------------------------

    def rt(self, resource: str) -> ResourceType:
        """A served resource type by plural, `plural.group`, kind or short name."""
        plural, _, group = resource.partition(".")
        for t in self.catalog.types:
            if (
                (t.plural == plural and (not group or t.group == group))
                or t.kind == resource
                or resource in t.short_names
            ):
                return t
        raise KeyError(f"{resource!r} is not served by this cluster (installed: {sorted(self.installed)})")

    def get(self, resource: str, namespace: str, name: str) -> dict[str, Any] | None:
        """The stored object (a copy), or None."""
        t = self.rt(resource)
        obj = self.store.get(t.key, namespace if t.namespaced else "", name)
        return self.registry.present(t, obj, None) if obj is not None else None

    def list(
        self,
        resource: str,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        return self.registry.list(self.rt(resource), namespace, label_selector, field_selector)

    def create(self, obj: dict[str, Any], namespace: str | None = None) -> dict[str, Any]:
        """Create `obj` (validated like an API request) as manager "loopback-test"."""
        group = obj["apiVersion"].rpartition("/")[0]
        t = next(t for t in self.catalog.types if t.kind == obj["kind"] and t.group == group)
        ns = namespace or obj.get("metadata", {}).get("namespace") or ("default" if t.namespaced else "")
        out = self.registry.create(t, ns, obj, Ctx(manager="loopback-test"))
        self.wake()
        return out

    def delete(self, resource: str, namespace: str, name: str, propagation: str | None = None) -> None:
        t = self.rt(resource)
        self.registry.delete(t, namespace, name, Ctx(manager="loopback-test"), propagation=propagation)
        self.wake()

    def create_namespace(self, name: str, labels: dict[str, str] | None = None) -> dict[str, Any]:
        meta: dict[str, Any] = {"name": name}
        if labels:
            meta["labels"] = labels
        return self.create({"apiVersion": "v1", "kind": "Namespace", "metadata": meta})

    def create_secret(
        self, namespace: str, name: str, data: dict[str, str | bytes], type: str = "Opaque"
    ) -> dict[str, Any]:  # noqa: A002
        enc = {k: base64.b64encode(v if isinstance(v, bytes) else v.encode()).decode() for k, v in data.items()}
        return self.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace},
                "type": type,
                "data": enc,
            }
        )

    def create_configmap(self, namespace: str, name: str, data: dict[str, str]) -> dict[str, Any]:
        return self.create(
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "metadata": {"name": name, "namespace": namespace},
                "data": dict(data),
            }
        )

    def events(self, namespace: str, involved: str | None = None, reason: str | None = None) -> list[dict[str, Any]]:
        """Events in `namespace`, optionally about the object named `involved` / with `reason`."""
        out = self.list("events", namespace)
        if involved is not None:
            out = [e for e in out if (e.get("involvedObject") or {}).get("name") == involved]
        if reason is not None:
            out = [e for e in out if e.get("reason") == reason]
        return sorted(out, key=lambda e: (e.get("firstTimestamp") or "", e["metadata"]["resourceVersion"]))

    def logs(self, namespace: str, pod: str, container: str | None = None, previous: bool = False) -> str:
        """A container's log as the API would return it (raises ApiError like the API)."""
        chunks = self.pod_logs(namespace, pod, {"container": container, "previous": previous}, threading.Event())
        return b"".join(chunks).decode(errors="replace")

    def pod_logs(self, namespace: str, pod: str, opts: dict[str, Any], closing: threading.Event) -> Iterator[bytes]:
        return self.kubelet.logs(namespace, pod, opts, closing)

    def wait_for(
        self, predicate: Callable[[], Any], timeout: float = 30.0, interval: float = 0.05, message: str = "condition"
    ) -> Any:
        """Poll `predicate` until it returns something truthy (returned); AssertionError with the
        cluster's state on timeout. KeyError/IndexError/TypeError/AttributeError/ApiError in the
        predicate count as "not yet"."""
        deadline = time.monotonic() + timeout
        last: Any = None
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
            time.sleep(interval)

    def describe(self, namespace: str | None = None) -> str:
        """A short text dump of jobs, pods and recent events (for failure messages)."""
        lines = []
        for t in self.catalog.types:
            if t.kind not in ("PyTorchJob", "Pod", "Workload", "TrainJob"):
                continue
            for o in self.list(t.plural, namespace):
                st = o.get("status") or {}
                conds = [
                    f"{c.get('type')}={c.get('status')}({c.get('reason', '')})" for c in st.get("conditions") or []
                ]
                cs = [
                    f"{c['name']}:{list((c.get('state') or {}).keys())}:{c.get('restartCount')}"
                    for c in st.get("containerStatuses") or []
                ]
                lines.append(
                    f"{t.kind} {o['metadata'].get('namespace', '')}/{o['metadata']['name']} phase={st.get('phase')} "
                    f"{' '.join(conds)} {' '.join(cs)}"
                )
        for e in self.list("events", namespace)[-25:]:
            lines.append(
                f"Event {e['involvedObject'].get('name')} {e.get('type')} {e.get('reason')}: {e.get('message')}"
            )
        if self.server_errors:
            lines.append(f"stand-in errors: {self.server_errors!r}")
        return "\n".join(lines)

    # --- RBAC stand-in ---------------------------------------------------------------------------

    def deny(
        self, verb: str, resource: str, namespace: str | None = None, name: str | None = None, times: int | None = None
    ) -> None:
        """Answer matching API requests with 403 Forbidden, as RBAC would. `verb` is an RBAC verb
        (get, list, watch, create, update, patch, delete, deletecollection) or "*"; `resource` a
        plural, "pods/log"-style subresource or "*"; `times` limits how many requests are denied."""
        self._denies.append({"verb": verb, "resource": resource, "namespace": namespace, "name": name, "times": times})

    def allow_all(self) -> None:
        self._denies.clear()

    def authorize(self, verb: str, group: str, resource: str, name: str | None, namespace: str | None) -> None:
        for rule in list(self._denies):
            if rule["verb"] not in ("*", verb):
                continue
            if rule["resource"] not in ("*", resource, f"{resource}.{group}" if group else resource):
                continue
            if rule["namespace"] is not None and rule["namespace"] != namespace:
                continue
            if rule["name"] is not None and rule["name"] != name:
                continue
            if rule["times"] is not None:
                rule["times"] -= 1
                if rule["times"] <= 0:
                    self._denies.remove(rule)
            from .errors import rbac_forbidden

            raise rbac_forbidden(self.user, verb, group, resource, name, namespace)

    # --- scheduling ------------------------------------------------------------------------------

    @staticmethod
    def _pod_pred(namespace: str, pod: str | Callable[[dict[str, Any]], bool]) -> Callable[[dict[str, Any]], bool]:
        if callable(pod):
            return lambda p: p["metadata"]["namespace"] == namespace and bool(pod(p))
        return lambda p: p["metadata"]["namespace"] == namespace and p["metadata"]["name"] == pod

    def hold_pending(
        self,
        namespace: str,
        pod: str | Callable[[dict[str, Any]], bool],
        reason: str = "Unschedulable",
        message: str = "0/1 nodes are available: 1 Insufficient nvidia.com/gpu. preemption: 0/1 nodes are "
        "available: 1 No preemption victims found for incoming pod.",
    ) -> None:
        """Keep matching pods (by name or predicate, also ones created later) unscheduled: Pending
        with PodScheduled=False and a FailedScheduling Event, until release()."""
        self.holds.append((self._pod_pred(namespace, pod), reason, message, namespace))
        self.wake()

    def release(self, namespace: str | None = None) -> None:
        """Drop every hold (those of `namespace` only, if given)."""
        if namespace is None:
            self.holds.clear()
        else:
            self.holds = [h for h in self.holds if h[3] != namespace]
        for s in self.controllers.controllers:
            if isinstance(s, Scheduler):
                s.reported.clear()
        self.wake()

    # --- pod state injection ---------------------------------------------------------------------

    def signal_pod(self, namespace: str, pod: str, sig: int = signal_mod.SIGTERM, container: str | None = None) -> None:
        """Send `sig` to the main process of the pod's container(s) (e.g. SIGTERM: preemption)."""
        rt = self.kubelet.runtime(namespace, pod)
        if rt is None:
            raise KeyError(f"pod {namespace}/{pod} has no running process")
        rt.signal(container, sig)

    def oom_kill(self, namespace: str, pod: str, container: str | None = None) -> None:
        """Kill the container's processes as the kernel OOM killer would (exit 137, OOMKilled)."""
        rt = self.kubelet.runtime(namespace, pod)
        if rt is None:
            raise KeyError(f"pod {namespace}/{pod} has no running process")
        for c in rt.containers:
            if container in (None, c["name"]):
                inst = rt.current.get(c["name"])
                if inst is not None:
                    inst.oom = True
                    rt.kill_group(inst)

    def _freeze(self, namespace: str, pod: str) -> dict[str, Any]:
        """Take the pod away from the kubelet (its processes are killed); returns the pod."""
        with self.kubelet.lock:  # no runtime can start for it in between
            cur = self.get("pods", namespace, pod)
            if cur is None:
                raise KeyError(f"pod {namespace}/{pod} not found")
            uid = cur["metadata"]["uid"]
            self.frozen_pods.add(uid)
            rt = self.kubelet.runtimes.get(uid)
            if rt is not None:
                with rt.lock:  # waits for a status write in flight
                    rt.frozen = True
        if rt is not None:
            rt.terminate(0)
            rt.finished.wait(10)
        with self.store.lock:
            cur = self.get("pods", namespace, pod)
            assert cur is not None
            if not cur["spec"].get("nodeName"):
                cur["spec"]["nodeName"] = self.node_name
                cur["metadata"].pop("resourceVersion", None)
                cur = self.registry.update(
                    self.rt("pods"), namespace, pod, cur, Ctx(manager="kube-scheduler", internal=True)
                )
        return cur

    def _write_pod_status(self, namespace: str, pod: str, status: dict[str, Any]) -> dict[str, Any]:
        with self.store.lock:
            cur = self.get("pods", namespace, pod)
            assert cur is not None
            cur["status"] = status
            cur["metadata"].pop("resourceVersion", None)
            out = self.registry.update(
                self.rt("pods"), namespace, pod, cur, Ctx(manager="kubelet", internal=True), subresource="status"
            )
        self.wake()
        return out

    def _status_base(self, pod: dict[str, Any], phase: str, ready: bool) -> dict[str, Any]:
        now = ts()
        st = copy.deepcopy(pod.get("status") or {})
        st.update(
            {"phase": phase, "hostIP": "127.0.0.1", "podIP": "127.0.0.1", "startTime": st.get("startTime") or now}
        )
        r = "True" if ready else "False"
        st["conditions"] = [
            {"type": "PodScheduled", "status": "True", "lastProbeTime": None, "lastTransitionTime": now},
            {"type": "Initialized", "status": "True", "lastProbeTime": None, "lastTransitionTime": now},
            {"type": "ContainersReady", "status": r, "lastProbeTime": None, "lastTransitionTime": now},
            {"type": "Ready", "status": r, "lastProbeTime": None, "lastTransitionTime": now},
        ]
        return st

    def _statuses(
        self,
        pod: dict[str, Any],
        container: str | None,
        state: dict[str, Any],
        restart_count: int | None,
        last_state: dict[str, Any] | None,
    ) -> list[dict[str, Any]]:
        old = {s["name"]: s for s in (pod.get("status") or {}).get("containerStatuses") or []}
        out = []
        for c in pod["spec"].get("containers") or []:
            prev = old.get(c["name"]) or {
                "name": c["name"],
                "image": c.get("image", ""),
                "imageID": "",
                "restartCount": 0,
                "ready": False,
                "started": False,
                "lastState": {},
                "state": {"waiting": {"reason": "ContainerCreating"}},
            }
            if container in (None, c["name"]):
                prev = dict(prev, state=copy.deepcopy(state), ready=False, started=False)
                if restart_count is not None:
                    prev["restartCount"] = restart_count
                if last_state is not None:
                    prev["lastState"] = copy.deepcopy(last_state)
            out.append(prev)
        return out

    def set_waiting(
        self, namespace: str, pod: str, reason: str, message: str | None = None, container: str | None = None
    ) -> dict[str, Any]:
        """Put the pod's container(s) in `state.waiting` (e.g. ImagePullBackOff, CreateContainerConfigError);
        the kubelet stops managing the pod."""
        cur = self._freeze(namespace, pod)
        waiting: dict[str, Any] = {"reason": reason}
        if message:
            waiting["message"] = message
        st = self._status_base(cur, "Pending", False)
        st["containerStatuses"] = self._statuses(cur, container, {"waiting": waiting}, None, None)
        return self._write_pod_status(namespace, pod, st)

    def set_terminated(
        self,
        namespace: str,
        pod: str,
        exit_code: int,
        reason: str | None = None,
        message: str | None = None,
        container: str | None = None,
        phase: str | None = None,
        restart_count: int | None = None,
    ) -> dict[str, Any]:
        """Terminate the pod's container(s) with `exit_code` (phase Succeeded if 0 else Failed,
        unless given); the kubelet stops managing the pod."""
        cur = self._freeze(namespace, pod)
        term = {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "startedAt": (cur.get("status") or {}).get("startTime") or ts(),
            "finishedAt": ts(),
            "containerID": "containerd://" + uuid.uuid4().hex,
        }
        if message:
            term["message"] = message
        st = self._status_base(cur, phase or ("Succeeded" if exit_code == 0 else "Failed"), False)
        st["containerStatuses"] = self._statuses(cur, container, {"terminated": term}, restart_count, None)
        return self._write_pod_status(namespace, pod, st)

    def evict(
        self,
        namespace: str,
        pod: str,
        message: str = "The node was low on resource: memory. Threshold quantity: 100Mi, available: 10Mi. ",
    ) -> dict[str, Any]:
        """Node-pressure eviction: processes killed, phase Failed, reason Evicted, DisruptionTarget."""
        cur = self._freeze(namespace, pod)
        st = self._status_base(cur, "Failed", False)
        st.update({"reason": "Evicted", "message": message})
        st["conditions"].append(
            {
                "type": "DisruptionTarget",
                "status": "True",
                "lastProbeTime": None,
                "lastTransitionTime": ts(),
                "reason": "TerminationByKubelet",
                "message": message,
            }
        )
        term = {
            "exitCode": 137,
            "reason": "Error",
            "startedAt": st["startTime"],
            "finishedAt": ts(),
            "containerID": "containerd://" + uuid.uuid4().hex,
        }
        st["containerStatuses"] = self._statuses(cur, None, {"terminated": term}, None, None)
        return self._write_pod_status(namespace, pod, st)

    def preempt(self, namespace: str, pod: str) -> None:
        """Scheduler preemption: a DisruptionTarget condition, then a graceful delete (SIGTERM first)."""
        cur = self.get("pods", namespace, pod)
        if cur is None:
            raise KeyError(f"pod {namespace}/{pod} not found")
        rt = self.kubelet.runtime(namespace, pod)
        cond = {
            "type": "DisruptionTarget",
            "status": "True",
            "lastProbeTime": None,
            "lastTransitionTime": ts(),
            "reason": "PreemptionByScheduler",
            "message": "default-scheduler: preempting to accommodate a higher priority pod",
        }
        if rt is not None:
            self.kubelet.status_extra[cur["metadata"]["uid"]] = {"conditions": [cond]}
        st = cur.get("status") or {}
        st["conditions"] = [c for c in st.get("conditions") or [] if c.get("type") != "DisruptionTarget"] + [cond]
        self._write_pod_status(namespace, pod, st)
        self.registry.delete(self.rt("pods"), namespace, pod, Ctx(manager="kube-scheduler", internal=True))
        self.wake()

    # --- Kueue -----------------------------------------------------------------------------------

    def admit_workload(
        self, namespace: str, job: str, cluster_queue: str = "cluster-queue", flavor: str = "default-flavor"
    ) -> dict[str, Any]:
        """Admit the Workload of PyTorchJob `job` (QuotaReserved and Admitted True); Kueue then unsuspends the job."""
        return self.kueue.admit(namespace, job, cluster_queue, flavor)

    def workload_for(self, namespace: str, job: str) -> dict[str, Any] | None:
        from .operator import workload_name

        j = self.get("pytorchjobs", namespace, job)
        if j is None:
            return None
        return self.get("workloads", namespace, workload_name(job, j["metadata"]["uid"]))


__all__ = ["LoopbackCluster", "ApiError"]
