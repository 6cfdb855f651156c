"""The workstation loop: `submit`, `status`, `logs`, `list`, `delete`, `suspend`, `resume`.

Command bodies parse options and print; the work is done by the Python API, `ctrlnet.client.Client`
(imported inside the bodies, so `ctrlnet --help` never loads the kubernetes client)."""

from __future__ import annotations

import json
import sys
from typing import Annotated

import typer

from ctrlnet.commands.options import ConfigFile, Overrides
from ctrlnet.errors import UserError
from ctrlnet.log import get_logger

log = get_logger(__name__)

Namespace = Annotated[
    str | None, typer.Option("-n", "--namespace", help="Namespace (default: the context's, else default).")
]
Context = Annotated[str | None, typer.Option("--context", help="kubeconfig context (default: the current one).")]
Format = Annotated[str, typer.Option("-o", "--output", help="text, json or yaml.")]
FORMATS = ("text", "json", "yaml")


def _format(value: str, allowed: tuple[str, ...] = FORMATS) -> str:
    if value not in allowed:
        raise UserError(f"-o {value!r}: use one of {', '.join(allowed)}")
    return value


def _client(context: str | None, namespace: str | None):
    from ctrlnet.client import Client

    return Client(context, namespace)


def _emit(doc, fmt: str) -> None:
    if fmt == "json":
        typer.echo(json.dumps(doc, indent=2, default=str))
    else:
        import yaml

        typer.echo(yaml.safe_dump(doc, sort_keys=False), nl=False)


# The options of `ctrlnet submit`, shared with `ctrlnet precompute --cluster` and `ctrlnet prepare --cluster`.
RunName = Annotated[
    str | None,
    typer.Option(
        "--name", help="Run name (default: cluster.name, -precompute / -prepare for those jobs, plus a random suffix)."
    ),
]
DryRun = Annotated[bool, typer.Option("--dry-run", help="Let the API server validate everything; persist nothing.")]
Wait = Annotated[bool, typer.Option("--wait", help="Follow the run to its end: exit 0 if it succeeds, 1 if it fails.")]
KubeVersion = Annotated[str, typer.Option("--kube-version", help="Schemas to check core objects against.")]


def submit_job(
    file: str | None,
    overrides: list[str],
    name: str | None,
    namespace: str | None,
    context: str | None,
    dry_run: bool,
    wait: bool,
    output: str,
    kube_version: str,
    task: str | None = None,
) -> None:
    """`ctrlnet submit` (a training run, or a precompute job when the config says cluster.task:
    precompute, or `task` does): validate, check the cluster, apply, print what was done (and
    follow it with --wait)."""
    from ctrlnet.errors import ObjectsInvalid

    fmt = _format(output, ("text", "json"))
    if file is None and not overrides:
        raise UserError("no job config: pass one with -f job.yaml (see examples/)")
    if task:
        overrides = [*overrides, f"cluster.task={task}"]
    client = _client(context, namespace).connect()  # a kubeconfig problem before a config problem
    try:
        run = client.submit(file, overrides, name=name, dry_run=dry_run, kube_version=kube_version)
    except ObjectsInvalid as e:
        for line in e.problems:
            typer.echo(line)
        typer.echo(str(e), err=True)
        raise typer.Exit(1) from None
    if run.note and fmt != "json":  # which backend `auto` chose and why, or the runtime it fell back to
        typer.echo(f"note: {run.note}", err=True)
    if fmt == "json":
        doc = run.as_dict()
        if run.note:
            doc["note"] = run.note
        _emit(doc, "json")
    elif dry_run:
        from ctrlnet.k8s.render import dump_objects

        typer.echo(dump_objects(run.objects), nl=False)
        typer.echo(
            f"dry run: the API server accepted {len(run.objects)} object(s) for run {run.name} in "
            f"{run.namespace}; nothing was created",
            err=True,
        )
    else:
        ns = f" -n {run.namespace}"
        typer.echo(f"submitted {run.kind} {run.name} in namespace {run.namespace}")
        where = {"precompute": "cache:   ", "prepare": "dataset: "}.get(run.task, "outputs: ")
        typer.echo(f"  {where} {run.output}")
        if run.queue:
            typer.echo(f"  queued in Kueue LocalQueue {run.queue}: it starts when admitted")
        typer.echo(f"  status:   ctrlnet status {run.name}{ns} -w")
        typer.echo(f"  logs:     ctrlnet logs {run.name}{ns} -f")
        typer.echo(f"  delete:   ctrlnet delete {run.name}{ns}")
        if run.output_warning:
            log.warning(run.output_warning)
    if fmt != "json":  # after the outcome, so a refusal stays one line; -o json carries them
        for w in run.warnings:
            log.warning(w)
    if wait and not dry_run:
        from ctrlnet.cluster.follow import show_changes

        final = show_changes(client.watch(run.name), sys.stdout, tty=False)
        raise typer.Exit(0 if final.phase == "Succeeded" else 1)


def refuse_cluster_options(job: str, name, namespace, context, dry_run, wait, output) -> None:
    """A local `ctrlnet precompute` / `ctrlnet prepare` given options that only a job on the cluster
    takes: one line naming them and the fix."""
    given = [
        flag
        for flag, value in (
            ("--name", name),
            ("-n", namespace),
            ("--context", context),
            ("--dry-run", dry_run),
            ("--wait", wait),
            ("-o", output != "text"),
        )
        if value
    ]
    if given:
        raise UserError(
            f"{', '.join(given)}: for a {job} job on the cluster; add --cluster (or drop them to {job} here)"
        )


