"""Checkpoint uploads to object storage, in the background, so training goes on while they run.

The Checkpointer stages a checkpoint on local disk (fast), hands the folder to its node's
`Uploader`, and trains on. The Uploader copies the folder file by file in one background thread:
one upload in flight at a time (a new checkpoint waits for the previous upload: the queue holds
one), each request bounded by `checkpoint.upload_timeout_s`, a failed try retried after
`checkpoint.upload_backoff_s` (doubling, at most 60 s) up to `checkpoint.upload_attempts` tries,
resuming with the files not yet uploaded. It never commits: the Checkpointer writes COMMITTED
(and `latest`) only after every node's Uploader reported its part uploaded, and never for a
checkpoint whose upload failed. The staged copy is deleted once the upload is over, either way.
"""

from __future__ import annotations

import shutil
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from ctrlnet_trainer.storage import Prefix, bounded_options

MAX_BACKOFF_S = 60.0
MIN_RATE = 1 << 20
"""Bytes/s below which a file's upload counts as stalled (its bound: timeout + size / MIN_RATE)."""


@dataclass
class Upload:
    """One checkpoint folder on its way to the store; `finished` is set once it is over."""

    name: str
    local: Path
    ok: bool = False
    tries: int = 0
    error: str | None = None
    seconds: float = 0.0
    finished: threading.Event = field(default_factory=threading.Event)

    @property
    def done(self) -> bool:
        return self.finished.is_set()


class Uploader:
    """Uploads staged checkpoint folders into `store` (a remote prefix), one at a time, in a
    background thread, with bounded retries. `submit` starts one, `poll` looks, `wait` blocks."""

    def __init__(self, store: Prefix, *, attempts: int, backoff_s: float, timeout_s: float):
        # A private client whose requests give up after timeout_s with no retries of their own:
        # retrying is decided here, per file, with backoff the user configured.
        self.store = Prefix(store.url, bounded_options(store.url, timeout_s))
        self.attempts, self.backoff_s, self.timeout_s = attempts, backoff_s, timeout_s
        self.current: Upload | None = None
        self._thread: threading.Thread | None = None

    def submit(self, name: str, local: Path) -> Upload:
        """Upload the folder `local` to `<store>/<name>` in the background (after the previous upload)."""
        self.wait()
        upload = Upload(name, Path(local))
        self.current = upload
        # A daemon: a run that crashes must not hang on an upload; its checkpoint is simply not committed.
        self._thread = threading.Thread(target=self._run, args=(upload,), name=f"upload-{name}", daemon=True)
        self._thread.start()
        return upload

    def poll(self) -> Upload | None:
        return self.current

    def wait(self) -> Upload | None:
        """Block until the upload in flight (if any) is over; the last upload."""
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        return self.current

    def _run(self, upload: Upload) -> None:
        start = time.monotonic()
        files = sorted(p for p in upload.local.rglob("*") if p.is_file())
        uploaded: set[Path] = set()
        try:
            for attempt in range(1, self.attempts + 1):
                upload.tries = attempt
                try:
                    for path in files:
                        if path not in uploaded:
                            # A whole-file bound too: a store that never answers (e.g. to
                            # `Expect: 100-continue`) escapes the per-request read timeout.
                            bound = self.timeout_s + path.stat().st_size / MIN_RATE
                            rel = path.relative_to(upload.local).as_posix()
                            self.store.upload(path, upload.name, rel, timeout=bound)
                            uploaded.add(path)
                    upload.ok = True
                    return
                except Exception as e:  # any failure of the store: retry, then give the checkpoint up
                    upload.error = _describe(e)
                    if attempt == self.attempts:
                        _say(
                            f"warning: checkpoint {upload.name}: upload to {self.store.url} failed "
                            f"{attempt} times ({upload.error}); giving it up (not committed)"
                        )
                        return
                    wait = min(self.backoff_s * 2 ** (attempt - 1), MAX_BACKOFF_S)
                    _say(
                        f"warning: checkpoint {upload.name}: upload try {attempt}/{self.attempts} to "
                        f"{self.store.url} failed ({upload.error}); retrying in {wait:g} s"
                    )
                    time.sleep(wait)
        finally:
            upload.seconds = time.monotonic() - start
            shutil.rmtree(upload.local, ignore_errors=True)  # the staged copy is spent either way
            upload.finished.set()


def _describe(e: BaseException) -> str:
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:200]}" if lines else type(e).__name__


def _say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)
