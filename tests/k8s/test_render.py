"""`ctrlnet render`: golden renders of every example, agreement with Helm, the ConfigMap contract."""

from __future__ import annotations

import os
import shutil

import pytest
import yaml

from ctrlnet.config import load_job_config, load_train_config
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import chart_dir, chart_values
from ctrlnet.k8s.render import rendered_objects
from ctrlnet.k8s.yamlio import dump_objects, parse_manifests

from .conftest import EXAMPLES, ROOT, by_kind, ctrlnet, render_example

GOLDEN = ROOT / "tests" / "k8s" / "golden"
UPDATE = os.environ.get("CTRLNET_UPDATE_GOLDEN") == "1"


@pytest.mark.parametrize("example", EXAMPLES)
def test_golden_render(example):
    """Each example renders to exactly its golden file (CTRLNET_UPDATE_GOLDEN=1 rewrites them)."""
    text = dump_objects(render_example(example))
    golden = GOLDEN / example
    if UPDATE:
        golden.write_text(text)
    assert golden.is_file(), f"no golden file {golden}: run with CTRLNET_UPDATE_GOLDEN=1"
    assert text == golden.read_text(), (
        f"{example} renders differently from {golden}; if intended, CTRLNET_UPDATE_GOLDEN=1"
    )


def test_cli_render_equals_helm_engine(tmp_path):
    """`ctrlnet render` prints what the Helm engine renders from the chart with the job as values."""
    example = ROOT / "examples" / "multi-node-deepspeed.yaml"
    proc = ctrlnet("render", "-f", str(example), "--set", "cluster.nodes=3")
    assert proc.returncode == 0, proc.stderr
    cfg = load_job_config(example, ["cluster.nodes=3"])
    direct = helm.render(chart_dir(), chart_values(cfg), release=cfg.cluster.name, namespace="ml-training", how="sdk")
    assert parse_manifests([proc.stdout]) == rendered_objects(direct)
    worker = by_kind(parse_manifests([proc.stdout]), "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]
    assert worker["replicas"] == 2


@pytest.mark.skipif(shutil.which("helm") is None, reason="no helm binary on PATH (the SDK engine is tested instead)")
def test_binary_and_sdk_engines_agree():
    cfg = load_job_config(ROOT / "examples" / "trainjob.yaml")
    args = dict(release=cfg.cluster.name, namespace="ml-training")
    a = helm.render(chart_dir(), chart_values(cfg), how="binary", **args)
    b = helm.render(chart_dir(), chart_values(cfg), how="sdk", **args)
    assert rendered_objects(a) == rendered_objects(b)


def test_render_output_dir(tmp_path):
    proc = ctrlnet("render", "-f", "examples/single-gpu.yaml", "-o", str(tmp_path / "out"))
    assert proc.returncode == 0, proc.stderr
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == [
        "configmap.yaml",
        "networkpolicy.yaml",
        "serviceaccount.yaml",
        "trainjob.yaml",
    ]
    # cluster.backend auto (the example's) renders a TrainJob offline: Trainer v2 is the main line.
    job = yaml.safe_load((tmp_path / "out" / "trainjob.yaml").read_text())
    assert job["kind"] == "TrainJob" and job["metadata"]["name"] == "fill50k-single-gpu"
    assert job["spec"]["runtimeRef"]["name"] == "ctrlnet-torch"


@pytest.mark.parametrize("example", EXAMPLES)
def test_configmap_is_the_train_section(example, tmp_path):
    """The trainer reads the ConfigMap's config.yaml with TrainConfig and gets the job's train section."""
    cm = by_kind(render_example(example), "ConfigMap")
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    assert load_train_config(path) == load_job_config(ROOT / "examples" / example).train


def test_null_survives_helm(tmp_path):
    """Helm drops nulls that override a chart default; `train` has none, so null stays null."""
    cm = by_kind(
        render_example("single-gpu.yaml", "train.optim.max_grad_norm=null", "train.optim.learning_rate=3e-7"),
        "ConfigMap",
    )
    path = tmp_path / "config.yaml"
    path.write_text(cm["data"]["config.yaml"])
    train = load_train_config(path)
    assert train.optim.max_grad_norm is None and train.optim.learning_rate == 3e-7


def test_every_nullable_cluster_key_defaults_to_null():
    """Helm deletes a key whose user value is null when the chart default is not: so every
    nullable cluster key must default to null, or `null` would silently not switch it off."""
    import types
    import typing

    from pydantic import BaseModel

    from ctrlnet.config.cluster import ClusterConfig

    def walk(model, prefix=""):
        for name, field in model.model_fields.items():
            ann = field.annotation
            if isinstance(ann, type) and issubclass(ann, BaseModel):
                yield from walk(ann, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}", field

    def nullable(ann):
        return typing.get_origin(ann) in (typing.Union, types.UnionType) and type(None) in typing.get_args(ann)

    bad = [key for key, field in walk(ClusterConfig) if nullable(field.annotation) and field.default is not None]
    assert bad == []


def test_pod_essentials_single_gpu():
    job = by_kind(render_example("single-gpu.yaml"), "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert list(specs) == ["Master"] and specs["Master"]["replicas"] == 1  # no Worker with 0 replicas
    pod = specs["Master"]["template"]["spec"]
    (c,) = pod["containers"]
    assert c["name"] == "pytorch"
    assert c["command"] == ["python", "-m", "ctrlnet_trainer.launch"]
    assert c["args"] == [
        "--nnodes=1",
        "--nproc-per-node=1",
        "-m",
        "ctrlnet_trainer",
        "--config",
        "/etc/ctrlnet/config.yaml",
    ]
    assert c["resources"]["limits"]["nvidia.com/gpu"] == "1"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "8Gi"}
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] == 10001
    assert pod["terminationGracePeriodSeconds"] == 600
    assert specs["Master"]["restartPolicy"] == "ExitCode"
    assert job["spec"]["runPolicy"] == {"cleanPodPolicy": "Running", "backoffLimit": 3}
    labels = job["metadata"]["labels"]
    assert (
        labels["app.kubernetes.io/name"] == "ctrlnet" and labels["app.kubernetes.io/instance"] == "fill50k-single-gpu"
    )


