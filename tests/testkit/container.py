"""Run a container of the built trainer image exactly as a rendered pod spec says, on a machine
where `podman run` cannot start containers (crun: setrlimit RLIMIT_NPROC: Operation not permitted).

What a kubelet and its runtime do for one container, done with the host's tools (root needed):
the image's filesystem (`podman image mount`) under an overlay, remounted read-only
(readOnlyRootFilesystem); the pod's volumes at their mountPaths: a ConfigMap's files read-only,
emptyDirs as tmpfs (with their sizeLimit; medium Memory at /dev/shm), subPaths of one emptyDir as
folders of one tmpfs; /proc, /dev; /etc/hosts and /etc/hostname as the kubelet writes them; new
mount, UTS and PID namespaces (the command is PID 1, as in a pod: SIGTERM reaches only a process
that handles it); a network namespace with loopback only, shared by the pods of one test (as a
pod network would be: the master's name resolves to it); then the command and args of the
container (not the image's ENTRYPOINT: the chart sets both), with the env of the spec, the
operator's injected env and secretKeyRefs resolved, as runAsUser:runAsGroup with fsGroup as a
supplementary group, no capabilities (a non-root uid after exec keeps none) and no_new_privs
(allowPrivilegeEscalation: false), in workingDir or the image's.

This is the only runner: `RUNNER` names it in the test report. A `podman run` runner is not
written because it could not be tested here (every `podman run` fails at setrlimit).
"""

from __future__ import annotations

import copy
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import uuid
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

RUNNER = "unshare"
IMAGE_PATH = "/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"  # the image's ENV PATH


def image_exists(image: str) -> bool:
    if shutil.which("podman") is None:
        return False
    return subprocess.run(["podman", "image", "exists", image], capture_output=True).returncode == 0


@dataclass(frozen=True)
class Image:
    tag: str
    rootfs: Path  # the image's filesystem, mounted by podman (the overlay's read-only lower layer)
    workdir: str  # its WORKDIR: a container's cwd when the spec sets no workingDir
    size_bytes: int


def mount_image(tag: str) -> Image:
    out = subprocess.run(["podman", "image", "mount", tag], capture_output=True, text=True, check=True)
    config = json.loads(
        subprocess.run(["podman", "image", "inspect", tag], capture_output=True, text=True, check=True).stdout
    )[0]
    return Image(tag, Path(out.stdout.strip()), config["Config"].get("WorkingDir") or "/", int(config["Size"]))


def _size(quantity: str | None) -> str:
    """A Kubernetes quantity as a tmpfs size option (16Gi -> 16g)."""
    if not quantity:
        return "50%"
    m = re.fullmatch(r"(\d+)(Ki|Mi|Gi|Ti)?", str(quantity))
    if not m:
        return "50%"
    return m.group(1) + {"Ki": "k", "Mi": "m", "Gi": "g", "Ti": "t", None: ""}[m.group(2)]


@contextmanager
def loopback_network():
    """A network namespace with loopback only, for the pods of one test; yields its name."""
    name = f"ctrlnet-{uuid.uuid4().hex[:8]}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    try:
        subprocess.run(["ip", "netns", "exec", name, "ip", "link", "set", "lo", "up"], check=True)
        yield name
    finally:
        subprocess.run(["ip", "netns", "delete", name], check=False)


@dataclass
class Pod:
    """One pod of a rendered job: its spec, the ConfigMaps and Secrets its volumes and env name."""

    name: str
    spec: dict
    configmaps: dict[str, dict[str, str]] = field(default_factory=dict)
    secrets: dict[str, dict[str, str]] = field(default_factory=dict)
    hosts: tuple[str, ...] = ()  # other pods' names, on this network's loopback
    folders: dict[str, Path] = field(default_factory=dict)  # volumes made elsewhere (projected): name -> host folder

    @property
    def container(self) -> dict:
        """The trainer container: `pytorch` (PyTorchJob) or `node` (a TrainJob's runtime)."""
        (c,) = [c for c in self.spec["containers"] if c["name"] in ("pytorch", "node")]
        return c

    def env(self) -> dict[str, str]:
        env = {
            "PATH": IMAGE_PATH,
            "HOSTNAME": self.name,
        }
        for e in self.container.get("env") or []:
            if "value" in e:
                env[e["name"]] = re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), str(e["value"]))
            elif "secretKeyRef" in e.get("valueFrom", {}):
                ref = e["valueFrom"]["secretKeyRef"]
                value = self.secrets.get(ref["name"], {}).get(ref["key"])
                if value is None and not ref.get("optional"):
                    raise KeyError(f"secret {ref['name']}/{ref['key']} not found (CreateContainerConfigError)")
                if value is not None:
                    env[e["name"]] = value
            elif "fieldRef" in e.get("valueFrom", {}):
                path = e["valueFrom"]["fieldRef"]["fieldPath"]
                env[e["name"]] = {"metadata.name": self.name, "metadata.namespace": "default"}.get(path, "")
        return env


