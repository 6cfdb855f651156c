"""`python -m ctrlnet_trainer.selfcheck`: is this installation whole? The trainer image runs it
at build time (a failing check fails the build), and anyone can run it in a pod.

* Imports every module of `ctrlnet` and `ctrlnet_trainer` (walking the installed packages, not a
  list that could go stale). A module of ours that is missing is a broken install (the image once
  lost `ctrlnet.config.credentials` to a .dockerignore pattern and its smoke import passed
  anyway); a third-party package that is missing is fine only where it belongs to another extra
  than the one checked (the image has [train], not the workstation's [k8s]): those are listed.
* Checks every shipped weight file of the demo base against the sha256 and size its
  provenance.json records (builtin:demo must be the base that was pretrained, not a truncated
  or missing file).

Exit 0 with a summary line, or 1 with one line per problem.
"""

from __future__ import annotations

import argparse
import hashlib
import importlib
import json
import pkgutil
import sys
from pathlib import Path

from ctrlnet.errors import one_line

PACKAGES = ("ctrlnet", "ctrlnet_trainer")
# Third-party top-level modules of the extras the trainer image does not install: ctrlnet[k8s].
OTHER_EXTRAS = {"helm": "k8s", "kubernetes": "k8s", "kubernetes_validate": "k8s", "jsonschema": "k8s"}


def module_problems(packages=PACKAGES) -> tuple[int, list[str], list[str]]:
    """(modules imported, problems, modules skipped because another extra's package is missing)."""
    imported, problems, skipped = 0, [], []
    names = []
    for package in packages:
        root = importlib.import_module(package)
        names.append(package)
        for info in pkgutil.walk_packages(root.__path__, prefix=f"{package}."):
            if info.name.rsplit(".", 1)[-1] != "__main__":  # running a CLI is not importing it
                names.append(info.name)
    for name in names:
        try:
            importlib.import_module(name)
            imported += 1
        except ModuleNotFoundError as e:
            top = (e.name or "").split(".")[0]
            if top in OTHER_EXTRAS:
                skipped.append(f"{name} (needs ctrlnet[{OTHER_EXTRAS[top]}]: {e.name})")
            else:
                problems.append(f"{name}: cannot be imported: {type(e).__name__}: {e}")
        except Exception as e:  # any other failure at import is a broken install
            problems.append(f"{name}: cannot be imported: {one_line(e, with_type=True)}")
    return imported, problems, skipped


def weight_problems(folder: Path | None = None) -> tuple[int, list[str]]:
    """(weight files checked, problems) for the demo base shipped in the package."""
    if folder is None:
        from ctrlnet_trainer.models.demo import WEIGHTS as folder
    provenance = folder / "provenance.json"
    if not provenance.is_file():
        return 0, [f"{provenance} is missing: the demo base (builtin:demo) is not installed"]
    records = json.loads(provenance.read_text())["weights"]
    problems = []
    for rel, record in sorted(records.items()):
        path = folder / rel
        if not path.is_file():
            problems.append(f"{path} is missing")
            continue
        data = path.read_bytes()
        if len(data) != record["bytes"] or hashlib.sha256(data).hexdigest() != record["sha256"]:
            problems.append(f"{path}: {len(data)} bytes, sha256 differs from provenance.json")
    on_disk = {str(p.relative_to(folder)) for p in folder.rglob("*.safetensors")}
    problems += [f"{folder / rel}: not recorded in provenance.json" for rel in sorted(on_disk - set(records))]
    return len(records), problems


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(prog="python -m ctrlnet_trainer.selfcheck", description=__doc__.splitlines()[0]).parse_args(
        argv
    )
    imported, problems, skipped = module_problems()
    weights, weight_issues = weight_problems()
    problems += weight_issues
    for line in problems:
        print(f"error: {line}", file=sys.stderr)
    if problems:
        return 1
    extra = f"; skipped {len(skipped)} that need another extra: {', '.join(skipped)}" if skipped else ""
    print(f"selfcheck: {imported} modules import, {weights} demo weight files match their sha256{extra}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
