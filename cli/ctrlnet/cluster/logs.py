"""`ctrlnet logs`: every rank's log at once, each line prefixed (and coloured in a terminal) with
its pod's role, `[master-0]`, `[worker-3]`.

With `--follow` it is driven by a pod watch: a Pending pod is announced with the reason it waits
and picked up when its container starts; a container the kubelet restarts, or a pod the operator
deletes and re-creates (ExitCode restarts), gets a new stream from its first line; it ends when
the job has finished and every stream has drained. Whole lines only: lines of different pods
never interleave mid-line.

`RunLogs.lines()` is the reading, an iterator of `LogLine`s (what `Client.logs` returns); the CLI
prints them with a `Printer`.
"""

from __future__ import annotations

import os
import queue
import re
import threading
from collections.abc import Iterable, Iterator
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


@dataclass(frozen=True)
class LogLine:
    """One line of a run's log: the pod's node rank and role (`master-0`, `worker-2`, `node-1`, or
    `ctrlnet` for a line about the run itself), and its text. `note`: a line ctrlnet adds (a pod
    that waits, a container re-created, a stream that ended), not one the trainer printed."""

    rank: int
    role: str
    text: str
    pod: str | None = None
    note: bool = False

    def __str__(self) -> str:
        return f"[{self.role}] {self.text}"


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

    def print(self, lines: Iterable[LogLine]) -> None:
        for line in lines:
            self.line(line.role, line.rank, line.text)


def use_colour(out: TextIO) -> bool:
    return out.isatty() and not os.environ.get("NO_COLOR")


class _Ended:
    """A stream thread's last item on the queue: every line it read is before it."""

    def __init__(self, key: tuple[str, int]):
        self.key = key


