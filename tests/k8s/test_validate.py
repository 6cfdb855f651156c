"""`ctrlnet validate`: every render passes; each rule catches the real mistake it exists for."""

from __future__ import annotations

import pytest

from ctrlnet.k8s.validate import validate_objects

from .conftest import EXAMPLES, by_kind, ctrlnet, render_example


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_example_render_is_valid(example):
    assert [str(p) for p in validate_objects(render_example(example))] == []


def _master(objs):
    return by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]


def _container(objs, rtype="Master"):
    return by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"][rtype]["template"]["spec"]["containers"][0]


def problems_after(example, mutate):
    objs = render_example(example)
    mutate(objs)
    return [str(p) for p in validate_objects(objs)]


def only(problems, needle):
    hits = [p for p in problems if needle in p]
    assert hits, f"no problem mentions {needle!r}: {problems}"
    return hits


def test_worker_with_zero_replicas():
    def m(objs):
        by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 0
    only(problems_after("multi-node-deepspeed.yaml", m), "Worker.replicas: is 0: omit Worker")


def test_master_replicas_must_be_one():
    def m(objs):
        _master(objs)["replicas"] = 2
    only(problems_after("single-gpu.yaml", m), "Master replicas must be 1")


def test_container_must_be_named_pytorch():
    def m(objs):
        _container(objs)["name"] = "trainer"
    only(problems_after("single-gpu.yaml", m), "no container named pytorch")


def test_gpu_limit_must_equal_processes_per_node():
    def m(objs):
        res = _container(objs, "Worker")["resources"]
        res["limits"]["nvidia.com/gpu"] = res["requests"]["nvidia.com/gpu"] = "4"
    only(problems_after("multi-node-deepspeed.yaml", m), "GPU limit 4 != 8 processes per node")


def test_nproc_flag_must_match():
    def m(objs):
        c = _container(objs)
        c["args"] = [a.replace("--nproc-per-node=1", "--nproc-per-node=2") for a in c["args"]]
    only(problems_after("single-gpu.yaml", m), "--nproc-per-node=2 but the job says 1")


def test_nnodes_must_match_replicas():
    def m(objs):
        by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 3
    only(problems_after("multi-node-deepspeed.yaml", m), "--nnodes=2 but the job has 4 pods")


def test_inline_secret_value():
    def m(objs):
        _container(objs)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"})
    only(problems_after("single-gpu.yaml", m), "AWS_SECRET_ACCESS_KEY has an inline value")


def test_inline_secret_value_in_trainjob():
    def m(objs):
        by_kind(objs, "TrainJob")["spec"]["trainer"]["env"].append({"name": "HF_TOKEN", "value": "hf_abc"})
    only(problems_after("trainjob.yaml", m), "HF_TOKEN has an inline value")


