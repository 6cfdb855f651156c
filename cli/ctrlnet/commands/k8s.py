"""`ctrlnet render` and `ctrlnet validate`: the job's Kubernetes objects, from the Helm chart, checked offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctrlnet.commands.options import ConfigFile, Overrides
from ctrlnet.errors import UserError

KubeVersion = Annotated[
    str, typer.Option("--kube-version", help="Kubernetes version whose schemas core objects are checked against.")
]


def _config(file: str | None, set_: list[str] | None):
    from ctrlnet.config import load_job_config

    if file is None and not set_:
        raise UserError("no job config: pass one with -f job.yaml (see examples/)")
    return load_job_config(file, set_)


def _read_manifests(paths: list[str]) -> list[dict]:
    import yaml

    from ctrlnet.k8s.yamlio import parse_manifests

    texts = []
    for raw in paths:
        p = Path(raw)
        if p.is_dir():
            files = sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.name != "kustomization.yaml")
            if not files:
                raise UserError(f"--manifests {p}: no .yaml files in that folder")
        elif p.is_file() or raw == "-":
            files = [p]
        else:
            raise UserError(f"--manifests {p} does not exist: pass a YAML file or a folder of them")
        for f in files:
            texts.append(typer.get_text_stream("stdin").read() if str(f) == "-" else f.read_text())
    try:
        return parse_manifests(texts)
    except yaml.YAMLError as e:
        raise UserError(f"--manifests: not valid YAML ({str(e).splitlines()[0]})") from None


def register(app: typer.Typer) -> None:
    @app.command()
    def render(
        file: ConfigFile = None,
        set_: Overrides = None,
        out: Annotated[
            str | None,
            typer.Option("-o", "--output-dir", help="Write one file per object into this folder instead of printing."),
        ] = None,
    ) -> None:
        """Render the job's Kubernetes objects from the Helm chart (PyTorchJob or TrainJob, ConfigMap, ...)."""
        from ctrlnet.k8s.render import render_objects
        from ctrlnet.k8s.yamlio import dump_objects, write_objects

        cfg = _config(file, set_)
        objs = render_objects(cfg)
        if out is None:
            typer.echo(dump_objects(objs), nl=False)
            return
        for path in write_objects(objs, Path(out)):
            typer.echo(f"wrote {path}", err=True)

    @app.command()
    def validate(
        file: ConfigFile = None,
        set_: Overrides = None,
        manifests: Annotated[
            list[str] | None,
            typer.Option(
                "--manifests",
                help="Check these rendered YAML files or folders (or - for stdin) instead of rendering -f.",
            ),
        ] = None,
        kube_version: KubeVersion = "1.30",
    ) -> None:
        """Check the job's objects offline: Kubernetes and CRD schemas, plus the rules they do not encode.

        Prints one line per problem and exits 1 when there are problems (2: bad input)."""
        from ctrlnet.k8s.validate import validate_objects

        if manifests:
            if file is not None or set_:
                raise UserError("give either -f/--set (render and check a job) or --manifests (check files), not both")
            objs = _read_manifests(manifests)
            source = ", ".join(manifests)
        else:
            from ctrlnet.k8s.render import render_objects

            objs = render_objects(_config(file, set_))
            source = file or "--set"
        if not objs:
            raise UserError(f"{source}: no Kubernetes objects to check")
        secrets: set[str] = set()
        problems = validate_objects(objs, kube_version=kube_version, secrets_seen=secrets)
        for p in problems:
            typer.echo(str(p))
        if problems:
            typer.echo(f"{len(problems)} problem(s) in {len(objs)} object(s) from {source}", err=True)
            raise typer.Exit(1)
        names = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
        needs = f"; needs Secrets: {', '.join(sorted(secrets))}" if secrets else ""
        typer.echo(f"ok: {len(objs)} object(s) valid ({names}){needs}")
