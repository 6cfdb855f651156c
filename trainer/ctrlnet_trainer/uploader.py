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
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import tenacity

from ctrlnet.errors import one_line
from ctrlnet.log import ALL_RANKS, get_logger
from ctrlnet_trainer.storage import Prefix, bounded_options

log = get_logger(__name__)

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
        uploaded: set[Path] = set()  # a retry resumes with the files not yet uploaded

        def upload_the_rest() -> None:
            for path in files:
                if path not in uploaded:
                    # A whole-file bound too: a store that never answers (e.g. to
                    # `Expect: 100-continue`) escapes the per-request read timeout.
                    bound = self.timeout_s + path.stat().st_size / MIN_RATE
                    rel = path.relative_to(upload.local).as_posix()
                    self.store.upload(path, upload.name, rel, timeout=bound)
                    uploaded.add(path)

        def retrying(state: tenacity.RetryCallState) -> None:
            upload.tries, upload.error = state.attempt_number, _describe(state.outcome.exception())
            log.warning(
                f"checkpoint {upload.name}: upload try {state.attempt_number}/{self.attempts} to "
                f"{self.store.url} failed ({upload.error}); retrying in {state.upcoming_sleep:g} s",
                extra=ALL_RANKS,  # each node uploads its own part
            )

        # Any failure of the store is retried (doubling waits from backoff_s, at most MAX_BACKOFF_S),
        # then the checkpoint is given up: it is never committed, training decides what follows.
        retry = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.attempts),
            wait=tenacity.wait_exponential(multiplier=self.backoff_s, max=MAX_BACKOFF_S),
            retry=tenacity.retry_if_exception_type(Exception),
            before_sleep=retrying,
            reraise=True,
        )
        try:
            retry(upload_the_rest)
            upload.ok = True
        except Exception as e:  # noqa: BLE001 - the last try's failure: give the checkpoint up
            upload.tries, upload.error = retry.statistics["attempt_number"], _describe(e)
            log.warning(
                f"checkpoint {upload.name}: upload to {self.store.url} failed "
                f"{upload.tries} times ({upload.error}); giving it up (not committed)",
                extra=ALL_RANKS,
            )
        finally:
            upload.tries = retry.statistics.get("attempt_number", upload.tries)  # the tries made, success or not
            upload.seconds = time.monotonic() - start
            shutil.rmtree(upload.local, ignore_errors=True)  # the staged copy is spent either way
            upload.finished.set()


def _describe(e: BaseException) -> str:
    return one_line(e, with_type=True)
