"""What looks like a credential: variable names that hold one, and values shaped like one.

The one place for this, used by the config model (a job file is refused before anything renders)
and by `ctrlnet validate` (ctrlnet.k8s.rules, on manifests written by hand). Callers get a
description of what was found ("a GitHub token"), never the text itself: a message that quotes a
credential leaks it into terminals, CI logs and bug reports.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

# --- names ---------------------------------------------------------------------------------------

# Anywhere in the name: words nobody uses for anything but a credential.
_SECRET_SUBSTRINGS = re.compile(
    r"SECRET|PASSWORD|PASSWD|PASSPHRASE|CREDENTIAL|PRIVATE_?KEY|API_?KEY|ACCESS_?KEY|AUTHORIZATION", re.I
)
# As the last `_`-separated part (WANDB_KEY, HF_AUTH, GITHUB_PAT, SENTRY_DSN, DB_PASS, ...): on
# their own these words name too much else (KEY_PATH, AUTH_MODE, PATH) to match anywhere.
_SECRET_SUFFIXES = frozenset({"KEY", "KEYS", "AUTH", "PAT", "DSN", "PASS", "PWD", "COOKIE", "CREDS", "SIGNATURE"})


def secret_env_name(name: str) -> bool:
    """True for an environment variable name that holds a credential (so its value must come from
    a Secret by secretKeyRef). TOKENIZERS_PARALLELISM is not one: a part must *end* in TOKEN."""
    if _SECRET_SUBSTRINGS.search(name):
        return True
    parts = [p for p in name.upper().split("_") if p]
    if any(p.endswith(("TOKEN", "TOKENS")) for p in parts):
        return True
    # A bare PWD is the shell's working directory, not a password.
    return len(parts) > 1 and parts[-1] in _SECRET_SUFFIXES


# --- values --------------------------------------------------------------------------------------

# Known token formats, searched for anywhere in a string: (what it is, pattern). URLs first: a
# URL's user:password is the more useful thing to name (it may hold a token of any format).
_TOKENS: list[tuple[str, re.Pattern[str]]] = [
    # scheme://user:password@host (s3://KEY:SECRET@bucket, postgres://u:pw@db, https://u:token@host)
    ("a URL with a user:password in it", re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^/\s@:]*:[^/\s@]+@")),
    # Server=db;User Id=sa;Password=...; (a field of its own, so a prompt saying "password=" is no match)
    ("a connection string with a password", re.compile(r"(?i)(^|;)\s*(password|pwd)\s*=[^;\s]+")),
    ("a Hugging Face token", re.compile(r"\bhf_[A-Za-z0-9]{30,}")),
    ("a GitHub token", re.compile(r"\b(gh[pousr]_[A-Za-z0-9]{30,}|github_pat_[A-Za-z0-9_]{20,})")),
    ("a GitLab token", re.compile(r"\bglpat-[A-Za-z0-9_-]{20,}")),
    ("an AWS access key id", re.compile(r"\b(AKIA|ASIA|AGPA|AIDA|AROA|AIPA|ANPA|ANVA)[A-Z0-9]{16}\b")),
    ("an API secret key (sk-...)", re.compile(r"\bsk-[A-Za-z0-9_-]{20,}")),
    ("a Stripe key", re.compile(r"\b[rs]k_(live|test)_[A-Za-z0-9]{16,}")),
    ("a Slack token", re.compile(r"\bxox[abposr]-[A-Za-z0-9-]{10,}")),
    ("a Google API key", re.compile(r"\bAIza[0-9A-Za-z_-]{35}")),
    ("a JSON Web Token", re.compile(r"\beyJ[A-Za-z0-9_-]{10,}\.eyJ[A-Za-z0-9_-]{10,}\.")),
    ("a private key", re.compile(r"-----BEGIN [A-Z ]*PRIVATE KEY-----")),
]
# Long random-looking strings: a W&B key (40 hex), a base64 secret. Only where a *name* belongs
# (a Secret name, a variable name): elsewhere a commit hash or a checksum is a fine value.
_HEX_BLOB = re.compile(r"^[0-9a-fA-F]{32,}$")
_B64_BLOB = re.compile(r"^[A-Za-z0-9+/_-]{32,}={0,2}$")


def credential_kind(value: Any, *, blobs: bool = False) -> str | None:
    """What credential `value` looks like ("a GitHub token"), or None. `blobs`: also long
    hex / base64 strings, for fields that expect a name."""
    if not isinstance(value, str):
        return None
    for kind, pattern in _TOKENS:
        if pattern.search(value):
            return kind
    if blobs:
        text = value.strip()
        if _HEX_BLOB.match(text):
            return "a long hex string (an API key?)"
        if _B64_BLOB.match(text) and all(re.search(c, text) for c in ("[a-z]", "[A-Z]", "[0-9]")):
            return "a long random-looking string (a key?)"
    return None


def find_credentials(node: Any, path: tuple[str, ...] = ()) -> Iterator[tuple[tuple[str, ...], str]]:
    """(path, kind) of every string in nested dicts and lists that looks like a credential. A
    mapping *key* that looks like one is reported at its parent's path (the key is not shown)."""
    if isinstance(node, dict):
        for k, v in node.items():
            kind = credential_kind(k)
            if kind is not None:
                yield path, f"a key that looks like {kind}"
                continue
            yield from find_credentials(v, (*path, str(k)))
    elif isinstance(node, (list, tuple)):
        for i, v in enumerate(node):
            yield from find_credentials(v, (*path[:-1], f"{path[-1]}[{i}]") if path else (f"[{i}]",))
    else:
        kind = credential_kind(node)
        if kind is not None:
            yield path, kind