def pid1(unshare_pid: int) -> int | None:
    """The container's PID 1 (the child of unshare), as the host sees it: where a kubelet's
    signals go (unshare itself would die of a SIGTERM and orphan the container)."""
    children = Path(f"/proc/{unshare_pid}/task/{unshare_pid}/children")
    try:
        pids = children.read_text().split()
    except OSError:
        return None
    return int(pids[0]) if pids else None


class Running:
    """A started container: its log as it comes, signals to its PID 1, its exit."""

    def __init__(self, pod: Pod, process: subprocess.Popen, workdir: Path):
        self.pod, self.process, self.workdir = pod, process, workdir
        self.lines: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))

    @property
    def log(self) -> str:
        return "\n".join(self.lines)

    def pid1(self) -> int | None:
        return pid1(self.process.pid)

    def signal(self, sig: int = signal.SIGTERM) -> None:
        """What the kubelet does to stop a pod: the signal to the container's PID 1."""
        pid = self.pid1()
        if pid is not None:
            os.kill(pid, sig)

    def wait_for_line(self, needle: str, timeout: float) -> bool:
        return wait_for(
            lambda: any(needle in ln for ln in self.lines) or self.process.poll() is not None, timeout
        ) and any(needle in ln for ln in self.lines)

    def wait(self, timeout: float) -> int:
        """The exit code as the kubelet reports it (128+n when killed by signal n)."""
        try:
            code = self.process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
            raise
        finally:
            self._reader.join(timeout=10)
            shutil.rmtree(self.workdir, ignore_errors=True)
        return 128 - code if code < 0 else code


def start(pod: Pod, image: Image, netns: str | None, *, env: dict[str, str] | None = None) -> Running:
    """Start `pod`'s trainer container from `image`, in network `netns` (None: the host's)."""
    argv, work = command(pod, image, netns, env=env)
    process = subprocess.Popen(
        argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )
    return Running(pod, process, work)


def in_image(rootfs: Path, path: str) -> str:
    """`path` with the image's symlinks resolved inside the image (Debian's /var/run -> /run):
    a mount on the unresolved path would follow an absolute link out to the host's folder."""
    parts, out, hops = [p for p in path.split("/") if p], [], 0
    while parts:
        part = parts.pop(0)
        here = Path(rootfs, *out, part)
        if here.is_symlink() and hops < 40:
            hops += 1
            link = os.readlink(here)
            parts = [p for p in link.split("/") if p] + parts
            if link.startswith("/"):
                out = []
            continue
        if part == "..":
            out = out[:-1]
        elif part != ".":
            out.append(part)
    return "/" + "/".join(out)


