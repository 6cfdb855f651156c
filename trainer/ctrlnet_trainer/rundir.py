"""One output prefix = one run, and one rule for when an output is taken.

    free       no run.json: a run may start here (the folder or prefix must be empty or missing)
    taken      run.json (seed + config), written by `claim` once the run has checked its inputs
               (base loaded, data opened, checkpoint read) and is about to train its first step.
               Before that moment a run writes nothing into the output, so a run that fails on
               its inputs, at any point, leaves the output free.
    finished   FINISHED, written last by a run that completed (final step trained, controlnet/,
               samples and metrics written).

A taken output is continued only by resuming it (`checkpoint.resume`): an unfinished one from its
newest committed checkpoint, or from step 0 when it has none. Every run that claims the output
rewrites run.json with its own config (keeping `created` and the seed), so run.json always
describes what trained last. A finished output is never trained into again: a resume that would
retrain any of its steps (it has no checkpoint, or its newest is before its final step) is
refused, since it would overwrite controlnet/ and metrics.jsonl. It may only be extended: resumed
from a checkpoint of its own final step with a larger loop.max_steps (FINISHED is then removed
until the longer run ends). Resuming a finished run with the very config it finished with (a pod
of a job that is done, restarted) trains nothing and succeeds: `finished_as_configured`.
"""

from __future__ import annotations

import json
import time

from ctrlnet.config.contract import CHECKPOINTS_DIR, FINISHED, LATEST, RUN_FILE
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.storage import Prefix


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())


def read_run(output: Prefix) -> dict | None:
    return json.loads(output.read_text(RUN_FILE)) if output.exists(RUN_FILE) else None


def read_finished(output: Prefix) -> dict | None:
    return json.loads(output.read_text(FINISHED)) if output.exists(FINISHED) else None


def _comparable(config: dict) -> dict:
    """A run's config without checkpoint.resume (which a restarted pod always sets)."""
    return {**config, "checkpoint": {k: v for k, v in config.get("checkpoint", {}).items() if k != "resume"}}


def finished_as_configured(output: Prefix, cfg: TrainConfig) -> dict | None:
    """FINISHED's record when `output` holds a finished run with exactly this config and this run
    only asks to resume it: there is nothing to do (e.g. a pod of a completed job restarted)."""
    if cfg.checkpoint.resume != LATEST or not output.exists(FINISHED):
        return None
    run = read_run(output)
    if run is None or _comparable(run.get("config", {})) != _comparable(cfg.model_dump(mode="json")):
        return None
    return read_finished(output)


def check_owner(output: Prefix, cfg: TrainConfig, resume=None) -> dict | None:
    """The existing run's record when this run may continue it (None for a free output); raises
    when the output is taken. `resume`: the checkpoints.ResumePoint this run would continue from."""
    run = read_run(output)
    if run is None:
        if output.listdir():
            raise UserError(
                f"output {output.url} is not empty and holds no ctrlnet run: choose an empty or new --output"
            )
        return None
    finished = read_finished(output)
    if finished is None:
        if cfg.checkpoint.resume is None:
            raise UserError(
                f"output {output.url} holds another run (started {run.get('created', '?')}): "
                "continue it with --resume latest (checkpoint.resume=latest), or choose a new --output"
            )
        return run
    last = int(finished["step"])
    what = f"output {output.url} holds another run, finished at step {last} ({finished.get('finished', '?')})"
    own = output.url_of(CHECKPOINTS_DIR) + "/"
    if cfg.checkpoint.resume is None:
        raise UserError(
            f"{what}: a finished run is not trained into again (nor resumed with --resume); "
            f"choose a new --output{_branch_hint(output)}"
        )
    if resume is None:
        raise UserError(
            f"{what} and holds no checkpoint to continue from: resuming would train it again from step 0 and "
            f"overwrite its controlnet/ and metrics.jsonl; choose a new --output"
        )
    if cfg.loop.max_steps is not None and cfg.loop.max_steps <= last:
        raise UserError(f"{what}: nothing to train with loop.max_steps={cfg.loop.max_steps}; raise it to train further")
    if resume.step < last or not resume.url.startswith(own):
        redo = f"retrain steps {resume.step + 1}-{last}" if resume.step < last else "train into it"
        raise UserError(
            f"{what}: resuming from {resume.url} would {redo} and overwrite its controlnet/ and metrics.jsonl; "
            f"choose a new --output (with checkpoint.resume={resume.url} to branch from that checkpoint)"
        )
    return run  # resumes from its own final step: an extension, checked against loop.max_steps in claim


def _branch_hint(output: Prefix) -> str:
    from ctrlnet_trainer.checkpoints import committed_steps, step_dir_name

    store = Prefix(output.url_of(CHECKPOINTS_DIR))
    steps = committed_steps(store)
    if not steps:
        return ""
    return f" (to train on from its checkpoint: --resume {store.url_of(step_dir_name(steps[-1]))} into the new output)"


def claim(
    output: Prefix, cfg: TrainConfig, seed: int, previous: dict | None, *, start: int, total: int, is_main: bool
) -> None:
    """The run is about to train steps `start`+1..`total` into `output`: from here on the output
    is taken. Every rank checks; main writes run.json (this run's config; `created` and the seed
    of a run it continues are kept) and removes FINISHED when extending a finished run."""
    finished = read_finished(output) if previous is not None else None
    if finished is not None and total <= int(finished["step"]):
        raise UserError(
            f"output {output.url} holds a run that finished at step {finished['step']}: nothing to train with "
            f"{total} steps; raise loop.max_steps to train it further, or choose a new --output"
        )
    if not is_main:
        return
    write_run(output, cfg, seed, created=(previous or {}).get("created"))
    if finished is not None:
        output.remove(FINISHED)


def write_run(output: Prefix, cfg: TrainConfig, seed: int, created: str | None = None) -> None:
    now = _now()
    record = {"created": created or now, "started": now, "seed": seed, "config": cfg.model_dump(mode="json")}
    output.write_text(json.dumps(record, indent=2) + "\n", RUN_FILE)


def write_finished(output: Prefix, step: int, controlnet: str) -> None:
    """Mark the run complete (main process, after everything else is written)."""
    record = {"finished": _now(), "step": step, "controlnet": controlnet}
    output.write_text(json.dumps(record, indent=2) + "\n", FINISHED)
