"""The Python API without a cluster (docs/python-api.md; tests/e2e/test_python_api.py runs it
against one): `import ctrlnet` stays light, JobConfig.from_file / with_overrides are the CLI's
loading, `ctrlnet.render` is `ctrlnet render`, the typed errors carry the CLI's exit codes, and the
typed results print as the CLI prints them."""

from __future__ import annotations

import io
import subprocess
import sys

import pytest
import yaml

import ctrlnet
from ctrlnet.config import load_job_config

JOB = {
    "train": {"output": "s3://bucket/runs", "loop": {"max_steps": 2}},
    "cluster": {"name": "api", "backend": "pytorchjob", "gpus_per_node": 0, "shm_size": "64Mi"},
}
HEAVY = ("torch", "diffusers", "transformers", "kubernetes", "kubernetes_validate", "helm_python", "jsonschema")


@pytest.fixture
def job_file(tmp_path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(JOB))
    return path


def test_import_ctrlnet_and_its_api_names_load_nothing_heavy():
    code = (
        "import sys, ctrlnet; "
        "[getattr(ctrlnet, n) for n in ('Client', 'JobConfig', 'render', 'RunStatus', 'LogLine', 'RunNotFound')]; "
        "ctrlnet.Client(); "
        f"print(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "", f"`import ctrlnet; ctrlnet.Client` imported: {r.stdout.strip()}"


def test_every_exported_name_resolves():
    assert set(ctrlnet.__all__) == set(ctrlnet._EXPORTS) | {"__version__"}
    for name in ctrlnet.__all__:
        assert getattr(ctrlnet, name) is not None
    with pytest.raises(AttributeError):
        ctrlnet.NoSuchThing  # noqa: B018


def test_job_config_from_file_with_overrides_is_the_clis_loading(job_file):
    overrides = ["train.optim.learning_rate=1e-4", "cluster.nodes=2"]
    job = ctrlnet.JobConfig.from_file(job_file)
    tuned = job.with_overrides(overrides)
    assert tuned == load_job_config(job_file, overrides, for_cluster=True)
    assert tuned.train.optim.learning_rate == 1e-4 and tuned.cluster.nodes == 2
    assert job.train.optim.learning_rate != 1e-4  # a new config; the original is unchanged
    assert tuned.with_overrides(["train.loop.max_steps=5"]).train.optim.learning_rate == 1e-4  # they add up
    assert ctrlnet.JobConfig.from_file(job_file, overrides) == tuned
    built = ctrlnet.JobConfig.model_validate(JOB).with_overrides(["cluster.nodes=3"])  # built in code
    assert built.cluster.nodes == 3 and built.cluster.name == "api"


@pytest.mark.parametrize(
    ("file", "overrides"),
    [
        ("missing.yaml", []),
        ("job.yaml", ["train.optim.lr=1"]),
        ("job.yaml", ["cluster.nodes=0"]),
        ("job.yaml", ["train.loop.max_steps"]),
        ("job.yaml", ["train.loop.device=cuda"]),  # a cluster rule: no GPU for a cuda job
    ],
)
def test_job_config_errors_are_the_clis_one_line(tmp_path, job_file, file, overrides):
    path = tmp_path / file
    with pytest.raises(ctrlnet.UserError) as api:
        ctrlnet.JobConfig.from_file(path).with_overrides(overrides)
    with pytest.raises(ctrlnet.UserError) as cli:
        load_job_config(path, overrides, for_cluster=True)
    assert str(api.value) == str(cli.value) and api.value.exit_code == 2


def test_render_is_what_ctrlnet_render_prints(job_file):
    from typer.testing import CliRunner

    from ctrlnet.cli import app

    printed = CliRunner().invoke(app, ["render", "-f", str(job_file), "--set", "cluster.nodes=2"])
    assert printed.exit_code == 0, printed.output
    expected = [d for d in yaml.safe_load_all(printed.stdout) if d]
    assert ctrlnet.render(job_file, ["cluster.nodes=2"]) == expected
    assert ctrlnet.render(ctrlnet.JobConfig.from_file(job_file).with_overrides(["cluster.nodes=2"])) == expected
    assert expected[-1]["kind"] == "PyTorchJob"


def test_submit_plans_a_job_config_as_it_plans_the_file(job_file):
    from ctrlnet.cluster import submit as sub

    from_file = sub.plan(job_file, ["cluster.nodes=2"], name="r1", namespace="ml")
    job = ctrlnet.JobConfig.from_file(job_file)
    from_job = sub.plan(job, ["cluster.nodes=2"], name="r1", namespace="ml")
    assert from_job.objects == from_file.objects and from_job.output == "s3://bucket/runs/r1"
    assert sub.plan(job.with_overrides(["cluster.nodes=2"]), name="r1", namespace="ml").objects == from_file.objects


def test_typed_errors_carry_the_clis_exit_codes():
    from ctrlnet import errors

    assert issubclass(errors.RunNotFound, errors.UserError) and errors.RunNotFound("x").exit_code == 2
    for cls in (errors.RunFailed, errors.WaitTimeout, errors.DeleteIncomplete):
        assert issubclass(cls, errors.ClusterError) and cls("x").exit_code == 1
    invalid = errors.ObjectsInvalid("2 problem(s)", ["a", "b"])
    assert isinstance(invalid, errors.UserError) and invalid.exit_code == 1 and invalid.problems == ["a", "b"]
    assert errors.RunFailed("failed", status="S").status == "S"
    assert ctrlnet.RunNotFound is errors.RunNotFound and ctrlnet.ClusterError is errors.ClusterError


def test_a_client_connects_on_first_use_with_the_clis_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    client = ctrlnet.Client(namespace="ml")  # nothing read yet
    with pytest.raises(ctrlnet.UserError, match=r"^no kubeconfig found \(KUBECONFIG="):
        client.status("run")
    with pytest.raises(ctrlnet.UserError, match="is not a namespace name"):
        ctrlnet.Client(namespace="Not_A_Namespace").list()


def test_log_arguments_are_checked_before_connecting(tmp_path, monkeypatch):
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    client = ctrlnet.Client()
    with pytest.raises(ctrlnet.UserError, match="give --rank or --pod, not both"):
        client.logs("run", rank=0, pod="worker-0")
    with pytest.raises(ctrlnet.UserError, match="cannot be followed"):
        client.logs("run", previous=True, follow=True)
    with pytest.raises(ctrlnet.UserError, match="give a duration like 30s"):
        client.logs("run", since="ten minutes")


def test_results_print_as_the_cli_prints_them():
    from ctrlnet.client import RunRow, Submitted
    from ctrlnet.cluster.logs import Printer

    row = {"name": "r", "namespace": "ns", "backend": "pytorchjob", "phase": "Running", "pods_ready": 1, "pods": 2}
    row |= {"step": 3, "total": 10, "age_s": 5, "output": "s3://b/r", "later": "kept"}
    parsed = RunRow.from_row(row)
    assert (parsed.name, parsed.pods, parsed.step) == ("r", 2, 3) and parsed.as_dict() == row  # the -o json row
    obj = {"kind": "PyTorchJob", "metadata": {"name": "r"}, "spec": {}}
    done = Submitted("r", "ns", "pytorchjob", "PyTorchJob", "train", "s3://b/r", False, [obj])
    assert done.as_dict()["objects"] == [{"kind": "PyTorchJob", "name": "r"}]
    assert Submitted("r", "ns", "pytorchjob", "PyTorchJob", "train", "o", True, [obj]).as_dict()["objects"] == [obj]
    line = ctrlnet.LogLine(1, "worker-0", "hello", "r-worker-0")
    out = io.StringIO()
    Printer(out, colour=False).print([line, ctrlnet.LogLine(0, "ctrlnet", "no pods for r yet", note=True)])
    assert out.getvalue() == "[worker-0] hello\n[ctrlnet] no pods for r yet\n" and str(line) == "[worker-0] hello"
