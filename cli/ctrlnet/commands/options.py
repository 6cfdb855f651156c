"""Options shared by several commands."""

from typing import Annotated

import typer

ConfigFile = Annotated[str | None, typer.Option("-f", "--file", help="Job config YAML (see `ctrlnet config schema`).")]
Overrides = Annotated[
    list[str] | None,
    typer.Option("--set", help="Override a key, e.g. --set train.loop.max_steps=100 (repeatable)."),
]
