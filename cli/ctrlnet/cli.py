"""The `ctrlnet` command. Kept light: heavy imports (torch, diffusers, kubernetes) happen inside
command bodies, so `ctrlnet --help` stays instant."""

import sys
from typing import Annotated, Any

import typer

from ctrlnet import log
from ctrlnet.commands import cluster_cmd, config_cmd, k8s, local, precompute_cmd, prepare_cmd
from ctrlnet.errors import UserError

# click's exception base, as the Typer in use raises it (Typer 0.29 vendors click as typer._click).
ClickException: type[Exception] = next(c for c in typer.BadParameter.__mro__ if c.__name__ == "ClickException")


class _App(typer.Typer):
    """The Typer app, run without click's standalone mode: a usage error (a bad option value, a
    misspelled command, a missing argument) comes back to main() as an exception, printed as one
    `error:` line like every other bad input, instead of click's box. CliRunner (the tests) runs
    the click command itself, in standalone mode, as before."""

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        kwargs.setdefault("standalone_mode", False)
        kwargs.setdefault("prog_name", "ctrlnet")  # also under `python -m ctrlnet`
        return super().__call__(*args, **kwargs)


def _version(value: bool) -> None:
    if value:
        from importlib.metadata import PackageNotFoundError, version

        try:
            typer.echo(f"ctrlnet {version('ctrlnet')}")
        except PackageNotFoundError:  # run from a source tree that was never installed
            typer.echo("ctrlnet (not installed: no version)")
        raise typer.Exit()


app = _App(
    name="ctrlnet",
    help="Train ControlNet adapters for Stable Diffusion, locally or on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=True,
)


@app.callback()
def verbosity(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Say more: debug lines too.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only warnings and errors (no notes).")] = False,
    version: Annotated[
        bool, typer.Option("--version", callback=_version, is_eager=True, help="Print the version and exit.")
    ] = False,
) -> None:
    """The options every command takes (before its name: `ctrlnet -q train`)."""
    if verbose and quiet:
        raise UserError("give -v or -q, not both")
    # Also exported (CTRLNET_VERBOSITY) to the processes a command starts: torchrun's workers.
    log.configure(1 if verbose else -1 if quiet else 0)
    # The libraries' Python warnings (torch's, torchao's) only with -v: by default nothing of
    # theirs comes before a command's own output or its one error line.
    log.capture_library_warnings(only_verbose=True)


# The order `ctrlnet --help` lists them in: commands first, in this order, then the groups.
for module in (config_cmd, local, prepare_cmd, precompute_cmd, k8s, cluster_cmd):
    module.register(app)


def main() -> None:
    try:
        code = app()
    except UserError as e:  # ClusterError included (exit 1)
        # One line naming the problem and the fix; no traceback (the Standards' bad-input rule).
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except ClickException as e:  # usage errors: a bad option value, an unknown command or option
        _close_progress_bars()
        if type(e).__name__ == "NoArgsIsHelpError":  # `ctrlnet data`: the help, as click prints it
            if help_text := e.format_message().strip():  # type: ignore[attr-defined]
                print(help_text, file=sys.stderr, flush=True)  # (rich printed it already)
        else:
            print(f"error: {usage_error_line(e)}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)  # type: ignore[attr-defined]
    except (KeyboardInterrupt, typer.Abort):
        sys.exit(130)  # Ctrl-C while following a run: quiet, the run goes on
    if isinstance(code, int) and not isinstance(code, bool):  # typer.Exit(n), --help, --version
        sys.exit(code)


def usage_error_line(error: Exception) -> str:
    """click's message on one line, after the command it is about and before where to look:
    `ctrlnet data synth-fill: Invalid value for '--rows': 0 is not in the range x>=1 (see
    ctrlnet data synth-fill --help)`."""
    message = " ".join(error.format_message().split())  # type: ignore[attr-defined]
    ctx = getattr(error, "ctx", None)
    if ctx is None:
        return message
    command = ctx.command_path
    return f"{command}: {message} (see {command} --help)"


def _close_progress_bars() -> None:
    """Finish any progress bar still open (the trainer's, a download's) before the error line:
    tqdm redraws an abandoned bar when it is garbage-collected at exit, which would put the bar
    after the error and leave the error line mid-screen instead of last."""
    tqdm = sys.modules.get("tqdm.std")  # only if something imported tqdm: it stays out of --help
    if tqdm is None:
        return
    for bar in list(getattr(tqdm.tqdm, "_instances", ())):
        try:
            bar.close()
        except Exception:  # a half-built bar must not hide the error it was interrupted by
            pass
