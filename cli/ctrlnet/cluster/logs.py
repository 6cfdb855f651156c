"""`ctrlnet logs`: every rank's log at once, each line prefixed (and coloured in a terminal) with
its pod's role, `[master-0]`, `[worker-3]`.

With `--follow` it is driven by a pod watch: a Pending pod is announced with the reason it waits
and picked up when its container starts; a container the kubelet restarts, or a pod the operator
deletes and re-creates (ExitCode restarts), gets a new stream from its first line; it ends when
the job has finished and every stream has drained. One writer lock and whole lines only: lines of
different pods never interleave mid-line.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from dataclasses import dataclass
from typing import TextIO

from ctrlnet.cluster import status as st
from ctrlnet.cluster.follow import watch_forever
from ctrlnet.cluster.kube import Kube
from ctrlnet.cluster.runs import Run, pod_rank
from ctrlnet.errors import ClusterError, UserError

_COLOURS = (36, 33, 35, 32, 34, 31, 96, 93, 95, 92, 94, 91)
_DURATION = re.compile(r"^(\d+)(s|m|h|d)$")


def parse_since(text: str | None) -> int | None:
    """`30s`, `5m`, `2h`, `1d` -> seconds."""
    if text is None:
        return None
    m = _DURATION.match(text.strip())
    if not m:
        raise UserError(f"--since {text!r}: give a duration like 30s, 5m, 2h or 1d")
    return int(m.group(1)) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[m.group(2)]


@dataclass
class LogOptions:
    follow: bool = False
    tail: int | None = None
    since_s: int | None = None
    previous: bool = False
    timestamps: bool = False
    rank: int | None = None
    pod: str | None = None


class Printer:
    """Whole lines, one writer at a time, each with its pod's prefix."""

    def __init__(self, out: TextIO, colour: bool):
        self.out, self.colour, self.lock = out, colour, threading.Lock()

    def prefix(self, role: str, rank: int) -> str:
        if not self.colour:
            return f"[{role}]"
        return f"\x1b[{_COLOURS[rank % len(_COLOURS)]}m[{role}]\x1b[0m"

    def line(self, role: str, rank: int, text: str) -> None:
        with self.lock:
            self.out.write(f"{self.prefix(role, rank)} {text}\n")
            self.out.flush()


def use_colour(out: TextIO) -> bool:
    return out.isatty() and not os.environ.get("NO_COLOR")


