"""The `ctrlnet` command. Kept light: heavy imports (torch, diffusers, kubernetes) happen inside
command bodies, so `ctrlnet --help` stays instant."""

import sys

import typer

from ctrlnet.commands import config_cmd, k8s, local
from ctrlnet.errors import UserError

app = typer.Typer(
    name="ctrlnet",
    help="Train ControlNet adapters for Stable Diffusion, locally or on Kubernetes.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)

for module in (config_cmd, local, k8s):
    module.register(app)


def main() -> None:
    try:
        app()
    except UserError as e:
        # One line naming the problem and the fix; no traceback (the Standards' bad-input rule).
        print(f"error: {e}", file=sys.stderr)
        sys.exit(e.exit_code)
