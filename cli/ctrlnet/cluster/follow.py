"""`ctrlnet status -w`, `submit --wait` and `Client.watch` / `Client.wait`: follow a run until it
ends, driven by watches. `watch_status` yields the statuses (the work); `show_changes` draws them.

Two watch streams (the job by name, its pods by label) wake the loop when something changes;
then the status is read once and redrawn. Training progress lives in the rank-0 log, which no
watch announces, so it alone is refreshed on a timer. In a terminal the screen is cleared and
the status redrawn in place (rich's Live); elsewhere one line is appended per change.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Iterable, Iterator
from typing import TextIO

from ctrlnet.cluster import status as st
from ctrlnet.cluster.kube import Kube
from ctrlnet.cluster.runs import Run
from ctrlnet.errors import ClusterError

PROGRESS_EVERY_S = 5.0
_CLEAR = "\x1b[H\x1b[2J"


def watch_forever(
    kube: Kube, kind: str, changes: queue.Queue, stop: threading.Event, namespace: str | None = None, **selectors
) -> None:
    """Put `(kind, event)` on `changes` for every watch event in `namespace` (default: the
    connection's), starting with a synthetic `{"type": "LIST", "items": [...]}`; when a watch ends
    (timeout, 410 Gone) list again and go on. A ClusterError is put on the queue and ends the thread."""
    from ctrlnet.cluster.kube import RESOURCES

    path = RESOURCES[kind].path(namespace or kube.namespace)
    while not stop.is_set():
        try:
            listing = kube.request("GET", path, query=_query(selectors), verb="list")
            changes.put((kind, {"type": "LIST", "items": listing.get("items") or []}))
            version = (listing.get("metadata") or {}).get("resourceVersion")
            for event in kube.watch(kind, namespace=namespace, resource_version=version, timeout_s=60, **selectors):
                if stop.is_set():
                    return
                if event.get("type") != "BOOKMARK":
                    changes.put((kind, event))
        except ClusterError as e:
            changes.put(e)
            return


def _query(selectors: dict) -> list[tuple[str, str]]:
    names = {"labels": "labelSelector", "fields": "fieldSelector"}
    return [(names[k], v) for k, v in selectors.items() if v and k in names]


def watch_status(kube: Kube, run: Run, *, deadline: float | None = None) -> Iterator[st.RunStatus]:
    """`run`'s status now, then again on every change (and every PROGRESS_EVERY_S for progress),
    until it finishes (the last one yielded is finished) or `deadline` (time.monotonic()) passes
    (the last one yielded is not). Close the iterator to stop early."""
    from ctrlnet.cluster.runs import find_run

    changes: queue.Queue = queue.Queue()
    stop = threading.Event()
    watchers = [
        threading.Thread(
            target=watch_forever,
            args=(kube, run.backend.resource.kind, changes, stop, run.namespace),
            kwargs={"fields": f"metadata.name={run.name}"},
            daemon=True,
        ),
        threading.Thread(
            target=watch_forever,
            args=(kube, "Pod", changes, stop, run.namespace),
            kwargs={"labels": run.backend.pod_selector(run.name)},
            daemon=True,
        ),
    ]
    for w in watchers:
        w.start()
    try:
        while True:
            run = find_run(kube, run.name, run.namespace)
            status = st.gather(kube, run)
            yield status
            if status.finished:
                return
            now = time.monotonic()
            if deadline is not None and now >= deadline:
                return
            wake = now + PROGRESS_EVERY_S if deadline is None else min(now + PROGRESS_EVERY_S, deadline)
            while True:  # wait for a change, refreshing progress on the timer
                try:
                    item = changes.get(timeout=max(0.0, wake - time.monotonic()))
                except queue.Empty:
                    break
                if isinstance(item, Exception):
                    raise item
                time.sleep(0.2)  # let a burst of events settle into one redraw
                _drain(changes)
                break
    finally:
        stop.set()


def show_changes(statuses: Iterable[st.RunStatus], out: TextIO, *, tty: bool, fmt: str = "text") -> st.RunStatus | None:
    """Draw each status of `statuses` (Client.watch); the last one. `tty`: `out` is a terminal and
    the format text (the screen is redrawn in place), else one line or document per change."""
    last_line = None
    status = None
    live = None  # in a terminal: rich's Live, from the first status on
    try:
        for status in statuses:
            if tty and fmt == "text":
                live = live or _live(out)
                live.update(st.view(status), refresh=True)
            else:
                _draw(status, out, fmt=fmt, previous=last_line)
            last_line = st.summary_line(status)
    finally:
        if live is not None:
            live.stop()  # the last status stays on the screen, whole
    return status


def follow_status(kube: Kube, run: Run, out: TextIO, *, tty: bool, fmt: str = "text") -> st.RunStatus:
    """Redraw `run`'s status on every change until it finishes; its final status."""
    return show_changes(watch_status(kube, run), out, tty=tty, fmt=fmt)


def _drain(q: queue.Queue) -> None:
    while True:
        try:
            item = q.get_nowait()
        except queue.Empty:
            return
        if isinstance(item, Exception):
            raise item


def _live(out: TextIO):
    """The run's status as the terminal's whole screen: cleared once, then redrawn in place."""
    from rich.live import Live

    from ctrlnet.cluster.draw import terminal

    out.write(_CLEAR)
    out.flush()
    live = Live(console=terminal(out), auto_refresh=False)
    live.start()
    return live


def _draw(status: st.RunStatus, out: TextIO, *, fmt: str, previous: str | None) -> None:
    """Off a terminal: a JSON document, or a line when the status changed."""
    if fmt == "json":
        import json

        out.write(json.dumps(status.as_dict(), default=str) + "\n")  # one document per line (JSON Lines)
    else:
        line = st.summary_line(status)
        if line != previous:
            out.write(f"{time.strftime('%H:%M:%S')} {status.name}: {line}\n")
    out.flush()
