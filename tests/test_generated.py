"""Every generated file is what the code generates now (tools/gen: docs, chart values and schema,
the chart's contract template, manifests/). Fix: python tools/generate.py"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from tools.gen import GENERATED

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.parametrize("gen", GENERATED, ids=[g.name for g in GENERATED])
def test_in_sync(gen):
    assert gen.stale(ROOT) == [], f"{gen.name} is stale: run python tools/generate.py"


def test_generate_check_passes():
    r = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "generate.py"), "--check"], capture_output=True, text=True, timeout=300
    )
    assert r.returncode == 0, r.stderr
