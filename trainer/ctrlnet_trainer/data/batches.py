"""Examples -> batches, resumably: batch order is a pure function of (seed, epoch, rank), so a
resumed run continues at the exact batch where it stopped without reading the batches before it.
Map-style data through DataLoader workers (MapBatches), streamed data per rank (StreamingBatches)."""

from __future__ import annotations

import itertools
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from ctrlnet.errors import UserError
from ctrlnet_trainer.data.sources import Source
from ctrlnet_trainer.data.transforms import BAD_ROWS, BadRow, Examples
from ctrlnet_trainer.seeds import epoch_order_seed, row_rng


def collate(examples: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Stack the examples; unreadable ones (BadRow) are left out and listed under BAD_ROWS."""
    good = [e for e in examples if not isinstance(e, BadRow)]
    batch = {k: torch.stack([e[k] for e in good]).contiguous() for k in good[0]} if good else {}
    if len(good) < len(examples):
        batch[BAD_ROWS] = [e.description for e in examples if isinstance(e, BadRow)]
    return batch


@dataclass
class Position:
    """Where the data stands: the epoch, and how many examples of it all processes together have
    consumed. Global, so a run can resume on another number of processes (map-style data)."""

    epoch: int = 0
    sample: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "sample": self.sample}


class GlobalBatchSampler:
    """Per epoch, a seeded permutation of the rows cut into global batches of
    world x batch_size x accumulation rows (the last partial one dropped). Within a global batch,
    micro-batch `a` of rank `r` is the slice starting at (a x world + r) x batch_size. So the rows
    of every optimizer step, and the epoch's order, depend on the global batch only: the same
    run on 4 x 2 or on 2 x 4 trains on the same rows in the same steps."""

    def __init__(self, n: int, batch_size: int, accumulation: int, rank: int, world: int, seed: int, start: Position):
        self.n, self.batch_size, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.accumulation = accumulation
        self.global_batch = batch_size * world * accumulation
        self.steps_per_epoch = n // self.global_batch
        if self.steps_per_epoch == 0:
            raise UserError(
                f"the dataset has {n} rows, fewer than one optimizer step's worth ({world} processes x batch "
                f"{batch_size} x accumulation {accumulation} = {self.global_batch}): lower loop.batch_size or add data"
            )
        if start.sample % self.global_batch:
            raise ValueError(f"position {start} is not at a global batch boundary of {self.global_batch}")
        self.start = start

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        b = self.batch_size
        for epoch in itertools.count(self.start.epoch):
            order = torch.randperm(
                self.n, generator=torch.Generator().manual_seed(epoch_order_seed(self.seed, epoch))
            ).tolist()
            first = self.start.sample // self.global_batch if epoch == self.start.epoch else 0
            for step in range(first, self.steps_per_epoch):
                for micro in range(self.accumulation):
                    at = step * self.global_batch + (micro * self.world + self.rank) * b
                    yield [(i, epoch) for i in order[at : at + b]]


class MapBatches:
    """Resumable batches from a map-style source, loaded by DataLoader workers."""

    def __init__(
        self,
        examples: Examples,
        batch_size: int,
        accumulation: int,
        rank: int,
        world: int,
        seed: int,
        num_workers: int,
        start: Position,
        pin_memory: bool,
    ):
        self.sampler = GlobalBatchSampler(len(examples), batch_size, accumulation, rank, world, seed, start)
        self.consumed_per_micro_batch = batch_size * world  # every rank takes one in lockstep
        self.position = Position(start.epoch, start.sample)
        self.loader = torch.utils.data.DataLoader(
            examples,
            batch_sampler=self.sampler,
            collate_fn=collate,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=False,
        )

    @property
    def steps_per_epoch(self) -> int:
        return self.sampler.steps_per_epoch

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        usable = self.sampler.steps_per_epoch * self.sampler.global_batch
        for batch in self.loader:
            # Advance before yielding: a checkpoint taken after this batch's step resumes at the next one.
            self.position.sample += self.consumed_per_micro_batch
            if self.position.sample == usable:
                self.position = Position(self.position.epoch + 1, 0)
            yield batch


class StreamingBatches:
    """Batches from a streaming dataset: each rank reads its own shard of the stream, so a streamed
    run resumes on the same number of processes only. The position counts all ranks' examples; a
    resume skips this rank's share (sample / world rows of its shard). Rows are read here, in
    order; decoding and transforms run in `num_workers` processes, a few batches ahead."""

    def __init__(
        self,
        source: Source,
        examples: Examples,
        batch_size: int,
        rank: int,
        world: int,
        seed: int,
        shuffle_buffer: int,
        start: Position,
        num_workers: int = 0,
    ):
        from datasets.distributed import split_dataset_by_node

        rows = source.rows.shuffle(seed=seed, buffer_size=shuffle_buffer)
        self.rows = split_dataset_by_node(rows, rank=rank, world_size=world)
        self.examples, self.batch_size, self.seed = examples, batch_size, seed
        self.rank, self.world, self.num_workers = rank, world, num_workers
        self.position = Position(start.epoch, start.sample)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        encoder = _RowEncoder(self.examples, self.num_workers)
        ahead = max(1, 2 * self.num_workers)  # batches being decoded while the current one trains
        try:
            while True:
                epoch, skip = self.position.epoch, self.position.sample // self.world
                self.rows.set_epoch(epoch)
                rows = itertools.islice(iter(self.rows), skip, None)
                pending: deque = deque()
                read = skip  # this rank's rows handed to the encoder so far
                produced = False
                for chunk in _chunks(rows, self.batch_size):
                    if len(chunk) < self.batch_size:
                        break
                    # Index: this rank's row number, interleaved across ranks so ids never collide.
                    jobs = [(row, epoch, read + j, (read + j) * self.world + self.rank) for j, row in enumerate(chunk)]
                    pending.append(encoder.submit(jobs))
                    read += len(chunk)
                    if len(pending) > ahead:
                        produced = True
                        yield self._consumed(pending.popleft())
                while pending:
                    produced = True
                    yield self._consumed(pending.popleft())
                if not produced and skip == 0:
                    raise UserError(
                        "the streaming dataset yielded less than one batch: lower loop.batch_size or add data"
                    )
                self.position = Position(epoch + 1, 0)
        finally:
            encoder.close()

    def _consumed(self, result) -> dict[str, torch.Tensor]:
        batch = collate(result())
        # Advance when the batch is handed out (not when prefetched): a checkpoint resumes after it.
        self.position.sample += self.batch_size * self.world
        return batch


class _RowEncoder:
    """Rows -> examples, inline or in worker processes, results in submission order."""

    def __init__(self, examples: Examples, workers: int):
        self.examples, self.pool = examples, None
        if workers > 0:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(
                workers,
                mp_context=multiprocessing.get_context("fork"),
                initializer=_set_worker_examples,
                initargs=(examples,),
            )

    def submit(self, jobs: list[tuple]):
        """A callable returning the jobs' examples (waiting for the workers when there are some)."""
        if self.pool is None:
            done = [_encode_row(self.examples, *job) for job in jobs]
            return lambda: done
        futures = [self.pool.submit(_encode_in_worker, job) for job in jobs]
        return lambda: [f.result() for f in futures]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=False, cancel_futures=True)


def _encode_row(examples: Examples, row: dict[str, Any], epoch: int, rng_index: int, index: int) -> dict:
    example = examples.encode(row, row_rng(examples.seed, epoch, rng_index))
    example["sample_id"] = torch.tensor([epoch, index])  # keys the step's random draws (step.draw)
    return example


_WORKER_EXAMPLES: Examples | None = None


def _set_worker_examples(examples: Examples) -> None:
    global _WORKER_EXAMPLES
    _WORKER_EXAMPLES = examples
    torch.set_num_threads(1)  # decode workers: leave the cores to the training step


def _encode_in_worker(job: tuple) -> dict:
    return _encode_row(_WORKER_EXAMPLES, *job)


def _chunks(rows: Iterator[Any], size: int) -> Iterator[list[Any]]:
    """Consecutive lists of `size` rows (the last one may be shorter)."""
    while chunk := list(itertools.islice(rows, size)):
        yield chunk
