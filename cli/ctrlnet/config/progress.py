"""The progress line: how a training pod tells `ctrlnet status` how far it got.

Rank 0 prints one line to stdout at every logging step and at every committed checkpoint:

    ctrlnet-progress {"event": "step", "step": 120, "total": 1000, "loss": 0.1234, ...}

A fixed prefix, then one JSON object (a stable contract, versioned by "v"):

    event          "step" (a logging step), "checkpoint" (a checkpoint was committed) or "done"
    step, total    optimizer steps done / to do
    loss           mean loss over the window since the previous "step" line
    samples_per_s  training throughput over that window (all processes together)
    step_s         mean seconds per optimizer step over that window ("step" events)
    data_wait_s    of which, mean seconds a step waited for its batch ("step" events)
    eta_s          seconds left at that throughput
    epoch          data epoch of the next batch
    checkpoint     URL of the newest committed checkpoint ("checkpoint" events; null before the first)
    time           UTC, ISO 8601

`ctrlnet status` reads the newest lines of the master pod's log. Both sides import this module,
so the format lives in one place.
"""

from __future__ import annotations

import json
import time
from typing import Any

PREFIX = "ctrlnet-progress "
VERSION = 1


def format_line(event: str, **fields: Any) -> str:
    record = {"v": VERSION, "event": event, **fields, "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    return PREFIX + json.dumps(record, separators=(",", ":"))


def parse_line(line: str) -> dict[str, Any] | None:
    """The record of a progress line (a log line may carry a timestamp or other prefix before it);
    None for any other line or a malformed one."""
    at = line.find(PREFIX)
    if at < 0:
        return None
    try:
        record = json.loads(line[at + len(PREFIX) :])
    except ValueError:
        return None
    return record if isinstance(record, dict) and "event" in record else None


def latest_progress(lines: list[str]) -> dict[str, Any] | None:
    """The newest step record, with the newest committed checkpoint folded in (None: no progress yet)."""
    step: dict[str, Any] | None = None
    checkpoint: str | None = None
    for line in lines:
        record = parse_line(line)
        if record is None:
            continue
        if record["event"] == "checkpoint":
            checkpoint = record.get("checkpoint") or checkpoint
        if record["event"] in ("step", "done") or step is None:
            step = {**(step or {}), **record}
    if step is not None and checkpoint is not None:
        step["checkpoint"] = checkpoint
    return step
