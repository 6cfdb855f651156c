"""`python -m ctrlnet_trainer.precompute --config config.yaml [--set key=value ...] [--shard-rows N]`:
encode a run's training rows once into `data.cache` (format: layout.py).

The same config and command line as `python -m ctrlnet_trainer`, and the same launcher in a pod
(`python -m ctrlnet_trainer.launch ... -m ctrlnet_trainer.precompute --config ...`). Under torchrun
each process (RANK of WORLD_SIZE) encodes shards i with i % WORLD_SIZE == RANK: no overlap, no gap.

Restartable: a shard whose record and file are complete is skipped, so a job that died redoes only
its unfinished shards, and a finished cache (its manifest exists) is left alone. Rank 0 writes the
manifest once every shard exists (after a barrier when a process group exists, else by watching
the store).
"""

from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass

import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet.log import ALL_RANKS, capture_library_warnings, get_logger
from ctrlnet_trainer import data
from ctrlnet_trainer.cache import layout
from ctrlnet_trainer.cache.encode import RowEncoder, decoded_shards, load_encoders, prepare_encoders
from ctrlnet_trainer.shards import Progress, group_exists, ranks, wait_for_all
from ctrlnet_trainer.storage import Prefix

log = get_logger(__name__)


@dataclass
class PrecomputeResult:
    cache: str
    rows: int
    shards: int
    encoded: int  # shards this process encoded in this call (0: all were already there)
    seconds: float


# ---------------------------------------------------------------- the job
def precompute(cfg: TrainConfig, shard_rows: int | None = None) -> PrecomputeResult:
    """Encode the run's rows into data.cache. SIGTERM or Ctrl-C stop it after the shard being
    written (Preempted, its `step` the shards this process wrote): run again, it continues there."""
    from ctrlnet_trainer.preemption import StopFlag

    stop = StopFlag().install()
    try:
        return _precompute(cfg, shard_rows, stop)
    finally:
        stop.uninstall()


def _precompute(cfg: TrainConfig, shard_rows: int | None, stop) -> PrecomputeResult:
    from ctrlnet_trainer import accel, storage
    from ctrlnet_trainer.preemption import Preempted
    from ctrlnet_trainer.quiet import quiet_library_noise

    start = time.monotonic()
    quiet_library_noise()
    if not cfg.data.cache:
        raise UserError("data.cache is not set: give the folder or URL to write the cache to (--set data.cache=PATH)")
    shard_rows = shard_rows or layout.DEFAULT_SHARD_ROWS
    here = ranks()
    use_cuda = accel.check_device_options(cfg)
    device = torch.device(f"cuda:{here.local_rank}") if use_cuda else torch.device("cpu")
    dtype = accel.DTYPES[cfg.loop.mixed_precision]
    storage.probe(outputs=[cfg.data.cache], inputs=[cfg.model.base, cfg.data.dataset])
    if not storage.is_remote(cfg.data.cache):  # read-only, full, a file in the way: one line before encoding
        from ctrlnet_trainer import fs

        fs.check_writable(cfg.data.cache, "data.cache", cfg.data.cache)
    seed = _seed(cfg)
    prefix = Prefix(cfg.data.cache)

    base = load_encoders(cfg, seed)
    source = data.training_rows(cfg.data, cfg.model.cache_dir, seed)
    rows = len(source.rows)
    fingerprint = layout.build_fingerprint(
        cfg,
        seed,
        base.family,
        rows=rows,
        scaling_factor=base.vae.config.scaling_factor,
        max_length=base.tokenizer.model_max_length,
        dtype=dtype,
        fields=base.family.cache_fields(base.text),
    )
    plan = layout.shard_plan(rows, shard_rows)
    done = _finished(prefix, fingerprint)
    if done is not None:
        log.info(
            f"note: {prefix.url} already holds this cache ({rows} rows, {len(done['shards'])} shards): nothing to do"
        )
        return PrecomputeResult(prefix.url, rows, len(done["shards"]), 0, time.monotonic() - start)
    _claim(prefix, fingerprint)

    prepare_encoders(cfg, device, dtype, base)
    encoder = RowEncoder(base, device, dtype, cfg.data)
    if here.rank == 0:
        _write_empty_prompt(prefix, encoder)
    fp_id = layout.fingerprint_id(fingerprint)
    mine = here.mine(plan)
    todo = [s for s in mine if layout.complete_record(prefix, *s, fp_id) is None]
    if len(todo) < len(mine):  # a restart: say what it keeps
        log.info(
            f"note: rank {here.rank}: {len(mine) - len(todo)} of its {len(mine)} shards are already in {prefix.url}; encoding the rest",
            extra=ALL_RANKS,
        )
    progress = Progress(
        prefix,
        layout.SHARDS,
        plan,
        layout.record_name,
        rows=rows,
        enabled=here.rank == 0,
        job="precompute",
        output_key="data.cache",
    )
    complete = lambda shard: layout.complete_record(prefix, *shard, fp_id)  # noqa: E731
    written = 0
    for index, first, count, example_rows in decoded_shards(source, cfg, base.family, todo):
        tensors, bad = encoder.encode_shard(example_rows)
        entry = layout.save_atomically(
            prefix, tensors, {"bad_rows": _json(bad)}, layout.SHARDS, layout.shard_name(index)
        )
        record = {"shard": index, "first_row": first, "rows": count, "fingerprint": fp_id, "rank": here.rank, **entry}
        layout.write_json(prefix, record, layout.SHARDS, layout.record_name(index))  # last: the shard now exists
        progress.shard_done(count)
        written += 1
        if stop.requested and written < len(todo):  # each process stops after its own shard
            raise Preempted(written, None, stop.signum)

    if here.rank == 0:
        records = wait_for_all(prefix, layout.SHARDS, plan, layout.record_name, complete, progress)
        empty = layout.read_json(prefix, layout.EMPTY_PROMPT_RECORD)
        layout.write_json(prefix, layout.manifest(fingerprint, rows, shard_rows, records, empty), layout.MANIFEST)
        progress.finish(cache=prefix.url)
    elif group_exists():
        wait_for_all(prefix, layout.SHARDS, plan, layout.record_name, complete, None)
    return PrecomputeResult(prefix.url, rows, len(plan), len(todo), time.monotonic() - start)