def test_secret_reference_must_name_secret_and_key():
    def m(objs):
        env = _container(objs)["env"]
        ref = next(e for e in env if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"]
        ref.pop("name")
    only(problems_after("single-gpu.yaml", m), "HF_TOKEN: name the Secret and its key")


def test_secret_object_in_manifests():
    def m(objs):
        objs.append({"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "s3-credentials"}, "stringData": {"AWS_SECRET_ACCESS_KEY": "x"}})
    only(problems_after("single-gpu.yaml", m), "Secret/s3-credentials: a Secret in the manifests")


def test_resolution_not_multiple_of_8():
    def m(objs):
        cm = by_kind(objs, "ConfigMap")
        cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("resolution: 512", "resolution: 500")
    only(problems_after("single-gpu.yaml", m), "data.resolution: must be a multiple of 8")


def test_restartable_pods_must_resume_from_latest():
    import yaml

    def m(objs):
        cm = by_kind(objs, "ConfigMap")
        train = yaml.safe_load(cm["data"]["config.yaml"])
        train["checkpoint"].pop("resume")
        cm["data"]["config.yaml"] = yaml.safe_dump(train)
    only(problems_after("single-gpu.yaml", m), "train.checkpoint.resume is unset")


def test_dns1035_job_name():
    def m(objs):
        by_kind(objs, "PyTorchJob")["metadata"]["name"] = "Fill50k_Run"
    only(problems_after("single-gpu.yaml", m), "is not a DNS-1035 label")


def test_unknown_field_is_a_schema_problem():
    def m(objs):
        by_kind(objs, "PyTorchJob")["spec"]["runPolicy"]["backofLimit"] = 3
    only(problems_after("single-gpu.yaml", m), "'backofLimit' was unexpected")


def test_core_kind_schema():
    def m(objs):
        by_kind(objs, "ConfigMap")["data"]["config.yaml"] = 7
    only(problems_after("single-gpu.yaml", m), "ConfigMap/fill50k-single-gpu-config: data.config.yaml: 7 is not of type 'string'")


def test_restart_policy_enum():
    def m(objs):
        _master(objs)["restartPolicy"] = "OnExitCode"
    only(problems_after("single-gpu.yaml", m), "'OnExitCode': use one of Always, OnFailure, Never, ExitCode")


def test_kueue_job_must_be_created_suspended():
    def m(objs):
        del by_kind(objs, "PyTorchJob")["spec"]["runPolicy"]["suspend"]
    only(problems_after("kueue.yaml", m), "queued in Kueue but not created suspended")


def test_volcano_needs_its_scheduler():
    def m(objs):
        del _master(objs)["template"]["spec"]["schedulerName"]
    only(problems_after("volcano.yaml", m), "set schedulerName: volcano")


def test_dev_shm_must_be_memory_backed():
    def m(objs):
        vols = _master(objs)["template"]["spec"]["volumes"]
        next(v for v in vols if v["name"] == "dshm")["emptyDir"] = {}
    only(problems_after("single-gpu.yaml", m), "/dev/shm must be an emptyDir with medium: Memory and a sizeLimit")


def test_runs_as_non_root():
    def m(objs):
        sc = _master(objs)["template"]["spec"]["securityContext"]
        sc.pop("runAsNonRoot")
        sc["runAsUser"] = 0
        _container(objs)["securityContext"].pop("runAsNonRoot")
    probs = problems_after("single-gpu.yaml", m)
    only(probs, "runAsNonRoot is not set")
    only(probs, "0 is root")


def test_grace_period_long_enough_to_checkpoint():
    def m(objs):
        _master(objs)["template"]["spec"]["terminationGracePeriodSeconds"] = 5
    only(problems_after("single-gpu.yaml", m), "5s is too short to finish a step and checkpoint")


def test_missing_configmap():
    def m(objs):
        objs[:] = [o for o in objs if o["kind"] != "ConfigMap"]
    only(problems_after("single-gpu.yaml", m), "mounts ConfigMap fill50k-single-gpu-config, which is not among the rendered objects")


def test_trainjob_reserved_env():
    def m(objs):
        by_kind(objs, "TrainJob")["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})
    only(problems_after("trainjob.yaml", m), "PET_NNODES is injected")


def test_cli_validate_ok_and_problems(tmp_path):
    ok = ctrlnet("validate", "-f", "examples/multi-node-deepspeed.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok: 4 object(s) valid") and "needs Secrets: hf-token, s3-credentials" in ok.stdout

    rendered = ctrlnet("render", "-f", "examples/multi-node-deepspeed.yaml").stdout
    broken = (rendered.replace("name: pytorch\n", "name: trainer\n", 1)
                      .replace("resolution: 512", "resolution: 500"))
    (tmp_path / "job.yaml").write_text(broken)
    bad = ctrlnet("validate", "--manifests", str(tmp_path / "job.yaml"))
    assert bad.returncode == 1
    lines = bad.stdout.strip().splitlines()
    assert len(lines) == 2, lines  # one line per problem
    assert any("no container named pytorch" in ln for ln in lines)
    assert any("multiple of 8" in ln for ln in lines)
    assert "2 problem(s)" in bad.stderr

    stdin = ctrlnet("validate", "--manifests", "-", stdin=rendered)
    assert stdin.returncode == 0, stdin.stdout


def test_cli_validate_bad_input():
    proc = ctrlnet("validate", "--manifests", "nowhere/")
    assert proc.returncode == 2 and proc.stderr.startswith("error: ") and len(proc.stderr.strip().splitlines()) == 1
    proc = ctrlnet("validate", "-f", "examples/single-gpu.yaml", "--manifests", "manifests/base")
    assert proc.returncode == 2 and "not both" in proc.stderr


class TestClusterConfig:
    """Mistakes the config model stops before anything renders."""

    def _err(self, *sets):
        from ctrlnet.config import load_job_config
        from ctrlnet.errors import UserError

        with pytest.raises(UserError) as e:
            load_job_config(None, list(sets))
        return str(e.value)

    def test_name(self):
        assert "DNS-1035" in self._err("cluster.name=run_1")
        assert "DNS-1035" in self._err(f"cluster.name={'a' * 51}")

    def test_inline_credential_in_env(self):
        assert "cluster.secrets.env" in self._err("cluster.env={AWS_SECRET_ACCESS_KEY: abc}")

    def test_reserved_env(self):
        assert "launcher" in self._err("cluster.env={MASTER_ADDR: x}")

    def test_two_queue_systems(self):
        assert "pick one" in self._err("cluster.kueue.queue=a", "cluster.volcano.queue=b")

    def test_gang_larger_than_job(self):
        assert "only 1 nodes" in self._err("cluster.volcano.queue=q", "cluster.volcano.min_available=2")

    def test_rwo_cache_on_several_nodes(self):
        assert "ReadWriteMany" in self._err("cluster.nodes=2", "cluster.cache.enabled=true", "cluster.cache.access_mode=ReadWriteOnce")

    def test_pytorchjob_only_keys_on_trainjob(self):
        assert "PyTorchJob setting" in self._err("cluster.backend=trainjob", "cluster.ttl_seconds_after_finished=60")

    def test_grace_period(self):
        assert "cluster.termination_grace_period_seconds" in self._err("cluster.termination_grace_period_seconds=5")
