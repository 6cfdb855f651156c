"""Label and field selectors, parsed and matched as k8s.io/apimachinery/pkg/labels and /fields do."""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .errors import ApiError, bad_request

_KEY = re.compile(
    r"^([a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*/)?[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$"
)
_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")


@dataclass(frozen=True)
class Requirement:
    key: str
    op: str  # =, !=, in, notin, exists, !, gt, lt
    values: tuple[str, ...] = ()

    def matches(self, labels: dict[str, str]) -> bool:
        has = self.key in labels
        v = labels.get(self.key)
        if self.op == "=":
            return has and v == self.values[0]
        if self.op == "!=":
            return not has or v != self.values[0]
        if self.op == "in":
            return has and v in self.values
        if self.op == "notin":
            return not has or v not in self.values
        if self.op == "exists":
            return has
        if self.op == "!":
            return not has
        if self.op in ("gt", "lt"):
            try:
                n, lim = int(v or ""), int(self.values[0])
            except ValueError:
                return False
            return n > lim if self.op == "gt" else n < lim
        return False


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        if ch == "(":
            depth += 1
        elif ch == ")":
            depth -= 1
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _check_key(key: str, sel: str) -> None:
    if not key or len(key.split("/")[-1]) > 63 or not _KEY.match(key):
        raise bad_request(
            f"unable to parse requirement: <nil>: Invalid value: {key!r}: name part must consist of "
            "alphanumeric characters, '-', '_' or '.', and must start and end with an alphanumeric "
            "character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for validation is "
            "'([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
        )


def _check_value(value: str) -> None:
    if len(value) > 63 or not _VALUE.match(value):
        raise bad_request(
            f"unable to parse requirement: values[0][{value}]: Invalid value: {value!r}: a valid label "
            "must be an empty string or consist of alphanumeric characters, '-', '_' or '.', and must "
            "start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',  or '12345', "
            "regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
        )


def parse_label_selector(text: str | None) -> list[Requirement]:
    if not text or not text.strip():
        return []
    reqs = []
    for raw in _split_top(text):
        part = raw.strip()
        if not part:
            raise bad_request("found '', expected: !, identifier, or 'end of string'")
        m = re.match(r"^(\S+?)\s+(in|notin)\s*\((.*)\)$", part)
        if m:
            key, op, vals = m.group(1), m.group(2), tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            _check_key(key, text)
            for v in vals:
                _check_value(v)
            reqs.append(Requirement(key, op, vals))
            continue
        if part.startswith("!"):
            key = part[1:].strip()
            _check_key(key, text)
            reqs.append(Requirement(key, "!"))
            continue
        m = re.match(r"^([^=!<>\s]+)\s*(==|=|!=|>|<)\s*(\S*)$", part)
        if m:
            key, op, val = m.group(1), m.group(2), m.group(3)
            _check_key(key, text)
            if op in (">", "<"):
                reqs.append(Requirement(key, "gt" if op == ">" else "lt", (val,)))
                continue
            _check_value(val)
            reqs.append(Requirement(key, "!=" if op == "!=" else "=", (val,)))
            continue
        if re.match(r"^\S+$", part):
            _check_key(part, text)
            reqs.append(Requirement(part, "exists"))
            continue
        raise bad_request(f"unable to parse requirement: found '{part}', expected: '=', '!=', '==', 'in', notin'")
    return reqs


def labels_match(reqs: list[Requirement], labels: dict[str, str] | None) -> bool:
    labels = labels or {}
    return all(r.matches(labels) for r in reqs)


# --- field selectors -----------------------------------------------------------------------------


def _g(obj: dict[str, Any], *path: str) -> str:
    cur: Any = obj
    for p in path:
        if not isinstance(cur, dict):
            return ""
        cur = cur.get(p)
    if cur is None:
        return ""
    if isinstance(cur, bool):
        return "true" if cur else "false"
    return str(cur)


def _fields(*names: str) -> dict[str, Callable[[dict[str, Any]], str]]:
    return {n: (lambda o, parts=tuple(n.split(".")): _g(o, *parts)) for n in names}


COMMON = _fields("metadata.name", "metadata.namespace")
FIELD_SETS: dict[tuple[str, str], dict[str, Callable[[dict[str, Any]], str]]] = {
    ("", "pods"): {
        **COMMON,
        **_fields(
            "spec.nodeName",
            "spec.restartPolicy",
            "spec.schedulerName",
            "spec.serviceAccountName",
            "spec.hostNetwork",
            "status.phase",
            "status.podIP",
            "status.nominatedNodeName",
        ),
    },
    ("", "events"): {
        **COMMON,
        **_fields(
            "involvedObject.kind",
            "involvedObject.namespace",
            "involvedObject.name",
            "involvedObject.uid",
            "involvedObject.apiVersion",
            "involvedObject.resourceVersion",
            "involvedObject.fieldPath",
            "reason",
            "reportingComponent",
            "type",
        ),
        "source": lambda o: _g(o, "source", "component"),
    },
    ("", "secrets"): {**COMMON, **_fields("type")},
    ("", "namespaces"): {**COMMON, **_fields("status.phase")},
    ("", "nodes"): {**COMMON, **_fields("spec.unschedulable")},
    ("", "persistentvolumeclaims"): {**COMMON},
}


@dataclass(frozen=True)
class FieldReq:
    field: str
    op: str  # = or !=
    value: str


def parse_field_selector(text: str | None, group: str, plural: str, custom: bool) -> list[FieldReq]:
    if not text or not text.strip():
        return []
    known = FIELD_SETS.get((group, plural), COMMON)
    reqs = []
    for raw in text.split(","):
        part = raw.strip()
        m = re.match(r"^([^=!]+?)\s*(==|=|!=)\s*(.*)$", part)
        if not m:
            raise bad_request(f"invalid selector: '{text}'; can't understand '{part}'")
        f, op, v = m.group(1).strip(), m.group(2), m.group(3).strip()
        if f not in known:
            if custom:
                raise bad_request(f'"{f}" is not a known field selector: only "metadata.name", "metadata.namespace"')
            raise bad_request(f"field label not supported: {f}")
        reqs.append(FieldReq(f, "!=" if op == "!=" else "=", v))
    return reqs


def fields_match(reqs: list[FieldReq], obj: dict[str, Any], group: str, plural: str) -> bool:
    known = FIELD_SETS.get((group, plural), COMMON)
    for r in reqs:
        v = known[r.field](obj)
        if (v == r.value) != (r.op == "="):
            return False
    return True


def format_selector(match_labels: dict[str, str]) -> str:
    return ",".join(f"{k}={v}" for k, v in sorted(match_labels.items()))


__all__ = [
    "ApiError",
    "parse_label_selector",
    "labels_match",
    "parse_field_selector",
    "fields_match",
    "format_selector",
]
