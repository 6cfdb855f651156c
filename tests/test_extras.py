"""Without an extra, a command that needs it says in one line how to install it (exit 2, no traceback).

A missing package is simulated with a None entry in sys.modules, in a subprocess running the real CLI.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ctrlnet.errors import UserError
from ctrlnet.extras import needs

ROOT = Path(__file__).resolve().parent.parent


def _cli_without(missing: str, *args: str, cwd: Path = ROOT) -> subprocess.CompletedProcess:
    code = f"import sys; sys.modules[{missing!r}] = None; sys.argv[0] = 'ctrlnet'; from ctrlnet.cli import main; main()"
    return subprocess.run(
        [sys.executable, "-c", code, *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "CTRLNET_HELM": "sdk"},
    )  # not a helm binary, should one be on PATH


@pytest.mark.parametrize(
    "missing, extra, args",
    [
        ("helm_python", "k8s", ["render", "-f", "examples/single-gpu.yaml"]),
        ("jsonschema", "k8s", ["validate", "--manifests", "manifests/base"]),
        ("kubernetes_validate", "k8s", ["validate", "--manifests", "manifests/base"]),
        ("torch", "train", ["train", "--max-steps", "1", "--output", "{tmp}/run"]),
        ("diffusers", "train", ["generate", "--base", "b", "--controlnet", "c", "--image", "i.png", "--prompt", "p"]),
        ("torch", "train", ["model", "init", "--out", "{tmp}/base"]),
        ("torch", "train", ["data", "synth-fill", "--out", "{tmp}/data", "--rows", "2"]),
    ],
)
def test_missing_extra_is_one_line(tmp_path, missing, extra, args):
    proc = _cli_without(missing, *[a.replace("{tmp}", str(tmp_path)) for a in args])
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    assert f"pip install 'ctrlnet[{extra}]'" in lines[0] and missing in lines[0], lines[0]


def test_helm_binary_is_the_other_way_out():
    proc = _cli_without("helm_python", "render", "-f", "examples/single-gpu.yaml")
    assert "or put a `helm` binary on PATH" in proc.stderr


def test_needs():
    with needs("k8s"):
        import json
    assert json.__name__ == "json"
    with pytest.raises(
        UserError, match=r"module 'no_such_package_xyz' is not installed: pip install 'ctrlnet\[train\]'"
    ):
        with needs("train"):
            import no_such_package_xyz  # noqa: F401
    with pytest.raises(ModuleNotFoundError):  # a module of ours missing is a bug: its traceback stays
        with needs("k8s"):
            import ctrlnet.k8s.no_such_module  # noqa: F401
    with pytest.raises(ValueError):
        with needs("gpu"):
            import json  # noqa: F401
