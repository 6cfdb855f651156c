"""manifests/: generated from the chart, and kustomize builds exactly what `ctrlnet render` renders."""

from __future__ import annotations

import shutil
import subprocess

import pytest
import yaml

from ctrlnet.k8s.validate import validate_objects
from ctrlnet.k8s.yamlio import parse_manifests
from tools.gen.manifests import OVERLAYS, variant_objects

from .conftest import ROOT

# In sync with the chart and examples/: tests/test_generated.py.


def _key(o):
    return (o["kind"], o["metadata"]["name"])


@pytest.mark.skipif(shutil.which("kubectl") is None, reason="needs kubectl (its built-in kustomize)")
@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_kustomize_build_equals_render(variant):
    path = ROOT / "manifests" / ("base" if variant == "base" else f"overlays/{variant}")
    out = subprocess.run(["kubectl", "kustomize", str(path)], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    built = sorted(parse_manifests([out.stdout]), key=_key)
    rendered = sorted(variant_objects(ROOT, variant), key=_key)
    assert built == rendered
    assert [str(p) for p in validate_objects(built)] == []


@pytest.mark.parametrize("variant", ["base", *OVERLAYS])
def test_variant_renders_are_valid(variant):
    assert [str(p) for p in validate_objects(variant_objects(ROOT, variant))] == []


def test_overlays_only_add_what_they_are_about():
    # The base is a TrainJob (cluster.backend auto, offline); the multi-node example sets a
    # PyTorchJob-only setting (priority_class_name), so it and the volcano overlay are PyTorchJobs.
    kueue = yaml.safe_load((ROOT / "manifests/overlays/kueue/trainjob-patch.yaml").read_text())
    assert {op["path"] for op in kueue} == {
        "/metadata/labels/kueue.x-k8s.io~1queue-name",
        "/metadata/labels/kueue.x-k8s.io~1priority-class",
        "/spec/suspend",
    }
    volcano = yaml.safe_load((ROOT / "manifests/overlays/volcano/pytorchjob-patch.yaml").read_text())
    assert {op["path"] for op in volcano} == {
        "/spec/runPolicy/schedulingPolicy",
        "/spec/pytorchReplicaSpecs/Master/template/spec/schedulerName",
        "/spec/pytorchReplicaSpecs/Worker/template/spec/schedulerName",
    }


def test_queue_examples_validate():
    objs = parse_manifests([(ROOT / "manifests/examples/kueue-queues.yaml").read_text()])
    assert [o["kind"] for o in objs] == ["ResourceFlavor", "ClusterQueue", "LocalQueue", "WorkloadPriorityClass"]
    assert [str(p) for p in validate_objects(objs)] == []
    # the LocalQueue is the one the Kueue example and overlay submit to
    lq = objs[2]
    assert (lq["metadata"]["name"], lq["metadata"]["namespace"]) == ("team-a", "ml-training")


def test_argocd_application_is_gitops_safe():
    app = yaml.safe_load((ROOT / "manifests/examples/argocd-application.yaml").read_text())
    assert app["kind"] == "Application" and (ROOT / app["spec"]["source"]["path"] / "kustomization.yaml").is_file()
    assert app["spec"]["syncPolicy"]["automated"] == {"prune": False, "selfHeal": False}
