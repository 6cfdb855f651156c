"""The Helm engine: a `helm` binary on PATH when there is one, else helm-python-sdk (Helm v4's
Go engine in-process). Both render the same chart with the same values, so the output agrees.

CTRLNET_HELM=binary|sdk forces one engine (auto: binary if found, else sdk).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ctrlnet.errors import UserError, one_line
from ctrlnet.extras import needs

_SOURCE = re.compile(r"^# Source: (\S+)\s*$", re.M)


def engine() -> str:
    """'binary' or 'sdk', per CTRLNET_HELM (default auto)."""
    want = os.environ.get("CTRLNET_HELM", "auto").strip().lower() or "auto"
    if want not in ("auto", "binary", "sdk"):
        raise UserError(f"CTRLNET_HELM={want!r}: use auto, binary or sdk")
    if want == "binary" or (want == "auto" and shutil.which("helm")):
        if not shutil.which("helm"):
            raise UserError("CTRLNET_HELM=binary but no `helm` on PATH: install Helm, or unset CTRLNET_HELM")
        return "binary"
    return "sdk"


def _sdk():
    try:
        # No helm-python-sdk wheel for some platforms (Intel macOS): a helm binary does the same job.
        with needs("k8s", alternative="put a `helm` binary on PATH"):
            import helm_python
        return helm_python
    except OSError as e:  # wheel without a native library for this platform
        raise UserError(
            f"helm-python-sdk cannot load its native library ({one_line(e)}): put a `helm` binary on PATH"
        ) from None


def render(
    chart: Path, values: dict[str, Any], *, release: str, namespace: str, how: str | None = None
) -> dict[str, str]:
    """Render `chart` with `values`: template path (e.g. ctrlnet/templates/configmap.yaml) -> text.
    NOTES.txt and templates that render to nothing are left out."""
    how = how or engine()
    out = (
        _render_binary(chart, values, release, namespace)
        if how == "binary"
        else _render_sdk(chart, values, release, namespace)
    )
    return {path: text for path, text in out.items() if not path.endswith("NOTES.txt") and text.strip()}


def _render_sdk(chart: Path, values: dict[str, Any], release: str, namespace: str) -> dict[str, str]:
    helm = _sdk()
    try:
        with helm.Chart.load(str(chart)) as ch:
            return ch.render(values, name=release, namespace=namespace, is_install=True)
    except helm.HelmError as e:
        raise UserError(f"helm could not render {chart}: {_one_line(str(e))}") from None


def _render_binary(chart: Path, values: dict[str, Any], release: str, namespace: str) -> dict[str, str]:
    with tempfile.TemporaryDirectory(prefix="ctrlnet-helm-") as tmp:
        vf = Path(tmp) / "values.json"
        vf.write_text(json.dumps(values))
        proc = subprocess.run(
            ["helm", "template", release, str(chart), "--namespace", namespace, "-f", str(vf)],
            capture_output=True,
            text=True,
            check=False,
        )
    if proc.returncode != 0:
        raise UserError(f"helm template failed: {_one_line(proc.stderr)}")
    out: dict[str, str] = {}
    for doc in re.split(r"^---\s*$", proc.stdout, flags=re.M):
        m = _SOURCE.search(doc)
        if m and doc.strip():
            out[m.group(1)] = out.get(m.group(1), "") + doc
    return out


def lint(
    chart: Path, values: dict[str, Any] | None = None, *, strict: bool = True, how: str | None = None
) -> list[str]:
    """`helm lint` findings as lines "[SEVERITY] path: message" (empty list: clean)."""
    how = how or engine()
    if how == "binary":
        args = ["helm", "lint", str(chart), *(["--strict"] if strict else [])]
        with tempfile.TemporaryDirectory(prefix="ctrlnet-helm-") as tmp:
            if values is not None:
                vf = Path(tmp) / "values.json"
                vf.write_text(json.dumps(values))
                args += ["-f", str(vf)]
            proc = subprocess.run(args, capture_output=True, text=True, check=False)
        return [ln.strip() for ln in proc.stdout.splitlines() if ln.strip().startswith("[")]
    helm = _sdk()
    report = helm.lint(str(chart), values, strict=strict)
    names = {0: "UNKNOWN", 1: "INFO", 2: "WARNING", 3: "ERROR"}
    lines = [
        f"[{names.get(m['severity'], m['severity'])}] {m['path']}: {m['error']}" for m in report.get("messages", [])
    ]
    lines += [f"[ERROR] {e}" for e in report.get("errors", []) if not any(e in ln for ln in lines)]
    return lines


def _one_line(text: str) -> str:
    return " ".join(text.split())[:800]
