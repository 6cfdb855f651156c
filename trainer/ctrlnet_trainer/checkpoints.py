"""Checkpoints under `<output>/checkpoints/`: the whole save/resume protocol, in one class.

    step-00000500/…                   accelerate state: optimizer, LR schedule, RNGs (+ DeepSpeed shards)
    step-00000500/controlnet/         the ControlNet in diffusers format (loads in stock diffusers)
    step-00000500/trainer_state.json  the loop's position: step, data position, seed, run shape
    step-00000500/COMMITTED           written last: a checkpoint without it does not exist
    latest                            pointer, updated only after COMMITTED

Saving a checkpoint: stage (every rank writes its part into the local copy), publish (each node's
local main uploads its node's files; a no-op for a folder), commit (main writes COMMITTED, then
`latest`), rotate (old committed checkpoints go only after a newer one is committed; COMMITTED is
deleted first, so a checkpoint is never half deleted and still committed). A crash at any point
leaves at worst an uncommitted folder, which resolve ignores and the next save of that step replaces.

Object storage: publishing runs in the background (uploader.Uploader: one upload in flight,
retried with backoff) while training goes on. Step N is committed only once every node's upload
of its part is over: while N is pending, each step every rank contributes "my node's upload is
still running / failed" to one all-reduce (ranks stay in lockstep, as every rank saved N at the
same step); when nothing is running, main commits N, or, if any node failed, nobody does and N is
given up. The next checkpoint, SIGTERM (exit 143) and the end of the run wait for the pending
upload first. A run stops (StorageError, exit 1) after `checkpoint.max_failed_uploads`
checkpoints in a row could not be uploaded; before that it trains on, its newest committed
checkpoint unchanged.

Resuming: resolve `latest` (or a path) to a committed checkpoint, read its trainer_state.json once,
check it fits this run before downloading anything (`ResumePoint.find`, which runs before the
Accelerator exists, because it may change the gradient accumulation), fetch, load.

Elastic resume: what a step trains on depends on the global batch only (processes x batch x
accumulation; data.GlobalBatchSampler), and every random draw on the example only (step.draw),
so a checkpoint written by 4 processes x batch 2 continues on 2 x 4, or on 8 x 1 with the
accumulation doubled, at the same sample: same data order, same examples per step, same noise,
same optimizer and LR state. What differs is floating-point summation order across processes
(weights agree to ~1e-6, not bitwise). Streamed data is sharded per process: same shape only.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch

from ctrlnet.config.contract import CHECKPOINTS_DIR, COMMITTED, LATEST, TRAINER_STATE
from ctrlnet.config.contract import FINAL_MODEL_DIR as CONTROLNET_DIR
from ctrlnet.config.train import CheckpointConfig, TrainConfig
from ctrlnet.errors import StorageError, UserError, one_line
from ctrlnet.log import get_logger
from ctrlnet_trainer import fs, optim, weights
from ctrlnet_trainer.accel import Ranks
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.uploader import Uploader

log = get_logger(__name__)

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


STATE_FORMAT = 2
"""trainer_state.json format: 2 = global data position (epoch, sample) and per-example draws."""


def committed_steps(store: Prefix) -> list[int]:
    steps = []
    for entry in store.listdir():
        m = _STEP_DIR.match(entry)
        if m and store.exists(entry, COMMITTED):
            steps.append(int(m.group(1)))
    return sorted(steps)


def resolve(store: Prefix, resume: str) -> str | None:
    """URL of the checkpoint to resume from, or None for `latest` when there is none yet."""
    if resume == LATEST:
        # The newest committed checkpoint, found by listing rather than read from the `latest`
        # pointer: a crash between a COMMITTED marker and the pointer update leaves the pointer one
        # checkpoint behind, and a pointer may name an uncommitted folder. Newest first, so this is
        # one listing and usually one marker check.
        for name in sorted((e for e in store.listdir() if _STEP_DIR.match(e)), reverse=True):
            if store.exists(name, COMMITTED):
                return store.url_of(name)
        return None
    checkpoint = Prefix(resume)
    if not checkpoint.exists(COMMITTED):
        raise UserError(
            f"checkpoint.resume {resume!r} is not a committed checkpoint (no {COMMITTED} marker): "
            "use `latest` or a checkpoints/step-N folder that has one"
        )
    return checkpoint.url


@dataclass(frozen=True)
class ResumePoint:
    """A committed checkpoint to continue from, the loop state saved with it, and the gradient
    accumulation this run must use to keep its global batch."""

    url: str
    state: dict
    accumulation: int

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def seed(self) -> int:
        return int(self.state["seed"])

    @classmethod
    def find(cls, output: Prefix, cfg: TrainConfig, world: int) -> ResumePoint | None:
        """The checkpoint `checkpoint.resume` names, checked against this run's shape; None for a
        fresh start (no resume asked, or `latest` before a restartable job's first checkpoint)."""
        resume = cfg.checkpoint.resume
        url = resolve(Prefix(output.url_of(CHECKPOINTS_DIR)), resume) if resume else None
        if url is None:
            return None
        url, state = readable_state(url, cfg.checkpoint.on_corrupt)
        if state.get("format") != STATE_FORMAT:
            raise UserError(
                f"checkpoint {url} was written by an older ctrlnet (trainer_state format "
                f"{state.get('format', 1)}, this one reads {STATE_FORMAT}): resume it with the version that wrote it"
            )
        return cls(url, state, _accumulation_for(url, state, cfg, world))


class Committed(NamedTuple):
    """A checkpoint just committed: its step and URL (None on processes other than main)."""

    step: int
    url: str | None


def previous_committed(url: str) -> str | None:
    """The newest committed checkpoint before the one at `url`, in the same checkpoints folder."""
    parent, _, name = url.rstrip("/").rpartition("/")
    m = _STEP_DIR.match(name)
    if not m:
        return None
    store = Prefix(parent)
    older = [s for s in committed_steps(store) if s < int(m.group(1))]
    return store.url_of(step_dir_name(older[-1])) if older else None


def corrupt(url: str, reason: str, on_corrupt: str) -> str:
    """The committed checkpoint to use instead of the unreadable one at `url` (on_corrupt=previous),
    or a UserError naming it and the ways forward."""
    fallback = previous_committed(url) if on_corrupt == "previous" else None
    if fallback is not None:
        log.warning(
            f"checkpoint {url} is unreadable ({reason}); resuming from the committed checkpoint "
            f"before it, {fallback} (checkpoint.on_corrupt=previous)"
        )
        return fallback
    if on_corrupt == "previous":
        raise UserError(f"checkpoint {url} is unreadable ({reason}) and no committed checkpoint precedes it")
    raise UserError(
        f"checkpoint {url} is unreadable ({reason}): set checkpoint.on_corrupt=previous to resume from the "
        "committed checkpoint before it, or checkpoint.resume to another checkpoint"
    )


def readable_state(url: str, on_corrupt: str) -> tuple[str, dict]:
    """(url, trainer_state) of the checkpoint at `url`, or of an earlier committed one when its
    state cannot be read and `on_corrupt` is `previous`."""
    while True:
        try:
            return url, json.loads(Prefix(url).read_text(TRAINER_STATE))
        except (OSError, ValueError) as e:  # missing, unreadable, or not JSON
            url = corrupt(url, f"{TRAINER_STATE}: {_reason(e)}", on_corrupt)


def _nonfinite_file(path: Path) -> str | None:
    """Why the checkpoint's ControlNet file is unusable (non-finite values: a torn or garbage
    save), or None. A missing file is left to the load, which names it."""
    if not path.exists():
        return None
    try:
        bad = weights.nonfinite_in_file(path)
    except Exception as e:
        return _reason(e)
    return f"its ControlNet holds non-finite values ({weights.names(bad)})" if bad else None


def _reason(e: BaseException) -> str:
    return one_line(e, limit=160, with_type=True)


def _accumulation_for(url: str, state: dict, cfg: TrainConfig, world: int) -> int:
    """This run's gradient accumulation: the configured one if it keeps the checkpoint's global
    batch, else the one that does (an elastic restart on more or fewer processes), else refuse."""
    saved_world, saved_batch, saved_accum = (
        state["world_size"],
        state["batch_size"],
        state["gradient_accumulation_steps"],
    )
    global_batch = saved_world * saved_batch * saved_accum
    batch, accum = cfg.loop.batch_size, cfg.loop.gradient_accumulation_steps
    was = f"{saved_world} processes x batch {saved_batch} x accumulation {saved_accum}"
    if cfg.data.streaming and (world, batch) != (saved_world, saved_batch):
        raise UserError(
            f"checkpoint {url} was written with {was}; this run has {world} x {batch}: a streamed dataset is "
            "sharded per process, so resume it with the same processes and loop.batch_size"
        )
    if world * batch * accum == global_batch:
        return accum
    if global_batch % (world * batch) == 0:
        adjusted = global_batch // (world * batch)
        log.info(
            f"note: resuming {url} ({was} = global batch {global_batch}) on {world} processes x batch {batch}: "
            f"gradient accumulation {adjusted} keeps the global batch"
        )
        return adjusted
    raise UserError(
        f"checkpoint {url} was written with {was} (global batch {global_batch}); {world} processes x batch "
        f"{batch} cannot make that global batch: choose loop.batch_size so that {world} x batch divides {global_batch}"
    )


class Checkpointer:
    """Owns every file under checkpoints/. The Trainer tells it what to save (`track`), when
    (`maybe_save`), and gets the saved loop state back from `restore`."""

    def __init__(self, output: Prefix, accelerator, ranks: Ranks, cfg: CheckpointConfig, sharded: bool):
        self.store = Prefix(output.url_of(CHECKPOINTS_DIR))
        # `sharded`: DeepSpeed ZeRO-3, whose weights each rank holds a shard of.
        self.acc, self.ranks, self.cfg, self.sharded = accelerator, ranks, cfg, sharded
        # One writer per copy of the files: every node stages its own copy of a bucket's
        # checkpoint; a folder is one copy shared by all nodes.
        self.stager = ranks.is_local_main if self.store.staged else ranks.is_main
        self.model: torch.nn.Module | None = None
        self.loop_state: Callable[[], dict] | None = None
        # Object storage: each node's stager uploads in the background; `pending` is the step
        # staged and uploading but not yet committed (the same on every rank).
        self.uploader = None
        if self.store.staged and self.stager:
            self.uploader = Uploader(
                self.store, attempts=cfg.upload_attempts, backoff_s=cfg.upload_backoff_s, timeout_s=cfg.upload_timeout_s
            )
            shutil.rmtree(self.store.local(), ignore_errors=True)  # stages left by a killed attempt
        self.pending: int | None = None
        self.failed_in_a_row = 0
        self.last_error: str | None = None

    # ------------------------------------------------------------ what exists
    def committed_steps(self) -> list[int]:
        return committed_steps(self.store)

    def resolve(self, resume: str) -> str | None:
        return resolve(self.store, resume)

    # ------------------------------------------------------------ what is saved
    def track(self, model: torch.nn.Module, loop_state: Callable[[], dict]) -> None:
        """Save `model` (accelerate-prepared) in diffusers format and `loop_state()` (JSON) with
        every checkpoint; the optimizer and LR schedule come with accelerate's state."""
        self.model, self.loop_state = model, loop_state
        acc = self.acc

        def save_hook(models, state_dicts, output_dir):
            state_dicts.clear()  # save() writes the ControlNet, gathered and checked: accelerate must not

        def load_hook(models, input_dir):
            while models:
                m = acc.unwrap_model(models.pop())
                loaded = type(m).from_pretrained(Path(input_dir) / CONTROLNET_DIR)  # the family's ControlNet class
                m.load_state_dict(loaded.state_dict())

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    # ------------------------------------------------------------ saving
    def maybe_save(self, step: int, stop: bool) -> Committed | None:
        """After every step (collective): commit the pending upload if it is over; checkpoint
        every `checkpoint.every_steps`, and when the run must stop (SIGTERM: then wait for its
        upload). Returns the newest checkpoint committed during this call."""
        committed = self.settle(wait=False)
        if step % self.cfg.every_steps == 0 or stop:
            committed = self.save(step) or committed
            if stop:  # preempted: wait for this upload; exit 143 (retryable) whatever its fate
                committed = self.settle(wait=True, may_stop=False) or committed
        return committed

    def flush(self) -> Committed | None:
        """Wait for the pending upload and commit it (collective; at the end of a run)."""
        return self.settle(wait=True, may_stop=False)

    def save(self, step: int) -> Committed | None:
        """Stage `step` and publish it (collective: every rank calls it): to a folder, published
        and committed at once; to object storage, uploaded in the background and committed by a
        later `settle`. Returns what was committed during this call."""
        committed = self.settle(wait=True)  # one upload in flight: the previous checkpoint's first
        acc, name = self.acc, step_dir_name(step)
        folder = self.store.local(name)
        if self.ranks.is_main and self.store.exists(name):
            self._discard(name)  # an earlier attempt at this step (a crash, a corrupt checkpoint): start clean
        if self.stager and self.store.staged and folder.exists():
            shutil.rmtree(folder)
        acc.wait_for_everyone()
        error = None
        try:
            folder.mkdir(parents=True, exist_ok=True)
            acc.save_state(str(folder))  # every rank: DeepSpeed saves its shards collectively
        except Exception as e:
            error = self._write_error(e, folder)
        error = self._agreed(error, "another process could not write its part")
        if error is None:
            # Collective; a copy equal to the live model and finite, or IntegrityError (nothing committed).
            state_dict = weights.gather(acc, self.model, is_main=self.ranks.is_main, sharded=self.sharded)
            if self.ranks.is_main:
                try:
                    weights.write(acc.unwrap_model(self.model), folder / CONTROLNET_DIR, state_dict)
                    state = {"format": STATE_FORMAT, **self.loop_state()}
                    (folder / TRAINER_STATE).write_text(json.dumps(state, indent=2) + "\n")
                except Exception as e:
                    error = self._write_error(e, folder)
            error = self._agreed(error, "the main process could not write the checkpoint")
        if error is not None:  # nothing committed: the partial folder goes (it may hold the space needed)
            if self.stager:
                shutil.rmtree(folder, ignore_errors=True)
            done = self.committed_steps()
            if done:
                last = f"the last committed checkpoint, {self.store.url_of(step_dir_name(done[-1]))}, is intact"
                then = f"{last}: continue from it with --resume latest"
            else:
                then = "no checkpoint was committed before it: start the run again"
            raise StorageError(f"checkpoint {name} could not be written ({error}); nothing of it was committed, {then}")
        acc.wait_for_everyone()
        if not self.store.staged:  # a folder: the staged files are the checkpoint
            url = self.commit(step) if self.ranks.is_main else None
            acc.wait_for_everyone()
            return Committed(step, url)
        if self.uploader is not None:
            self.uploader.submit(name, folder)
        self.pending = step
        return committed

    @staticmethod
    def _write_error(error: Exception, folder: Path) -> str:
        """Why writing into `folder` failed, as one line; `error` itself when it is not a write error."""
        code = fs.os_errno(error)
        if code is None:  # torch.save's writer carries no errno ("iostream error", "unexpected pos")
            try:
                full = shutil.disk_usage(folder if folder.exists() else folder.parent).free < 1 << 20
            except OSError:
                full = False
            if full:
                code = errno.ENOSPC
            elif isinstance(error, RuntimeError):
                return f"{folder}: {one_line(error)}"
            else:
                raise error
        return fs.error_line(OSError(code, os.strerror(code)), folder)

    def settle(self, wait: bool, may_stop: bool = True) -> Committed | None:
        """Commit the pending checkpoint once every node's upload of it is over (collective);
        `wait`: block until then. A checkpoint that any node failed to upload is never committed;
        `checkpoint.max_failed_uploads` of those in a row stop the run (if `may_stop`: not at its
        end, where the final model is still worth writing, nor when preempted)."""
        if self.pending is None:
            return None
        upload = None
        if self.uploader is not None:
            upload = self.uploader.wait() if wait else self.uploader.poll()
        running = float(upload is not None and not upload.done)
        failed = float(upload is not None and upload.done and not upload.ok)
        if self.ranks.world > 1:
            from ctrlnet_trainer.accel import all_reduce

            flags = all_reduce(torch.tensor([running, failed], device=self.acc.device)).tolist()
            running, failed = flags
        if running:
            return None
        step, self.pending = self.pending, None
        if not failed:
            self.failed_in_a_row = 0
            return Committed(step, self.commit(step) if self.ranks.is_main else None)
        self.failed_in_a_row += 1
        self.last_error = (upload.error if upload is not None else None) or "another node's upload failed: see its log"
        stopping = may_stop and self.failed_in_a_row >= self.cfg.max_failed_uploads
        if self.ranks.is_main:
            try:
                self._discard(step_dir_name(step))  # the uploaded part, if the store lets us
            except Exception:
                pass  # uncommitted, so ignored by resume; the next save of this step replaces it
            if not may_stop:
                then = "the newest committed checkpoint stays the one to resume from"
            elif stopping:
                then = "stopping"
            else:
                then = f"training goes on ({self.failed_in_a_row} of checkpoint.max_failed_uploads={self.cfg.max_failed_uploads} in a row)"
            log.warning(
                f"checkpoint {step_dir_name(step)} could not be uploaded to {self.store.url} "
                f"({self.last_error}): not committed; {then}"
            )
        if stopping:
            raise StorageError(
                f"{self.failed_in_a_row} checkpoints in a row could not be uploaded to {self.store.url} "
                f"(last: {self.last_error}): stopping (checkpoint.max_failed_uploads={self.cfg.max_failed_uploads}); "
                "fix the store (AWS_ENDPOINT_URL, credentials, quota) and continue with --resume latest"
            )
        return None

    def commit(self, step: int) -> str:
        """Mark `step` complete, point `latest` at it, then rotate. Main process only."""
        name = step_dir_name(step)
        self.store.write_text(f"step {step}\n", name, COMMITTED)
        self.store.write_text(name + "\n", LATEST)
        if self.cfg.total_limit is not None:
            for old in self.committed_steps()[: -self.cfg.total_limit]:
                self._discard(step_dir_name(old))
        return self.store.url_of(name)

    def _discard(self, name: str) -> None:
        """Delete checkpoint folder `name`: its COMMITTED marker first, so that a crash midway
        leaves an uncommitted folder, never a committed checkpoint with files missing."""
        if self.store.exists(name, COMMITTED):
            self.store.remove(name, COMMITTED)
        self.store.remove(name)

    # ------------------------------------------------------------ resuming
    def restore(self, point: ResumePoint) -> dict:
        """Load `point` into the tracked model, optimizer and schedule (collective); returns its
        loop state (step, data position, ...). A checkpoint that cannot be loaded is named, and
        replaced by the committed one before it if `checkpoint.on_corrupt` is `previous`."""
        url, state = point.url, point.state
        while True:
            error = self._load(url)
            if error is None:
                break
            # Every rank tried; all move on together (the fallback loads everything again, so a
            # partial load is overwritten) or all stop with the same line.
            url = corrupt(url, error, self.cfg.on_corrupt)
            url, fallback = readable_state(url, self.cfg.on_corrupt)
            shape = ("format", "world_size", "batch_size", "gradient_accumulation_steps")
            if any(fallback.get(k) != state.get(k) for k in shape):
                raise UserError(
                    f"checkpoint {url} was written by another run shape than {point.url}: resume it explicitly "
                    "with checkpoint.resume"
                )
            state = fallback
        log.info(f"resuming from {url} at step {state['step']}")
        return state

    def _load(self, url: str) -> str | None:
        """Fetch, check and load the checkpoint at `url` on every rank; why it failed on any rank,
        or None. Refused: a ControlNet file or loaded weights with non-finite values (a torn save)."""
        error, checkpoint = None, Prefix(url)
        folder = checkpoint.local()
        if self.ranks.is_local_main:  # one copy per node
            try:
                folder = checkpoint.fetch()
            except Exception as e:
                error = _reason(e)
            if error is None:
                error = _nonfinite_file(folder / CONTROLNET_DIR / weights.WEIGHTS_FILE)
        error = self._agreed(error, "another node could not fetch or read its copy")
        if error is None:
            try:
                self.acc.load_state(str(folder))
            except Exception as e:  # damaged weights, optimizer or RNG state: name it, no traceback
                error = _reason(e)
            if error is None:  # what was loaded, on every rank (under ZeRO-3: this rank's shards)
                bad = weights.nonfinite_local(self.model, self.acc)
                error = f"it loaded non-finite weights ({weights.names(bad)})" if bad else None
            error = self._agreed(error, "another process could not load its part")
        if error is None:
            optim.replay_cpu_adam_steps(self.acc)
        return error

    def _agreed(self, error: str | None, elsewhere: str) -> str | None:
        """`error`, or `elsewhere` if another rank had one: every rank takes the same branch next."""
        self.acc.wait_for_everyone()
        if self.ranks.world > 1:
            from ctrlnet_trainer.accel import all_reduce

            failed = all_reduce(torch.tensor([float(error is not None)], device=self.acc.device)).item()
            if failed and error is None:
                return elsewhere
        return error
