"""One output prefix = one run. `run.json` records the seed and config; a second run into the
same prefix is refused unless it resumes, so nothing already written is overwritten."""

from __future__ import annotations

import json
import time

from ctrlnet.config.contract import RUN_FILE
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.storage import Prefix


def read_run(output: Prefix) -> dict | None:
    return json.loads(output.read_text(RUN_FILE)) if output.exists(RUN_FILE) else None


def check_owner(output: Prefix, cfg: TrainConfig) -> dict | None:
    """The existing run's record when we may continue it; raises when the output is taken."""
    run = read_run(output)
    resuming = cfg.checkpoint.resume is not None
    if run is not None and not resuming and output.listdir() == [RUN_FILE]:
        return None  # an earlier attempt stopped on bad input before writing anything: nothing to protect
    if run is not None and not resuming:
        raise UserError(
            f"output {output.url} holds another run (started {run.get('created', '?')}): "
            "continue it with --resume latest (checkpoint.resume=latest), or choose a new --output"
        )
    if run is None and output.listdir():
        raise UserError(f"output {output.url} is not empty and holds no ctrlnet run: choose an empty or new --output")
    return run


def write_run(output: Prefix, cfg: TrainConfig, seed: int) -> None:
    record = {
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "seed": seed,
        "config": cfg.model_dump(mode="json"),
    }
    output.write_text(json.dumps(record, indent=2) + "\n", RUN_FILE)
