"""`cluster.backend: auto` and the TrainJob's runtime, resolved against what a cluster serves
(ctrlnet.cluster.backend_choice), with a stand-in for the connection: which APIs it serves, which
runtimes exist, and whether RBAC lets the user read them."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from ctrlnet.cluster.backend_choice import choose_backend
from ctrlnet.cluster.kube import Forbidden
from ctrlnet.config import load_job_config
from ctrlnet.errors import ClusterError


class FakeKube:
    def __init__(self, served=("PyTorchJob", "TrainJob"), runtimes=("ctrlnet-torch",), forbidden=False):
        self.served_kinds, self.runtimes, self.forbidden = set(served), set(runtimes), forbidden
        self.conn = SimpleNamespace(context="loopback")
        self.namespace = "default"

    def served(self, res):
        return res.kind in self.served_kinds

    def require(self, res):
        if res.kind not in self.served_kinds:
            raise ClusterError(f"{res.what} is not installed on the cluster of context loopback: install it")

    def get(self, kind, name, namespace=None):
        assert kind in ("ClusterTrainingRuntime", "TrainingRuntime")
        if self.forbidden:
            raise Forbidden("forbidden (403)")
        return {"metadata": {"name": name}} if name in self.runtimes else None


def cfg(*sets: str):
    return load_job_config(None, list(sets), for_cluster=True)


def test_auto_is_a_trainjob_where_trainer_v2_and_ctrlnets_runtime_are_installed():
    chosen, note = choose_backend(FakeKube(), cfg())
    assert chosen.cluster.backend == "trainjob" and chosen.cluster.trainjob.runtime == "ctrlnet-torch"
    assert note is None


def test_auto_is_a_pytorchjob_where_only_the_training_operator_is_installed():
    chosen, note = choose_backend(FakeKube(served={"PyTorchJob"}), cfg())
    assert chosen.cluster.backend == "pytorchjob"
    assert "TrainJob (trainer.kubeflow.org/v1alpha1) is not served" in note


def test_a_missing_default_runtime_falls_back_to_trainers_own_and_says_what_that_costs():
    chosen, note = choose_backend(FakeKube(runtimes={"torch-distributed"}), cfg())
    assert chosen.cluster.backend == "trainjob" and chosen.cluster.trainjob.runtime == "torch-distributed"
    assert "no retry after a preemption" in note and "manifests/runtime/ctrlnet-torch.yaml" in note
    # An explicit trainjob file that relied on the old default keeps working the same way.
    chosen, _ = choose_backend(FakeKube(runtimes={"torch-distributed"}), cfg("cluster.backend=trainjob"))
    assert chosen.cluster.trainjob.runtime == "torch-distributed"


def test_auto_without_any_runtime_uses_the_training_operator_and_names_the_runtime():
    chosen, note = choose_backend(FakeKube(runtimes=()), cfg())
    assert chosen.cluster.backend == "pytorchjob"
    assert "ClusterTrainingRuntime ctrlnet-torch is not installed" in note


def test_a_runtime_the_user_named_is_never_swapped():
    with pytest.raises(ClusterError, match="ClusterTrainingRuntime mine is not installed: kubectl apply"):
        choose_backend(
            FakeKube(served={"TrainJob"}, runtimes={"torch-distributed"}),
            cfg("cluster.backend=trainjob", "cluster.trainjob.runtime=mine"),
        )


def test_nothing_installed_is_one_line_naming_both_operators():
    with pytest.raises(ClusterError) as err:
        choose_backend(FakeKube(served=()), cfg())
    text = str(err.value)
    assert "no training operator can run this job" in text and "Kubeflow Trainer v2" in text
    assert "Training Operator v1.9" in text and "\n" not in text


def test_explicit_backends_keep_their_meaning():
    chosen, note = choose_backend(FakeKube(), cfg("cluster.backend=pytorchjob"))
    assert chosen.cluster.backend == "pytorchjob" and note is None
    with pytest.raises(ClusterError, match="is not installed on the cluster of context loopback"):
        choose_backend(FakeKube(served={"TrainJob"}), cfg("cluster.backend=pytorchjob"))


def test_pytorchjob_only_settings_make_auto_a_pytorchjob_even_offline():
    config = cfg("cluster.priority_class_name=high")
    assert config.cluster.offline_backend == "pytorchjob"
    chosen, _ = choose_backend(FakeKube(), config)
    assert chosen.cluster.backend == "pytorchjob"
    assert cfg().cluster.offline_backend == "trainjob"


def test_unreadable_runtimes_are_assumed_present_and_said_so():
    chosen, note = choose_backend(FakeKube(forbidden=True), cfg())
    assert chosen.cluster.backend == "trainjob" and "cannot read ClusterTrainingRuntimes (RBAC)" in note