def test_multi_node_deepspeed():
    objs = render_example("multi-node-deepspeed.yaml")
    job = by_kind(objs, "PyTorchJob")
    specs = job["spec"]["pytorchReplicaSpecs"]
    assert specs["Master"]["replicas"] == 1 and specs["Worker"]["replicas"] == 1
    assert job["spec"]["nprocPerNode"] == "8"
    for rs in specs.values():
        c = rs["template"]["spec"]["containers"][0]
        assert "--nnodes=2" in c["args"] and "--nproc-per-node=8" in c["args"]
        assert c["resources"]["limits"]["nvidia.com/gpu"] == "8"
        assert rs["template"]["spec"]["priorityClassName"] == "training-high"
    assert (
        "distributed:\n  collective_timeout_s: 1800\n  offload_optimizer: false\n  strategy: deepspeed\n  zero_stage: 2"
        in by_kind(objs, "ConfigMap")["data"]["config.yaml"]
    )
    assert by_kind(objs, "PersistentVolumeClaim")["spec"]["accessModes"] == ["ReadWriteMany"]


def test_queues():
    kueue = by_kind(render_example("kueue.yaml"), "PyTorchJob")
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    assert kueue["metadata"]["labels"]["kueue.x-k8s.io/priority-class"] == "research"
    assert kueue["spec"]["runPolicy"]["suspend"] is True
    volcano = by_kind(render_example("volcano.yaml"), "PyTorchJob")
    assert volcano["spec"]["runPolicy"]["schedulingPolicy"] == {
        "queue": "research",
        "minAvailable": 2,
        "scheduleTimeoutSeconds": 3600,
    }
    assert all(
        rs["template"]["spec"]["schedulerName"] == "volcano" for rs in volcano["spec"]["pytorchReplicaSpecs"].values()
    )
    tj = by_kind(render_example("trainjob.yaml", "cluster.kueue.queue=team-a"), "TrainJob")
    assert tj["spec"]["suspend"] is True and tj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"


