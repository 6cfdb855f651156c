"""Object storage with one global resourceVersion counter and a bounded watch history (the
stand-in for etcd plus the watch cache)."""

from __future__ import annotations

import bisect
import copy
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

Key = tuple[str, str]  # (group, plural)


@dataclass
class Change:
    rv: int
    key: Key
    namespace: str
    type: str  # ADDED | MODIFIED | DELETED
    obj: dict[str, Any]
    prev: dict[str, Any] | None


class Store:
    def __init__(self, history: int = 1000, first_rv: int = 1000):
        self.lock = threading.RLock()
        self.changed = threading.Condition(self.lock)
        self.rv = first_rv
        self._objects: dict[tuple[Key, str, str], dict[str, Any]] = {}
        self._history: list[Change] = []
        self._history_rvs: list[int] = []
        self.max_history = history
        self.compacted_rv = 0  # events with rv <= this are gone from the history
        self.serial = 0  # bumps on every change but Events (what controllers wake up on)

    def next_rv(self) -> int:
        self.rv += 1
        return self.rv

    def _record(self, change: Change) -> None:
        self._history.append(change)
        self._history_rvs.append(change.rv)
        if len(self._history) > self.max_history:
            drop = len(self._history) - self.max_history
            self.compacted_rv = self._history_rvs[drop - 1]
            del self._history[:drop]
            del self._history_rvs[:drop]
        if change.key != ("", "events"):
            self.serial += 1
        self.changed.notify_all()

    def get(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            obj = self._objects.get((key, namespace, name))
            return copy.deepcopy(obj) if obj is not None else None

    def exists(self, key: Key, namespace: str, name: str) -> bool:
        with self.lock:
            return (key, namespace, name) in self._objects

    def list(self, key: Key, namespace: str | None = None) -> list[dict[str, Any]]:
        with self.lock:
            items = [
                (ns, name, o)
                for (k, ns, name), o in self._objects.items()
                if k == key and (namespace is None or ns == namespace)
            ]
            return [copy.deepcopy(o) for ns, name, o in sorted(items, key=lambda t: (t[0], t[1]))]

    def iter_raw(self, key: Key, namespace: str | None = None) -> Iterator[dict[str, Any]]:
        """Stored objects without copying: callers must hold `lock` and not mutate them."""
        for (k, ns, _), o in self._objects.items():
            if k == key and (namespace is None or ns == namespace):
                yield o

    def put(self, key: Key, obj: dict[str, Any]) -> dict[str, Any]:
        """Store `obj` under a new resourceVersion (ADDED or MODIFIED); returns a copy."""
        with self.lock:
            meta = obj["metadata"]
            k = (key, meta.get("namespace", ""), meta["name"])
            prev = self._objects.get(k)
            rv = self.next_rv()
            stored = copy.deepcopy(obj)
            stored["metadata"]["resourceVersion"] = str(rv)
            self._objects[k] = stored
            self._record(Change(rv, key, k[1], "MODIFIED" if prev is not None else "ADDED", stored, prev))
            return copy.deepcopy(stored)

    def remove(self, key: Key, namespace: str, name: str) -> dict[str, Any] | None:
        with self.lock:
            prev = self._objects.pop((key, namespace, name), None)
            if prev is None:
                return None
            rv = self.next_rv()
            final = copy.deepcopy(prev)
            final["metadata"]["resourceVersion"] = str(rv)
            self._record(Change(rv, key, namespace, "DELETED", final, prev))
            return copy.deepcopy(final)

    def changes_after(self, rv: int, key: Key, namespace: str | None) -> list[Change]:
        """History entries newer than `rv` for `key` (caller holds the lock)."""
        i = bisect.bisect_right(self._history_rvs, rv)
        return [c for c in self._history[i:] if c.key == key and (namespace is None or c.namespace == namespace)]

    def too_old(self, rv: int) -> bool:
        return rv < self.compacted_rv
