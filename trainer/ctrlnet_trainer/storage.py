"""Every path is a URL: plain paths, file://, s3://, gs://, ... through fsspec.

The trainer reads and writes local files only, through one mirror operation that behaves the same
for a folder and a bucket: `Prefix.local(...)` is where a file of the prefix lives on this machine
(the file itself for a folder; a node-local staging copy for a bucket), `publish(...)` makes a
local file part of the prefix, and `fetch(...)` brings one to this machine. For a folder both are
no-ops, so code written against them never asks "is this remote?".
"""

from __future__ import annotations

import hashlib
import os
import posixpath
import shutil
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import fsspec
from fsspec.asyn import AsyncFileSystem

from ctrlnet.errors import StorageError, UserError, one_line

_S3 = ("s3", "s3a")
PROBE_TIMEOUT_S = 3.0
"""Connect/read timeout of the one request that checks each object store at the start."""


def is_remote(url: str) -> bool:
    protocol = url.split("://", 1)[0] if "://" in url else "file"
    return protocol not in ("file", "local")


def looks_like_path(where: str) -> bool:
    """A string meant as a filesystem path rather than a hub id (`org/name` has one slash)."""
    return where.startswith((".", "/", "~")) or where.count("/") > 1


def protocol_of(url: str) -> str:
    return url.split("://", 1)[0] if "://" in url else "file"


def bounded_options(url: str, timeout_s: float) -> dict:
    """fsspec options for `url` whose requests give up after `timeout_s` with no retries of their
    own (the caller decides about retrying): for S3 a connect/read timeout and one attempt. Other
    protocols keep their defaults."""
    if protocol_of(url) in _S3:
        return {
            "skip_instance_cache": True,  # never share (or retune) the cached client other code uses
            "config_kwargs": {
                "connect_timeout": timeout_s,
                "read_timeout": timeout_s,
                "retries": {"total_max_attempts": 1, "mode": "standard"},
            },
        }
    return {}


def s3_endpoint(fs=None) -> str:
    """The S3 endpoint a client talks to, for messages."""
    url = getattr(fs, "endpoint_url", None) or (getattr(fs, "client_kwargs", None) or {}).get("endpoint_url")
    url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    return url or "AWS S3 (no AWS_ENDPOINT_URL set)"


