"""What the two sharded jobs share (`ctrlnet precompute`: cache/job.py; `ctrlnet prepare`:
prepare/job.py): a dataset's rows cut into consecutive shards, shard i done by process
i % WORLD_SIZE, each shard's record written after its file (a shard without a record is
unfinished), and rank 0 waiting for every record before it writes the manifest.

No process group is needed to split the work (torchrun's RANK / WORLD_SIZE say it), and rank 0's
progress counts every process's shards from the records in the store: a bar in a terminal, else
progress lines (ctrlnet.config.progress) that `ctrlnet status` reads.
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from ctrlnet.config.progress import format_line
from ctrlnet.log import get_logger
from ctrlnet_trainer.storage import Prefix

log = get_logger(__name__)

POLL_S = 2.0
"""How often rank 0 looks for the other processes' shards when no process group can wait for them."""

Shard = tuple[int, int, int]
"""(index, first row, rows)."""


@dataclass
class Ranks:
    rank: int
    world: int
    local_rank: int

    def mine(self, plan: Sequence[Shard]) -> list[Shard]:
        """This process's shards: no overlap, no gap across the processes."""
        return [s for s in plan if s[0] % self.world == self.rank]


def ranks() -> Ranks:
    """From torchrun's environment (1 process when it is not set)."""
    env = os.environ
    return Ranks(int(env.get("RANK", "0")), int(env.get("WORLD_SIZE", "1")), int(env.get("LOCAL_RANK", "0")))


def shard_plan(rows: int, shard_rows: int) -> list[Shard]:
    """(index, first row, rows) of every shard: consecutive, the last one possibly shorter."""
    return [(i, first, min(shard_rows, rows - first)) for i, first in enumerate(range(0, rows, shard_rows))]


def group_exists() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def wait_for_all(
    prefix: Prefix,
    folder: str,
    plan: Sequence[Shard],
    record_name: Callable[[int], str],
    complete: Callable[[Shard], dict | None],
    progress: Progress | None,
) -> list[dict]:
    """Every shard's record, once all exist: a barrier when a process group exists, else by looking
    at the store every POLL_S (the other processes are alive, or torchrun has stopped this one).
    One listing per look; the records are read once all are there. `complete(shard)`: its record
    when the shard is finished for this job's fingerprint, else None."""
    if group_exists():
        import torch.distributed as dist

        dist.barrier()
    while True:
        listed = set(prefix.listdir(folder))
        missing = sum(record_name(index) not in listed for index, _, _ in plan)
        if not missing:
            records = [complete(shard) for shard in plan]
            if all(records):
                return records
            missing = sum(r is None for r in records)  # a record of another layout: its process is redoing it
        if progress is not None:
            progress.waiting(missing)
        time.sleep(POLL_S)


class Progress:
    """Rank 0's account of all processes' work, counted from the records in the store (one listing
    per shard it finishes). `job`: the progress lines' job name (`ctrlnet status` shows rows/s for
    a precompute or prepare job); `output`: what the done line names as written."""

    def __init__(
        self,
        prefix: Prefix,
        folder: str,
        plan: Sequence[Shard],
        record_name: Callable[[int], str],
        *,
        rows: int,
        enabled: bool,
        job: str,
        output_key: str,
    ):
        self.prefix, self.folder, self.plan, self.record_name = prefix, folder, plan, record_name
        self.rows, self.enabled, self.job, self.output_key = rows, enabled, job, output_key
        self.start, self.done_here, self.said_waiting = time.monotonic(), 0, -1
        self.bar = None
        self.lines = enabled and not sys.stdout.isatty()
        if enabled and sys.stderr.isatty():
            from tqdm.auto import tqdm

            self.bar = tqdm(total=rows, initial=self._rows_done(), desc=f"{job} rows", dynamic_ncols=True)

    def _rows_done(self) -> int:
        listed = set(self.prefix.listdir(self.folder))
        return sum(n for index, _, n in self.plan if self.record_name(index) in listed)

    def shard_done(self, rows: int) -> None:
        if not self.enabled:
            return
        self.done_here += rows
        if self.bar:
            self.bar.update(rows)
        if self.lines:
            done = self._rows_done()
            # This process's rate times the processes: they work on shards of the same size.
            rate = self.done_here / max(time.monotonic() - self.start, 1e-9) * int(os.environ.get("WORLD_SIZE", "1"))
            line = format_line(
                "step",
                job=self.job,
                step=done,
                total=self.rows,
                samples_per_s=round(rate, 3),
                eta_s=round((self.rows - done) / max(rate, 1e-9)),
            )
            print(line, flush=True)

    def waiting(self, missing: int) -> None:
        if self.enabled and missing != self.said_waiting:
            log.info(
                f"waiting for {missing} shard(s) of the other processes (on several nodes, {self.output_key} must be "
                "storage they all write to: object storage or a shared volume)"
            )
            self.said_waiting = missing

    def finish(self, **fields) -> None:
        if self.bar:
            self.bar.update(self.rows - self.bar.n)
            self.bar.close()
        if self.lines:
            print(format_line("done", job=self.job, step=self.rows, total=self.rows, **fields), flush=True)
