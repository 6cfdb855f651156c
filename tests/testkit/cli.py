"""What the command-line tests share: the script's entry point run in this process, the offline
environment a subprocess runs in, and what every test asserts about bad input."""

import os
import subprocess
import sys
from pathlib import Path

CTRLNET = Path(sys.executable).parent / "ctrlnet"
"""The console script of this venv (what a user runs)."""


def offline_env(hf_home: Path) -> dict:
    """The environment a `ctrlnet` subprocess runs in: no hub access, its own HF cache."""
    return {**os.environ, "HF_HOME": str(hf_home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


def run_in_process(args, *, monkeypatch, capture, cwd) -> subprocess.CompletedProcess:
    """`ctrlnet ARGS` through its entry point (`ctrlnet.cli.main`) in this process: the same command
    line without ten seconds of imports per call. `capture`: pytest's capfd or capsys."""
    from ctrlnet.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", ["ctrlnet", *map(str, args)])
    capture.readouterr()
    try:
        main()
        code = 0
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else int(e.code is not None)
    out, err = capture.readouterr()
    return subprocess.CompletedProcess(args, code, out, err)


def assert_user_error(proc, *words):
    """Exit 2, one `error:` line naming the problem (each of `words` in it), no traceback; returns the line."""
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]
