"""`ctrlnet render` and `ctrlnet validate`: the job's Kubernetes objects, from the Helm chart, checked offline."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from ctrlnet.commands.options import ConfigFile, Overrides
from ctrlnet.errors import UserError
from ctrlnet.log import get_logger

log = get_logger(__name__)

KubeVersion = Annotated[
    str, typer.Option("--kube-version", help="Kubernetes version whose schemas core objects are checked against.")
]


def _config(file: str | None, set_: list[str] | None):
    from ctrlnet.config import load_job_config

    if file is None and not set_:
        raise UserError("no job config: pass one with -f job.yaml (see examples/)")
    return load_job_config(file, set_, for_cluster=True)


def _manifest_files(raw: str) -> list[Path]:
    p = Path(raw)
    if raw == "-":
        return [p]
    if p.is_dir():
        files = sorted(f for f in p.rglob("*") if f.suffix in (".yaml", ".yml") and f.name != "kustomization.yaml")
        if not files:
            raise UserError(f"--manifests {p}: no .yaml files in that folder")
        return files
    if p.is_file():
        return [p]
    raise UserError(f"--manifests {p} does not exist: pass a YAML file, a folder of them, or - for stdin")


def _read_manifests(paths: list[str]) -> list[dict]:
    from ctrlnet.k8s.yamlio import parse_manifest_file

    objs: list[dict] = []
    for raw in paths:
        for f in _manifest_files(raw):
            if str(f) == "-":
                text, source = typer.get_text_stream("stdin").read(), "stdin (-)"
            else:
                try:
                    text, source = f.read_text(encoding="utf-8"), str(f)
                except (OSError, UnicodeDecodeError) as e:
                    raise UserError(
                        f"--manifests {f} cannot be read ({type(e).__name__}): pass a UTF-8 YAML file"
                    ) from None
            objs += parse_manifest_file(text, source)
    return objs


def _refuse_overwrite(objs: list[dict], out: Path, overwrite: bool) -> None:
    """`render -o DIR` never replaces a file without being asked: say which, and how."""
    from ctrlnet.k8s.yamlio import file_name

    if out.exists() and not out.is_dir():
        raise UserError(f"-o {out} is a file: give a folder (render writes one file per object into it)")
    targets = [out / file_name(o) for o in objs]
    if dirs := [t.name for t in targets if t.is_dir()]:
        raise UserError(f"-o {out}: {', '.join(dirs)} is a folder there: choose another -o folder")
    taken = [t.name for t in targets if t.exists()]
    if taken and not overwrite:
        raise UserError(
            f"-o {out} already holds {', '.join(taken)}: pass --overwrite to replace them, or choose another folder"
        )


def render(
    file: ConfigFile = None,
    set_: Overrides = None,
    out: Annotated[
        str | None,
        typer.Option("-o", "--output-dir", help="Write one file per object into this folder instead of printing."),
    ] = None,
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="With -o: replace the files of the same names already there.")
    ] = False,
) -> None:
    """Render the job's Kubernetes objects from the Helm chart (PyTorchJob or TrainJob, ConfigMap, ...)."""
    from ctrlnet.k8s.render import render_objects
    from ctrlnet.k8s.yamlio import dump_objects, write_objects

    cfg = _config(file, set_)
    objs = render_objects(cfg)
    if out is None:
        typer.echo(dump_objects(objs), nl=False)
        return
    _refuse_overwrite(objs, Path(out), overwrite)
    for path in write_objects(objs, Path(out)):
        typer.echo(f"wrote {path}", err=True)


def validate(
    file: ConfigFile = None,
    set_: Overrides = None,
    manifests: Annotated[
        bool,
        typer.Option(
            "--manifests",
            help="Check rendered YAML instead of rendering -f: the PATHS given (files, folders, or - for stdin).",
        ),
    ] = False,
    paths: Annotated[
        list[str] | None, typer.Argument(metavar="[PATHS]...", help="With --manifests: YAML files, folders or -.")
    ] = None,
    kube_version: KubeVersion = "1.30",
) -> None:
    """Check the job's objects offline: Kubernetes and CRD schemas, plus the rules they do not encode.

    `ctrlnet validate -f job.yaml`, or `ctrlnet validate --manifests a.yaml b/ -`.
    Prints one line per problem and exits 1 when there are problems (2: bad input)."""
    from ctrlnet.k8s.schemas import check_kube_version
    from ctrlnet.k8s.validate import validate_objects

    # --manifests is a switch and the paths are arguments, so `--manifests a.yaml b/ c.yaml`
    # checks all three (an option takes one value; repeating `--manifests X` still works).
    if paths and not manifests:
        raise UserError(f"{paths[0]}: files to check go after --manifests, e.g. ctrlnet validate --manifests a.yaml b/")
    kube_version = check_kube_version(kube_version)
    if manifests:
        if file is not None or set_:
            raise UserError("give either -f/--set (render and check a job) or --manifests (check files), not both")
        if not paths:
            raise UserError("--manifests needs what to check: YAML files, folders, or - for stdin")
        objs = _read_manifests(paths)
        source = ", ".join(paths)
    else:
        from ctrlnet.k8s.render import render_objects

        objs = render_objects(_config(file, set_))
        source = file or "--set"
    if not objs:
        raise UserError(f"{source}: no Kubernetes objects to check")
    secrets: set[str] = set()
    warnings: list = []
    problems = validate_objects(objs, kube_version=kube_version, secrets_seen=secrets, warnings=warnings)
    # Warnings (hardening advice: a mutable image tag, no NetworkPolicy, ...) go to stderr,
    # marked, and never change the exit code; stdout keeps one line per problem.
    for w in warnings:
        log.warning(w)
    for p in problems:
        typer.echo(str(p))
    if problems:
        typer.echo(f"{len(problems)} problem(s) in {len(objs)} object(s) from {source}", err=True)
        raise typer.Exit(1)
    names = ", ".join(f"{o['kind']}/{o['metadata']['name']}" for o in objs)
    needs = f"; needs Secrets: {', '.join(sorted(secrets))}" if secrets else ""
    warned = f"; {len(warnings)} warning(s)" if warnings else ""
    typer.echo(f"ok: {len(objs)} object(s) valid ({names}){needs}{warned}")


def register(app: typer.Typer) -> None:
    app.command()(render)
    app.command()(validate)