class RunLogs:
    """A run's log lines, as an iterator (`lines()`); the caller prints them."""

    def __init__(self, kube: Kube, run: Run, options: LogOptions):
        self.kube, self.run, self.opts = kube, run, options
        nodes = run.nodes
        if options.rank is not None and nodes and options.rank >= nodes:
            raise UserError(
                f"--rank {options.rank}: run {run.name} has {nodes} node(s), ranks 0..{nodes - 1} (0 is the master)"
            )
        self.streams: set[tuple[str, int]] = set()  # (pod uid, restartCount) of every stream started
        self.ended: set[tuple[str, int]] = set()  # ... and of those that have ended
        self.announced: dict[str, str] = {}  # pod uid -> the waiting reason last printed
        self.roles_seen: set[str] = set()  # roles whose log was streamed (a new pod of one is a re-creation)
        self.queue: queue.Queue = queue.Queue()  # watch events, stream lines, stream ends, errors

    def lines(self) -> Iterator[LogLine]:
        return self.follow() if self.opts.follow else self.once()

    # ------------------------------------------------------------ which pods
    def wanted(self, pod: dict) -> bool:
        rank, role = pod_rank(pod)
        if self.opts.rank is not None:
            return rank == self.opts.rank
        if self.opts.pod is not None:
            return self.opts.pod in (pod["metadata"]["name"], role)
        return True

    # ------------------------------------------------------------ one shot
    def once(self) -> Iterator[LogLine]:
        pods = [
            p
            for p in self.kube.list("Pod", self.run.namespace, labels=self.run.backend.pod_selector(self.run.name))
            if self.wanted(p)
        ]
        if not pods:
            yield self._no_pods()
        for pod in sorted(pods, key=lambda p: pod_rank(p)[0]):
            rank, role = pod_rank(pod)
            name = pod["metadata"]["name"]
            cs = st.container_status(pod, st.trainer_container(pod)) or {}
            state = cs.get("state") or {}
            if self.opts.previous and not cs.get("lastState", {}).get("terminated"):
                yield LogLine(rank, role, "(no previous container: it has not restarted)", name, note=True)
                continue
            if not self.opts.previous and "running" not in state and "terminated" not in state:
                yield from self._announce(pod, force=True)
                continue
            for text in self._lines(pod, follow=False, tail=self.opts.tail, since=self.opts.since_s):
                yield LogLine(rank, role, text, name)

    # ------------------------------------------------------------ following
    def follow(self) -> Iterator[LogLine]:
        changes = self.queue
        stop = threading.Event()
        selector = self.run.backend.pod_selector(self.run.name)
        ns = self.run.namespace
        threads = [
            threading.Thread(
                target=watch_forever,
                args=(self.kube, "Pod", changes, stop, ns),
                kwargs={"labels": selector},
                daemon=True,
            ),
            threading.Thread(
                target=watch_forever,
                args=(self.kube, self.run.backend.resource.kind, changes, stop, ns),
                kwargs={"fields": f"metadata.name={self.run.name}"},
                daemon=True,
            ),
        ]
        for t in threads:
            t.start()
        finished, seen_pods = False, False
        try:
            # Not before the first pod listing: the job's watch may say "finished" first.
            while not (finished and seen_pods and self.ended >= self.streams):
                try:
                    item = changes.get(timeout=1.0)
                except queue.Empty:
                    continue
                if isinstance(item, LogLine):
                    yield item
                    continue
                if isinstance(item, _Ended):
                    self.ended.add(item.key)
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
                    yield self._no_pods()
                seen_pods = True
                for pod in objs:
                    if event["type"] != "DELETED" and self.wanted(pod):
                        yield from self._consider(pod, initial)
        finally:
            stop.set()

    def _consider(self, pod: dict, initial: bool) -> Iterator[LogLine]:
        uid = pod["metadata"]["uid"]
        cs = st.container_status(pod, st.trainer_container(pod)) or {}
        state = cs.get("state") or {}
        instance = int(cs.get("restartCount") or 0)
        if "running" not in state and "terminated" not in state:
            yield from self._announce(pod)
            return
        key = (uid, instance)
        if key in self.streams:
            return
        rank, role = pod_rank(pod)
        name = pod["metadata"]["name"]
        if not initial and (instance or self._had_role(pod)):
            what = "restarted" if instance else "re-created"
            yield LogLine(rank, role, f"--- container {what} (pod {name}, restart {instance}) ---", name, note=True)
        self.roles_seen.add(role)
        tail, since = (self.opts.tail, self.opts.since_s) if initial else (None, None)
        self.streams.add(key)
        threading.Thread(target=self._stream, args=(pod, key, tail, since), daemon=True).start()

    def _had_role(self, pod: dict) -> bool:
        return pod_rank(pod)[1] in self.roles_seen

    def _stream(self, pod: dict, key: tuple[str, int], tail: int | None, since: int | None) -> None:
        rank, role = pod_rank(pod)
        name = pod["metadata"]["name"]
        try:
            for text in self._lines(pod, follow=True, tail=tail, since=since):
                self.queue.put(LogLine(rank, role, text, name))
        except (ClusterError, UserError) as e:
            self.queue.put(LogLine(rank, role, f"(log stream ended: {e})", name, note=True))
        finally:
            self.queue.put(_Ended(key))

    def _announce(self, pod: dict, force: bool = False) -> Iterator[LogLine]:
        rank, role = pod_rank(pod)
        events = [
            e
            for e in self.kube.list("Event", self.run.namespace, fields=f"involvedObject.uid={pod['metadata']['uid']}")
        ]
        reason, _ = st.pod_reason(pod, st.container_status(pod, st.trainer_container(pod)) or {}, events)
        reason = reason or f"{(pod.get('status') or {}).get('phase', 'Pending')}"
        if force or self.announced.get(pod["metadata"]["uid"]) != reason:
            self.announced[pod["metadata"]["uid"]] = reason
            yield LogLine(rank, role, f"(no log yet: {reason})", pod["metadata"]["name"], note=True)

    def _no_pods(self) -> LogLine:
        phase = st.job_phase(self.run.job, self.run.backend.name)[0]
        note = "it is suspended or queued" if phase in ("Suspended", "Created") else f"the job is {phase}"
        return LogLine(0, "ctrlnet", f"no pods for {self.run.name} yet ({note})", note=True)

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
