"""Scan the pods of the rendered examples with checkov, a pod-security scanner nobody here wrote.

    make scan                                          # a checkov venv (.venv-checkov), then this
    python tools/checkov_pods.py --checkov .venv-checkov/bin/checkov
    python tools/checkov_pods.py --set cluster.secrets.as_files=true   # every example, with overrides
    python tools/checkov_pods.py --keep out/ --json    # keep the scanned manifests; JSON summary

checkov's kubernetes framework knows Pods, Deployments, Jobs, ... but not PyTorchJob or TrainJob:
run on `ctrlnet render -o DIR` as is, it passes 15 checks and looks at no pod. So each job is
replaced by the Pods its operator creates from it (a PyTorchJob replica's template as is; a
TrainJob's runtime patch of its `node` pod, with spec.trainer's image, command, args, env and
resources put into the `node` container, as Trainer does; what the runtime itself adds, e.g.
imagePullPolicy, is not known here), next to the chart's other objects (NetworkPolicy,
ServiceAccount, ...), and checkov scans that folder. A check skipped by an annotation on the pod
template (`checkov.io/skipN: <check id>=<reason>`, docs/kubernetes.md#hardening) is reported as
skipped with its reason. Exit 1 when a check fails.

checkov pins old versions of boto3/botocore, packaging and networkx, which the trainer's
dependencies (s3fs, torch) cannot share: it lives in its own virtual environment, never in the
project's (`make scan` makes one).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
EXAMPLES = sorted((ROOT / "examples").glob("*.yaml"))
CHECKOV_VENV = ROOT / ".venv-checkov"


def _trainjob_pod_template(job: dict[str, Any], tpl: dict[str, Any]) -> dict[str, Any]:
    trainer = job["spec"].get("trainer") or {}
    fields = {
        "image": trainer.get("image"),
        "command": trainer.get("command"),
        "args": trainer.get("args"),
        "env": trainer.get("env"),
        "resources": trainer.get("resourcesPerNode"),
    }
    for c in (tpl.get("spec") or {}).get("containers") or []:
        if c.get("name") == "node":
            c.update({k: v for k, v in fields.items() if v is not None})
    return tpl


def job_pods(job: dict[str, Any]) -> list[dict[str, Any]]:
    """The Pods a PyTorchJob or TrainJob makes, one per pod template, as checkov reads a Pod."""
    meta = job.get("metadata") or {}
    name, ns = meta.get("name", "job"), meta.get("namespace")
    templates: list[tuple[str, dict[str, Any]]] = []
    if job.get("kind") == "PyTorchJob":
        for rtype, rs in (job.get("spec", {}).get("pytorchReplicaSpecs") or {}).items():
            templates.append((f"{name}-{rtype.lower()}-0", copy.deepcopy(rs.get("template") or {})))
    elif job.get("kind") == "TrainJob":
        for patch in job["spec"].get("runtimePatches") or []:
            for rj in patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]:
                if rj.get("name") == "node":
                    tpl = copy.deepcopy(rj["template"]["spec"]["template"])
                    templates.append((f"{name}-node-0-0", _trainjob_pod_template(job, tpl)))
    pods = []
    for pod_name, tpl in templates:
        pod_meta = {**(tpl.get("metadata") or {}), "name": pod_name}
        if ns:
            pod_meta["namespace"] = ns
        pods.append({"apiVersion": "v1", "kind": "Pod", "metadata": pod_meta, "spec": tpl.get("spec") or {}})
    return pods


def scan_manifests(example: Path, sets: list[str] | None = None) -> list[dict[str, Any]]:
    """The chart's objects for `example`, with each job replaced by the Pods it makes."""
    from ctrlnet.config import load_job_config
    from ctrlnet.k8s.render import render_objects

    out = []
    for obj in render_objects(load_job_config(str(example), list(sets or []))):
        out += job_pods(obj) if obj.get("kind") in ("PyTorchJob", "TrainJob") else [obj]
    return out


def find_checkov(explicit: str | None = None) -> str | None:
    """`explicit`, else CTRLNET_CHECKOV, else .venv-checkov's, else one beside this Python, else PATH's."""
    for candidate in (
        explicit,
        os.environ.get("CTRLNET_CHECKOV"),
        CHECKOV_VENV / "bin" / "checkov",
        Path(sys.executable).parent / "checkov",
    ):
        if candidate and Path(candidate).exists():
            return str(candidate)
    return shutil.which("checkov")


