"""The kubelet stand-in: runs each pod bound to `loopback-node` as real local processes (or, with
`LoopbackCluster(image=...)`, from the built image through testkit.container).

How a container becomes a process:
* command + args, with `$(VAR)` expanded from the container's env as the kubelet does; a program
  `python`/`python3`/`pythonX.Y` runs `sys.executable`; another bare name is looked up next to
  `sys.executable` first (the venv's `torchrun`, `ctrlnet`), then PATH;
* env: PATH, VIRTUAL_ENV, PYTHONPATH, LANG/LC_ALL/TZ of the test process, HOME and TMPDIR in the
  pod's own folder, HOSTNAME = pod name, the cluster's extra env, then the container's env:
  `value`, and `valueFrom.fieldRef` (metadata.name/namespace/uid, metadata.labels['x'],
  metadata.annotations['x'], spec.nodeName, spec.serviceAccountName, status.podIP/hostIP);
  other `valueFrom` and `envFrom` are not resolved: the container fails to start, StartError;
* volumes are per-pod local folders (configMap/secret: their keys as files, the pod waits in
  ContainerCreating with FailedMount Events while one is missing; emptyDir: a folder, a subPath a
  folder in it; projected: serviceAccountToken sources as a token the cluster issued for that
  audience, configMap/secret sources as their items; persistentVolumeClaim: one folder per claim
  for the cluster's lifetime). Every
  command/arg/env value and workingDir that starts with a volumeMount's mountPath (also
  `--flag=<mountPath>...`) is rewritten to the local folder: that is how
  `/etc/ctrlnet/config.yaml` is found;
* host names of the pod's namespace (pods, services and pods' `<hostname>[.<subdomain>]`, with
  `.ns[.svc[.cluster.local]]`, the PyTorchJob replica names `<job>-master-0`/`<job>-worker-N`
  and a JobSet's `<jobset>-<replicatedJob>-<i>-<index>[.<subdomain>]`) in env values and args
  become 127.0.0.1: every pod shares the loopback interface. So that jobs do not collide on it,
  MASTER_PORT/PET_MASTER_PORT of a PyTorchJob's or a JobSet's pods become a free port chosen once
  per (namespace, job, port);
* stdout+stderr become the container log (line by line, timestamped); the exit code becomes
  `state.terminated` (0 Completed, else Error; 128+signal when killed). Containers are not
  restarted in place (restartPolicy Always/OnFailure: the pod just ends; ctrlnet's jobs use the
  operator's ExitCode policy, which re-creates pods);
* deleting a pod sends SIGTERM to each container's main process, waits the grace period (capped
  by the cluster's `max_grace_seconds`), then SIGKILLs the process group;
* the Training Operator's `init-pytorch` init container (an nslookup loop) is emulated: it
  succeeds once the master's Service exists.
Not emulated without an image: resource limits, security contexts, probes, isolation (same
filesystem, network and PID namespace as the tests).
"""

from __future__ import annotations

import base64
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
import traceback
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
L_JOB = "training.kubeflow.org/job-name"
L_JOBSET = "jobset.sigs.k8s.io/jobset-name"


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
        self.started_at = ts()
        self.finished_at: str | None = None
        self.exit_code: int | None = None
        self.reason: str | None = None
        self.message: str | None = None
        self.done = False  # the process ended and its output is drained
        self.reader: threading.Thread | None = None
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
            self.exit_code, self.message = exit_code, message
            self.reason = reason or ("Completed" if exit_code == 0 else "Error")
            self.finished_at, self.done = ts(), True
            self.cond.notify_all()

    def terminated(self) -> dict[str, Any]:
        out = {"exitCode": self.exit_code, "reason": self.reason, "startedAt": self.started_at}
        out.update(finishedAt=self.finished_at, containerID=self.container_id)
        return {**out, "message": self.message} if self.message else out