def command(pod: Pod, image: Image, netns: str | None, *, env: dict[str, str] | None = None) -> tuple[list[str], Path]:
    """The host command that runs `pod`'s container, and its scratch folder (remove it after).
    `env`: the container's environment as resolved elsewhere (the loopback kubelet); default:
    the spec's own env with its Secrets and fields resolved."""
    rootfs = image.rootfs
    spec, c = pod.spec, pod.container
    work = Path(tempfile.mkdtemp(prefix=f"ctrlnet-pod-{pod.name}-", dir="/var/tmp"))
    for d in ("upper", "work", "root", "etc"):
        (work / d).mkdir()
    (work / "etc/hosts").write_text(
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n"
        + "".join(f"127.0.0.1\t{h}\n" for h in (pod.name, *pod.hosts))
    )
    (work / "etc/hostname").write_text(pod.name + "\n")
    root = work / "root"
    sh = [
        "set -e",
        "mount --make-rprivate /",
        f"mount -t overlay overlay -o lowerdir={rootfs},upperdir={work}/upper,workdir={work}/work {root}",
        f"mount -t proc proc {root}/proc",
        f"mount --rbind /dev {root}/dev",
    ]
    volumes = {v["name"]: v for v in spec.get("volumes") or []}
    tmpfs_of: dict[str, Path] = {}
    for m in c.get("volumeMounts") or []:
        v, target = volumes[m["name"]], f"{root}{in_image(rootfs, m['mountPath'])}"
        sh.append(f"mkdir -p {shlex.quote(target)}")
        if "configMap" in v:
            files = work / "volumes" / m["name"]
            files.mkdir(parents=True, exist_ok=True)
            for key, text in pod.configmaps[v["configMap"]["name"]].items():
                (files / key).write_text(text)
            sh.append(f"mount --bind -o ro {files} {shlex.quote(target)}")
            sh.append(f"mount -o remount,bind,ro {shlex.quote(target)}")
        elif "emptyDir" in v:
            # One tmpfs per emptyDir (its sizeLimit), world-writable as the kubelet makes it;
            # a subPath is a folder of it.
            if m["name"] not in tmpfs_of:
                backing = work / "volumes" / m["name"]
                backing.mkdir(parents=True, exist_ok=True)
                sh.append(f"mount -t tmpfs -o size={_size(v['emptyDir'].get('sizeLimit'))},mode=0777 tmpfs {backing}")
                tmpfs_of[m["name"]] = backing
            source = tmpfs_of[m["name"]] / m["subPath"] if m.get("subPath") else tmpfs_of[m["name"]]
            sh.append(f"mkdir -p {source} && chmod 0777 {source}")
            sh.append(f"mount --bind {source} {shlex.quote(target)}")
        elif m["name"] in pod.folders:  # e.g. a projected service-account token, written by the kubelet
            sh.append(f"mount --bind -o ro {shlex.quote(str(pod.folders[m['name']]))} {shlex.quote(target)}")
        else:
            raise NotImplementedError(f"volume {m['name']}: only configMap, emptyDir and given folders are emulated")
    sh += [
        f"mount --bind -o ro {work}/etc/hosts {root}/etc/hosts",
        f"mount --bind -o ro {work}/etc/hostname {root}/etc/hostname",
    ]
    security = {**(spec.get("securityContext") or {}), **(c.get("securityContext") or {})}
    if security.get("readOnlyRootFilesystem"):
        sh.append(f"mount -o remount,bind,ro {root}")
    uid, gid = security.get("runAsUser", 0), security.get("runAsGroup", 0)
    groups = f"--groups={security['fsGroup']}" if security.get("fsGroup") is not None else ""
    env = {"PATH": IMAGE_PATH, "HOSTNAME": pod.name, **env} if env is not None else pod.env()
    argv = [str(a) for a in (c.get("command") or []) + (c.get("args") or [])]
    argv = [re.sub(r"\$\((\w+)\)", lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
    cwd = c.get("workingDir") or image.workdir
    nnp = "setpriv --no-new-privs " if security.get("allowPrivilegeEscalation") is False else ""
    sh += [
        f"hostname {shlex.quote(pod.name)}",
        f"exec {nnp}chroot --userspec={uid}:{gid} {groups} {root} /usr/bin/env -i "
        + " ".join(shlex.quote(f"{k}={v}") for k, v in env.items())
        + f' /bin/sh -c \'cd "$0" && exec "$@"\' {shlex.quote(cwd)} '
        + " ".join(shlex.quote(a) for a in argv),
    ]
    network = ["ip", "netns", "exec", netns] if netns else []
    return [*network, "unshare", "-m", "-u", "-p", "-f", "/bin/sh", "-c", "\n".join(sh)], work


def pods_from_render(objs: list[dict], secrets: dict[str, dict[str, str]] | None = None) -> list[Pod]:
    """The pods a Training Operator would make of the rendered PyTorchJob: Master-0, Worker-0..,
    each with the env the operator injects (testkit.cluster's operator stand-in: one source)."""
    from testkit.cluster.operator import PyTorchJobController

    job = next(o for o in objs if o["kind"] == "PyTorchJob")
    configmaps = {o["metadata"]["name"]: o["data"] for o in objs if o["kind"] == "ConfigMap"}
    replicas, name = job["spec"]["pytorchReplicaSpecs"], job["metadata"]["name"]
    names = [f"{name}-master-0"] + [
        f"{name}-worker-{i}" for i in range(int(replicas.get("Worker", {}).get("replicas", 0)))
    ]
    pods = []
    for rtype, spec in replicas.items():
        for index in range(int(spec.get("replicas", 1))):
            pspec = copy.deepcopy(spec["template"]["spec"])
            PyTorchJobController._set_env(None, job, pspec, rtype.lower(), index, replicas)
            pod_name = f"{name}-{rtype.lower()}-{index}"
            others = tuple(n for n in names if n != pod_name)
            pods.append(Pod(pod_name, pspec, configmaps, secrets or {}, others))
    return pods


def wait_for(predicate, timeout: float, every: float = 0.5) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(every)
    return predicate()