def probe(outputs: Iterable[str | None], inputs: Iterable[str | None] = (), timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Reach every object store among `outputs` and `inputs` once (one listing request per
    bucket, short timeout, no retries), so missing credentials or an unreachable endpoint fail in
    seconds, before any model or data is loaded, with one line naming the endpoint and what to
    set. Raises StorageError (exit 1), or UserError for a bucket that does not exist. A bucket
    that only refuses the listing is an error for an output (the run lists its checkpoints) but
    not for an input, which may be readable without it."""
    seen = set()
    for url, must_list in [*((u, True) for u in outputs), *((u, False) for u in inputs)]:
        if not url or "://" not in url or protocol_of(url) not in _S3:
            continue  # local paths, hub ids; other stores report their own errors when first used
        fs, path = fsspec.core.url_to_fs(url, **bounded_options(url, timeout_s))
        bucket, _, key = path.partition("/")
        if bucket in seen:
            continue
        seen.add(bucket)
        _probe_s3(fs, url, bucket, key, must_list)


def _probe_s3(fs, url: str, bucket: str, key: str, must_list: bool) -> None:
    from botocore.exceptions import (
        ConnectionError as BotoConnectionError,
    )
    from botocore.exceptions import (
        NoCredentialsError,
        PartialCredentialsError,
    )

    fs.retries = 1  # s3fs's own retry loop, on this private client only
    try:
        fs.call_s3("list_objects_v2", Bucket=bucket, Prefix=key, MaxKeys=1)
    except (NoCredentialsError, PartialCredentialsError):
        raise StorageError(
            f"no credentials for {url} (endpoint {s3_endpoint(fs)}): set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY (on a cluster: cluster.secrets.s3), or AWS_PROFILE"
        ) from None
    except (BotoConnectionError, TimeoutError, OSError) as e:
        if isinstance(e, FileNotFoundError):
            raise UserError(
                f"bucket {bucket!r} of {url} does not exist at {s3_endpoint(fs)}: create it, or fix the URL "
                "(or AWS_ENDPOINT_URL if the bucket lives on another store)"
            ) from None
        if isinstance(e, PermissionError):
            if not must_list:
                return
            raise StorageError(
                f"{s3_endpoint(fs)} refused access to {url} ({one_line(e, limit=160, with_type=True)}): check AWS_ACCESS_KEY_ID / "
                "AWS_SECRET_ACCESS_KEY and that they may list and write the bucket"
            ) from None
        raise StorageError(
            f"cannot reach the object store at {s3_endpoint(fs)} for {url} ({one_line(e, limit=160, with_type=True)}): check "
            "AWS_ENDPOINT_URL (the store's http(s) URL; unset for AWS S3) and that it is reachable from here"
        ) from None


def local_path(url: str) -> str:
    return url[len("file://") :] if url.startswith("file://") else url


def staging_root(url: str) -> Path:
    """Node-local folder mirroring a remote prefix: the same path for every rank on a node, so a
    node's ranks share one staged checkpoint. CTRLNET_WORK_DIR moves it (e.g. onto a big disk)."""
    base = os.environ.get("CTRLNET_WORK_DIR") or os.path.join(tempfile.gettempdir(), "ctrlnet-work")
    return Path(base) / hashlib.sha1(url.encode()).hexdigest()[:16]


@dataclass
class Prefix:
    """A folder or object-storage prefix, e.g. `runs/a` or `s3://bucket/runs/a`."""

    url: str
    options: dict = field(default_factory=dict, compare=False, repr=False)
    """fsspec options, e.g. `bounded_options(url, timeout)` for a client that gives up quickly."""

    def __post_init__(self) -> None:
        self.url = self.url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.options)
        if self.options and hasattr(self.fs, "retries"):
            self.fs.retries = 1  # a private client (skip_instance_cache): the caller owns retrying

    @property
    def remote(self) -> bool:
        return is_remote(self.url)

    @property
    def staged(self) -> bool:
        """Files are written to a node-local mirror and published (a bucket), rather than in
        place (a folder, shared by every node that mounts it)."""
        return self.remote

    # --- the mirror: one way to read and write, for a folder and a bucket alike ----------------
    def local(self, *parts: str) -> Path:
        """Where `<prefix>/<parts>` lives on this machine: the path itself for a folder, the
        node-local mirror for a bucket. Write here, then `publish`."""
        if self.staged:
            return staging_root(self.url).joinpath(*parts)
        return Path(self.join(*parts))

    def publish(self, *parts: str) -> None:
        """Make the local file or folder `<parts>` part of the prefix (a no-op for a folder)."""
        if self.staged:
            self.upload(self.local(*parts), *parts)

    def fetch(self, *parts: str) -> Path:
        """`<prefix>/<parts>` on this machine (downloaded afresh into the mirror for a bucket;
        the path itself for a folder)."""
        local = self.local(*parts)
        if self.staged:
            if local.is_dir():
                shutil.rmtree(local)
            elif local.exists():
                local.unlink()
            local.parent.mkdir(parents=True, exist_ok=True)  # a fresh machine (a new pod) has no mirror yet
            self.download(local, *parts)
        return local

    def drop_local(self, *parts: str) -> None:
        """Free the mirror copy of published files (a no-op for a folder: there the copy is the file)."""
        if self.staged:
            shutil.rmtree(self.local(*parts), ignore_errors=True)

    def join(self, *parts: str) -> str:
        return posixpath.join(self.root, *parts)

    def url_of(self, *parts: str) -> str:
        return posixpath.join(self.url, *parts)

    def _fresh(self, path: str) -> str:
        # Object-store clients cache listings; another process (a rank, a previous attempt) may
        # have written since, and checkpoint decisions must see the store as it is now.
        if self.remote:
            self.fs.invalidate_cache(path)
        return path

    def exists(self, *parts: str) -> bool:
        return self.fs.exists(self._fresh(self.join(*parts)))

    def read_text(self, *parts: str) -> str:
        with self.fs.open(self.join(*parts), "r") as f:
            return f.read()

    def write_text(self, text: str, *parts: str) -> None:
        path = self.join(*parts)
        if not self.remote:
            # Write-then-rename so a reader never sees half a pointer file.
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path) or ".", prefix=".tmp-")
            with os.fdopen(fd, "w") as f:
                f.write(text)
            os.chmod(tmp, 0o644)  # mkstemp makes 0600; these files are shared with readers
            os.replace(tmp, path)
        else:
            with self.fs.open(path, "w") as f:
                f.write(text)

    def listdir(self, *parts: str) -> list[str]:
        path = self._fresh(self.join(*parts))
        if not self.fs.exists(path):
            return []
        return sorted(posixpath.basename(p.rstrip("/")) for p in self.fs.ls(path, detail=False))

    def remove(self, *parts: str) -> None:
        path = self.join(*parts)
        if self.fs.exists(path):
            self.fs.rm(path, recursive=True)

    def upload(self, local: str | Path, *parts: str, timeout: float | None = None) -> None:
        """Copy a local file or folder to `<prefix>/<parts>` (a no-op when it is already there).
        `timeout`: give up (and cancel) after that many seconds in all (async stores)."""
        dest = self.join(*parts)
        local = str(local)
        if not self.remote:
            if os.path.abspath(local) == os.path.abspath(dest):
                return
            if os.path.isdir(local):
                shutil.copytree(local, dest, dirs_exist_ok=True)
            else:
                os.makedirs(os.path.dirname(dest) or ".", exist_ok=True)
                shutil.copy2(local, dest)
            return
        bound = {"timeout": timeout} if timeout and isinstance(self.fs, AsyncFileSystem) else {}
        if os.path.isdir(local):
            self.fs.put(local.rstrip("/") + "/", dest, recursive=True, **bound)
        else:
            self.fs.put_file(local, dest, **bound)

    def download(self, local: str | Path, *parts: str) -> str:
        """Copy `<prefix>/<parts>` (file or folder) to `local`; returns the local path."""
        src = self.join(*parts)
        if not self.remote:
            return src
        local = str(local)
        if self.fs.isdir(src):
            os.makedirs(local, exist_ok=True)
            self.fs.get(src.rstrip("/") + "/", local.rstrip("/") + "/", recursive=True)
        else:
            self.fs.get_file(src, local)
        return local