class PodRuntime(threading.Thread):
    def __init__(self, kubelet: Kubelet, pod: dict[str, Any]):
        super().__init__(name=f"{kubelet.cluster.tag}-kubelet-{pod['metadata']['name']}", daemon=True)
        self.k = kubelet
        self.ns, self.name, self.uid = pod["metadata"]["namespace"], pod["metadata"]["name"], pod["metadata"]["uid"]
        self.pod = pod
        self.current: dict[str, Instance] = {}
        self.waiting: dict[str, tuple[str, str | None]] = {}  # container -> (reason, message) before it runs
        self.lock = threading.RLock()
        self.stop_at: float | None = None  # monotonic deadline for SIGKILL once termination starts
        self.terminating = False
        self.removed = threading.Event()  # the pod object is gone: kill now
        self.frozen = False  # a test took the pod over (LoopbackCluster.set_waiting & co.)
        self.conditions: dict[str, dict[str, Any]] = {}
        self.start_time = ts()
        self.dir = kubelet.cluster.root / "pods" / self.ns / f"{self.name}-{self.uid[:8]}"
        self.mounts: dict[str, Path] = {}
        self.init_done = not pod["spec"].get("initContainers")
        self.finished = threading.Event()

    @property
    def containers(self) -> list[dict[str, Any]]:
        return self.pod["spec"].get("containers") or []

    @property
    def init_containers(self) -> list[dict[str, Any]]:
        return self.pod["spec"].get("initContainers") or []

    def _stopping(self) -> bool:
        return self.removed.is_set() or self.terminating or self.k.stopping.is_set()

    def _event(self, type_: str, reason: str, message: str, container: str | None = None) -> None:
        fp = f"spec.containers{{{container}}}" if container else None
        self.k.cluster.registry.record_event(self.pod, type_, reason, message, "kubelet", self.k.node, field_path=fp)

    # --- status ----------------------------------------------------------------------------------

    def _cond(self, type_: str, ok: bool, reason: str | None = None, message: str | None = None) -> dict[str, Any]:
        s = "True" if ok else "False"
        prev = self.conditions.get(type_)
        if prev is None or prev["status"] != s:
            prev = {"type": type_, "status": s, "lastProbeTime": None, "lastTransitionTime": ts()}
        new = {k: v for k, v in prev.items() if k not in ("reason", "message")}
        new.update({k: v for k, v in (("reason", reason), ("message", message)) if v})
        self.conditions[type_] = new
        return new

    def _container_status(self, c: dict[str, Any], init: bool) -> dict[str, Any]:
        inst = self.current.get(c["name"])
        st: dict[str, Any] = {"name": c["name"], "image": c.get("image", ""), "imageID": "", "restartCount": 0}
        st.update(ready=False, started=False, lastState={})
        if inst is None:
            default = "PodInitializing" if not self.init_done and not init else "ContainerCreating"
            reason, msg = self.waiting.get(c["name"], (default, None))
            st["state"] = {"waiting": {"reason": reason, **({"message": msg} if msg else {})}}
            return st
        st["containerID"] = inst.container_id
        if inst.done:
            st["state"] = {"terminated": inst.terminated()}
        else:
            st.update(state={"running": {"startedAt": inst.started_at}}, ready=not init, started=True)
        return st

    def phase(self) -> str:
        if not self.init_done:
            inits = [self.current.get(c["name"]) for c in self.init_containers]
            return "Failed" if any(i and i.done and i.exit_code != 0 for i in inits) else "Pending"
        insts = [self.current.get(c["name"]) for c in self.containers]
        if all(i is None for i in insts):
            return "Pending"
        if any(i is None or not i.done for i in insts):
            return "Running"
        return "Succeeded" if all(i.exit_code == 0 for i in insts) else "Failed"

    def write_status(self) -> bool:
        """Write the pod's status; False when the pod is gone (or replaced)."""
        with self.lock:
            if self.frozen:
                return True
            phase = self.phase()
            init_st = [self._container_status(c, True) for c in self.init_containers]
            cont_st = [self._container_status(c, False) for c in self.containers]
            unready = [s["name"] for s in cont_st if not s["ready"]]
            incomplete = [s["name"] for s in init_st if (s["state"].get("terminated") or {}).get("exitCode") != 0]
            why = f"containers with incomplete status: [{' '.join(incomplete)}]"
            conds = [
                self._cond("Initialized", not incomplete, *(("ContainersNotInitialized", why) if incomplete else ()))
            ]
            if phase in ("Succeeded", "Failed"):
                conds += [self._cond(t, False, "PodCompleted") for t in ("Ready", "ContainersReady")]
            else:
                why = ("ContainersNotReady", f"containers with unready status: [{' '.join(unready)}]")
                conds += [self._cond(t, not unready, *(why if unready else ())) for t in ("Ready", "ContainersReady")]
            conds.append(self._cond("PodScheduled", True))
            status = {
                "phase": phase,
                "conditions": conds,
                "hostIP": "127.0.0.1",
                "podIP": "127.0.0.1",
                "startTime": self.start_time,
                "containerStatuses": cont_st,
            }
            if init_st:
                status["initContainerStatuses"] = init_st
            return self.k.write_status(self, status)

    # --- setup -----------------------------------------------------------------------------------

    def _setup_volumes(self) -> None:
        mounts: dict[str, Path] = {}
        for v in self.pod["spec"].get("volumes") or []:
            target = self.dir / "volumes" / v["name"]
            if "configMap" in v or "secret" in v:
                kind, ref = (
                    ("secret", v["secret"].get("secretName"))
                    if "secret" in v
                    else ("configmap", v["configMap"]["name"])
                )
                obj = self.k.cluster.store.get(("", kind + "s"), self.ns, ref or "")
                if obj is None:
                    raise MountError(f'MountVolume.SetUp failed for volume "{v["name"]}" : {kind} "{ref}" not found')
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for key, value in (obj.get("data") or {}).items():
                    (target / key).write_bytes(base64.b64decode(value) if kind == "secret" else str(value).encode())
            elif "projected" in v:
                shutil.rmtree(target, ignore_errors=True)
                target.mkdir(parents=True)
                for src in v["projected"].get("sources") or []:
                    self._project(src, target)
            elif "persistentVolumeClaim" in v:
                target = self.k.cluster.root / "pvcs" / self.ns / v["persistentVolumeClaim"]["claimName"]
                target.mkdir(parents=True, exist_ok=True)
            else:  # emptyDir and anything else: a fresh folder
                target.mkdir(parents=True, exist_ok=True)
            mounts[v["name"]] = target
        self.mounts = mounts

    def _project(self, src: dict[str, Any], target: Path) -> None:
        """One source of a projected volume: a serviceAccountToken (a token the cluster issues for
        its audience), a configMap or secret (its items, or every key)."""
        if "serviceAccountToken" in src:
            sat = src["serviceAccountToken"]
            token = self.k.cluster.service_account_token(self.ns, sat.get("audience") or "")
            (target / sat["path"]).write_text(token)
            return
        for kind in ("configMap", "secret"):
            if kind not in src:
                continue
            ref = src[kind]
            obj = self.k.cluster.store.get(("", kind.lower() + "s"), self.ns, ref.get("name") or "")
            if obj is None:
                if ref.get("optional"):
                    return
                raise MountError(
                    f'MountVolume.SetUp failed for volume "projected" : {kind.lower()} "{ref.get("name")}" not found'
                )
            data = obj.get("data") or {}
            items = ref.get("items") or [{"key": k, "path": k} for k in data]
            for it in items:
                value = data.get(it["key"], "")
                path = target / it["path"]
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_bytes(base64.b64decode(value) if kind == "secret" else str(value).encode())

    def _mount_map(self, c: dict[str, Any]) -> list[tuple[str, str]]:
        """(mountPath, local folder) of the container's mounts, longest mountPath first."""
        out = []
        for m in c.get("volumeMounts") or []:
            base = self.mounts.get(m.get("name", ""))
            if base is not None:
                local = base / m["subPath"] if m.get("subPath") else base
                if m.get("subPath") and not local.exists():
                    local.mkdir(parents=True, exist_ok=True)  # as the kubelet does for a subPath of an emptyDir
                out.append((m["mountPath"].rstrip("/") or "/", str(local)))
        return sorted(out, key=lambda t: -len(t[0]))

    @staticmethod
    def _rewrite_path(s: str, mm: list[tuple[str, str]]) -> str:
        flag, eq, value = s.partition("=") if s.startswith("-") else ("", "", s)
        for mp, local in mm:
            if value == mp or value.startswith(mp + "/"):
                return flag + eq + local + value[len(mp) :]
        return s

    def _host_pattern(self) -> re.Pattern[str]:
        store = self.k.cluster.store
        names = {o["metadata"]["name"] for plural in ("services", "pods") for o in store.list(("", plural), self.ns)}
        for p in store.list(("", "pods"), self.ns):  # <hostname>.<subdomain>
            host, sub = p["spec"].get("hostname"), p["spec"].get("subdomain")
            if host:
                names.add(host)
                if sub:
                    names.add(f"{host}.{sub}")
        alts = [re.escape(n) for n in sorted(names, key=len, reverse=True)]
        labels = self.pod["metadata"].get("labels") or {}
        job = labels.get(L_JOB)
        if job:
            alts.insert(0, re.escape(job) + r"-(?:master|worker)-\d+")
        jobset = labels.get(L_JOBSET)
        if jobset:  # a JobSet pod's peers, before they exist: <jobset>-<replicatedJob>-<i>-<index>[.<subdomain>]
            sub = re.escape(self.pod["spec"].get("subdomain") or jobset)
            alts.insert(0, re.escape(jobset) + rf"-[a-z0-9-]+?-\d+-\d+(?:\.{sub})?")
        ns = re.escape(self.ns)
        return re.compile(
            # not inside a path (/var/run/...), but after a URL's // (http://<job>-master-0:23456)
            rf"(?:(?<=//)|(?<![A-Za-z0-9./-]))(?:{'|'.join(alts) or '(?!)'})(?:\.{ns}(?:\.svc(?:\.cluster\.local)?)?)?(?![A-Za-z0-9-])"
        )

    def _field_ref(self, path: str) -> str:
        """A downward-API fieldRef, as the kubelet resolves it."""
        meta, m = self.pod["metadata"], re.match(r"^metadata\.(labels|annotations)\['([^']+)'\]$", path)
        if m:
            return str((meta.get(m.group(1)) or {}).get(m.group(2), ""))
        simple = {
            "metadata.name": meta["name"],
            "metadata.namespace": meta["namespace"],
            "metadata.uid": meta["uid"],
            "spec.nodeName": self.pod["spec"].get("nodeName") or self.k.node,
            "spec.serviceAccountName": self.pod["spec"].get("serviceAccountName") or "default",
            "status.podIP": "127.0.0.1",
            "status.hostIP": "127.0.0.1",
        }
        if path not in simple:
            raise ValueError(f'unsupported fieldRef "{path}"')
        return simple[path]

    def _env(self, c: dict[str, Any], hosts: re.Pattern[str], mm: list[tuple[str, str]]) -> dict[str, str]:
        if c.get("envFrom") or any(set(e.get("valueFrom") or {}) - {"fieldRef"} for e in c.get("env") or []):
            raise ValueError("the loopback kubelet resolves no envFrom and no valueFrom but fieldRef: give env values")
        labels = self.pod["metadata"].get("labels") or {}
        job = labels.get(L_JOB) or labels.get(L_JOBSET)
        env: dict[str, str] = {}
        for e in c.get("env") or []:
            if "valueFrom" in e:  # not $(VAR)-expanded, as on a real kubelet
                env[e["name"]] = self._field_ref(e["valueFrom"]["fieldRef"]["fieldPath"])
                continue
            val = hosts.sub("127.0.0.1", _expand(str(e.get("value", "")), env))
            if job and e["name"] in ("MASTER_PORT", "PET_MASTER_PORT") and val.isdigit():
                val = str(self.k.cluster.job_port(self.ns, job, int(val)))
            env[e["name"]] = self._rewrite_path(val, mm)
        return env

    def _command(
        self, c: dict[str, Any], env: dict[str, str], hosts: re.Pattern[str], mm: list[tuple[str, str]]
    ) -> list[str]:
        argv = [
            self._rewrite_path(hosts.sub("127.0.0.1", _expand(str(x), env)), mm)
            for x in (c.get("command") or []) + (c.get("args") or [])
        ]
        if not argv:
            raise FileNotFoundError("no command: the loopback kubelet has no image entrypoints; set command or args")
        if PY.match(os.path.basename(argv[0])):
            argv[0] = sys.executable
        elif "/" not in argv[0]:
            found = shutil.which(
                argv[0], path=os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
            )
            if found is None:
                raise FileNotFoundError(f'exec: "{argv[0]}": executable file not found in $PATH')
            argv[0] = found
        return argv

    def _container_command(self, c: dict[str, Any], inst: Instance) -> list[str]:
        """The host command that runs container `c` from the cluster's image (testkit.container),
        with the env this kubelet resolved (the job's loopback ports) but paths as the spec says
        them: inside the container they are real."""
        from testkit import container

        configmaps = {}
        for v in self.pod["spec"].get("volumes") or []:
            if "configMap" in v:
                obj = self.k.cluster.store.get(("", "configmaps"), self.ns, v["configMap"]["name"]) or {}
                configmaps[v["configMap"]["name"]] = {k: str(x) for k, x in (obj.get("data") or {}).items()}
        env = {**self.k.cluster.extra_env, **self._env(c, self._host_pattern(), [])}
        projected = {
            v["name"]: self.mounts[v["name"]]
            for v in self.pod["spec"].get("volumes") or []
            if "projected" in v and v["name"] in self.mounts
        }
        pod = container.Pod(self.name, self.pod["spec"], configmaps, folders=projected)
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
        env.update({k: os.environ[k] for k in ("VIRTUAL_ENV", "PYTHONPATH", "LANG", "LC_ALL", "TZ") if k in os.environ})
        return {**env, **self.k.cluster.extra_env}

    # --- processes -------------------------------------------------------------------------------

    def _start(self, c: dict[str, Any]) -> Instance:
        """Start one container (a failure to start is a finished instance: StartError, 128)."""
        name, inst = c["name"], Instance(c["name"])
        self._event("Normal", "Pulled", f'Container image "{c.get("image", "")}" already present on machine', name)
        self._event("Normal", "Created", f"Created container {name}", name)
        try:
            mm, hosts = self._mount_map(c), self._host_pattern()
            env = {**self._base_env(), **self._env(c, hosts, mm)}
            cwd = self._rewrite_path(c["workingDir"], mm) if c.get("workingDir") else str(self.dir / "home")
            if self.k.cluster.image is not None:
                argv, env = self._container_command(c, inst), None
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
            msg = f"failed to create containerd task: failed to create shim task: OCI runtime create failed: {err}"
            inst.finish(128, "StartError", msg)
            self._event("Warning", "Failed", f"Error: {msg}", name)
            return inst
        self._event("Normal", "Started", f"Started container {name}", name)
        proc = inst.proc

        def read() -> None:
            for line in iter(proc.stdout.readline, b""):
                inst.log(line)
            proc.stdout.close()

        inst.reader = threading.Thread(target=read, name=f"{self.k.cluster.tag}-log-{self.name}-{name}", daemon=True)
        inst.reader.start()
        return inst

    def _emulated_init_pytorch(self, c: dict[str, Any]) -> Instance:
        """Training Operator v1.9's init container: `nslookup <job>-master-0` until it resolves."""
        inst = Instance(c["name"])
        for reason, msg in (
            ("Pulled", f'Container image "{c.get("image", "")}" already present on machine'),
            ("Created", f"Created container {c['name']}"),
            ("Started", f"Started container {c['name']}"),
        ):
            self._event("Normal", reason, msg, c["name"])
        m = re.search(r"nslookup (\S+?);", " ".join(c.get("command") or []))
        host = m.group(1) if m else ""

        def run() -> None:
            for _ in range(100):
                if self._stopping():
                    return inst.finish(143)
                if self.k.cluster.store.exists(("", "services"), self.ns, host):
                    inst.log(f"Name:\t{host}.{self.ns}.svc.cluster.local\nAddress: 127.0.0.1\n".encode())
                    return inst.finish(0)
                inst.log(f"** server can't find {host}: NXDOMAIN\nwaiting for master\n".encode())
                time.sleep(0.2)
            inst.finish(1)

        inst.reader = threading.Thread(target=run, name=f"{self.k.cluster.tag}-init-{self.name}", daemon=True)
        inst.reader.start()
        return inst

    def _poll(self, inst: Instance) -> bool:
        """True when the instance just finished."""
        if inst.done or inst.proc is None:  # no process: emulated, it finishes on its own
            return False
        rc = inst.proc.poll()
        if rc is None:
            return False
        if inst.reader is not None:
            inst.reader.join(5)
        if inst.scratch is not None:
            shutil.rmtree(inst.scratch, ignore_errors=True)
        inst.finish(128 - rc if rc < 0 else rc)
        return True

    def signal(self, sig: int) -> None:
        with self.lock:
            for inst in self.current.values():
                inst.kill(sig)

    @staticmethod
    def kill_group(inst: Instance) -> None:
        if inst.proc is not None and inst.proc.poll() is None:
            try:
                os.killpg(inst.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    # --- lifecycle -------------------------------------------------------------------------------

    def terminate(self, grace: float) -> None:
        with self.lock:
            if self.terminating:
                self.stop_at = min(self.stop_at or grace, time.monotonic() + grace)
                return
            self.terminating, self.stop_at = True, time.monotonic() + grace
            for c in self.containers + self.init_containers:
                inst = self.current.get(c["name"])
                if inst is not None and not inst.done:
                    self._event("Normal", "Killing", f"Stopping container {c['name']}", c["name"])
                    inst.kill(signal.SIGTERM)

    def run(self) -> None:
        try:
            self._run()
        except Exception as exc:  # a bug in the stand-in: keep it visible
            self.k.cluster.server_errors.append(exc)
            if self.k.cluster.verbose:
                traceback.print_exc()
        finally:
            for inst in self.current.values():
                self.kill_group(inst)
                if inst.proc is not None:
                    try:
                        inst.proc.wait(5)
                    except subprocess.TimeoutExpired:
                        pass
                    if inst.reader is not None:
                        inst.reader.join(2)
                    if not inst.done:
                        rc = inst.proc.returncode
                        inst.finish(137 if rc is None else (128 - rc if rc < 0 else rc))
            self.finished.set()

    def _sleep(self, secs: float) -> None:
        end = time.monotonic() + secs
        while time.monotonic() < end and not self._stopping():
            time.sleep(min(0.05, end - time.monotonic()))

    def _run(self) -> None:
        while not self._stopping():  # 1. volumes
            try:
                self._setup_volumes()
                self.waiting.clear()
                break
            except MountError as err:
                self.waiting = {c["name"]: ("ContainerCreating", None) for c in self.containers}
                self._event("Warning", "FailedMount", str(err))
                if not self.write_status():
                    return
                self._sleep(0.2)
        if self._stopping() or not self.write_status():
            return self._finish_termination()
        for c in self.init_containers:  # 2. init containers, one after the other
            emulate = c["name"] == "init-pytorch" and "nslookup" in " ".join(c.get("command") or [])
            inst = self._emulated_init_pytorch(c) if emulate else self._start(c)
            with self.lock:
                self.current[c["name"]] = inst
            self.write_status()
            while not inst.done:
                self._poll(inst)
                if self._stopping():
                    return self._finish_termination()
                time.sleep(0.05)
            if inst.exit_code != 0:
                self.write_status()  # the pod failed in its init phase
                return self._idle_until_removed()
        with self.lock:
            self.init_done = True
        for c in self.containers:  # 3. the containers
            if self._stopping():
                return self._finish_termination()
            inst = self._start(c)
            with self.lock:
                self.current[c["name"]] = inst
        if not self.write_status():
            return self._finish_termination(remove=False)
        while not self._stopping():  # 4. until they end
            if any([self._poll(self.current[c["name"]]) for c in self.containers]):
                if not self.write_status():
                    return self._finish_termination(remove=False)
            if self.phase() in ("Succeeded", "Failed"):
                return self._idle_until_removed()
            time.sleep(0.05)
        self._finish_termination()

    def _idle_until_removed(self) -> None:
        while not self._stopping():
            time.sleep(0.05)
        self._finish_termination()

    def _finish_termination(self, remove: bool = True) -> None:
        """Stop every process (SIGTERM already sent by terminate(); SIGKILL at the deadline), then
        confirm the deletion of the pod."""
        if not self._stopping():
            return
        if self.k.stopping.is_set() or self.removed.is_set():
            self.terminate(0.0 if self.removed.is_set() else 1.0)
        insts = [i for i in self.current.values() if not i.done]
        while any(not i.done for i in insts):
            for i in insts:
                self._poll(i)
            if self.stop_at is not None and time.monotonic() >= self.stop_at:
                for i in insts:
                    self.kill_group(i)
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
        for i in self.current.values():
            self.kill_group(i)  # children left behind by a main process that exited
        if remove and not self.removed.is_set() and not self.k.stopping.is_set():
            self.k.confirm_deletion(self)


def _rfc3339nano(t_ns: int) -> str:
    secs, ns = divmod(t_ns, 1_000_000_000)
    return datetime.fromtimestamp(secs, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{ns:09d}Z"


def _expand(s: str, env: dict[str, str]) -> str:
    """Kubernetes $(VAR) expansion: defined variables are replaced, $$ escapes, others stay."""
    return re.sub(
        r"\$\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)|\$\(([A-Za-z_][A-Za-z0-9_.-]*)\)",
        lambda m: m.group(0)[1:] if m.group(0).startswith("$$") else env.get(m.group(2), m.group(0)),
        s,
    )


class Kubelet:
    """Owns the pod runtimes of the one node."""

    def __init__(self, cluster: LoopbackCluster, node: str):
        self.cluster = cluster
        self.node = node
        self.runtimes: dict[str, PodRuntime] = {}
        self.lock = threading.RLock()
        self.stopping = threading.Event()
        self.pods = cluster.catalog.by_key(("", "pods"))

    def write_status(self, rt: PodRuntime, status: dict[str, Any]) -> bool:
        with self.cluster.store.lock:
            cur = self.cluster.store.get(self.pods.key, rt.ns, rt.name)
            if cur is None or cur["metadata"]["uid"] != rt.uid:
                return False
            if rt.frozen:
                return True
            cur["status"] = status
            try:
                ctx = Ctx(manager="kubelet", internal=True)
                self.cluster.registry.update(self.pods, rt.ns, rt.name, cur, ctx, subresource="status")
            except ApiError:
                return False
        self.cluster.wake()
        return True

    def confirm_deletion(self, rt: PodRuntime) -> None:
        with self.cluster.store.lock:
            cur = self.cluster.store.get(self.pods.key, rt.ns, rt.name)
            if cur is not None and cur["metadata"]["uid"] == rt.uid and cur["metadata"].get("deletionTimestamp"):
                self.cluster.store.remove(self.pods.key, rt.ns, rt.name)
        self.cluster.wake()

    def sync(self) -> None:
        """Start runtimes for new pods, terminate deleted ones (called by the controller loop)."""
        seen = set()
        for pod in self.cluster.store.list(self.pods.key):
            meta = pod["metadata"]
            if pod["spec"].get("nodeName") != self.node:
                continue
            uid = meta["uid"]
            seen.add(uid)
            with self.lock:
                rt = self.runtimes.get(uid)
                if meta.get("deletionTimestamp") and (rt is None or rt.finished.is_set()):  # nothing runs: gone
                    self.cluster.store.remove(self.pods.key, meta["namespace"], meta["name"])
                    continue
                runnable = self.cluster.run_pods and pod["status"].get("phase") not in ("Succeeded", "Failed")
                if rt is None and runnable and uid not in self.cluster.frozen_pods:
                    rt = self.runtimes[uid] = PodRuntime(self, pod)
                    rt.start()
                if rt is not None and meta.get("deletionTimestamp") and not rt.terminating:
                    rt.terminate(
                        min(float(meta.get("deletionGracePeriodSeconds") or 0), self.cluster.max_grace_seconds)
                    )
        with self.lock:
            for uid, rt in list(self.runtimes.items()):
                if uid not in seen:
                    rt.removed.set()
                    if rt.finished.is_set():
                        del self.runtimes[uid]

    def runtime(self, namespace: str, name: str) -> PodRuntime | None:
        pod = self.cluster.store.get(self.pods.key, namespace, name)
        with self.lock:
            return self.runtimes.get(pod["metadata"]["uid"]) if pod else None

    def stop(self, timeout: float = 10.0) -> None:
        self.stopping.set()
        with self.lock:
            rts = list(self.runtimes.values())
        deadline = time.monotonic() + timeout
        for rt in rts:
            rt.join(max(0.1, deadline - time.monotonic()))
        for rt in rts:  # belt and braces
            for inst in rt.current.values():
                rt.kill_group(inst)
                if inst.reader is not None:
                    inst.reader.join(1)

    # --- logs ------------------------------------------------------------------------------------

    def logs(self, namespace: str, name: str, opts: dict[str, Any], closing: threading.Event) -> Iterator[bytes]:
        """pods/log: the kubelet's checks (validateContainerLogStatus: 400 with its words), then the
        log of the container's current instance, followed until it ends with `follow`."""
        pod = self.cluster.store.get(self.pods.key, namespace, name)
        if pod is None:
            raise E.not_found("", "pods", name)
        spec = pod["spec"]
        names, inits = (
            [c["name"] for c in spec.get("containers") or []],
            [c["name"] for c in spec.get("initContainers") or []],
        )
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
            yield b""  # not scheduled yet: an empty log
            return
        st = pod.get("status") or {}
        statuses = (st.get("containerStatuses") or []) + (st.get("initContainerStatuses") or [])
        cst = next((s for s in statuses if s.get("name") == container), None)
        state = (cst or {}).get("state") or {}
        if opts.get("previous"):  # no container restarts in place here, unless a test wrote one
            if not ((cst or {}).get("lastState") or {}).get("terminated", {}).get("containerID"):
                raise E.bad_request(f'previous terminated container "{container}" in pod "{name}" not found')
            yield b""
            return
        if cst is None or "waiting" in state:
            reason = ((state.get("waiting") or {}).get("reason")) or "ContainerCreating"
            reason = {
                "ErrImagePull": "image can't be pulled",
                "ImagePullBackOff": "trying and failing to pull image",
            }.get(reason, reason)
            raise E.bad_request(f'container "{container}" in pod "{name}" is waiting to start: {reason}')
        rt = self.runtime(namespace, name)
        inst = rt.current.get(container) if rt is not None else None
        yield b""
        if inst is None:  # a state a test wrote: no process, no log
            return
        since = time.time_ns() - opts["sinceSeconds"] * 1_000_000_000 if opts.get("sinceSeconds") else None

        def fmt(lines: list[tuple[int, bytes]]) -> bytes:
            if not opts.get("timestamps"):
                return b"".join(line for _, line in lines)
            return b"".join(_rfc3339nano(t).encode() + b" " + line for t, line in lines)

        with inst.cond:
            lines = [x for x in inst.lines if since is None or x[0] >= since]
            pos = len(inst.lines)
        if opts.get("tailLines") is not None:
            lines = lines[-opts["tailLines"] :] if opts["tailLines"] > 0 else []
        yield fmt(lines)
        while opts.get("follow") and not closing.is_set():
            with inst.cond:
                if pos >= len(inst.lines) and not inst.done:
                    inst.cond.wait(0.25)
                new, pos = inst.lines[pos:], len(inst.lines)
                finished = inst.done and pos >= len(inst.lines)
            yield fmt(new)  # b"" lets the server notice a client that went away
            if finished or rt.removed.is_set():
                return
