"""Shared helpers for the Kubernetes bundle tests (chart, render, validate, manifests, image)."""

from __future__ import annotations

import copy
import functools
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = sorted(p.name for p in (ROOT / "examples").glob("*.yaml"))


@functools.cache
def _render(example: str, sets: tuple[str, ...] = ()) -> list[dict]:
    """An example rendered as that backend: the one it or `sets` name, else PyTorchJob. The
    examples leave `cluster.backend` at auto (TrainJob offline: the golden renders show that); the
    rule and hardening tests written against the PyTorchJob's fields pin it, the TrainJob ones
    render examples/trainjob.yaml or set cluster.backend=trainjob."""
    from ctrlnet.config import load_job_config
    from ctrlnet.k8s.render import render_objects

    cfg = load_job_config(ROOT / "examples" / example, list(sets))
    if cfg.cluster.backend == "auto":
        cfg = load_job_config(ROOT / "examples" / example, ["cluster.backend=pytorchjob", *sets])
    return render_objects(cfg)


def render_example(example: str, *sets: str) -> list[dict]:
    """The example's rendered objects (a fresh copy: tests may mutate it)."""
    return copy.deepcopy(_render(example, tuple(sets)))


def by_kind(objs: list[dict], kind: str) -> dict:
    (obj,) = [o for o in objs if o["kind"] == kind]
    return obj


def ctrlnet(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess:
    """Run the real CLI entry point (main(): UserError -> one line, exit 2) in a subprocess."""
    return subprocess.run(
        [sys.executable, "-c", "from ctrlnet.cli import main; main()", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        input=stdin,
        timeout=120,
    )


@pytest.fixture
def root() -> Path:
    return ROOT
