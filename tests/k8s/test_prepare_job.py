"""A prepare job (`cluster.task: prepare`) is the training job's chart with one change, like a
precompute job: the launcher starts the prepare module instead of the trainer (and the pods say
so in their `component` label). Every validate rule and CRD schema passes for it, on both
backends; without a source or a dataset it is refused, by ctrlnet and by Helm."""

from __future__ import annotations

import pytest

from ctrlnet.config import contract, load_job_config
from ctrlnet.errors import UserError
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import chart_dir, chart_values
from ctrlnet.k8s.validate import validate_objects

from .conftest import ctrlnet, render_example

SOURCE = "s3://my-bucket/raw/photos"
DATASET = "s3://my-bucket/datasets/photos-canny-512"
DATA = (f"train.prepare.source={SOURCE}", f"train.data.dataset={DATASET}")
PREPARE = ("cluster.task=prepare", *DATA)
COMPONENT = "app.kubernetes.io/component"
# One example per backend: the PyTorchJob and the TrainJob renders.
BACKENDS = {"multi-node-deepspeed.yaml": "PyTorchJob", "trainjob.yaml": "TrainJob"}


def _as_training(node):
    """The objects with the two things a prepare job changes put back as training has them."""
    if isinstance(node, dict):
        return {k: "training" if k == COMPONENT and v == "prepare" else _as_training(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_training(v) for v in node]
    return contract.TRAINER_MODULE if node == contract.PREPARE_MODULE else node


@pytest.mark.parametrize("example", sorted(BACKENDS))
def test_a_prepare_job_is_the_training_job_running_the_prepare_module(example):
    train = render_example(example, *DATA)
    pre = render_example(example, *PREPARE)
    assert pre != train and _as_training(pre) == train
    job = next(o for o in pre if o["kind"] in ("PyTorchJob", "TrainJob"))
    assert job["kind"] == BACKENDS[example]
    assert all(o["metadata"]["labels"][COMPONENT] == "prepare" for o in pre)
    text = repr(job)
    assert f"'-m', '{contract.PREPARE_MODULE}', '--config', '{contract.CONFIG_PATH}'" in text
    assert f"'{contract.TRAINER_MODULE}'" not in text
    # Schemas (core kinds and CRDs) and every rule of `ctrlnet validate`.
    assert [str(p) for p in validate_objects(pre)] == []


def test_cli_render_and_helm_notes_of_a_prepare_job():
    sets = [a for s in PREPARE for a in ("--set", s)]
    rendered = ctrlnet("render", "-f", "examples/single-gpu.yaml", *sets)
    assert rendered.returncode == 0, rendered.stderr
    assert f"- {contract.PREPARE_MODULE}\n" in rendered.stdout
    import helm_python

    with helm_python.Chart.load(str(chart_dir())) as ch:
        values = chart_values(load_job_config(None, list(PREPARE)))
        notes = ch.render(values, name="r", namespace="ml")["ctrlnet/templates/NOTES.txt"]
    assert (
        notes.lstrip().startswith("ctrlnet prepare job ") and f"Dataset: {DATASET} (annotated from {SOURCE};" in notes
    )


@pytest.mark.parametrize(
    ("sets", "missing"),
    [
        (["cluster.task=prepare", f"train.data.dataset={DATASET}"], "train.prepare.source"),
        (["cluster.task=prepare", f"train.prepare.source={SOURCE}"], "train.data.dataset"),
    ],
)
def test_a_prepare_job_without_a_source_or_a_dataset_is_refused_by_ctrlnet_and_by_helm(sets, missing):
    with pytest.raises(UserError, match=f"cluster.task is prepare but {missing} is not set"):
        load_job_config(None, sets)
    values = chart_values(load_job_config(None, sets[1:]))
    values["cluster"]["task"] = "prepare"  # plain `helm install --set cluster.task=prepare`
    with pytest.raises(UserError, match=f"cluster.task is prepare but {missing} is not set"):
        helm.render(chart_dir(), values, release="x", namespace="default", how="sdk")


def test_submit_plans_a_prepare_job_under_its_own_name_writing_the_dataset():
    """Named `<cluster.name>-prepare-<5 random>`, output = the dataset (the annotation that status,
    delete and the one-writer rule read); train.output is left as it is."""
    from ctrlnet.cluster import submit as sub
    from ctrlnet.config.cluster import DNS1035, MAX_NAME

    example = "examples/multi-node-deepspeed.yaml"
    plan = sub.plan(example, list(PREPARE), name=None, namespace="ml")
    base = load_job_config(example)
    assert plan.prepare and not plan.precompute and plan.name.startswith(f"{base.cluster.name}-prepare-")
    assert plan.output == DATASET and plan.output_key == "train.data.dataset"
    assert plan.cfg.train.output == base.train.output
    assert plan.objects[-1]["metadata"]["annotations"]["ctrlnet.io/output"] == DATASET
    long = sub.generated_name("a" * MAX_NAME, sub.PREPARE_SUFFIX)
    assert len(long) <= MAX_NAME and DNS1035.match(long) and "-prepare-" in long
