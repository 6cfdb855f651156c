"""The `ctrlnet` command. Kept light: heavy imports (torch, diffusers, kubernetes) happen inside
command bodies, so `ctrlnet --help` stays instant."""

import sys

import typer

from ctrlnet.commands import cluster_cmd, config_cmd, k8s, local
from ctrlnet.errors import UserError

app = typer.Typer(
    name="ctrlnet",
    help="Train ControlNet adapters for Stable Diffusion, locally or on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (config_cmd, local, k8s, cluster_cmd):
    module.register(app)


def main() -> None:
    try:
        app()
    except UserError as e:  # ClusterError included (exit 1)
        # One line naming the problem and the fix; no traceback (the Standards' bad-input rule).
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
    except KeyboardInterrupt:
        sys.exit(130)  # Ctrl-C while following a run: quiet, the run goes on