def run_checkov(checkov: str, folder: Path) -> list[dict[str, Any]]:
    """checkov's results for `folder`, one row per (check, resource): check_id, check_name,
    resource, example (the sub-folder), result (passed, failed, skipped), reason (of a skip)."""
    env = {**os.environ, "BC_SKIP_MAPPING": "TRUE", "CHECKOV_RUN_SCA_PACKAGE_SCAN_V2": "false"}
    proc = subprocess.run(
        [checkov, "-d", str(folder), "--framework", "kubernetes", "--output", "json", "--skip-download"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    if proc.returncode not in (0, 1):
        raise RuntimeError(f"checkov exited {proc.returncode}: {proc.stderr[-2000:]}")
    doc = json.loads(proc.stdout or "{}")
    rows = []
    for d in doc if isinstance(doc, list) else [doc]:
        results = d.get("results") or {}
        for result in ("passed", "failed", "skipped"):
            for r in results.get(f"{result}_checks") or []:
                file_path = r.get("file_path", "")
                rows.append(
                    {
                        "check_id": r["check_id"],
                        "check_name": r.get("check_name", ""),
                        "resource": r.get("resource", ""),
                        "example": Path(file_path.lstrip("/")).parts[0] if file_path else "",
                        "result": result,
                        "reason": (r.get("check_result") or {}).get("suppress_comment", ""),
                    }
                )
    return rows


def scan(examples: list[Path], checkov: str, sets: list[str] | None = None, keep: Path | None = None) -> list[dict]:
    """Render every example (with `sets`), write the scanned manifests, run checkov on them."""
    with tempfile.TemporaryDirectory() as tmp:
        folder = keep or Path(tmp)
        for ex in examples:
            write_manifests(scan_manifests(ex, sets), folder / ex.stem)
        return run_checkov(checkov, folder)


def write_manifests(objs: list[dict[str, Any]], out: Path) -> None:
    """One file per object, `<kind>-<name>.yaml` (a job makes several Pods)."""
    from ctrlnet.k8s.yamlio import dump_object

    out.mkdir(parents=True, exist_ok=True)
    for obj in objs:
        (out / f"{obj['kind'].lower()}-{obj['metadata']['name']}.yaml").write_text(dump_object(obj))


def summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    ordered = sorted(rows, key=lambda r: (r["check_id"], r["example"]))
    return {
        "passed": sum(r["result"] == "passed" for r in rows),
        "failed": sum(r["result"] == "failed" for r in rows),
        "skipped": sum(r["result"] == "skipped" for r in rows),
        "failed_checks": {r["check_id"]: r["check_name"] for r in ordered if r["result"] == "failed"},
        "skipped_checks": {r["check_id"]: r["reason"] for r in ordered if r["result"] == "skipped"},
    }


def main(argv: list[str] | None = None) -> int:
    sys.path.insert(0, str(ROOT))
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("examples", nargs="*", type=Path, default=EXAMPLES, help="job files (default: examples/)")
    parser.add_argument("--set", dest="sets", action="append", default=[], help="override, as ctrlnet --set")
    parser.add_argument("--checkov", help="the checkov executable (default: CTRLNET_CHECKOV, .venv-checkov, PATH)")
    parser.add_argument("--keep", type=Path, help="write the scanned manifests here and keep them")
    parser.add_argument("--json", action="store_true", help="print the summary and the failed rows as JSON")
    args = parser.parse_args(argv)
    checkov = find_checkov(args.checkov)
    if checkov is None:
        print("checkov not found: `make scan` installs it into .venv-checkov (or pass --checkov)", file=sys.stderr)
        return 2
    rows = scan(args.examples, checkov, args.sets, args.keep)
    s = summary(rows)
    if args.json:
        print(json.dumps({**s, "failed_rows": [r for r in rows if r["result"] == "failed"]}, indent=2))
    else:
        what = f"{len(args.examples)} example(s)" + "".join(f" --set {x}" for x in args.sets)
        print(f"checkov on the pods of {what}: passed {s['passed']}, failed {s['failed']}, skipped {s['skipped']}")
        for cid, name in s["failed_checks"].items():
            where = sorted({r["example"] for r in rows if r["check_id"] == cid and r["result"] == "failed"})
            print(f"  FAILED   {cid:<11} {name} ({', '.join(where)})")
        for cid, reason in s["skipped_checks"].items():
            where = sorted({r["example"] for r in rows if r["check_id"] == cid and r["result"] == "skipped"})
            print(f"  skipped  {cid:<11} {reason} ({', '.join(where)})")
    return 1 if s["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())
