"""The kubelet stand-in: runs each pod bound to `loopback-node` as real local processes.

How a container becomes a process (see also the LoopbackCluster docs):
* command + args, with `$(VAR)` expanded from the container's env as the kubelet does; a command
  whose program is `python`/`python3`/`pythonX.Y` runs `sys.executable`; any other bare program
  name is looked up next to `sys.executable` first (the venv's `torchrun`, `ctrlnet`), then PATH;
  without a command, args[0] is the program (no image entrypoints here);
* env: PATH, VIRTUAL_ENV, PYTHONPATH, LANG/LC_ALL/TZ of the test process, HOME and TMPDIR in the
  pod's own folder, HOSTNAME = pod name, the cluster's extra env, then the container's env
  (value, valueFrom secretKeyRef/configMapKeyRef/fieldRef/resourceFieldRef, envFrom);
* volumes are per-pod local folders (configMap/secret: their keys as files; emptyDir: a folder;
  persistentVolumeClaim: one folder per claim, shared by the pods that mount it and kept for the
  cluster's lifetime; hostPath: the host path itself; a subPath of an emptyDir or claim is created
  as a folder, as the kubelet does). Every command/arg/env value and workingDir
  that starts with a volumeMount's mountPath (also `--flag=<mountPath>...`) is rewritten to the
  local folder: that is how `/etc/ctrlnet/config.yaml` is found;
* host names of the pod's namespace (pods and services, with `.ns[.svc[.cluster.local]]`, and the
  PyTorchJob replica names `<job>-master-0`/`<job>-worker-N`) in literal env values and args are
  rewritten to 127.0.0.1: every pod shares the loopback interface. So that jobs do not collide
  on it, MASTER_PORT/PET_MASTER_PORT of a PyTorchJob's pods become a free port chosen once per
  (namespace, job, port); any other port a process listens on is shared by all pods;
* stdout+stderr become the container log (line by line, timestamped); the exit code becomes
  `state.terminated` (0 Completed, else Error; 128+signal when killed; OOMKilled when the test
  says so), restartPolicy Always/OnFailure restart the container in place after a short
  CrashLoopBackOff (restartCount + 1, lastState, `previous` logs).
* deleting a pod sends SIGTERM to each container's main process, waits the grace period (capped
  by the cluster's `max_grace_seconds`), then SIGKILLs the process group.
* the Training Operator's `init-pytorch` init container (an nslookup loop in busybox) is emulated:
  it succeeds once the master's Service exists.
Not emulated: images (nothing is pulled; every image "is present"), resource limits, security
contexts (processes run as the test's user), probes, container isolation (same filesystem,
network and PID namespace as the tests).
"""

from __future__ import annotations

import copy
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

from . import errors as E
from .errors import ApiError
from .registry import Ctx, ts

if TYPE_CHECKING:
    from .cluster import LoopbackCluster

PY = re.compile(r"^python(3(\.\d+)?)?$")
QUANTITY = re.compile(r"^([+-]?[0-9.]+(?:[eE][+-]?\d+)?)([a-zA-Z]*)$")
SUFFIX = {
    "": 1,
    "m": 1e-3,
    "k": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "E": 1e18,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
    "Ei": 2**60,
    "n": 1e-9,
    "u": 1e-6,
}


def quantity(v: Any) -> float:
    m = QUANTITY.match(str(v).strip())
    if not m or m.group(2) not in SUFFIX:
        raise ValueError(f"quantities must match the regular expression: {v!r}")
    return float(m.group(1)) * SUFFIX[m.group(2)]


