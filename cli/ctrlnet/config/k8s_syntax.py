"""Kubernetes' syntax for names, labels and quantities, as the API server checks it
(k8s.io/apimachinery validation), so the config model refuses a value the cluster would refuse,
naming the config key instead of a field deep in a rendered manifest.

Each check returns None, or the problem and its fix as a phrase; the caller names the key.
"""

from __future__ import annotations

import re

from ctrlnet.config.credentials import shown

DNS1123_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
"""Names of Secrets, ConfigMaps, ServiceAccounts, ... (at most 253 characters)."""
LABEL_VALUE = re.compile(r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
"""A label value, and the name part of a label or annotation key (at most 63 characters)."""
QUANTITY = re.compile(r"^(\d+(\.\d*)?|\.\d+)([KMGTPE]i|[numkMGTPE]|[eE][+-]?\d+)?$")
"""A non-negative resource.Quantity: 8, 7500m, 64Gi, 100G, 1e3."""
_BYTES_TYPO = re.compile(r"^(\d+(?:\.\d+)?)\s*([kKmMgGtTpPeE])(?:i?[bB])$")  # 64GB, 64gb, 64GiB


def quantity_problem(value: str, example: str = "64Gi") -> str | None:
    if QUANTITY.match(value):
        return None
    typo = _BYTES_TYPO.match(value.strip())
    hint = f" (did you mean {typo.group(1)}{typo.group(2).upper()}i?)" if typo else ""
    return (
        f"{shown(value)} is not a Kubernetes quantity{hint}: write a number with a unit suffix, e.g. "
        f"{example} (binary: Ki, Mi, Gi, Ti) or {example.removesuffix('i')} (decimal: k, M, G, T), no 'B'"
    )


def cpu_problem(value: str) -> str | None:
    if QUANTITY.match(value):
        return None
    return f"{shown(value)} is not a Kubernetes CPU quantity: write cores, e.g. 8, or millicores, e.g. 7500m"


def label_value_problem(value: str) -> str | None:
    if len(value) <= 63 and LABEL_VALUE.match(value):
        return None
    return (
        f"{shown(value)} is not a valid label value: at most 63 characters, letters, digits, '-', '_' "
        "and '.', starting and ending with a letter or digit (or empty)"
    )


def qualified_name_problem(key: str, what: str = "label key") -> str | None:
    """A label or annotation key: `name` or `prefix/name`, prefix a DNS-1123 subdomain."""
    prefix, _, name = key.rpartition("/")
    if (
        name
        and len(name) <= 63
        and LABEL_VALUE.match(name)
        and (not prefix and "/" not in key or (len(prefix) <= 253 and DNS1123_SUBDOMAIN.match(prefix)))
    ):
        return None
    return (
        f"{shown(key)} is not a valid {what}: `name` or `prefix/name`, the name at most 63 letters, digits, "
        "'-', '_' or '.', the prefix a lowercase DNS name (e.g. example.com/team)"
    )


def secret_name_problem(value: str) -> str | None:
    """A Secret's name (DNS-1123 subdomain). The value is never quoted: it may be the credential
    itself, put where its Secret's name belongs."""
    if len(value) <= 253 and DNS1123_SUBDOMAIN.match(value):
        return None
    return "must be the name of a Kubernetes Secret (lowercase letters, digits, '-' and '.'), e.g. hf-token"