def test_trainjob_backend():
    objs = render_example("trainjob.yaml")
    assert [o["kind"] for o in objs] == ["ServiceAccount", "ConfigMap", "NetworkPolicy", "TrainJob"]
    tj = by_kind(objs, "TrainJob")
    assert tj["apiVersion"] == "trainer.kubeflow.org/v1alpha1"
    assert tj["spec"]["runtimeRef"] == {
        "apiGroup": "trainer.kubeflow.org",
        "kind": "ClusterTrainingRuntime",
        "name": "torch-distributed",
    }
    t = tj["spec"]["trainer"]
    assert t["numNodes"] == 2 and t["numProcPerNode"] == 4 and t["resourcesPerNode"]["limits"]["nvidia.com/gpu"] == "4"
    assert not any(e["name"].startswith("PET_") for e in t["env"])  # Trainer injects those
    (patch,) = tj["spec"]["runtimePatches"]
    (rj,) = patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"]
    assert rj["name"] == "node"
    pod = rj["template"]["spec"]["template"]["spec"]
    assert pod["containers"][0]["name"] == "node" and "env" not in pod["containers"][0]
    assert {v["name"] for v in pod["volumes"]} == {"config", "dshm", "scratch"}


def _walk(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from _walk(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from _walk(v, f"{path}[{i}]")
    else:
        yield path, node


@pytest.mark.parametrize("example", EXAMPLES)
def test_secrets_only_by_reference(example):
    """Secret names appear only as secretKeyRef names; no credential-like env var has a value; no Secret object."""
    sets = ("cluster.secrets.env=[{name: WANDB_API_KEY, secret: wandb, key: api-key}]",)
    objs = render_example(example, *sets)
    assert "Secret" not in [o["kind"] for o in objs]
    cfg = load_job_config(ROOT / "examples" / example, list(sets))
    secret_names = {cfg.cluster.secrets.s3, cfg.cluster.secrets.hub_token, "wandb"} - {None}
    for obj in objs:
        for path, value in _walk(obj):
            if value in secret_names:
                assert path.endswith(".valueFrom.secretKeyRef.name"), f"{obj['kind']}{path} = {value}"
            if (
                path.endswith(".name")
                and isinstance(value, str)
                and value in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "HF_TOKEN", "WANDB_API_KEY")
            ):
                env_path = path[: -len(".name")]
                assert any(p == env_path + ".valueFrom.secretKeyRef.key" for p, _ in _walk(obj)), (
                    f"{obj['kind']}{env_path} is not a secretKeyRef"
                )


def test_render_bad_input_is_one_line():
    for args, needle in [
        (["render", "-f", "examples/nope.yaml"], "does not exist"),
        (["render", "-f", "examples/single-gpu.yaml", "--set", "cluster.nodez=2"], "cluster.nodez"),
        (["render", "-f", "examples/single-gpu.yaml", "--set", "cluster.name=Bad_Name"], "DNS-1035"),
        (["render", "-f", "examples/single-gpu.yaml", "--set", "cluster.env={HF_TOKEN: abc}"], "credential"),
        (["render", "-f", "examples/kueue.yaml", "--set", "cluster.volcano.queue=q"], "pick one"),
        (["render"], "-f"),
    ]:
        proc = ctrlnet(*args)
        assert proc.returncode == 2, (args, proc.stdout, proc.stderr)
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], (args, proc.stderr)
        assert "Traceback" not in proc.stderr