def rfc3339nano(t_ns: int) -> str:
    secs, ns = divmod(t_ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


class ConfigError(Exception):
    """CreateContainerConfigError: a referenced Secret/ConfigMap or key is missing."""


class MountError(Exception):
    """A volume cannot be set up yet (FailedMount)."""


class Instance:
    """One run of one container: its process, log and outcome."""

    def __init__(self, name: str):
        self.name = name
        self.container_id = "containerd://" + uuid.uuid4().hex
        self.proc: subprocess.Popen[bytes] | None = None
        self.lines: list[tuple[int, bytes]] = []
        self.cond = threading.Condition()
        self.started_at: str | None = None
        self.finished_at: str | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.message: str | None = None
        self.done = False  # the process ended and its output is drained
        self.reader: threading.Thread | None = None
        self.oom = False
        self.killed_by_kubelet = False
        self.in_container = False  # run from the image: signals go to the container's PID 1
        self.scratch: Path | None = None  # the container's overlay upper layer, removed when it ends

    def kill(self, sig: int) -> None:
        """Send `sig` to the container's process (a real container: its PID 1)."""
        if self.proc is None or self.proc.poll() is not None:
            return
        pid = self.proc.pid
        if self.in_container:
            from testkit.container import pid1

            pid = pid1(self.proc.pid) or pid
        try:
            os.kill(pid, sig)
        except ProcessLookupError:
            pass

    def log(self, line: bytes) -> None:
        with self.cond:
            self.lines.append((time.time_ns(), line))
            self.cond.notify_all()

    def finish(self, exit_code: int, reason: str | None = None, message: str | None = None) -> None:
        with self.cond:
            self.exit_code = exit_code
            self.reason = reason or ("Completed" if exit_code == 0 else "Error")
            if self.oom:
                self.reason = "OOMKilled"
            self.message = message
            self.finished_at = ts()
            self.done = True
            self.cond.notify_all()

    def terminated(self) -> dict[str, Any]:
        out = {
            "exitCode": self.exit_code,
            "reason": self.reason,
            "startedAt": self.started_at,
            "finishedAt": self.finished_at,
            "containerID": self.container_id,
        }
        if self.message:
            out["message"] = self.message
        return out


class PodRuntime(threading.Thread):
    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]):
        super().__init__(name=f"{kubelet.cluster.tag}-kubelet-{pod['metadata']['name']}", daemon=True)
        self.k = kubelet
        self.ns = pod["metadata"]["namespace"]
        self.name = pod["metadata"]["name"]
        self.uid = pod["metadata"]["uid"]
        self.pod = pod
        self.current: dict[str, Instance] = {}
        self.previous: dict[str, Instance] = {}
        self.restarts: dict[str, int] = {}
        self.waiting: dict[str, tuple[str, str | None]] = {}
        self.lock = threading.RLock()
        self.stop_at: float | None = None  # monotonic deadline for SIGKILL once termination starts
        self.terminating = False
        self.removed = threading.Event()  # the pod object is gone: kill now
        self.frozen = False
        self.conditions: dict[str, dict[str, Any]] = {}
        self.start_time = ts()
        self.dir = kubelet.root / "pods" / self.ns / f"{self.name}-{self.uid[:8]}"
        self.mounts: dict[str, Path] = {}
        self.init_done = not (pod["spec"].get("initContainers"))
        self.finished = threading.Event()

    # --- helpers ---------------------------------------------------------------------------------

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.pod["spec"].get("containers") or []

    @property
    def init_containers(self) -> list[dict[str, Any]]:
        return self.pod["spec"].get("initContainers") or []

    def _event(self, type_: str, reason: str, message: str, container: str | None = None) -> None:
        fp = f"spec.containers{{{container}}}" if container else None
        try:
            self.k.cluster.registry.record_event(
                self.pod, type_, reason, message, "kubelet", self.k.node, field_path=fp
            )
        except ApiError:
            pass

    def _cond(self, type_: str, status: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
        s = "True" if status else "False"
        prev = self.conditions.get(type_)
        if prev is None or prev["status"] != s:
            prev = {"type": type_, "status": s, "lastProbeTime": None, "lastTransitionTime": ts()}
        prev = dict(prev)
        prev.pop("reason", None)
        prev.pop("message", None)
        if reason:
            prev["reason"] = reason
        if message:
            prev["message"] = message
        self.conditions[type_] = prev
        return prev

    # --- status ----------------------------------------------------------------------------------

    def _container_status(self, c: dict[str, Any], init: bool) -> dict[str, Any]:
        name = c["name"]
        inst = self.current.get(name)
        prev = self.previous.get(name)
        st: dict[str, Any] = {
            "name": name,
            "image": c.get("image", ""),
            "imageID": f"loopback://image/{c.get('image', '')}",
            "restartCount": self.restarts.get(name, 0),
            "ready": False,
            "started": False,
        }
        w = self.waiting.get(name)
        if w is not None or inst is None:
            reason, msg = (
                w
                if w is not None
                else ("PodInitializing" if not self.init_done and not init else "ContainerCreating", None)
            )
            st["state"] = {"waiting": {"reason": reason, **({"message": msg} if msg else {})}}
        elif not inst.done:
            st["state"] = {"running": {"startedAt": inst.started_at}}
            st["ready"] = not init
            st["started"] = True
            st["containerID"] = inst.container_id
        else:
            st["state"] = {"terminated": inst.terminated()}
            st["containerID"] = inst.container_id
        if prev is not None and prev.done:
            st["lastState"] = {"terminated": prev.terminated()}
        else:
            st["lastState"] = {}
        return st

    def phase(self) -> str:
        if not self.init_done:
            failed_init = any(
                i.done and i.exit_code != 0 and not self._will_restart(i)
                for i in (self.current.get(c["name"]) for c in self.init_containers)
                if i
            )
            return "Failed" if failed_init else "Pending"
        insts = [self.current.get(c["name"]) for c in self.containers]
        if any(i is None for i in insts):
            return "Pending" if not any(i is not None for i in insts) else "Running"
        if any(not i.done or self._will_restart(i) for i in insts):
            return "Running"
        return "Succeeded" if all(i.exit_code == 0 for i in insts) else "Failed"

    def _will_restart(self, inst: Instance) -> bool:
        if self.terminating or self.removed.is_set():
            return False
        policy = self.pod["spec"].get("restartPolicy", "Always")
        if inst.killed_by_kubelet:
            return False
        return policy == "Always" or (policy == "OnFailure" and inst.exit_code != 0)

    def write_status(self) -> bool:
        """Write the pod's status; False when the pod is gone (or replaced)."""
        with self.lock:
            if self.frozen:
                return True
            phase = self.phase()
            init_st = [self._container_status(c, True) for c in self.init_containers]
            cont_st = [self._container_status(c, False) for c in self.containers]
            unready = [s["name"] for s in cont_st if not s["ready"]]
            incomplete = [s["name"] for s in init_st if not (s["state"].get("terminated") or {}).get("exitCode") == 0]
            conds = [
                self._cond("PodReadyToStartContainers", bool(self.mounts) or not self.waiting_mount()),
                self._cond(
                    "Initialized",
                    not incomplete,
                    None if not incomplete else "ContainersNotInitialized",
                    None if not incomplete else f"containers with incomplete status: [{' '.join(incomplete)}]",
                ),
            ]
            done = phase in ("Succeeded", "Failed")
            if done:
                conds.append(self._cond("Ready", False, "PodCompleted"))
                conds.append(self._cond("ContainersReady", False, "PodCompleted"))
            else:
                r = not unready
                msg = None if r else f"containers with unready status: [{' '.join(unready)}]"
                conds.append(self._cond("Ready", r, None if r else "ContainersNotReady", msg))
                conds.append(self._cond("ContainersReady", r, None if r else "ContainersNotReady", msg))
            conds.append(self._cond("PodScheduled", True))
            status = {
                "phase": phase,
                "conditions": conds,
                "hostIP": "127.0.0.1",
                "hostIPs": [{"ip": "127.0.0.1"}],
                "podIP": "127.0.0.1",
                "podIPs": [{"ip": "127.0.0.1"}],
                "startTime": self.start_time,
                "qosClass": (self.pod.get("status") or {}).get("qosClass", "BestEffort"),
                "containerStatuses": cont_st,
            }
            if init_st:
                status["initContainerStatuses"] = init_st
            for key, value in copy.deepcopy(self.k.status_extra.get(self.uid) or {}).items():
                if key == "conditions":
                    status["conditions"] += value
                else:
                    status[key] = value
            return self.k.write_status(self, status)

    def waiting_mount(self) -> bool:
        return any(r == "ContainerCreating" for r, _ in self.waiting.values())

    # --- setup -----------------------------------------------------------------------------------

    def _setup_volumes(self) -> None:
        store = self.k.cluster.store
        vols = self.dir / "volumes"
        mounts: dict[str, Path] = {}
        for v in self.pod["spec"].get("volumes") or []:
            name = v["name"]
            target = vols / name
            if "configMap" in v or "secret" in v:
                src = v.get("configMap") or v.get("secret") or {}
                is_secret = "secret" in v
                ref = src.get("secretName") if is_secret else src.get("name")
                obj = store.get(("", "secrets" if is_secret else "configmaps"), self.ns, ref or "")
                if obj is None:
                    if src.get("optional"):
                        target.mkdir(parents=True, exist_ok=True)
                        mounts[name] = target
                        continue
                    kind = "secret" if is_secret else "configmap"
                    raise MountError(f'MountVolume.SetUp failed for volume "{name}" : {kind} "{ref}" not found')
                self._write_keys(target, obj, is_secret, src.get("items"))
            elif "projected" in v:
                target.mkdir(parents=True, exist_ok=True)
                for s in v["projected"].get("sources") or []:
                    for key, plural in (("configMap", "configmaps"), ("secret", "secrets")):
                        if key in s:
                            obj = store.get(("", plural), self.ns, s[key].get("name", ""))
                            if obj is None and not s[key].get("optional"):
                                raise MountError(
                                    f'MountVolume.SetUp failed for volume "{name}" : {key.lower()} '
                                    f'"{s[key].get("name")}" not found'
                                )
                            if obj is not None:
                                self._write_keys(target, obj, key == "secret", s[key].get("items"), clear=False)
            elif "persistentVolumeClaim" in v:
                claim = v["persistentVolumeClaim"].get("claimName", "")
                target = self.k.root / "pvcs" / self.ns / claim
                target.mkdir(parents=True, exist_ok=True)
            elif "hostPath" in v:
                target = Path(v["hostPath"].get("path", "/"))
            else:  # emptyDir and anything else: a fresh folder
                target.mkdir(parents=True, exist_ok=True)
            mounts[name] = target
        self.mounts = mounts

    @staticmethod
    def _write_keys(
        target: Path, obj: dict[str, Any], secret: bool, items: list[dict[str, Any]] | None, clear: bool = True
    ) -> None:
        import base64

        if clear and target.exists():
            shutil.rmtree(target)
        target.mkdir(parents=True, exist_ok=True)
        data: dict[str, bytes] = {}
        for k, v in (obj.get("data") or {}).items():
            data[k] = base64.b64decode(v) if secret else str(v).encode()
        for k, v in (obj.get("binaryData") or {}).items():
            data[k] = base64.b64decode(v)
        pairs = [(i["key"], i.get("path", i["key"])) for i in items] if items else [(k, k) for k in data]
        for key, rel in pairs:
            if key in data:
                p = target / rel
                p.parent.mkdir(parents=True, exist_ok=True)
                p.write_bytes(data[key])

    def _mount_map(self, c: dict[str, Any]) -> list[tuple[str, str]]:
        out = []
        for m in c.get("volumeMounts") or []:
            base = self.mounts.get(m.get("name", ""))
            if base is None:
                continue
            local = base / m["subPath"] if m.get("subPath") else base
            if m.get("subPath") and not local.exists() and base.is_dir() and not self._keyed(m.get("name", "")):
                local.mkdir(parents=True, exist_ok=True)  # as the kubelet does for a subPath of an emptyDir or PVC
            out.append((m["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(out, key=lambda t: -len(t[0]))

    def _keyed(self, volume: str) -> bool:
        """A volume whose subPaths name keys (configMap, secret, projected), not folders to create."""
        v = next((v for v in self.pod["spec"].get("volumes") or [] if v.get("name") == volume), {})
        return any(k in v for k in ("configMap", "secret", "projected", "downwardAPI"))

    def _rewrite_path(self, s: str, mm: list[tuple[str, str]]) -> str:
        def one(v: str) -> str:
            for mp, local in mm:
                if v == mp or v.startswith(mp + "/"):
                    return local + v[len(mp) :]
            return v

        s2 = one(s)
        if s2 != s:
            return s2
        if s.startswith("-") and "=" in s:
            flag, _, val = s.partition("=")
            return f"{flag}={one(val)}"
        return s

    def _host_pattern(self) -> re.Pattern[str] | None:
        store = self.k.cluster.store
        names = {o["metadata"]["name"] for o in store.list(("", "services"), self.ns)}
        names |= {o["metadata"]["name"] for o in store.list(("", "pods"), self.ns)}
        job = (self.pod["metadata"].get("labels") or {}).get("training.kubeflow.org/job-name")
        alts = [re.escape(n) for n in sorted(names, key=len, reverse=True)]
        if job:
            alts.insert(0, re.escape(job) + r"-(?:master|worker)-\d+")
        if not alts:
            return None
        ns = re.escape(self.ns)
        return re.compile(
            rf"(?<![A-Za-z0-9.-])(?:{'|'.join(alts)})(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?![A-Za-z0-9-])"
        )

    # --- env -------------------------------------------------------------------------------------

    def _env(self, c: dict[str, Any], hosts: re.Pattern[str] | None, mm: list[tuple[str, str]]) -> dict[str, str]:
        import base64

        store = self.k.cluster.store
        env: dict[str, str] = {}
        for ef in c.get("envFrom") or []:
            prefix = ef.get("prefix", "")
            for key, plural in (("configMapRef", "configmaps"), ("secretRef", "secrets")):
                if key in ef:
                    ref = ef[key]
                    obj = store.get(("", plural), self.ns, ref.get("name", ""))
                    if obj is None:
                        if ref.get("optional"):
                            continue
                        raise ConfigError(
                            f'{"configmap" if plural == "configmaps" else "secret"} "{ref.get("name")}" not found'
                        )
                    for k, v in (obj.get("data") or {}).items():
                        env[prefix + k] = base64.b64decode(v).decode() if plural == "secrets" else str(v)
        for e in c.get("env") or []:
            name = e["name"]
            if "value" in e:
                val = _expand(str(e["value"]), env)
                if hosts is not None:
                    val = hosts.sub("127.0.0.1", val)
                job = (self.pod["metadata"].get("labels") or {}).get("training.kubeflow.org/job-name")
                if job and name in ("MASTER_PORT", "PET_MASTER_PORT") and val.isdigit():
                    val = str(self.k.cluster.job_port(self.ns, job, int(val)))
                env[name] = self._rewrite_path(val, mm)
            elif "valueFrom" in e:
                vf = e["valueFrom"]
                got = self._value_from(vf, c)
                if got is not None:
                    env[name] = got
            else:
                env[name] = ""
        return env

    def _value_from(self, vf: dict[str, Any], c: dict[str, Any]) -> str | None:
        import base64

        store = self.k.cluster.store
        for key, plural, kind in (
            ("secretKeyRef", "secrets", "Secret"),
            ("configMapKeyRef", "configmaps", "ConfigMap"),
        ):
            if key in vf:
                ref = vf[key]
                obj = store.get(("", plural), self.ns, ref.get("name", ""))
                if obj is None:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f'{kind.lower()} "{ref.get("name")}" not found')
                data = obj.get("data") or {}
                if ref.get("key") not in data:
                    if ref.get("optional"):
                        return None
                    raise ConfigError(f"couldn't find key {ref.get('key')} in {kind} {self.ns}/{ref.get('name')}")
                v = data[ref["key"]]
                return base64.b64decode(v).decode() if plural == "secrets" else str(v)
        if "fieldRef" in vf:
            path = vf["fieldRef"].get("fieldPath", "")
            meta = self.pod["metadata"]
            m = re.match(r"^metadata\.(labels|annotations)\['(.+)'\]$", path)
            if m:
                return (meta.get(m.group(1)) or {}).get(m.group(2), "")
            simple = {
                "metadata.name": meta["name"],
                "metadata.namespace": self.ns,
                "metadata.uid": self.uid,
                "spec.nodeName": self.k.node,
                "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName", ""),
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
                "status.podIPs": "127.0.0.1",
                "status.hostIPs": "127.0.0.1",
            }
            return simple.get(path, "")
        if "resourceFieldRef" in vf:
            r = vf["resourceFieldRef"]
            target = c
            if r.get("containerName"):
                target = next((x for x in self.containers if x["name"] == r["containerName"]), c)
            kind, _, res = r.get("resource", "").partition(".")
            value = ((target.get("resources") or {}).get(kind) or {}).get(res)
            if value is None:
                value = self.k.cluster.node_allocatable.get(res, "0")
            divisor = quantity(r.get("divisor", "1") or "1")
            return str(int(math.ceil(quantity(value) / divisor)))
        return None

    # --- processes -------------------------------------------------------------------------------

    def _command(
        self, c: dict[str, Any], env: dict[str, str], hosts: re.Pattern[str] | None, mm: list[tuple[str, str]]
    ) -> list[str]:
        cmd = [_expand(str(x), env) for x in (c.get("command") or [])]
        args = [_expand(str(x), env) for x in (c.get("args") or [])]
        argv = cmd + args
        if hosts is not None:
            argv = [hosts.sub("127.0.0.1", a) for a in argv]
        argv = [self._rewrite_path(a, mm) for a in argv]
        if not argv:
            raise FileNotFoundError("no command: the loopback kubelet has no image entrypoints; set command or args")
        prog = argv[0]
        if PY.match(os.path.basename(prog)):
            argv[0] = sys.executable
        elif "/" not in prog:
            found = shutil.which(prog, path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", ""))
            if found is None:
                raise FileNotFoundError(f'exec: "{prog}": executable file not found in $PATH')
            argv[0] = found
        return argv

    def _container_command(self, c: dict[str, Any], inst: Instance) -> list[str]:
        """The host command that runs container `c` from the cluster's image (testkit.container),
        with the env this kubelet resolved (Secrets, fields, the job's loopback ports) but paths as
        the spec says them: inside the container they are real."""
        import base64

        from testkit import container

        store = self.k.cluster.store
        configmaps, secrets = {}, {}
        for v in self.pod["spec"].get("volumes") or []:
            if "configMap" in v:
                obj = store.get(("", "configmaps"), self.ns, v["configMap"]["name"]) or {}
                configmaps[v["configMap"]["name"]] = {k: str(x) for k, x in (obj.get("data") or {}).items()}
        for s in store.list(("", "secrets"), self.ns):
            secrets[s["metadata"]["name"]] = {k: base64.b64decode(x).decode() for k, x in (s.get("data") or {}).items()}
        env = {**self.k.cluster.extra_env, **self._env(c, self._host_pattern(), [])}
        pod = container.Pod(self.name, self.pod["spec"], configmaps, secrets)
        argv, scratch = container.command(pod, self.k.cluster.image, None, env=env)
        inst.in_container, inst.scratch = True, scratch
        return argv

    def _base_env(self) -> dict[str, str]:
        home, tmp = self.dir / "home", self.dir / "tmp"
        home.mkdir(parents=True, exist_ok=True)
        tmp.mkdir(parents=True, exist_ok=True)
        env = {
            "PATH": os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"),
            "HOME": str(home),
            "TMPDIR": str(tmp),
            "HOSTNAME": self.name,
        }
        for k in ("VIRTUAL_ENV", "PYTHONPATH", "LANG", "LC_ALL", "TZ", "SYSTEMROOT"):
            if k in os.environ:
                env[k] = os.environ[k]
        env.update(self.k.cluster.extra_env)
        return env

    def _start(self, c: dict[str, Any]) -> Instance | None:
        """Start one container; None when it cannot start yet (config error: retried)."""
        name = c["name"]
        mm = self._mount_map(c)
        hosts = self._host_pattern()
        try:
            cenv = self._env(c, hosts, mm)
        except ConfigError as err:
            if self.waiting.get(name) != ("CreateContainerConfigError", str(err)):
                self.waiting[name] = ("CreateContainerConfigError", str(err))
                self._event("Warning", "Failed", f"Error: {err}", name)
                self.write_status()
            return None
        self.waiting.pop(name, None)
        inst = Instance(name)
        env = self._base_env()
        env.update(cenv)
        cwd = c.get("workingDir")
        cwd = self._rewrite_path(cwd, mm) if cwd else str(self.dir / "home")
        self._event("Normal", "Pulled", f'Container image "{c.get("image", "")}" already present on machine', name)
        self._event("Normal", "Created", f"Created container {name}", name)
        inst.started_at = ts()
        try:
            if self.k.cluster.image is not None:
                argv = self._container_command(c, inst)
                env = None
            else:
                argv = self._command(c, env, hosts, mm)
            inst.proc = subprocess.Popen(
                argv,
                env=env,
                cwd=cwd,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        except (OSError, ValueError) as err:
            inst.finish(
                128,
                "StartError",
                f"failed to create containerd task: failed to create shim task: OCI runtime "
                f"create failed: runc create failed: unable to start container process: {err}: unknown",
            )
            self._event("Warning", "Failed", f"Error: {inst.message}", name)
            return inst
        self._event("Normal", "Started", f"Started container {name}", name)
        proc = inst.proc

        def read() -> None:
            assert proc.stdout is not None
            for line in iter(proc.stdout.readline, b""):
                inst.log(line)
            proc.stdout.close()

        inst.reader = threading.Thread(target=read, name=f"{self.k.cluster.tag}-log-{self.name}-{name}", daemon=True)
        inst.reader.start()
        return inst

    def _emulated_init_pytorch(self, c: dict[str, Any]) -> Instance:
        """Training Operator v1.9's init container: `nslookup <job>-master-0` until it resolves."""
        inst = Instance(c["name"])
        inst.started_at = ts()
        self._event("Normal", "Pulled", f'Container image "{c.get("image", "")}" already present on machine', c["name"])
        self._event("Normal", "Created", f"Created container {c['name']}", c["name"])
        self._event("Normal", "Started", f"Started container {c['name']}", c["name"])
        text = " ".join(c.get("command") or [])
        m = re.search(r"nslookup (\S+?);", text)
        host = m.group(1) if m else ""
        tries = re.search(r"seq (\d+)", text)
        max_tries = int(tries.group(1)) if tries else 100

        def run() -> None:
            store = self.k.cluster.store
            for _ in range(max_tries):
                if self.terminating or self.removed.is_set():
                    inst.finish(143)
                    return
                if store.exists(("", "services"), self.ns, host):
                    for line in (
                        "Server:\t\t10.96.0.10",
                        "Address:\t10.96.0.10:53",
                        "",
                        f"Name:\t{host}.{self.ns}.svc.cluster.local",
                        "Address: 127.0.0.1",
                        "",
                    ):
                        inst.log(line.encode() + b"\n")
                    inst.finish(0)
                    return
                inst.log(f"** server can't find {host}: NXDOMAIN\n".encode())
                inst.log(b"waiting for master\n")
                time.sleep(self.k.cluster.init_poll_seconds)
            inst.finish(1)

        inst.reader = threading.Thread(target=run, name=f"{self.k.cluster.tag}-init-{self.name}", daemon=True)
        inst.reader.start()
        return inst

    def _poll(self, inst: Instance) -> bool:
        """True when the instance just finished."""
        if inst.done:
            return False
        if inst.proc is None:
            return False  # emulated: finishes on its own
        rc = inst.proc.poll()
        if rc is None:
            return False
        if inst.reader is not None:
            inst.reader.join(5)
        if inst.scratch is not None:
            shutil.rmtree(inst.scratch, ignore_errors=True)
        inst.finish(128 - rc if rc < 0 else rc)
        return True

    def signal(self, container: str | None, sig: int) -> None:
        with self.lock:
            names = [container] if container else [c["name"] for c in self.containers]
            for n in names:
                inst = self.current.get(n)
                if inst is not None:
                    inst.kill(sig)

    def kill_group(self, inst: Instance) -> None:
        if inst.proc is not None and inst.proc.poll() is None:
            try:
                os.killpg(inst.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def all_instances(self) -> list[Instance]:
        return list(self.current.values()) + list(self.previous.values())

    # --- lifecycle -------------------------------------------------------------------------------

    def terminate(self, grace: float) -> None:
        with self.lock:
            if self.terminating:
                self.stop_at = min(self.stop_at or grace, time.monotonic() + grace)
                return
            self.terminating = True
            self.stop_at = time.monotonic() + grace
            for c in self.containers + self.init_containers:
                inst = self.current.get(c["name"])
                if inst is not None and not inst.done:
                    inst.killed_by_kubelet = True
                    self._event("Normal", "Killing", f"Stopping container {c['name']}", c["name"])
                    inst.kill(signal.SIGTERM)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug in the stand-in: keep it visible
            self.k.cluster.server_errors.append(exc)
            if self.k.cluster.verbose:
                import traceback

                traceback.print_exc()
        finally:
            for inst in self.all_instances():
                self.kill_group(inst)
                if inst.proc is not None:
                    try:
                        inst.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                    if inst.reader is not None:
                        inst.reader.join(2)
                if not inst.done and inst.proc is not None:
                    rc = inst.proc.returncode
                    inst.finish(137 if rc is None else (128 - rc if rc < 0 else rc))
            self.finished.set()

    def _sleep(self, secs: float) -> bool:
        """Sleep unless stopping; True if it should stop."""
        end = time.monotonic() + secs
        while time.monotonic() < end:
            if self.removed.is_set() or self.terminating or self.k.stopping.is_set():
                return True
            time.sleep(min(0.05, end - time.monotonic()))
        return False

    def _run(self) -> None:
        # 1. volumes
        while True:
            if self.removed.is_set() or self.terminating or self.k.stopping.is_set():
                return self._finish_termination()
            try:
                self._setup_volumes()
                for c in self.containers + self.init_containers:
                    if self.waiting.get(c["name"], ("",))[0] == "ContainerCreating":
                        self.waiting.pop(c["name"], None)
                break
            except MountError as err:
                for c in self.containers:
                    self.waiting[c["name"]] = ("ContainerCreating", None)
                self._event("Warning", "FailedMount", str(err))
                self.mounts = {}
                if not self.write_status():
                    return
                self._sleep(self.k.cluster.retry_seconds)
        if not self.write_status():
            return
        # 2. init containers, one after the other
        for c in self.init_containers:
            while True:
                if self.removed.is_set() or self.terminating or self.k.stopping.is_set():
                    return self._finish_termination()
                if c["name"] == "init-pytorch" and "nslookup" in " ".join(c.get("command") or []):
                    inst: Instance | None = self._emulated_init_pytorch(c)
                else:
                    inst = self._start(c)
                if inst is None:
                    self._sleep(self.k.cluster.retry_seconds)
                    continue
                with self.lock:
                    self.current[c["name"]] = inst
                self.write_status()
                while not inst.done:
                    self._poll(inst)
                    if self.removed.is_set() or self.terminating or self.k.stopping.is_set():
                        return self._finish_termination()
                    time.sleep(0.05)
                if inst.exit_code == 0:
                    break
                if self._will_restart(inst):
                    self._backoff(c["name"], inst)
                    continue
                self.write_status()  # the pod failed in its init phase
                return self._idle_until_removed()
        with self.lock:
            self.init_done = True
        # 3. the containers
        pending = list(self.containers)
        while pending:
            if self.removed.is_set() or self.terminating or self.k.stopping.is_set():
                return self._finish_termination()
            still = []
            for c in pending:
                inst = self._start(c)
                if inst is None:
                    still.append(c)
                else:
                    with self.lock:
                        self.current[c["name"]] = inst
            pending = still
            self.write_status()
            if pending:
                self._sleep(self.k.cluster.retry_seconds)
        # 4. watch them
        backoff_until: dict[str, float] = {}
        while True:
            if self.removed.is_set() or self.k.stopping.is_set():
                return self._finish_termination()
            if self.terminating:
                return self._finish_termination()
            changed = False
            for c in self.containers:
                n = c["name"]
                inst = self.current[n]
                if self._poll(inst):
                    changed = True
                    if self._will_restart(inst):
                        delay = self.k.cluster.restart_backoff * (2 ** min(self.restarts.get(n, 0), 3))
                        backoff_until[n] = time.monotonic() + delay
                        self.waiting[n] = (
                            "CrashLoopBackOff",
                            f"back-off {int(10 * 2 ** min(self.restarts.get(n, 0), 5))}s "
                            f"restarting failed container={n} pod={self.name}_{self.ns}({self.uid})",
                        )
                        with self.lock:
                            self.previous[n] = inst
                            self.restarts[n] = self.restarts.get(n, 0) + 1
                        self._event(
                            "Warning",
                            "BackOff",
                            f"Back-off restarting failed container {n} in pod {self.name}_{self.ns}({self.uid})",
                            n,
                        )
                if n in backoff_until and time.monotonic() >= backoff_until[n]:
                    del backoff_until[n]
                    self.waiting.pop(n, None)
                    new = self._start(c)
                    if new is None:
                        backoff_until[n] = time.monotonic() + self.k.cluster.retry_seconds
                    else:
                        with self.lock:
                            self.current[n] = new
                    changed = True
            if changed:
                if not self.write_status():
                    return self._finish_termination(remove=False)
            if self.phase() in ("Succeeded", "Failed") and not backoff_until:
                return self._idle_until_removed()
            time.sleep(0.05)

    def _backoff(self, name: str, inst: Instance) -> None:
        with self.lock:
            self.previous[name] = inst
            self.restarts[name] = self.restarts.get(name, 0) + 1
            self.waiting[name] = (
                "CrashLoopBackOff",
                f"back-off 10s restarting failed container={name} pod={self.name}_{self.ns}({self.uid})",
            )
        self.write_status()
        self._sleep(self.k.cluster.restart_backoff)
        with self.lock:
            self.waiting.pop(name, None)

    def _idle_until_removed(self) -> None:
        while not (self.removed.is_set() or self.terminating or self.k.stopping.is_set()):
            time.sleep(0.05)
        self._finish_termination()

    def _finish_termination(self, remove: bool = True) -> None:
        """Stop every process (SIGTERM already sent by terminate(); SIGKILL at the deadline)."""
        if not self.terminating and not self.removed.is_set() and not self.k.stopping.is_set():
            return
        if self.k.stopping.is_set() or self.removed.is_set():
            grace = 0.0 if self.removed.is_set() else self.k.cluster.shutdown_grace
            self.terminate(grace)
        insts = [i for i in self.current.values() if not i.done]
        while any(not i.done for i in insts):
            for i in insts:
                self._poll(i)
            if self.stop_at is not None and time.monotonic() >= self.stop_at:
                for i in insts:
                    self.kill_group(i)
                for i in insts:
                    if i.proc is not None:
                        try:
                            i.proc.wait(5)
                        except subprocess.TimeoutExpired:
                            pass
                    self._poll(i)
                    if not i.done:
                        i.finish(137)
                break
            time.sleep(0.02)
        for i in self.all_instances():
            self.kill_group(i)  # children left behind by a main process that exited
        if remove and not self.removed.is_set() and not self.k.stopping.is_set():
            self.k.confirm_deletion(self)


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""
    return re.sub(
        r"\$\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: m.group(0)[1:] if m.group(0).startswith("$$") else env.get(m.group(2), m.group(0)),
        s,
    )


class Kubelet:
    """Owns the pod runtimes of the one node."""

    def __init__(self, cluster: LoopbackCluster, root: Path, node: str):
        self.cluster = cluster
        self.root = root
        self.node = node
        self.runtimes: dict[str, PodRuntime] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.status_extra: dict[str, dict[str, Any]] = {}
        self.ctx = Ctx(manager="kubelet", internal=True)

    def write_status(self, rt: PodRuntime, status: dict[str, Any]) -> bool:
        reg = self.cluster.registry
        pods = self.cluster.catalog.by_key(("", "pods"))
        with self.cluster.store.lock:
            cur = self.cluster.store.get(pods.key, rt.ns, rt.name)
            if cur is None or cur["metadata"]["uid"] != rt.uid:
                return False
            if rt.frozen:
                return True
            cur["status"] = status
            try:
                reg.update(pods, rt.ns, rt.name, cur, Ctx(manager="kubelet", internal=True), subresource="status")
            except ApiError:
                return False
        self.cluster.wake()
        return True

    def confirm_deletion(self, rt: PodRuntime) -> None:
        pods = self.cluster.catalog.by_key(("", "pods"))
        with self.cluster.store.lock:
            cur = self.cluster.store.get(pods.key, rt.ns, rt.name)
            if cur is not None and cur["metadata"]["uid"] == rt.uid and cur["metadata"].get("deletionTimestamp"):
                if not cur["metadata"].get("finalizers"):
                    self.cluster.registry.remove_now(pods, rt.ns, rt.name)
        self.cluster.wake()

    def sync(self) -> None:
        """Start runtimes for new pods, terminate deleted ones (called by the controller loop)."""
        store = self.cluster.store
        pods = store.list(("", "pods"))
        seen = set()
        for pod in pods:
            meta, spec = pod["metadata"], pod.get("spec") or {}
            if spec.get("nodeName") != self.node:
                if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                    self.cluster.registry.remove_now(
                        self.cluster.catalog.by_key(("", "pods")), meta["namespace"], meta["name"]
                    )
                continue
            uid = meta["uid"]
            seen.add(uid)
            with self.lock:
                rt = self.runtimes.get(uid)
                frozen = uid in self.cluster.frozen_pods
                if rt is None and meta.get("deletionTimestamp"):
                    if not meta.get("finalizers"):
                        self.cluster.registry.remove_now(
                            self.cluster.catalog.by_key(("", "pods")), meta["namespace"], meta["name"]
                        )
                    continue
                if (
                    rt is None
                    and not frozen
                    and self.cluster.run_pods
                    and (pod.get("status") or {}).get("phase") not in ("Succeeded", "Failed")
                ):
                    rt = PodRuntime(self, pod)
                    self.runtimes[uid] = rt
                    rt.start()
                if rt is not None and meta.get("deletionTimestamp") and not rt.terminating:
                    grace = min(float(meta.get("deletionGracePeriodSeconds") or 0), self.cluster.max_grace_seconds)
                    rt.terminate(grace)
        with self.lock:
            for uid, rt in list(self.runtimes.items()):
                if uid not in seen:
                    rt.removed.set()
                if rt.finished.is_set() and uid not in seen:
                    del self.runtimes[uid]

    def runtime(self, namespace: str, name: str) -> PodRuntime | None:
        with self.lock:
            cands = [r for r in self.runtimes.values() if r.ns == namespace and r.name == name]
        pod = self.cluster.store.get(("", "pods"), namespace, name)
        if pod is None:
            return None
        return next((r for r in cands if r.uid == pod["metadata"]["uid"]), None)

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with self.lock:
            rts = list(self.runtimes.values())
        deadline = time.monotonic() + timeout
        for rt in rts:
            rt.join(max(0.1, deadline - time.monotonic()))
        for rt in rts:  # belt and braces
            for inst in rt.all_instances():
                rt.kill_group(inst)
                if inst.reader is not None:
                    inst.reader.join(1)

    # --- logs ------------------------------------------------------------------------------------

    def logs(self, namespace: str, name: str, opts: dict[str, Any], closing: threading.Event) -> Iterator[bytes]:
        store = self.cluster.store
        pod = store.get(("", "pods"), namespace, name)
        if pod is None:
            raise E.not_found("", "pods", name)
        spec = pod.get("spec") or {}
        names = [c["name"] for c in spec.get("containers") or []]
        inits = [c["name"] for c in spec.get("initContainers") or []]
        container = opts.get("container")
        if not container:
            if len(names) != 1:
                extra = f" or one of the init containers: [{' '.join(inits)}]" if inits else ""
                raise E.bad_request(
                    f"a container name must be specified for pod {name}, choose one of: [{' '.join(names)}]{extra}"
                )
            container = names[0]
        elif container not in names + inits:
            raise E.bad_request(f"container {container} is not valid for pod {name}")
        if not spec.get("nodeName"):
            yield b""
            return
        st = pod.get("status") or {}
        cst = next(
            (
                s
                for s in (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or [])
                if s.get("name") == container
            ),
            None,
        )
        if cst is None:
            raise E.bad_request(
                f'container "{container}" in pod "{name}" is waiting to start: ContainerCreating'
                if not st.get("containerStatuses")
                else f'container "{container}" in pod "{name}" is not available'
            )
        state, last = cst.get("state") or {}, cst.get("lastState") or {}
        last_id = (last.get("terminated") or {}).get("containerID")
        # kubelet's validateContainerLogStatus, case by case
        use_prev = False
        if opts.get("previous"):
            if not last_id:
                raise E.bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            use_prev = True
        elif state.get("running"):
            pass
        elif state.get("terminated"):
            if not state["terminated"].get("containerID"):
                if not last_id:
                    raise E.bad_request(f'container "{container}" in pod "{name}" is terminated')
                use_prev = True
        elif last.get("terminated"):
            if not last_id:
                raise E.bad_request(f'container "{container}" in pod "{name}" is terminated')
            use_prev = True
        elif state.get("waiting"):
            reason = state["waiting"].get("reason")
            if reason == "ErrImagePull":
                reason = "image can't be pulled"
            elif reason == "ImagePullBackOff":
                reason = "trying and failing to pull image"
            raise E.bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        else:
            raise E.bad_request(f'container "{container}" in pod "{name}" is waiting to start - no logs yet')
        previous = use_prev
        rt = self.runtime(namespace, name)
        inst = None
        if rt is not None:
            inst = (rt.previous if previous else rt.current).get(container)
        yield b""
        if inst is None:
            return
        since_ns = None
        if opts.get("sinceSeconds"):
            since_ns = time.time_ns() - int(opts["sinceSeconds"]) * 1_000_000_000
        elif opts.get("sinceTime"):
            from .server import parse_time

            since_ns = int(parse_time(opts["sinceTime"]) * 1e9)
        budget = opts.get("limitBytes")

        def fmt(t: int, line: bytes) -> bytes:
            return (rfc3339nano(t).encode() + b" " + line) if opts.get("timestamps") else line

        with inst.cond:
            lines = [x for x in inst.lines if since_ns is None or x[0] >= since_ns]
            pos = len(inst.lines)
        if opts.get("tailLines") is not None:
            n = int(opts["tailLines"])
            lines = lines[-n:] if n > 0 else []
        out = b"".join(fmt(t, line) for t, line in lines)
        if budget is not None:
            out = out[:budget]
            budget -= len(out)
        yield out
        if not opts.get("follow") or previous:
            return
        while not closing.is_set() and (budget is None or budget > 0):
            with inst.cond:
                if pos >= len(inst.lines) and not inst.done:
                    inst.cond.wait(0.25)
                new = inst.lines[pos:]
                pos = len(inst.lines)
                finished = inst.done and pos >= len(inst.lines)
            if new:
                chunk = b"".join(fmt(t, line) for t, line in new)
                if budget is not None:
                    chunk = chunk[:budget]
                    budget -= len(chunk)
                yield chunk
            else:
                yield b""  # lets the server notice a client that went away
            if finished:
                return
            if rt is not None and rt.removed.is_set():
                return
