"""Checkpoints under `<output>/checkpoints/`, with a commit protocol that survives crashes.

    step-00000500/…          accelerate state + controlnet/ + trainer_state.json
    step-00000500/COMMITTED  written last: a checkpoint without it does not exist
    latest                   pointer, updated only after COMMITTED

Rotation removes the oldest committed checkpoints only after a newer one is committed.
"""

from __future__ import annotations

import re
import shutil
from pathlib import Path

from ctrlnet.errors import UserError
from ctrlnet_trainer.storage import Prefix

COMMITTED = "COMMITTED"
LATEST = "latest"
_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


class CheckpointStore:
    def __init__(self, output: Prefix, work_dir: Path):
        self.prefix = Prefix(output.url_of("checkpoints"))
        # Where accelerate writes before upload; the run's own folder when the output is local.
        self.local_root = Path(self.prefix.root) if not output.remote else Path(work_dir) / "checkpoints"

    def staging_dir(self, step: int) -> Path:
        return self.local_root / step_dir_name(step)

    def clear_staging(self, step: int) -> Path:
        """An empty folder to save `step` into (a crashed, uncommitted attempt is discarded)."""
        path = self.staging_dir(step)
        if path.exists():
            shutil.rmtree(path)
        path.mkdir(parents=True)
        return path

    def upload(self, step: int) -> None:
        """Copy this node's staged files to the prefix (no-op for a local output)."""
        if self.prefix.remote:
            self.prefix.upload(self.staging_dir(step), step_dir_name(step))

    def commit(self, step: int, total_limit: int | None) -> str:
        """Mark `step` complete, point `latest` at it, then rotate. Call on the main process only."""
        name = step_dir_name(step)
        self.prefix.write_text(f"step {step}\n", name, COMMITTED)
        self.prefix.write_text(name + "\n", LATEST)
        if self.prefix.remote:
            shutil.rmtree(self.staging_dir(step), ignore_errors=True)
        if total_limit is not None:
            for old in self.committed_steps()[:-total_limit]:
                self.prefix.remove(step_dir_name(old))
        return self.prefix.url_of(name)

    def committed_steps(self) -> list[int]:
        steps = []
        for entry in self.prefix.listdir():
            m = _STEP_DIR.match(entry)
            if m and self.prefix.exists(entry, COMMITTED):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def resolve(self, resume: str) -> str | None:
        """URL of the checkpoint to resume from, or None for `latest` when there is none yet."""
        if resume == LATEST:
            if self.prefix.exists(LATEST):
                name = self.prefix.read_text(LATEST).strip()
                if self.prefix.exists(name, COMMITTED):
                    return self.prefix.url_of(name)
            # The pointer is missing or names an uncommitted folder: fall back to the newest commit.
            steps = self.committed_steps()
            return self.prefix.url_of(step_dir_name(steps[-1])) if steps else None
        ckpt = Prefix(resume)
        if not ckpt.exists(COMMITTED):
            raise UserError(
                f"checkpoint.resume {resume!r} is not a committed checkpoint (no {COMMITTED} marker): "
                "use `latest` or a checkpoints/step-N folder that has one"
            )
        return ckpt.url
