"""Import layers of the two packages, read from the source (every import, also inside functions):

    ctrlnet.cli  ->  ctrlnet.commands  ->  ctrlnet.k8s (ctrlnet.cluster)  ->  ctrlnet.config, ctrlnet.errors, ctrlnet.log
                                       ->  ctrlnet_trainer                ->  ctrlnet.config, ctrlnet.errors, ctrlnet.log

so the trainer image needs no Kubernetes tooling and the config model stays importable anywhere.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGES = {"ctrlnet": ROOT / "cli" / "ctrlnet", "ctrlnet_trainer": ROOT / "trainer" / "ctrlnet_trainer"}


def _module(pkg: str, path: Path) -> str:
    parts = [pkg, *path.relative_to(PACKAGES[pkg]).with_suffix("").parts]
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def _imports(module: str, path: Path) -> set[str]:
    """Absolute names of what a module imports (from-imports resolved, relative ones too)."""
    is_pkg = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = module.split(".")[: len(module.split(".")) - node.level + (1 if is_pkg else 0)]
                base = ".".join([*anchor, *([base] if base else [])])
            names |= {base} | {f"{base}.{a.name}" for a in node.names}
    return names


def _within(name: str, *prefixes: str) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


OURS = ("ctrlnet", "ctrlnet_trainer", "tools")
BOTTOM = ("ctrlnet.config", "ctrlnet.errors", "ctrlnet.log")
# The families themselves and their registry: the rest of the trainer reaches them through a Family.
CONCRETE_FAMILIES = ("ctrlnet_trainer.models.sd", "ctrlnet_trainer.models.sdxl", "ctrlnet_trainer.models.families")
FAMILY_NAMES = {"sd", "sdxl"}
RULES = [
    # (rule, applies to module, allowed to import (of ours))
    ("ctrlnet.errors imports nothing of ours", lambda m: m == "ctrlnet.errors", lambda n: False),
    ("ctrlnet.log imports nothing of ours", lambda m: m == "ctrlnet.log", lambda n: False),
    (
        "ctrlnet.config imports only ctrlnet.config, ctrlnet.errors and ctrlnet.log",
        lambda m: _within(m, "ctrlnet.config"),
        lambda n: _within(n, *BOTTOM),
    ),
    (
        "ctrlnet.extras imports only ctrlnet.errors",
        lambda m: m == "ctrlnet.extras",
        lambda n: _within(n, "ctrlnet.errors"),
    ),
    (
        "ctrlnet_trainer imports of ctrlnet only ctrlnet.config, ctrlnet.errors and ctrlnet.log",
        lambda m: _within(m, "ctrlnet_trainer"),
        lambda n: _within(n, "ctrlnet_trainer", *BOTTOM),
    ),
    (
        "ctrlnet.k8s / ctrlnet.cluster never import ctrlnet_trainer, ctrlnet.commands or ctrlnet.cli",
        lambda m: _within(m, "ctrlnet.k8s", "ctrlnet.cluster"),
        lambda n: not _within(n, "ctrlnet_trainer", "ctrlnet.commands", "ctrlnet.cli"),
    ),
    (
        "ctrlnet.commands and ctrlnet.cli are the top: only the entry points (ctrlnet.cli, python -m ctrlnet) import them",
        lambda m: not _within(m, "ctrlnet.cli", "ctrlnet.__main__", "ctrlnet.commands"),
        lambda n: not _within(n, "ctrlnet.commands", "ctrlnet.cli"),
    ),
    ("python -m ctrlnet runs ctrlnet.cli only", lambda m: m == "ctrlnet.__main__", lambda n: _within(n, "ctrlnet.cli")),
    (
        "ctrlnet.cli imports only ctrlnet.commands, ctrlnet.errors and ctrlnet.log",
        lambda m: m == "ctrlnet.cli",
        lambda n: _within(n, "ctrlnet.commands", "ctrlnet.errors", "ctrlnet.log"),
    ),
    ("the product never imports the development tools (tools/)", lambda m: True, lambda n: not _within(n, "tools")),
    (
        "outside ctrlnet_trainer.models no module names a concrete model family (the Family seam)",
        lambda m: _within(m, "ctrlnet_trainer") and not _within(m, "ctrlnet_trainer.models"),
        lambda n: not _within(n, *CONCRETE_FAMILIES),
    ),
]


def test_import_layers():
    violations = []
    for pkg, folder in PACKAGES.items():
        for path in sorted(folder.rglob("*.py")):
            module = _module(pkg, path)
            try:
                imported = _imports(module, path)
            except SyntaxError as e:  # requires-python is >=3.11: every module must parse here
                violations.append(f"{module} does not parse on this Python: {e}")
                continue
            for rule, applies, allowed in RULES:
                if not applies(module):
                    continue
                # the root package holds only __version__
                bad = {n for n in imported if n != "ctrlnet" and _within(n, *OURS) and not allowed(n)}
                # `from a.b import c` imports a.b and maybe a.b.c: name a.b once
                bad = {n for n in bad if n.rpartition(".")[0] not in bad}
                violations += [f"{module} imports {name}: breaks '{rule}'" for name in sorted(bad)]
    assert violations == [], "\n".join(violations)


def test_the_check_sees_imports():
    """The walker finds absolute, from-, relative and function-level imports."""
    src = ROOT / "cli" / "ctrlnet" / "commands" / "k8s.py"
    names = _imports("ctrlnet.commands.k8s", src)
    assert {"ctrlnet.errors.UserError", "ctrlnet.k8s.render.render_objects", "ctrlnet.k8s.validate"} <= names


def test_help_imports_nothing_heavy():
    """`ctrlnet --help` stays instant: no trainer stack, no Kubernetes tooling (commands import them)."""
    heavy = ("torch", "diffusers", "transformers", "kubernetes", "kubernetes_validate", "helm_python", "jsonschema")
    code = (
        "import sys; from ctrlnet.cli import app; from typer.testing import CliRunner; "
        "r=CliRunner().invoke(app, ['--help']); assert r.exit_code==0, r.output; "
        f"print(','.join(m for m in {heavy!r} if m in sys.modules))"
    )
    start = time.monotonic()
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    elapsed = time.monotonic() - start
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"`ctrlnet --help` imported: {r.stdout.strip()}"
    assert elapsed < 5, f"`ctrlnet --help` took {elapsed:.1f}s"


def _family_checks(path: Path) -> list[str]:
    """`x == "sdxl"`-style comparisons, and `"sdxl" if ... else "sd"` choices, in a module's code."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Compare):
            operands = [node.left, *node.comparators]
        elif isinstance(node, ast.IfExp):
            operands = [node.body, node.orelse]
        else:
            continue
        if any(isinstance(o, ast.Constant) and o.value in FAMILY_NAMES for o in operands):
            found.append(f"{path.relative_to(ROOT)}:{node.lineno}")
    return found


def test_no_family_checks_outside_the_seam():
    """What differs between SD1.x/2.x and SDXL (and the next families) is asked of the Family object:
    no trainer module outside models/ compares a family name (the CLI's config may: it validates
    what the user typed, without the trainer)."""
    trainer = PACKAGES["ctrlnet_trainer"]
    checks = [
        c
        for path in sorted(trainer.rglob("*.py"))
        if "models" not in path.relative_to(trainer).parts
        for c in _family_checks(path)
    ]
    assert checks == []
    assert _family_checks(trainer / "models" / "load.py")  # the check sees one where there is one
