"""`ctrlnet prepare`: annotate a source of images (+ captions) into a ControlNet dataset
(`train.prepare` -> `train.data.dataset`), here (one process, or --nproc under torchrun) or as a
job on the cluster (--cluster), sharded by rows and restartable."""

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
from ctrlnet.commands.local import train_extra
from ctrlnet.commands.options import ConfigFile, Overrides
from ctrlnet.errors import UserError
from ctrlnet.extras import needs

Nproc = Annotated[
    int, typer.Option("--nproc", min=1, max=1024, help="Processes on this machine (one per GPU), under torchrun.")
]


def prepare(
    file: ConfigFile = None,
    set_: Overrides = None,
    nproc: Nproc = 1,
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
    """Annotate train.prepare.source (canny, depth or segmentation) into the dataset train.data.dataset."""
    from ctrlnet.config import load_job_config

    if cluster:  # `ctrlnet submit` of the same job file, running the prepare module instead
        if nproc != 1:
            raise UserError(
                "--nproc is for a local prepare: with --cluster, cluster.nodes x cluster.gpus_per_node processes "
                "each annotate their own shards"
            )
        submit_job(file, set_ or [], name, namespace, context, dry_run, wait, output, kube_version, task="prepare")
        return
    refuse_cluster_options("prepare", name, namespace, context, dry_run, wait, output)
    if file is None:
        raise UserError(
            "ctrlnet prepare needs a job file: -f job.yaml with train.prepare.source and train.data.dataset"
        )

    train = load_job_config(file, set_ or []).train
    start = time.monotonic()
    if nproc > 1:
        from ctrlnet.config.contract import PREPARE_MODULE
        from ctrlnet.local_launch import run_processes

        code = run_processes(train, nproc, PREPARE_MODULE, ())
        if code:
            raise typer.Exit(code)
        from ctrlnet.commands.precompute_cmd import read_manifest
        from ctrlnet.config.contract import PREPARE_MANIFEST

        manifest = read_manifest(train.data.dataset, PREPARE_MANIFEST)
        rows, skipped, shards = manifest["rows"], manifest["skipped"], len(manifest["shards"])
    else:
        with needs("train"):
            train_extra("torch", "datasets", "cv2")
            from ctrlnet_trainer.preemption import Preempted
            from ctrlnet_trainer.prepare.job import prepare as prepare_here

        try:
            result = prepare_here(train)
        except Preempted as p:  # SIGTERM / Ctrl-C: stopped after a whole shard
            typer.echo(
                f"stopped after {p.step} shard(s) written to {train.data.dataset}; "
                "run the same ctrlnet prepare again to continue where it stopped",
                err=True,
            )
            raise typer.Exit(p.exit_code) from None
        rows, skipped, shards = result.rows, result.skipped, result.shards
    seconds = time.monotonic() - start
    typer.echo(f"dataset:   {train.data.dataset}")
    typer.echo(f"annotator: {train.prepare.annotator}")
    typer.echo(f"rows:      {rows}" + (f" ({skipped} unreadable, left out)" if skipped else ""))
    typer.echo(f"shards:    {shards}")
    typer.echo(f"seconds:   {seconds:.1f}")
    typer.echo(f"next:      ctrlnet train -f {file}  (train.data.dataset is this dataset)")


def register(app: typer.Typer) -> None:
    app.command()(prepare)
