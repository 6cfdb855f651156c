"""Checkpoints under `<output>/checkpoints/`: the whole save/resume protocol, in one class.

    step-00000500/…                   accelerate state: optimizer, LR schedule, RNGs (+ DeepSpeed shards)
    step-00000500/controlnet/         the ControlNet in diffusers format (loads in stock diffusers)
    step-00000500/noise_rng_<rank>.pt each rank's noise/timestep generator
    step-00000500/trainer_state.json  the loop's position: step, data position, seed, run shape
    step-00000500/COMMITTED           written last: a checkpoint without it does not exist
    latest                            pointer, updated only after COMMITTED

Saving a checkpoint: stage (every rank writes its part into the local copy), publish (each node's
local main uploads its node's files; a no-op for a folder), commit (main writes COMMITTED, then
`latest`), rotate (old committed checkpoints go only after a newer one is committed). A crash at
any point leaves at worst an uncommitted folder, which resolve ignores and the next save of that
step replaces.

Resuming: resolve `latest` (or a path) to a committed checkpoint, read its trainer_state.json once,
refuse a checkpoint of another run shape before downloading anything, fetch, load.
"""

from __future__ import annotations

import json
import re
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ctrlnet.config.contract import CHECKPOINTS_DIR, COMMITTED, LATEST, TRAINER_STATE
from ctrlnet.config.contract import FINAL_MODEL_DIR as CONTROLNET_DIR
from ctrlnet.config.train import CheckpointConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.accel import Ranks
from ctrlnet_trainer.storage import Prefix

_STEP_DIR = re.compile(r"^step-(\d{8})$")


def step_dir_name(step: int) -> str:
    return f"step-{step:08d}"


def _noise_file(rank: int) -> str:
    return f"noise_rng_{rank}.pt"


@dataclass(frozen=True)
class ResumePoint:
    """A committed checkpoint to continue from, and the loop state saved with it."""

    url: str
    state: dict

    @property
    def step(self) -> int:
        return int(self.state["step"])

    @property
    def seed(self) -> int:
        return int(self.state["seed"])


