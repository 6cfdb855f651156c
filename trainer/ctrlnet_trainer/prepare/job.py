"""`ctrlnet prepare`'s job: annotate `train.prepare.source` into `train.data.dataset` (format:
layout.py), under the same launcher as training (`python -m ctrlnet_trainer.launch ... -m
ctrlnet_trainer.prepare --config ...` in a pod; torchrun --nproc locally).

Each process (RANK of WORLD_SIZE) annotates shards i with i % WORLD_SIZE == RANK: no overlap, no
gap. Restartable: a shard whose record and file are complete is skipped, so a job that died redoes
only its unfinished shards, and a finished dataset (its manifest exists) is left alone; one of
another config (its fingerprint differs) is refused. Rank 0 writes the manifest once every shard
exists. SIGTERM or Ctrl-C stop a process after the shard it is writing.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet.log import ALL_RANKS, get_logger
from ctrlnet_trainer.prepare import layout, rows
from ctrlnet_trainer.shards import Progress, Shard, group_exists, ranks, shard_plan, wait_for_all
from ctrlnet_trainer.storage import Prefix

log = get_logger(__name__)

DECODE_CHUNK = 64
"""Rows decoded and annotated at a time: a shard's images are never all in memory at once."""


@dataclass
class PrepareResult:
    dataset: str
    rows: int  # rows written (the source's rows less those skipped)
    skipped: int
    shards: int
    prepared: int  # shards this process annotated in this call (0: all were already there)
    seconds: float


def prepare(cfg: TrainConfig) -> PrepareResult:
    """Annotate the source into data.dataset; Preempted after a whole shard on SIGTERM / Ctrl-C."""
    from ctrlnet_trainer.preemption import StopFlag

    stop = StopFlag().install()
    try:
        return _prepare(cfg, stop)
    finally:
        stop.uninstall()


def _prepare(cfg: TrainConfig, stop) -> PrepareResult:
    import torch

    from ctrlnet_trainer import annotators, storage
    from ctrlnet_trainer.quiet import quiet_library_noise

    start = time.monotonic()
    quiet_library_noise()
    p, out = cfg.prepare, cfg.data.dataset
    _check_places(p.source, out)
    here = ranks()
    storage.probe(outputs=[out], inputs=[p.source])
    if not storage.is_remote(out):  # read-only, full, a file in the way: one line before annotating
        from ctrlnet_trainer import fs

        fs.check_writable(out, "data.dataset", out)
    use_cuda = torch.cuda.is_available() and cfg.loop.device != "cpu"
    device = f"cuda:{here.local_rank}" if use_cuda else "cpu"
    seed = cfg.loop.seed if cfg.loop.seed is not None else 0
    resolution = p.resolution or cfg.data.resolution
    prefix = Prefix(out)

    source = rows.open_rows(cfg, seed)
    annotator = annotators.build(
        p.annotator, cfg.annotators.params(p.annotator), device=device, cache_dir=cfg.model.cache_dir, seed=seed
    )
    total = None if source.streaming else len(source.rows)
    fingerprint = layout.build_fingerprint(cfg, annotator.identity(), rows=total, resolution=resolution, seed=seed)
    done = _finished(prefix, fingerprint)
    if done is not None:
        log.info(f"note: {prefix.url} already holds this prepared dataset ({done['rows']} rows): nothing to do")
        return PrepareResult(
            prefix.url, done["rows"], done["skipped"], len(done["shards"]), 0, time.monotonic() - start
        )
    if not prefix.exists(*layout.FINGERPRINT):  # every process writes the same bytes: whoever is first claims it
        layout.write_json(prefix, fingerprint, *layout.FINGERPRINT)
    fp_id = layout.fingerprint_id(fingerprint)

    def complete(shard: Shard) -> dict | None:
        return layout.complete_record(prefix, *shard, fp_id)

    writer = _ShardWriter(cfg, prefix, annotator, source, fp_id, resolution, here.rank)
    if total is not None:
        plan = shard_plan(total, p.shard_rows)
        mine = here.mine(plan)
        todo = [s for s in mine if complete(s) is None]
        if len(todo) < len(mine):  # a restart: say what it keeps
            log.info(
                f"note: rank {here.rank}: {len(mine) - len(todo)} of its {len(mine)} shards are already in "
                f"{prefix.url}; annotating the rest",
                extra=ALL_RANKS,
            )
        progress = _progress(prefix, plan, total, here.rank == 0)
        for n, shard in enumerate(todo, 1):
            progress.shard_done(writer.write(shard, rows.map_rows(source, shard)))
            _stop_between(stop, n, len(todo))
    else:  # streamed: the plan is known once the stream ends; every process reads it all
        plan, progress, n, began = [], None, 0, time.monotonic()
        for shard, kept in rows.streamed_shards(
            source, p.shard_rows, lambda s: s in here.mine([s]) and not complete(s)
        ):
            plan.append(shard)
            if shard[0] % here.world == here.rank and complete(shard) is None:
                writer.write(shard, kept)
                n += 1
                if here.rank == 0:  # rows read so far (the total is known at the stream's end)
                    _stream_progress(shard[1] + shard[2], began)
                _stop_between(stop, n, None)
        total = sum(count for _, _, count in plan)
        progress = _progress(prefix, plan, total, here.rank == 0)

    annotator.close()
    if here.rank == 0:
        records = wait_for_all(prefix, layout.STATE, plan, layout.record_name, complete, progress)
        manifest = layout.manifest(fingerprint, records, p.shard_rows, annotator.license)
        layout.write_json(prefix, manifest, layout.MANIFEST)
        progress.finish(dataset=prefix.url)
        return PrepareResult(
            prefix.url, manifest["rows"], manifest["skipped"], len(plan), writer.shards, time.monotonic() - start
        )
    if group_exists():
        wait_for_all(prefix, layout.STATE, plan, layout.record_name, complete, None)
    return PrepareResult(prefix.url, 0, 0, len(plan), writer.shards, time.monotonic() - start)


