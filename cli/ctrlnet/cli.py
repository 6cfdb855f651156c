"""The `ctrlnet` command. Kept light: heavy imports (torch, diffusers, kubernetes) happen inside
command bodies, so `ctrlnet --help` stays instant."""

import sys

import typer

from ctrlnet.commands import cluster_cmd, config_cmd, k8s, local, precompute_cmd
from ctrlnet.errors import UserError

app = typer.Typer(
    name="ctrlnet",
    help="Train ControlNet adapters for Stable Diffusion, locally or on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

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
