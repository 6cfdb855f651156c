"""`ctrlnet precompute`: encode a run's training data once (VAE latent distributions, text
embeddings, conditioning images) into `train.data.cache`, so that training reads those instead of
running the VAE encoder and the text encoder every step."""

import time
from typing import Annotated

import typer

from ctrlnet.commands.cluster_cmd import (
    Context,
    DryRun,
    Format,
    KubeVersion,
    Namespace,
    RunName,
    Wait,
    refuse_cluster_options,
    submit_job,
)
from ctrlnet.commands.local import _demo_preset, train_extra
from ctrlnet.commands.options import ConfigFile, Overrides
from ctrlnet.errors import UserError
from ctrlnet.extras import needs

ShardRows = Annotated[
    int | None,
    typer.Option(
        "--shard-rows",
        min=1,
        help="Rows per cache shard (default 256: a few hundred MB per shard at 512 px for SD1.5).",
    ),
]
Nproc = Annotated[int, typer.Option("--nproc", min=1, help="Processes on this machine (one per GPU), under torchrun.")]


def precompute(
    file: ConfigFile = None,
    set_: Overrides = None,
    nproc: Nproc = 1,
    shard_rows: ShardRows = None,
    cluster: Annotated[
        bool,
        typer.Option(
            "--cluster", help="Run it as a job on the cluster (cluster: section; N pods, each its own shards)."
        ),
    ] = False,
    name: RunName = None,
    namespace: Namespace = None,
    context: Context = None,
    dry_run: DryRun = False,
    wait: Wait = False,
    output: Format = "text",
    kube_version: KubeVersion = "1.30",
) -> None:
    """Precompute the VAE latents and text embeddings of a run's data into train.data.cache."""
    from ctrlnet.config import load_job_config

    if cluster:  # `ctrlnet submit` of the same job file, running the precompute module instead
        if nproc != 1 or shard_rows is not None:
            raise UserError(
                "--nproc and --shard-rows are for a local precompute: with --cluster, cluster.nodes x cluster.gpus_per_node processes each encode their own shards"
            )
        submit_job(file, set_ or [], name, namespace, context, dry_run, wait, output, kube_version, task="precompute")
        return
    refuse_cluster_options("precompute", name, namespace, context, dry_run, wait, output)

    cfg = load_job_config(file or _demo_preset(), set_ or [])
    train = cfg.train
    if not train.data.cache:
        raise UserError(
            "train.data.cache is not set: give the cache's folder or URL in the job file, "
            "or --set train.data.cache=PATH"
        )
    start = time.monotonic()
    if nproc > 1:
        from ctrlnet.config.contract import PRECOMPUTE_MODULE
        from ctrlnet.local_launch import run_processes

        args = ("--shard-rows", str(shard_rows)) if shard_rows else ()
        code = run_processes(train, nproc, PRECOMPUTE_MODULE, args)
        if code:
            raise typer.Exit(code)
        from ctrlnet.config.contract import CACHE_MANIFEST

        manifest = read_manifest(train.data.cache, CACHE_MANIFEST)
        rows, shards = manifest["rows"], len(manifest["shards"])
    else:
        with needs("train"):
            train_extra("torch", "diffusers")
            from ctrlnet_trainer.cache.job import precompute as precompute_here
            from ctrlnet_trainer.preemption import Preempted

        try:
            result = precompute_here(train, shard_rows)
        except Preempted as p:  # SIGTERM / Ctrl-C: stopped after a whole shard
            typer.echo(
                f"stopped after {p.step} shard(s) written to {train.data.cache}; "
                "run the same ctrlnet precompute again to continue where it stopped",
                err=True,
            )
            raise typer.Exit(p.exit_code) from None
        rows, shards = result.rows, result.shards
    typer.echo(f"cache:   {train.data.cache}")
    typer.echo(f"rows:    {rows}")
    typer.echo(f"shards:  {shards}")
    typer.echo(f"seconds: {time.monotonic() - start:.1f}")


def read_manifest(where: str, name: str) -> dict:
    """A finished job's manifest (`name` at the top of `where`: a cache's, a prepared dataset's),
    read here without the trainer's imports (the processes wrote it)."""
    import json

    import fsspec

    with fsspec.open(f"{where.rstrip('/')}/{name}", "r") as f:
        return json.load(f)


def register(app: typer.Typer) -> None:
    app.command()(precompute)
