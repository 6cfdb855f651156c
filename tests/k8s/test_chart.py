"""The Helm chart: lint clean, values.schema.json / values.yaml are the config model's (in sync:
tests/test_generated.py), the schema enforced by Helm itself, NOTES with the next commands."""

from __future__ import annotations

import json

import pytest
import yaml

from ctrlnet.config import JobConfig, TrainConfig, load_job_config
from ctrlnet.errors import UserError
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import chart_dir, chart_values

from .conftest import EXAMPLES, ROOT


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


@pytest.mark.parametrize("name", ["Bad_Name", "run.1", "1st-run", "a" * 51])
def test_helm_refuses_the_job_names_ctrlnet_refuses(name):
    """cluster.name's DNS-1035 pattern and 50-character limit are in values.schema.json."""
    with pytest.raises(UserError):
        load_job_config(None, [f"cluster.name={name}"])
    with pytest.raises(UserError, match="cluster.name|pattern|maxLength|length"):
        helm.render(chart_dir(), {"cluster": {"name": name}}, release="x", namespace="default", how="sdk")
    findings = helm.lint(chart_dir(), {"cluster": {"name": name}}, strict=True, how="sdk")
    assert any(f.startswith("[ERROR]") and "name" in f for f in findings), findings
    helm.render(chart_dir(), {"cluster": {"name": "a" * 50}}, release="x", namespace="default", how="sdk")


def test_chart_defaults_render():
    """`helm template charts/ctrlnet` with no values gives a valid single-GPU PyTorchJob."""
    from ctrlnet.k8s.render import rendered_objects
    from ctrlnet.k8s.validate import validate_objects

    out = helm.render(chart_dir(), {}, release="ctrlnet", namespace="default", how="sdk")
    objs = rendered_objects(out)
    assert [o["kind"] for o in objs] == ["ServiceAccount", "ConfigMap", "NetworkPolicy", "PyTorchJob"]
    assert [str(p) for p in validate_objects(objs)] == []


def test_notes_name_the_next_commands():
    import helm_python

    cfg = load_job_config(ROOT / "examples" / "multi-node-deepspeed.yaml")
    with helm_python.Chart.load(str(chart_dir())) as ch:
        notes = ch.render(chart_values(cfg), name="r", namespace="ml-training")["ctrlnet/templates/NOTES.txt"]
    assert "kubectl -n ml-training logs -f sd15-fill50k-2x8-master-0" in notes
    assert "one name per run" in notes
    with helm_python.Chart.load(str(chart_dir())) as ch:
        notes = ch.render({}, name="r", namespace="ml-training")["ctrlnet/templates/NOTES.txt"]
    assert f"Output: {TrainConfig().output}" in notes  # the trainer's default, not a copy of it


def test_notes_name_only_commands_that_exist():
    """NOTES suggests kubectl and helm, and of ctrlnet only the commands it has."""
    import re

    import helm_python
    from typer.main import get_command

    from ctrlnet.cli import app

    commands = set(get_command(app).commands)
    for example in EXAMPLES:
        cfg = load_job_config(ROOT / "examples" / example)
        with helm_python.Chart.load(str(chart_dir())) as ch:
            notes = ch.render(chart_values(cfg), name="r", namespace="ml")["ctrlnet/templates/NOTES.txt"]
        used = set(re.findall(r"^\s+ctrlnet (\S+)", notes, re.M))  # command lines are indented
        assert used <= commands, f"NOTES names ctrlnet {used - commands}, which does not exist"


def test_crds_are_unmodified_copies():
    import hashlib
    import re
    from importlib import resources

    prov = resources.files("ctrlnet.k8s.crds").joinpath("PROVENANCE.md").read_text()
    sums = dict((f, h) for h, f in re.findall(r"^\s+([0-9a-f]{64})\s+(\S+\.yaml)$", prov, re.M))
    files = [p for p in resources.files("ctrlnet.k8s.crds").iterdir() if p.name.endswith(".yaml")]
    # Every CRD has its checksum row and every row its file (7 at first; the test cluster adds Kueue's Workload).
    assert sorted(f.name for f in files) == sorted(sums) and len(files) >= 7
    for f in files:
        assert hashlib.sha256(f.read_bytes()).hexdigest() == sums[f.name], f.name
