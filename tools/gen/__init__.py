"""Every file generated from the code, in one registry: `python tools/generate.py` writes them
(or, with --check, says which are stale) and tests/test_generated.py checks each is in sync.

Development only: the generators are not part of the ctrlnet package.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from tools.gen import chart_contract, chart_values, config_docs, manifests


@dataclass(frozen=True)
class Generated:
    """One generated file, or a folder of them."""

    name: str
    """What it is called in messages and test ids: its path (a folder ends in /)."""
    build: Callable[[Path], dict[str, str]]
    """repo root -> {repo-relative path: text} of every file it produces."""
    owns: tuple[str, ...] = ()
    """Folders it owns whole: a file there that it no longer produces is stale (and removed)."""

    def leftovers(self, root: Path) -> list[str]:
        return sorted(
            f.relative_to(root).as_posix()
            for d in self.owns
            if (root / d).is_dir()
            for f in (root / d).rglob("*")
            if f.is_file()
        )

    def stale(self, root: Path) -> list[str]:
        """Paths whose checked-in text differs from what the code generates (or that should not exist)."""
        files = self.build(root)
        bad = [
            rel
            for rel, text in files.items()
            if not (root / rel).is_file() or (root / rel).read_text(encoding="utf-8") != text
        ]
        return bad + [rel for rel in self.leftovers(root) if rel not in files]

    def write(self, root: Path) -> list[str]:
        """Bring the checked-in files up to date; the paths written or removed."""
        files = self.build(root)
        changed = []
        for rel in self.leftovers(root):
            if rel not in files:
                (root / rel).unlink()
                changed.append(rel)
        for rel, text in files.items():
            path = root / rel
            if not path.is_file() or path.read_text(encoding="utf-8") != text:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text, encoding="utf-8")
                changed.append(rel)
        return changed


def _file(path: str, produce: Callable[[], str]) -> Generated:
    return Generated(path, lambda root: {path: produce()})


GENERATED = [
    _file(config_docs.DOC_PATH, config_docs.render_config_docs),
    _file(chart_values.VALUES_PATH, chart_values.values_yaml_text),
    _file(chart_values.SCHEMA_PATH, chart_values.values_schema_text),
    _file(chart_contract.TEMPLATE_PATH, chart_contract.contract_tpl_text),
    # Rendered from the chart, so after the chart files above.
    Generated("manifests/", manifests.build, owns=("manifests/base", "manifests/overlays")),
]
