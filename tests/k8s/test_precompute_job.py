"""A precompute job (`cluster.task: precompute`) is the training job's chart with one change: the
launcher starts the precompute module instead of the trainer (and the pods say so in their
`component` label). Same pods, same placement, secrets and storage; every validate rule and CRD
schema passes for it, on both backends."""

from __future__ import annotations

import pytest

from ctrlnet.config import contract, load_job_config
from ctrlnet.errors import UserError
from ctrlnet.k8s import helm
from ctrlnet.k8s.chart import chart_dir, chart_values
from ctrlnet.k8s.validate import validate_objects

from .conftest import EXAMPLES, ROOT, by_kind, ctrlnet, render_example

CACHE = "s3://my-bucket/caches/fill50k-sd15-512"
PRECOMPUTE = ("cluster.task=precompute", f"train.data.cache={CACHE}")
COMPONENT = "app.kubernetes.io/component"


def _as_training(node):
    """The objects with the two things a precompute job changes put back as training has them."""
    if isinstance(node, dict):
        return {k: "training" if k == COMPONENT and v == "precompute" else _as_training(v) for k, v in node.items()}
    if isinstance(node, list):
        return [_as_training(v) for v in node]
    return contract.TRAINER_MODULE if node == contract.PRECOMPUTE_MODULE else node


@pytest.mark.parametrize("example", EXAMPLES)
def test_a_precompute_job_is_the_training_job_running_the_precompute_module(example):
    train = render_example(example, f"train.data.cache={CACHE}")
    pre = render_example(example, *PRECOMPUTE)
    assert pre != train and _as_training(pre) == train
    job = next(o for o in pre if o["kind"] in ("PyTorchJob", "TrainJob"))
    assert job["metadata"]["labels"][COMPONENT] == "precompute"
    text = repr(job)
    assert f"'-m', '{contract.PRECOMPUTE_MODULE}', '--config', '{contract.CONFIG_PATH}'" in text
    assert f"'{contract.TRAINER_MODULE}'" not in text


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_precompute_render_is_valid(example):
    """Schemas (core kinds and CRDs) and every rule of `ctrlnet validate`."""
    assert [str(p) for p in validate_objects(render_example(example, *PRECOMPUTE))] == []


def test_cli_validate_and_render_a_precompute_job():
    sets = [a for s in PRECOMPUTE for a in ("--set", s)]
    ok = ctrlnet("validate", "-f", "examples/multi-node-deepspeed.yaml", *sets)
    assert ok.returncode == 0 and ok.stdout.startswith("ok:"), ok.stdout + ok.stderr
    rendered = ctrlnet("render", "-f", "examples/multi-node-deepspeed.yaml", *sets)
    assert rendered.returncode == 0 and f"- {contract.PRECOMPUTE_MODULE}\n" in rendered.stdout


def test_a_precompute_job_without_a_cache_is_refused_by_ctrlnet_and_by_helm():
    with pytest.raises(UserError, match="cluster.task is precompute but train.data.cache is not set"):
        load_job_config(None, ["cluster.task=precompute"])
    with pytest.raises(UserError, match="cluster.task: got 'encode'"):
        load_job_config(None, ["cluster.task=encode"])
    values = chart_values(load_job_config(None, []))
    values["cluster"]["task"] = "precompute"  # plain `helm install --set cluster.task=precompute`
    with pytest.raises(UserError, match="train.data.cache is not set"):
        helm.render(chart_dir(), values, release="x", namespace="default", how="sdk")
    values["cluster"]["task"] = "encode"
    with pytest.raises(UserError, match="task"):
        helm.render(chart_dir(), values, release="x", namespace="default", how="sdk")


def test_the_configmap_carries_the_cache_the_job_writes():
    import yaml

    cm = by_kind(render_example("single-gpu.yaml", *PRECOMPUTE), "ConfigMap")
    assert yaml.safe_load(cm["data"]["config.yaml"])["data"]["cache"] == CACHE


def test_submit_plans_a_precompute_job_under_its_own_name_writing_the_cache():
    """Named `<cluster.name>-precompute-<5 random>`, output = the cache (the annotation that status,
    delete and the one-writer rule read); train.output is left as it is, not made a run prefix."""
    from ctrlnet.cluster import submit as sub
    from ctrlnet.config.cluster import DNS1035, MAX_NAME

    example = "examples/multi-node-deepspeed.yaml"
    plan = sub.plan(example, list(PRECOMPUTE), name=None, namespace="ml")
    base = load_job_config(example)
    assert plan.precompute and plan.name.startswith(f"{base.cluster.name}-precompute-")
    assert plan.output == CACHE and plan.cfg.train.output == base.train.output
    assert plan.objects[-1]["metadata"]["annotations"]["ctrlnet.io/output"] == CACHE
    long = sub.generated_name("a" * MAX_NAME, sub.PRECOMPUTE_SUFFIX)
    assert len(long) <= MAX_NAME and DNS1035.match(long) and "-precompute-" in long
    train = sub.plan(example, [], name="r1", namespace="ml")
    assert not train.precompute and train.output == f"{base.train.output}/r1" == train.cfg.train.output


def test_helm_lint_clean_for_a_precompute_job():
    values = chart_values(load_job_config(ROOT / "examples" / "multi-node-deepspeed.yaml", list(PRECOMPUTE)))
    assert [f for f in helm.lint(chart_dir(), values, strict=True) if not f.startswith("[INFO]")] == []