class RunLogs:
    def __init__(self, kube: Kube, run: Run, out: TextIO, options: LogOptions):
        self.kube, self.run, self.opts = kube, run, options
        nodes = run.nodes
        if options.rank is not None and nodes and options.rank >= nodes:
            raise UserError(
                f"--rank {options.rank}: run {run.name} has {nodes} node(s), ranks 0..{nodes - 1} (0 is the master)"
            )
        self.printer = Printer(out, use_colour(out))
        self.streams: dict[tuple[str, int], threading.Thread] = {}  # (pod uid, restartCount) -> reader
        self.announced: dict[str, str] = {}  # pod uid -> the waiting reason last printed
        self.roles_seen: set[str] = set()  # roles whose log was streamed (a new pod of one is a re-creation)

    # ------------------------------------------------------------ which pods
    def wanted(self, pod: dict) -> bool:
        rank, role = pod_rank(pod)
        if self.opts.rank is not None:
            return rank == self.opts.rank
        if self.opts.pod is not None:
            return self.opts.pod in (pod["metadata"]["name"], role)
        return True

    # ------------------------------------------------------------ one shot
    def print_once(self) -> None:
        pods = [
            p
            for p in self.kube.list("Pod", self.run.namespace, labels=self.run.backend.pod_selector(self.run.name))
            if self.wanted(p)
        ]
        if not pods:
            self._no_pods()
        for pod in sorted(pods, key=lambda p: pod_rank(p)[0]):
            rank, role = pod_rank(pod)
            cs = st.container_status(pod, st.trainer_container(pod)) or {}
            state = cs.get("state") or {}
            if self.opts.previous and not cs.get("lastState", {}).get("terminated"):
                self.printer.line(role, rank, "(no previous container: it has not restarted)")
                continue
            if not self.opts.previous and "running" not in state and "terminated" not in state:
                self._announce(pod, force=True)
                continue
            for text in self._lines(pod, follow=False, tail=self.opts.tail, since=self.opts.since_s):
                self.printer.line(role, rank, text)

    # ------------------------------------------------------------ following
    def follow(self) -> None:
        changes: queue.Queue = queue.Queue()
        stop = threading.Event()
        selector = self.run.backend.pod_selector(self.run.name)
        threads = [
            threading.Thread(
                target=watch_forever, args=(self.kube, "Pod", changes, stop), kwargs={"labels": selector}, daemon=True
            ),
            threading.Thread(
                target=watch_forever,
                args=(self.kube, self.run.backend.resource.kind, changes, stop),
                kwargs={"fields": f"metadata.name={self.run.name}"},
                daemon=True,
            ),
        ]
        for t in threads:
            t.start()
        finished, seen_pods = False, False
        try:
            while not (finished and not any(t.is_alive() for t in self.streams.values())):
                try:
                    item = changes.get(timeout=1.0)
                except queue.Empty:
                    continue
                if isinstance(item, Exception):
                    raise item
                kind, event = item
                objs = event["items"] if event["type"] == "LIST" else [event["object"]]
                if kind != "Pod":
                    finished = event["type"] == "DELETED" or any(
                        st.job_phase(job, self.run.backend.name)[0] in st.TERMINAL for job in objs
                    )
                    continue
                # Containers already there at the first listing honour --tail/--since; any that
                # start later (a restart, a re-created pod, a pod that was Pending) are new: all of it.
                initial = not seen_pods
                if initial and not objs:
                    self._no_pods()
                seen_pods = True
                for pod in objs:
                    if event["type"] != "DELETED" and self.wanted(pod):
                        self._consider(pod, initial)
        finally:
            stop.set()

    def _consider(self, pod: dict, initial: bool) -> None:
        uid = pod["metadata"]["uid"]
        cs = st.container_status(pod, st.trainer_container(pod)) or {}
        state = cs.get("state") or {}
        instance = int(cs.get("restartCount") or 0)
        if "running" not in state and "terminated" not in state:
            self._announce(pod)
            return
        key = (uid, instance)
        if key in self.streams:
            return
        if not initial and (instance or self._had_role(pod)):
            rank, role = pod_rank(pod)
            what = "restarted" if instance else "re-created"
            self.printer.line(
                role, rank, f"--- container {what} (pod {pod['metadata']['name']}, restart {instance}) ---"
            )
        self.roles_seen.add(pod_rank(pod)[1])
        tail, since = (self.opts.tail, self.opts.since_s) if initial else (None, None)
        reader = threading.Thread(target=self._stream, args=(pod, tail, since), daemon=True)
        self.streams[key] = reader
        reader.start()

    def _had_role(self, pod: dict) -> bool:
        return pod_rank(pod)[1] in self.roles_seen

    def _stream(self, pod: dict, tail: int | None, since: int | None) -> None:
        rank, role = pod_rank(pod)
        try:
            for text in self._lines(pod, follow=True, tail=tail, since=since):
                self.printer.line(role, rank, text)
        except (ClusterError, UserError) as e:
            self.printer.line(role, rank, f"(log stream ended: {e})")

    def _announce(self, pod: dict, force: bool = False) -> None:
        rank, role = pod_rank(pod)
        events = [
            e
            for e in self.kube.list("Event", self.run.namespace, fields=f"involvedObject.uid={pod['metadata']['uid']}")
        ]
        reason, _ = st.pod_reason(pod, st.container_status(pod, st.trainer_container(pod)) or {}, events)
        reason = reason or f"{(pod.get('status') or {}).get('phase', 'Pending')}"
        if force or self.announced.get(pod["metadata"]["uid"]) != reason:
            self.announced[pod["metadata"]["uid"]] = reason
            self.printer.line(role, rank, f"(no log yet: {reason})")

    def _no_pods(self) -> None:
        phase = st.job_phase(self.run.job, self.run.backend.name)[0]
        note = "it is suspended or queued" if phase in ("Suspended", "Created") else f"the job is {phase}"
        self.printer.line("ctrlnet", 0, f"no pods for {self.run.name} yet ({note})")

    def _lines(self, pod: dict, *, follow: bool, tail: int | None = None, since: int | None = None):
        return self.kube.log_lines(
            pod["metadata"]["name"],
            st.trainer_container(pod),
            namespace=self.run.namespace,
            tail=tail,
            since_s=since,
            previous=self.opts.previous and not follow,
            timestamps=self.opts.timestamps,
            follow=follow,
        )