def _check_places(source: str | None, out: str | None) -> None:
    if not source:
        raise UserError(
            "train.prepare.source is not set: give the raw images to annotate (a folder with metadata.jsonl, "
            "parquet, .jsonl, s3:// URL or hub dataset id), e.g. --set train.prepare.source=./photos"
        )
    if not out:
        raise UserError(
            "train.data.dataset is not set: give the folder or s3:// URL ctrlnet prepare writes the dataset to "
            "(training then reads it from there), e.g. --set train.data.dataset=./prepared"
        )
    if source.rstrip("/") == out.rstrip("/"):
        raise UserError(
            f"train.data.dataset {out!r} is train.prepare.source: the prepared dataset goes to a folder of its own; "
            "give another train.data.dataset"
        )


def _finished(prefix: Prefix, fingerprint: dict) -> dict | None:
    """The manifest when the dataset is complete for this fingerprint, None when it is not (yet);
    refuses a place that holds (part of) a dataset of another config, or other files."""
    done = layout.read_json(prefix, layout.MANIFEST)
    theirs = done["fingerprint"] if done else layout.read_json(prefix, *layout.FINGERPRINT)
    if theirs is not None and theirs != fingerprint:
        raise UserError(
            f"train.data.dataset {prefix.url} holds a dataset prepared with another config; differs: "
            f"{', '.join(layout.differences(theirs, fingerprint))}: choose a new train.data.dataset, or delete that one"
        )
    if theirs is None and [name for name in prefix.listdir() if not name.startswith(".")]:
        raise UserError(
            f"train.data.dataset {prefix.url} is not empty and was not written by ctrlnet prepare: give an empty or "
            "new folder (prepare writes data/ and prepared.json there)"
        )
    return done


def _stop_between(stop, written: int, todo: int | None) -> None:
    from ctrlnet_trainer.preemption import Preempted

    if stop.requested and written != todo:  # each process stops after its own shard
        raise Preempted(written, None, stop.signum)


def _stream_progress(read: int, began: float) -> None:
    """A progress line (off a terminal) of a streamed source: rows read, no total yet."""
    import sys

    if not sys.stdout.isatty():
        from ctrlnet.config.progress import format_line

        rate = read / max(time.monotonic() - began, 1e-9)
        print(format_line("step", job="prepare", step=read, total=None, samples_per_s=round(rate, 3)), flush=True)


def _progress(prefix: Prefix, plan: list[Shard], total: int, enabled: bool) -> Progress:
    return Progress(
        prefix,
        layout.STATE,
        plan,
        layout.record_name,
        rows=total,
        enabled=enabled,
        job="prepare",
        output_key="train.data.dataset",
    )


class _ShardWriter:
    """Decodes, annotates and writes one shard at a time; counts what it wrote."""

    def __init__(self, cfg: TrainConfig, prefix: Prefix, annotator, source, fp_id: str, resolution: int, rank: int):
        self.cfg, self.prefix, self.annotator, self.source = cfg, prefix, annotator, source
        self.fp_id, self.resolution, self.rank = fp_id, resolution, rank
        self.features = layout.features(cfg, rows.caption_is_list(source, cfg.prepare.caption_column))
        self.shards = 0

    def write(self, shard: Shard, source_rows: list[tuple[int, dict]]) -> int:
        """Shard `shard` of `source_rows` written with its record (last); its row count."""
        d = self.cfg.data
        columns: dict[str, list] = {d.image_column: [], d.conditioning_image_column: [], d.caption_column: []}
        skipped: dict[str, str] = {}
        for at in range(0, len(source_rows), DECODE_CHUNK):
            decoded = [
                r for r in (self._decode(i, row, skipped) for i, row in source_rows[at : at + DECODE_CHUNK]) if r
            ]
            conditions = self.annotator.annotate([r.image for r in decoded], rows=[r.index for r in decoded])
            for r, condition in zip(decoded, conditions, strict=True):
                columns[d.image_column].append(r.original or layout.encoded(r.image, r.fmt))
                # A gray condition (edges, depth) as a one-channel PNG: a third of the bytes to
                # compress and store; readers convert it to RGB, the same pixel values.
                gray = condition.convert("L") if self.annotator.gray else condition
                columns[d.conditioning_image_column].append(layout.encoded(gray, "PNG"))
                columns[d.caption_column].append(r.caption)
        index, first, count = shard
        entry = layout.save_shard(self.prefix, columns, self.features, index)
        record = {
            "shard": index,
            "first_row": first,
            "rows": count,
            "written": len(columns[d.image_column]),
            "skipped": skipped,
            "fingerprint": self.fp_id,
            "rank": self.rank,
            **entry,
        }
        layout.write_json(self.prefix, record, layout.STATE, layout.record_name(index))  # last: the shard now exists
        self.shards += 1
        return count

    def _decode(self, index: int, row: dict, skipped: dict[str, str]) -> rows.Decoded | None:
        p = self.cfg.prepare
        caption = row.get(p.caption_column) if p.caption_column else ""
        try:
            return rows.decode(row[p.image_column], caption, index, self.source.root, self.resolution)
        except rows.BadImage as e:
            if not self.cfg.data.skip_bad_rows:
                raise UserError(
                    f"prepare.source {p.source!r}, row {index}, column {p.image_column!r}: {e}; "
                    "set train.data.skip_bad_rows=true to leave such rows out (they are counted in prepared.json)"
                ) from None
            log.warning(f"prepare.source row {index}: {e}: left out", extra=ALL_RANKS)
            skipped[str(index)] = str(e)
            return None
