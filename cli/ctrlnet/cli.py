"""The `ctrlnet` command. Kept light: heavy imports (torch, diffusers, kubernetes) happen inside
command bodies, so `ctrlnet --help` stays instant."""

import sys
from typing import Annotated

import typer

from ctrlnet import log
from ctrlnet.commands import cluster_cmd, config_cmd, k8s, local, precompute_cmd
from ctrlnet.errors import UserError

app = typer.Typer(
    name="ctrlnet",
    help="Train ControlNet adapters for Stable Diffusion, locally or on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)


@app.callback()
def verbosity(
    verbose: Annotated[bool, typer.Option("-v", "--verbose", help="Say more: debug lines too.")] = False,
    quiet: Annotated[bool, typer.Option("-q", "--quiet", help="Only warnings and errors (no notes).")] = False,
) -> None:
    """The options every command takes (before its name: `ctrlnet -q train`)."""
    if verbose and quiet:
        raise UserError("give -v or -q, not both")
    # Also exported (CTRLNET_VERBOSITY) to the processes a command starts: torchrun's workers.
    log.configure(1 if verbose else -1 if quiet else 0)


# The order `ctrlnet --help` lists them in: commands first, in this order, then the groups.
for module in (config_cmd, local, precompute_cmd, k8s, cluster_cmd):
    module.register(app)


def main() -> None:
    try:
        app()
    except UserError as e:  # ClusterError included (exit 1)
        # One line naming the problem and the fix; no traceback (the Standards' bad-input rule).
        _close_progress_bars()
        print(f"error: {e}", file=sys.stderr, flush=True)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)  # Ctrl-C while following a run: quiet, the run goes on


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
