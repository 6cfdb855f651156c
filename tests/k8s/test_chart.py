"""The Helm chart: lint clean, values.schema.json / values.yaml in sync with the config model,
the schema enforced by Helm itself, NOTES with the next commands, and `ctrlnet --help` stays light."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import yaml

from ctrlnet.config import JobConfig, load_job_config
from ctrlnet.errors import UserError
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import GENERATED, chart_dir, chart_values

from .conftest import EXAMPLES, ROOT


def test_generated_chart_files_in_sync():
    """values.yaml and values.schema.json are what tools/gen_chart_schema.py writes from the model."""
    for name, produce in GENERATED.items():
        assert (chart_dir() / name).read_text() == produce(), f"charts/ctrlnet/{name} is stale: run python tools/gen_chart_schema.py"


def test_schema_is_the_config_models():
    schema = json.loads((chart_dir() / "values.schema.json").read_text())
    assert schema["properties"].keys() == {"train", "cluster"}
    assert schema["$defs"]["ClusterConfig"]["additionalProperties"] is False
    assert schema["$defs"]["ClusterConfig"]["properties"]["nodes"]["minimum"] == 1


def test_values_yaml_defaults_are_the_models():
    values = yaml.safe_load((chart_dir() / "values.yaml").read_text())
    assert values["train"] == {}
    assert values["cluster"] == JobConfig().model_dump(mode="json")["cluster"]


@pytest.mark.parametrize("values_from", [None, *EXAMPLES])
def test_helm_lint_clean(values_from):
    values = chart_values(load_job_config(ROOT / "examples" / values_from)) if values_from else None
    findings = helm.lint(chart_dir(), values, strict=True)
    assert [f for f in findings if not f.startswith("[INFO]")] == []


def test_helm_enforces_the_schema():
    """Plain `helm install -f job.yaml` rejects what ctrlnet rejects (unknown keys, ranges, enums)."""
    for values, needle in [
        ({"cluster": {"nodez": 2}}, "nodez"),
        ({"cluster": {"nodes": 0}}, "minimum"),
        ({"cluster": {"backend": "mpijob"}}, "backend"),
        ({"train": {"loop": {"batch_size": "four"}}}, "batch_size"),
        ({"train": {"data": {"resolution": 500}}}, "multiple of 8|multipleOf|resolution"),
    ]:
        with pytest.raises(UserError, match=needle):
            helm.render(chart_dir(), values, release="x", namespace="default", how="sdk")


def test_chart_defaults_render():
    """`helm template charts/ctrlnet` with no values gives a valid single-GPU PyTorchJob."""
    from ctrlnet.k8s.render import parse_manifests
    from ctrlnet.k8s.validate import validate_objects

    out = helm.render(chart_dir(), {}, release="ctrlnet", namespace="default", how="sdk")
    objs = parse_manifests(list(out.values()))
    assert [o["kind"] for o in objs] == ["ServiceAccount", "ConfigMap", "PyTorchJob"]
    assert [str(p) for p in validate_objects(objs)] == []


def test_notes_name_the_next_commands():
    import helm_python

    cfg = load_job_config(ROOT / "examples" / "multi-node-deepspeed.yaml")
    with helm_python.Chart.load(str(chart_dir())) as ch:
        notes = ch.render(chart_values(cfg), name="r", namespace="ml-training")["ctrlnet/templates/NOTES.txt"]
    assert "kubectl -n ml-training logs -f sd15-fill50k-2x8-master-0" in notes
    assert "ctrlnet status sd15-fill50k-2x8" in notes and "one name per run" in notes


def test_help_does_not_import_heavy_modules():
    code = (
        "import sys\n"
        "from ctrlnet.cli import app\n"
        "try:\n    app(['--help'])\nexcept SystemExit:\n    pass\n"
        "heavy = [m for m in ('torch', 'kubernetes', 'kubernetes_validate', 'helm_python', 'jsonschema') if m in sys.modules]\n"
        "print('HEAVY', heavy)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stdout
    assert "HEAVY []" in out, out


def test_crds_are_unmodified_copies():
    import hashlib
    import re
    from importlib import resources

    prov = resources.files("ctrlnet.k8s.crds").joinpath("PROVENANCE.md").read_text()
    sums = dict((f, h) for h, f in re.findall(r"^\s+([0-9a-f]{64})\s+(\S+\.yaml)$", prov, re.M))
    files = [p for p in resources.files("ctrlnet.k8s.crds").iterdir() if p.name.endswith(".yaml")]
    assert len(files) == len(sums) == 7
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == sums[f.name], f.name
