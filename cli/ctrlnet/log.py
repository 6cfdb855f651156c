"""ctrlnet's one log: notes and warnings of the CLI and the trainer, rank-aware, with one verbosity.

Every module logs through `get_logger(__name__)` (a child of the `ctrlnet` logger) instead of
printing. What reaches the terminal:

    note (INFO)       stdout, as written ("resuming from ...", "speed: ...")
    warning and up    stderr, prefixed "warning: " / "error: "
    debug             only with -v

Rank-aware: under torchrun every process runs the same code, so a note would print once per GPU.
Records from processes other than rank 0 (torchrun's RANK) are dropped unless logged with
`extra=ALL_RANKS` (a warning about that rank's own rows or uploads, say; a pod's log already says
which rank it is).

Verbosity: `ctrlnet -v` (debug, and the libraries' info), default (notes and warnings), `ctrlnet -q`
(warnings and errors only). The CLI sets CTRLNET_VERBOSITY for the processes it starts (torchrun's
workers configure from it), so `-q` quiets a local multi-process run too. Python warnings
(`warnings.warn` in torch, diffusers, ...) go through the same handlers once an entry point calls
`capture_library_warnings()`.
"""

from __future__ import annotations

import logging
import os
import sys

ROOT = "ctrlnet"
VERBOSITY_ENV = "CTRLNET_VERBOSITY"
ALL_RANKS = {"all_ranks": True}
"""`log.warning(..., extra=ALL_RANKS)`: emitted by every process, not only rank 0."""

_LEVELS = {-1: logging.WARNING, 0: logging.INFO, 1: logging.DEBUG}


def get_logger(name: str) -> logging.Logger:
    """The logger of module `name` (`__name__`), under the `ctrlnet` tree whatever the package.
    The handlers are installed on first use (verbosity from CTRLNET_VERBOSITY), so a trainer run
    started any way (CLI, torchrun worker, a test calling train()) logs the same."""
    if not _installed():
        configure()
    short = name.split(".", 1)[1] if name.startswith(("ctrlnet.", "ctrlnet_trainer.")) else name
    return logging.getLogger(f"{ROOT}.{short}")


def _installed() -> bool:
    return any(isinstance(h, _Stream) for h in logging.getLogger(ROOT).handlers)


def rank() -> int:
    try:
        return int(os.environ.get("RANK", "0"))
    except ValueError:
        return 0


class _RankFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return rank() == 0 or getattr(record, "all_ranks", False)


class _Format(logging.Formatter):
    """Notes as written; warnings and errors with the prefix the CLI's own errors use."""

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.levelno >= logging.ERROR:
            return f"error: {text}"
        if record.levelno >= logging.WARNING:
            return f"warning: {text}"
        return text


class _Stream(logging.StreamHandler):
    """A handler on sys.stdout / sys.stderr as they are at each record (pytest's capture, the
    CLI's redirections replace them after the handler is made)."""

    def __init__(self, name: str, low: int, high: int):
        super().__init__()
        self.stream_name, self.low, self.high = name, low, high

    @property
    def stream(self):
        return getattr(sys, self.stream_name)

    @stream.setter
    def stream(self, _value) -> None:  # StreamHandler.__init__ assigns it
        pass

    def emit(self, record: logging.LogRecord) -> None:
        if self.low <= record.levelno < self.high:
            super().emit(record)
            self.flush()


def verbosity() -> int:
    """-1 (quiet), 0 or 1 (verbose), from CTRLNET_VERBOSITY (0 when unset or unreadable)."""
    try:
        return max(-1, min(1, int(os.environ.get(VERBOSITY_ENV, "0"))))
    except ValueError:
        return 0


def configure(level: int | None = None) -> None:
    """Install the handlers (once per process) at `level`: -1, 0 or 1; None: from the environment.
    An explicit level is exported to child processes (torchrun's workers) through CTRLNET_VERBOSITY."""
    if level is None:
        level = verbosity()
    else:
        level = max(-1, min(1, level))
        os.environ[VERBOSITY_ENV] = str(level)
    root = logging.getLogger(ROOT)
    root.setLevel(_LEVELS[level])
    root.propagate = False
    if not _installed():
        for handler in (_Stream("stdout", 0, logging.WARNING), _Stream("stderr", logging.WARNING, 1000)):
            handler.setFormatter(_Format())
            handler.addFilter(_RankFilter())
            root.addHandler(handler)


def capture_library_warnings(*, only_verbose: bool = False) -> None:
    """Python warnings (torch's, diffusers') through the same handlers and rank filter, silenced
    by -q: for the entry points (the CLI, the trainer's process), not at import. `only_verbose`
    (the CLI): shown with -v only, so a library's warning never precedes a command's one-line error."""
    configure()
    logging.captureWarnings(True)
    warned = logging.getLogger("py.warnings")
    warned.handlers = logging.getLogger(ROOT).handlers
    warned.propagate = False
    shown = verbosity() > 0 if only_verbose else verbosity() >= 0
    warned.setLevel(logging.WARNING if shown else logging.ERROR)