def _seed(cfg: TrainConfig) -> int:
    """The run's seed, when the cache depends on it (layout.build_fingerprint says when)."""
    if cfg.loop.seed is not None:
        return cfg.loop.seed
    if cfg.data.dataset is None or cfg.data.max_train_samples is not None or cfg.model.base is None:
        raise UserError(
            "loop.seed is not set, but the cached rows depend on it (synthetic data, data.max_train_samples "
            "or the in-code base): set loop.seed, the same for ctrlnet precompute and the run that trains from it"
        )
    return 0  # plays no part in this cache


def _finished(prefix: Prefix, fingerprint: dict) -> dict | None:
    """The manifest when the cache is already complete for this fingerprint, None when it is not
    (yet); refuses a place that holds (part of) a cache of another config."""
    done = layout.read_json(prefix, layout.MANIFEST)
    theirs = done["fingerprint"] if done else layout.read_json(prefix, layout.FINGERPRINT)
    if theirs is not None and theirs != fingerprint:
        raise UserError(
            f"data.cache {prefix.url} holds a cache of another config; differs: "
            f"{', '.join(layout.differences(theirs, fingerprint))}: choose a new data.cache, or delete that one"
        )
    return done


def _claim(prefix: Prefix, fingerprint: dict) -> None:
    # Every process writes the same bytes atomically: whoever comes first, the cache is claimed.
    if not prefix.exists(layout.FINGERPRINT):
        layout.write_json(prefix, fingerprint, layout.FINGERPRINT)


def _write_empty_prompt(prefix: Prefix, encoder: RowEncoder) -> None:
    entry = layout.read_json(prefix, layout.EMPTY_PROMPT_RECORD)
    if entry is not None and layout.has_file(prefix, entry):
        return
    entry = layout.save_atomically(prefix, encoder.embed([""]), {}, layout.EMPTY_PROMPT)
    layout.write_json(prefix, entry, layout.EMPTY_PROMPT_RECORD)


def _json(value) -> str:
    import json

    return json.dumps(value, sort_keys=True)


# ---------------------------------------------------------------- command line
def main(argv: list[str] | None = None) -> int:
    from ctrlnet_trainer.__main__ import _destroy_process_group, _report
    from ctrlnet_trainer.preemption import Preempted

    parser = argparse.ArgumentParser(prog="python -m ctrlnet_trainer.precompute", description=__doc__.splitlines()[0])
    parser.add_argument("--config", required=True, help="YAML file with the train section")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="override, e.g. data.cache=PATH")
    parser.add_argument(
        "--shard-rows", type=int, default=None, help=f"rows per shard (default {layout.DEFAULT_SHARD_ROWS})"
    )
    args = parser.parse_args(argv)
    capture_library_warnings(only_verbose=True)  # torch's and diffusers' warnings: with -v (CTRLNET_VERBOSITY=1) only
    try:
        if args.shard_rows is not None and args.shard_rows < 1:
            raise UserError(f"--shard-rows {args.shard_rows}: give a positive number of rows per shard")
        from ctrlnet.config import load_train_config

        result = precompute(load_train_config(args.config, args.overrides), args.shard_rows)
    except Preempted as p:
        print(f"stopped after {p.step} shard(s); the same command continues where it stopped", file=sys.stderr)
        return p.exit_code
    except UserError as e:
        _report(e)
        return e.exit_code
    finally:
        _destroy_process_group()
    if ranks().rank == 0:
        print(
            f"done: {result.rows} rows in {result.shards} shards at {result.cache} ({result.seconds:.1f} s)", flush=True
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
