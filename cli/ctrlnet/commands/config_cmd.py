"""`ctrlnet config show|schema`."""

import json

import typer
import yaml

from ctrlnet.commands.options import ConfigFile, Overrides

config_app = typer.Typer(help="Inspect the job config.", no_args_is_help=True)


@config_app.command("show")
def show(file: ConfigFile = None, set_: Overrides = None) -> None:
    """Print the effective config (file + overrides + defaults) as YAML."""
    from ctrlnet.config import load_job_config

    cfg = load_job_config(file, set_)
    typer.echo(yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False), nl=False)


@config_app.command("schema")
def schema() -> None:
    """Print the JSON schema of the job config."""
    from ctrlnet.config import JobConfig

    typer.echo(json.dumps(JobConfig.model_json_schema(), indent=2))


def register(app: typer.Typer) -> None:
    app.add_typer(config_app, name="config")
