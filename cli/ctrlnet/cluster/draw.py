"""How `ctrlnet status` and `ctrlnet list` draw: rich renderables, with styles and in-place
redraws on a terminal, and plain text elsewhere (a pipe, a file, a test), where nothing is
styled, wrapped or cut and lines carry no trailing blanks."""

from __future__ import annotations

import io
from typing import TYPE_CHECKING, TextIO

if TYPE_CHECKING:
    from rich.console import Console, RenderableType
    from rich.table import Table

PLAIN_WIDTH = 100_000
"""The width plain text is laid out in: wide enough that no line is ever wrapped or cut."""
PHASE_STYLES = {
    "Running": "green",
    "Succeeded": "green",
    "Failed": "red",
    "Pending": "yellow",
    "Restarting": "yellow",
    "Terminating": "yellow",
    "Suspended": "dim",
}
"""A phase's colour in a terminal (none off a terminal)."""


def table(*headers: str) -> Table:
    """Columns two spaces apart, a bold header, no box: the layout of kubectl's tables. A cell is
    never cut: one too wide for a terminal folds onto the next line."""
    from rich.table import Table

    t = Table(box=None, padding=(0, 1), pad_edge=False, show_edge=False, header_style="bold")
    for header in headers:
        t.add_column(header, no_wrap=True, overflow="fold")
    return t


def phase(text: str):
    """A phase, coloured by what it means."""
    from rich.text import Text

    return Text(text, style=PHASE_STYLES.get(text, ""))


def terminal(out: TextIO) -> Console:
    """A console drawing on the terminal `out`, at the terminal's width."""
    from rich.console import Console

    return Console(file=out, force_terminal=True, force_interactive=True, highlight=False, markup=False, emoji=False)


def plain(renderable: RenderableType) -> str:
    """`renderable` as plain text: no styles, no wrapping, no trailing blanks, no final newline."""
    from rich.console import Console

    buffer = io.StringIO()
    console = Console(
        file=buffer,
        width=PLAIN_WIDTH,
        force_terminal=False,
        force_jupyter=False,
        color_system=None,
        no_color=True,
        highlight=False,
        markup=False,
        emoji=False,
        legacy_windows=False,
    )
    console.print(renderable)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def show(renderable: RenderableType, out: TextIO) -> None:
    """Print `renderable` to `out`: drawn by rich on a terminal, as plain text elsewhere."""
    if out.isatty():
        terminal(out).print(renderable)
    else:
        out.write(plain(renderable) + "\n")
        out.flush()