def submit(
    file: ConfigFile = None,
    set_: Overrides = None,
    name: RunName = None,
    namespace: Namespace = None,
    context: Context = None,
    dry_run: DryRun = False,
    wait: Wait = False,
    output: Format = "text",
    kube_version: KubeVersion = "1.30",
) -> None:
    """Submit a new run: validate, render through the chart, server-side apply (a new name and output prefix each time)."""
    submit_job(file, set_ or [], name, namespace, context, dry_run, wait, output, kube_version)


def status(
    name: Annotated[str, typer.Argument(help="Run name (as `ctrlnet list` shows it).")],
    namespace: Namespace = None,
    context: Context = None,
    watch: Annotated[bool, typer.Option("-w", "--watch", help="Redraw as the run changes, until it ends.")] = False,
    output: Format = "text",
) -> None:
    """Show a run: phase and why, queue, every rank's pod, training progress."""
    from ctrlnet.cluster import status as st

    fmt = _format(output)
    client = _client(context, namespace)
    if watch:
        from ctrlnet.cluster.follow import show_changes

        final = show_changes(client.watch(name), sys.stdout, tty=sys.stdout.isatty() and fmt == "text", fmt=fmt)
        raise typer.Exit(0 if final.phase != "Failed" else 1)
    s = client.status(name)
    if fmt == "text":
        from ctrlnet.cluster.draw import show

        show(st.view(s), sys.stdout)
    else:
        _emit(s.as_dict(), fmt)


def logs(
    name: Annotated[str, typer.Argument(help="Run name.")],
    namespace: Namespace = None,
    context: Context = None,
    follow: Annotated[
        bool,
        typer.Option("-f", "--follow", help="Stream: wait for pods to start, follow restarts, end with the job."),
    ] = False,
    rank: Annotated[int | None, typer.Option("--rank", min=0, help="Only this node rank's pod (0 = master).")] = None,
    pod: Annotated[str | None, typer.Option("--pod", help="Only this pod (full name or role, e.g. worker-1).")] = None,
    tail: Annotated[int | None, typer.Option("--tail", min=0, help="Start with the last N lines of each pod.")] = None,
    since: Annotated[str | None, typer.Option("--since", help="Only lines newer than this, e.g. 10m.")] = None,
    previous: Annotated[bool, typer.Option("--previous", "-p", help="The previous (crashed) container's log.")] = False,
    timestamps: Annotated[bool, typer.Option("--timestamps", help="Prefix each line with its time.")] = False,
) -> None:
    """Print every rank's log, prefixed per pod; -f follows the run to its end."""
    from ctrlnet.cluster.logs import Printer, use_colour

    lines = _client(context, namespace).logs(
        name, follow=follow, rank=rank, pod=pod, tail=tail, since=since, previous=previous, timestamps=timestamps
    )
    Printer(sys.stdout, use_colour(sys.stdout)).print(lines)


def list_runs(
    namespace: Namespace = None,
    all_namespaces: Annotated[bool, typer.Option("-A", "--all-namespaces", help="Runs in every namespace.")] = False,
    context: Context = None,
    output: Format = "text",
) -> None:
    """List this tool's runs: name, backend, phase, pods ready, step, age."""
    from ctrlnet.cluster.draw import show
    from ctrlnet.cluster.listing import table

    fmt = _format(output, ("text", "json"))
    client = _client(context, namespace)
    rows = [r.as_dict() for r in client.list(all_namespaces=all_namespaces)]
    if fmt == "json":
        _emit(rows, "json")
    elif rows:
        show(table(rows, all_namespaces), sys.stdout)
    else:
        where = "any namespace" if all_namespaces else f"namespace {client.namespace}"
        typer.echo(f"no ctrlnet runs in {where}", err=True)


def delete(
    name: Annotated[str, typer.Argument(help="Run name.")],
    namespace: Namespace = None,
    context: Context = None,
    yes: Annotated[bool, typer.Option("--yes", "-y", help="Do not ask for confirmation.")] = False,
) -> None:
    """Delete a run: the job and every object submitted with it. Its outputs are kept."""
    from ctrlnet.errors import DeleteIncomplete

    def ask(run: str, run_namespace: str) -> bool:  # after the run is found and known to be ours
        if not sys.stdin.isatty():
            raise UserError(f"delete {name}: confirm with --yes (no terminal to ask on)")
        return typer.confirm(
            f"delete run {name} in namespace {run_namespace} (its pods stop; outputs are kept)?", abort=True
        )

    error = None
    try:
        result = _client(context, namespace).delete(name, confirm=None if yes else ask)
    except DeleteIncomplete as e:
        result, error = e.result, e
    if result.deleted:
        typer.echo(f"deleted {', '.join(result.deleted)}")
    for fate in result.failed:
        typer.echo(str(fate))
    if result.output:
        typer.echo(f"outputs kept at {result.output}")
    if error is not None:
        raise error


def suspend(
    name: Annotated[str, typer.Argument(help="Run name.")], namespace: Namespace = None, context: Context = None
) -> None:
    """Suspend a run: its pods stop (the trainer checkpoints on SIGTERM); `ctrlnet resume` continues it."""
    typer.echo(_client(context, namespace).suspend(name))


def resume(
    name: Annotated[str, typer.Argument(help="Run name.")], namespace: Namespace = None, context: Context = None
) -> None:
    """Resume a suspended run: new pods continue from its latest checkpoint."""
    typer.echo(_client(context, namespace).resume(name))


def register(app: typer.Typer) -> None:
    app.command()(submit)
    app.command()(status)
    app.command()(logs)
    app.command("list")(list_runs)
    app.command()(delete)
    app.command()(suspend)
    app.command()(resume)