class Checkpointer:
    """Owns every file under checkpoints/. The Trainer tells it what to save (`track`), when
    (`maybe_save`), and gets the saved loop state back from `restore`."""

    def __init__(self, output: Prefix, accelerator, ranks: Ranks, cfg: CheckpointConfig, deepspeed: bool):
        self.store = Prefix(output.url_of(CHECKPOINTS_DIR))
        self.acc, self.ranks, self.cfg, self.deepspeed = accelerator, ranks, cfg, deepspeed
        # One writer per copy of the files: every node stages its own copy of a bucket's
        # checkpoint; a folder is one copy shared by all nodes.
        self.stager = ranks.is_local_main if self.store.staged else ranks.is_main
        self.model: torch.nn.Module | None = None
        self.noise: torch.Generator | None = None
        self.loop_state: Callable[[], dict] | None = None

    # ------------------------------------------------------------ what exists
    def committed_steps(self) -> list[int]:
        steps = []
        for entry in self.store.listdir():
            m = _STEP_DIR.match(entry)
            if m and self.store.exists(entry, COMMITTED):
                steps.append(int(m.group(1)))
        return sorted(steps)

    def resolve(self, resume: str) -> str | None:
        """URL of the checkpoint to resume from, or None for `latest` when there is none yet."""
        if resume == LATEST:
            if self.store.exists(LATEST):
                name = self.store.read_text(LATEST).strip()
                if self.store.exists(name, COMMITTED):
                    return self.store.url_of(name)
            # The pointer is missing or names an uncommitted folder: fall back to the newest commit.
            steps = self.committed_steps()
            return self.store.url_of(step_dir_name(steps[-1])) if steps else None
        checkpoint = Prefix(resume)
        if not checkpoint.exists(COMMITTED):
            raise UserError(
                f"checkpoint.resume {resume!r} is not a committed checkpoint (no {COMMITTED} marker): "
                "use `latest` or a checkpoints/step-N folder that has one"
            )
        return checkpoint.url

    def find(self, resume: str | None, *, world: int, batch_size: int) -> ResumePoint | None:
        """The checkpoint `checkpoint.resume` names, checked against this run's shape; None for a
        fresh start (no resume asked, or `latest` before the first checkpoint of a restartable job)."""
        url = self.resolve(resume) if resume else None
        if url is None:
            return None
        state = json.loads(Prefix(url).read_text(TRAINER_STATE))
        # The data order is a function of (world size, batch size): another shape cannot continue
        # at "the same batch", so refuse rather than silently train on a different stream.
        saved = (state.get("world_size"), state.get("batch_size"))
        if saved != (world, batch_size):
            raise UserError(
                f"checkpoint {url} was written with {saved[0]} processes x batch {saved[1]}; this run has "
                f"{world} x {batch_size}: resume with the same processes and loop.batch_size"
            )
        return ResumePoint(url, state)

    # ------------------------------------------------------------ what is saved
    def track(self, model: torch.nn.Module, noise: torch.Generator, loop_state: Callable[[], dict]) -> None:
        """Save `model` (accelerate-prepared) in diffusers format, this rank's `noise` generator,
        and `loop_state()` (JSON) with every checkpoint; the optimizer and LR schedule come with
        accelerate's state."""
        self.model, self.noise, self.loop_state = model, noise, loop_state
        acc = self.acc

        def save_hook(models, weights, output_dir):
            if self.ranks.is_main:
                for m in models:
                    acc.unwrap_model(m).save_pretrained(Path(output_dir) / CONTROLNET_DIR, safe_serialization=True)
            weights.clear()  # saved above: accelerate must not write them again

        def load_hook(models, input_dir):
            from diffusers import ControlNetModel

            while models:
                m = models.pop()
                loaded = ControlNetModel.from_pretrained(Path(input_dir) / CONTROLNET_DIR)
                acc.unwrap_model(m).load_state_dict(loaded.state_dict())

        acc.register_save_state_pre_hook(save_hook)
        acc.register_load_state_pre_hook(load_hook)

    # ------------------------------------------------------------ saving
    def maybe_save(self, step: int, stop: bool) -> str | None:
        """Checkpoint every `checkpoint.every_steps`, and when the run must stop (SIGTERM)."""
        if step % self.cfg.every_steps == 0 or stop:
            return self.save(step)
        return None

    def save(self, step: int) -> str | None:
        """Stage, publish and commit `step` (collective: every rank calls it). Returns the
        checkpoint's URL on the main process, None elsewhere."""
        acc, name = self.acc, step_dir_name(step)
        folder = self.store.local(name)
        if self.stager and folder.exists():
            shutil.rmtree(folder)  # an uncommitted attempt at this step (a crash): start clean
        acc.wait_for_everyone()
        folder.mkdir(parents=True, exist_ok=True)
        acc.save_state(str(folder))  # every rank: DeepSpeed saves its shards collectively
        torch.save(self.noise.get_state(), folder / _noise_file(self.ranks.rank))
        if self.deepspeed:
            state_dict = acc.get_state_dict(self.model)  # collective: gathers the weights
            if self.ranks.is_main:
                acc.unwrap_model(self.model).save_pretrained(folder / CONTROLNET_DIR, state_dict=state_dict)
        if self.ranks.is_main:
            (folder / TRAINER_STATE).write_text(json.dumps(self.loop_state(), indent=2) + "\n")
        acc.wait_for_everyone()
        if self.stager:
            self.store.publish(name)
        acc.wait_for_everyone()
        url = self.commit(step) if self.ranks.is_main else None
        acc.wait_for_everyone()
        if self.stager:
            self.store.drop_local(name)  # published and committed: each node's stage is spent
        return url

    def commit(self, step: int) -> str:
        """Mark `step` complete, point `latest` at it, then rotate. Main process only."""
        name = step_dir_name(step)
        self.store.write_text(f"step {step}\n", name, COMMITTED)
        self.store.write_text(name + "\n", LATEST)
        if self.cfg.total_limit is not None:
            for old in self.committed_steps()[: -self.cfg.total_limit]:
                self.store.remove(step_dir_name(old))
        return self.store.url_of(name)

    # ------------------------------------------------------------ resuming
    def restore(self, point: ResumePoint) -> dict:
        """Load `point` into the tracked model, optimizer, schedule and noise generator (collective);
        returns its loop state (step, data position, ...)."""
        checkpoint = Prefix(point.url)
        folder = checkpoint.fetch() if self.ranks.is_local_main else checkpoint.local()  # one copy per node
        self.acc.wait_for_everyone()
        self.acc.load_state(str(folder))
        self.noise.set_state(torch.load(folder / _noise_file(self.ranks.rank)))
        if self.ranks.is_main:
            print(f"resuming from {point.url} at step {point.step}", flush=True)
        return point.state