def shown(value: Any) -> str:
    """repr(value) for a message, unless it looks like a credential: then a description."""
    kind = credential_kind(str(value), blobs=True)
    return f"<{kind}, not shown>" if kind else repr(value)


# --- the config model ----------------------------------------------------------------------------

CREDENTIAL_ERROR = "credential"
"""The pydantic error type of a refused credential; ctx `where` is the key inside the section."""


def _advice(section: str, path: tuple[str, ...], kind: str) -> str:
    """How to pass this credential instead, for the key it was found at."""
    head = path[0].split("[")[0] if path else ""
    if section == "cluster" and path[:1] == ("env",) and len(path) > 1:
        return f"reference a Secret instead: cluster.secrets.env: [{{name: {path[1]}, secret: SECRET-NAME, key: KEY}}]"
    if section == "cluster" and head in ("secrets", "image_pull_secrets"):
        return (
            "this key takes a name (of a Secret, a key in it, or a variable), not the credential: create "
            "a Secret (kubectl create secret generic NAME --from-literal=KEY=...) and reference it by name"
        )
    if section == "train" and path == ("hub", "token_env"):
        return (
            "this key takes the name of the environment variable that holds the token (e.g. HF_TOKEN), "
            "not the token: export the token in that variable (on a cluster: cluster.secrets.hub_token)"
        )
    if kind.startswith(("a URL", "a connection string")):
        return (
            "credentials in a URL are copied into the job's ConfigMap and logs: remove them and pass them "
            "by a Secret (cluster.secrets.s3 for s3://, cluster.secrets.env otherwise) or, locally, by "
            "environment variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, ...)"
        )
    return (
        "a credential never goes in the config: keep it in a Secret (cluster.secrets.env) or, locally, "
        "in an environment variable"
    )


def refuse_credentials(data: Any, section: str) -> None:
    """A model validator's check of a section's raw input: the first credential-looking value
    raises a pydantic error that names its key and the way to pass it instead, never the value."""
    from pydantic_core import PydanticCustomError

    for path, kind in find_credentials(data):
        raise PydanticCustomError(
            CREDENTIAL_ERROR,
            "holds {kind} (not shown): {advice}",
            {"where": ".".join(path), "kind": kind, "advice": _advice(section, path, kind)},
        )
