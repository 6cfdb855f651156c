"""`ctrlnet validate`: every render passes; each rule catches the real mistake it exists for."""

from __future__ import annotations

import pytest

from ctrlnet.k8s.rules import RULES
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


# --- every rule, and a real mistake it catches -----------------------------------------------------
# A case = (rule, example, mutation of its render, text of the problem the rule reports).


def _job(objs):
    return next(o for o in objs if o["kind"] in ("PyTorchJob", "TrainJob"))


def _node_pod(objs):
    """The TrainJob's runtime patch of its node pod."""
    (patch,) = by_kind(objs, "TrainJob")["spec"]["runtimePatches"]
    return patch["trainingRuntimeSpec"]["template"]["spec"]["replicatedJobs"][0]["template"]["spec"]["template"]["spec"]


def rename_config_map(objs):
    by_kind(objs, "ConfigMap")["metadata"]["name"] = "Config_Map"


def bad_label_value(objs):
    by_kind(objs, "ConfigMap")["metadata"]["labels"]["team"] = "ml team"


def inline_secret(objs):
    _container(objs)["env"].append({"name": "AWS_SECRET_ACCESS_KEY", "value": "wJalrXUtnFEMI"})


def inline_wandb_key(objs):
    _container(objs)["env"].append({"name": "WANDB_KEY", "value": "0123456789abcdef0123456789abcdef01234567"})


def credential_in_args(objs):
    _container(objs)["args"].append("--output=s3://AKIAZZZZEXAMPLE7Q2XK:wJalrXUtnFEMI@bucket/x")


def inline_secret_in_trainjob(objs):
    by_kind(objs, "TrainJob")["spec"]["trainer"]["env"].append({"name": "HF_TOKEN", "value": "hf_abc"})


def unnamed_secret_reference(objs):
    env = _container(objs)["env"]
    next(e for e in env if e["name"] == "HF_TOKEN")["valueFrom"]["secretKeyRef"].pop("name")


def add_secret_object(objs):
    objs.append(
        {
            "apiVersion": "v1",
            "kind": "Secret",
            "metadata": {"name": "s3-credentials"},
            "stringData": {"AWS_SECRET_ACCESS_KEY": "x"},
        }
    )


def resolution_500(objs):
    cm = by_kind(objs, "ConfigMap")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace("resolution: 512", "resolution: 500")


def drop_resume(objs):
    import yaml

    cm = by_kind(objs, "ConfigMap")
    train = yaml.safe_load(cm["data"]["config.yaml"])
    train["checkpoint"].pop("resume")
    cm["data"]["config.yaml"] = yaml.safe_dump(train)


def launcher_replica(objs):
    by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Launcher"] = {"replicas": 1}


def two_masters(objs):
    _master(objs)["replicas"] = 2


def worker_zero_replicas(objs):
    by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 0


def elastic(objs):
    by_kind(objs, "PyTorchJob")["spec"]["elasticPolicy"] = {"minReplicas": 1, "maxReplicas": 4}


def clean_pod_policy_always(objs):
    by_kind(objs, "PyTorchJob")["spec"]["runPolicy"]["cleanPodPolicy"] = "Always"


def not_suspended(objs):
    del by_kind(objs, "PyTorchJob")["spec"]["runPolicy"]["suspend"]


def trainjob_not_suspended(objs):
    by_kind(objs, "TrainJob")["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] = "team-a"


def gang_of_five(objs):
    by_kind(objs, "PyTorchJob")["spec"]["runPolicy"]["schedulingPolicy"]["minAvailable"] = 5


def nproc_auto(objs):
    by_kind(objs, "PyTorchJob")["spec"]["nprocPerNode"] = "auto"


def restart_on_exit_code(objs):
    _master(objs)["restartPolicy"] = "OnExitCode"


def rename_container(objs):
    _container(objs)["name"] = "trainer"


def drop_image(objs):
    del _container(objs)["image"]


def drop_scheduler(objs):
    del _master(objs)["template"]["spec"]["schedulerName"]


def three_workers(objs):
    by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Worker"]["replicas"] = 3


def drop_ports(objs):
    del _container(objs)["ports"]


def unnamed_pull_secret(objs):
    _master(objs)["template"]["spec"]["imagePullSecrets"] = [{"name": ""}]


def unnamed_runtime(objs):
    by_kind(objs, "TrainJob")["spec"]["runtimeRef"]["name"] = ""


def drop_trainer_image(objs):
    del by_kind(objs, "TrainJob")["spec"]["trainer"]["image"]


def three_num_nodes(objs):
    by_kind(objs, "TrainJob")["spec"]["trainer"]["numNodes"] = 3


def env_in_runtime_patch(objs):
    _node_pod(objs)["containers"][0]["env"] = [{"name": "NCCL_DEBUG", "value": "INFO"}]


def drop_node_container_patch(objs):
    del _node_pod(objs)["containers"]


def reserved_env_in_trainjob(objs):
    by_kind(objs, "TrainJob")["spec"]["trainer"]["env"].append({"name": "PET_NNODES", "value": "3"})


def gpu_request_below_limit(objs):
    _container(objs)["resources"]["requests"]["nvidia.com/gpu"] = "4"


def four_gpus_per_worker(objs):
    res = _container(objs, "Worker")["resources"]
    res["limits"]["nvidia.com/gpu"] = res["requests"]["nvidia.com/gpu"] = "4"


def two_processes(objs):
    c = _container(objs)
    c["args"] = [a.replace("--nproc-per-node=1", "--nproc-per-node=2") for a in c["args"]]


def disk_backed_shm(objs):
    vols = _master(objs)["template"]["spec"]["volumes"]
    next(v for v in vols if v["name"] == "dshm")["emptyDir"] = {}


def unmount_config(objs):
    c = _container(objs)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["name"] != "config"]


def run_as_root(objs):
    sc = _master(objs)["template"]["spec"]["securityContext"]
    sc.pop("runAsNonRoot")
    sc["runAsUser"] = 0
    _container(objs)["securityContext"].pop("runAsNonRoot")


def privileged(objs):
    _container(objs)["securityContext"]["privileged"] = True


def short_grace(objs):
    _master(objs)["template"]["spec"]["terminationGracePeriodSeconds"] = 5


def drop_config_map(objs):
    objs[:] = [o for o in objs if o["kind"] != "ConfigMap"]


def bad_job_name(objs):
    _job(objs)["metadata"]["name"] = "Fill50k_Run"


def unmount_tmp(objs):
    c = _container(objs)
    c["volumeMounts"] = [m for m in c["volumeMounts"] if m["mountPath"] != "/tmp"]


def home_on_a_config_map(objs):
    c = _container(objs)
    next(m for m in c["volumeMounts"] if m["mountPath"] == "/home/ctrlnet")["name"] = "config"


def output_on_the_root_filesystem(objs):
    cm = by_kind(objs, "ConfigMap")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace(
        "output: s3://my-bucket/controlnet/fill50k-single-gpu", "output: /data/runs/fill50k"
    )


def writable_root(objs):
    _container(objs)["securityContext"].pop("readOnlyRootFilesystem")


def node_patch_writable_root(objs):
    _node_pod(objs)["containers"][0]["securityContext"]["readOnlyRootFilesystem"] = False


def run_as_uid_1000(objs):
    _master(objs)["template"]["spec"]["securityContext"]["runAsUser"] = 1000


def container_uid_override(objs):
    _container(objs)["securityContext"]["runAsUser"] = 65


def image_by_tag(objs):
    _container(objs)["image"] = "ghcr.io/org/trainer:latest"


def drop_network_policy(objs):
    objs[:] = [o for o in objs if o["kind"] != "NetworkPolicy"]


def network_policy_for_other_pods(objs):
    np = by_kind(objs, "NetworkPolicy")
    np["spec"]["podSelector"] = {
        "matchExpressions": [{"key": "app.kubernetes.io/instance", "operator": "In", "values": ["x"]}]
    }


CASES = [
    ("object_name", "single-gpu.yaml", bad_job_name, "is not a DNS-1035 label"),
    ("object_name", "single-gpu.yaml", rename_config_map, "'Config_Map' is not a DNS-1123 name"),
    ("label_values", "single-gpu.yaml", bad_label_value, "'ml team' is not a valid label value"),
    ("credentials_by_reference", "single-gpu.yaml", inline_secret, "AWS_SECRET_ACCESS_KEY has an inline value"),
    ("credentials_by_reference", "trainjob.yaml", inline_secret_in_trainjob, "HF_TOKEN has an inline value"),
    ("credentials_by_reference", "single-gpu.yaml", inline_wandb_key, "WANDB_KEY has an inline value"),
    ("no_credentials_in_values", "single-gpu.yaml", credential_in_args, "holds a URL with a user:password in it"),
    ("credentials_by_reference", "single-gpu.yaml", unnamed_secret_reference, "HF_TOKEN: name the Secret and its key"),
    ("no_secret_objects", "single-gpu.yaml", add_secret_object, "Secret/s3-credentials: a Secret in the manifests"),
    ("trainer_config_loads", "single-gpu.yaml", resolution_500, "data.resolution: must be a multiple of 8"),
    ("restarted_pods_resume", "single-gpu.yaml", drop_resume, "train.checkpoint.resume is unset"),
    ("replica_types", "single-gpu.yaml", launcher_replica, "Launcher: unknown replica type"),
    ("one_master", "single-gpu.yaml", two_masters, "Master replicas must be 1"),
    ("no_empty_worker", "multi-node-deepspeed.yaml", worker_zero_replicas, "Worker.replicas: is 0: omit Worker"),
    ("no_elastic_policy", "single-gpu.yaml", elastic, "elastic training is not supported"),
    ("clean_pod_policy", "single-gpu.yaml", clean_pod_policy_always, "'Always': use one of None, Running, All"),
    ("queued_jobs_start_suspended", "kueue.yaml", not_suspended, "queued in Kueue but not created suspended"),
    (
        "queued_jobs_start_suspended",
        "trainjob.yaml",
        trainjob_not_suspended,
        "spec.suspend: queued in Kueue but not created suspended",
    ),
    ("gang_fits", "volcano.yaml", gang_of_five, "5 > 2 pods: the gang can never be scheduled"),
    ("nproc_per_node_is_a_number", "single-gpu.yaml", nproc_auto, "'auto': give the number of processes per node"),
    (
        "restart_policy",
        "single-gpu.yaml",
        restart_on_exit_code,
        "'OnExitCode': use one of Always, OnFailure, Never, ExitCode",
    ),
    ("container_named_pytorch", "single-gpu.yaml", rename_container, "no container named pytorch"),
    ("containers_have_images", "single-gpu.yaml", drop_image, "containers[0].image: is required"),
    ("volcano_scheduler", "volcano.yaml", drop_scheduler, "set schedulerName: volcano"),
    ("nnodes_matches_pods", "multi-node-deepspeed.yaml", three_workers, "--nnodes=2 but the job has 4 pods"),
    ("master_port_named", "single-gpu.yaml", drop_ports, "no port named pytorchjob-port"),
    ("pull_secrets_named", "single-gpu.yaml", unnamed_pull_secret, "name the pull Secret"),
    ("runtime_named", "trainjob.yaml", unnamed_runtime, "name the (Cluster)TrainingRuntime"),
    ("trainer_image", "trainjob.yaml", drop_trainer_image, "spec.trainer.image: is required"),
    ("nnodes_matches_num_nodes", "trainjob.yaml", three_num_nodes, "--nnodes=2 but numNodes is 3"),
    ("no_env_in_runtime_patches", "trainjob.yaml", env_in_runtime_patch, "goes in spec.trainer.env"),
    ("node_container_patched", "trainjob.yaml", drop_node_container_patch, "no patch of the node container"),
    ("no_reserved_env", "trainjob.yaml", reserved_env_in_trainjob, "PET_NNODES is injected"),
    (
        "gpu_request_equals_limit",
        "multi-node-deepspeed.yaml",
        gpu_request_below_limit,
        "nvidia.com/gpu request 4 != limit 8",
    ),
    ("one_process_per_gpu", "multi-node-deepspeed.yaml", four_gpus_per_worker, "GPU limit 4 != 8 processes per node"),
    ("one_process_per_gpu", "single-gpu.yaml", two_processes, "--nproc-per-node=2 but the job says 1"),
    (
        "dev_shm_in_memory",
        "single-gpu.yaml",
        disk_backed_shm,
        "/dev/shm must be an emptyDir with medium: Memory and a sizeLimit",
    ),
    ("config_mounted", "single-gpu.yaml", unmount_config, "the trainer config is not mounted at /etc/ctrlnet"),
    ("runs_as_non_root", "single-gpu.yaml", run_as_root, "runAsNonRoot is not set"),
    ("uid_is_not_root", "single-gpu.yaml", run_as_root, "0 is root"),
    ("unprivileged", "single-gpu.yaml", privileged, "privileged / allowPrivilegeEscalation"),
    (
        "grace_period_fits_a_checkpoint",
        "single-gpu.yaml",
        short_grace,
        "5s is too short to finish a step and checkpoint",
    ),
    (
        "mounted_configmaps_present",
        "single-gpu.yaml",
        drop_config_map,
        "mounts ConfigMap fill50k-single-gpu-config, which is not among the rendered objects",
    ),
    ("writable_scratch", "single-gpu.yaml", unmount_tmp, "TMPDIR (/tmp) is on no writable volume"),
    ("writable_scratch", "single-gpu.yaml", home_on_a_config_map, "HOME (/home/ctrlnet) is on no writable volume"),
    (
        "local_paths_writable",
        "single-gpu.yaml",
        output_on_the_root_filesystem,
        "train.output '/data/runs/fill50k' is on the read-only root filesystem",
    ),
    # Warnings (hardening advice, checkov's checks): reported, never failing validate.
    ("read_only_root_filesystem", "single-gpu.yaml", writable_root, "readOnlyRootFilesystem: is not true"),
    ("read_only_root_filesystem", "trainjob.yaml", node_patch_writable_root, "readOnlyRootFilesystem: is not true"),
    (
        "uid_at_least_10000",
        "multi-node-deepspeed.yaml",
        run_as_uid_1000,
        "runAsUser: is 1000: run as a uid of at least 10000",
    ),
    ("uid_at_least_10000", "single-gpu.yaml", container_uid_override, "runAsUser: is 65"),
    (
        "image_pinned_by_digest",
        "single-gpu.yaml",
        image_by_tag,
        "ghcr.io/org/trainer:latest is a tag the registry can move",
    ),
    (
        "image_pinned_by_digest",
        "trainjob.yaml",
        lambda objs: None,
        "spec.trainer.image: ghcr.io/ctrlnet/trainer:0.1.0 is a tag",
    ),
    ("pods_have_a_network_policy", "volcano.yaml", drop_network_policy, "no NetworkPolicy selects these pods"),
    (
        "pods_have_a_network_policy",
        "trainjob.yaml",
        network_policy_for_other_pods,
        "no NetworkPolicy selects these pods",
    ),
]
WARNINGS = {"read_only_root_filesystem", "uid_at_least_10000", "image_pinned_by_digest", "pods_have_a_network_policy"}


@pytest.mark.parametrize("rule, example, mutate, needle", CASES, ids=[f"{c[0]}-{c[2].__name__}" for c in CASES])
def test_rule_catches(rule, example, mutate, needle):
    objs = render_example(example)
    mutate(objs)
    warnings = []
    problems = validate_objects(objs, warnings=warnings)
    found = warnings if rule in WARNINGS else problems
    only([str(p) for p in found], needle)
    assert rule in {p.rule for p in found if needle in str(p)}, f"{needle!r} was not reported by {rule}"
    assert all(p.warning == (p.rule in WARNINGS) for p in problems + warnings)


def test_warnings_are_the_rules_marked_so():
    """Hardening advice (a warning) never fails validate; every other rule is a problem."""
    rules = [r for rs in RULES.values() for r in rs]
    assert {r.__name__ for r in rules if getattr(r, "warning", False)} == WARNINGS


@pytest.mark.parametrize("example", EXAMPLES)
def test_examples_warn_only_of_their_image_tag(example):
    """The chart's defaults pass every hardening rule but the digest: the examples name an image by tag."""
    warnings = []
    assert validate_objects(render_example(example), warnings=warnings) == []
    assert [w.rule for w in warnings] == ["image_pinned_by_digest"]
    digest = "cluster.image=ghcr.io/ctrlnet/trainer@sha256:" + "0" * 64
    warnings = []
    assert validate_objects(render_example(example, digest), warnings=warnings) == [] and warnings == []


def test_every_rule_is_documented_and_caught_by_a_case():
    rules = [r for rs in RULES.values() for r in rs]
    assert [r.__name__ for r in rules if not (r.__doc__ or "").strip()] == [], "a rule without a docstring"
    assert {r.__name__ for r in rules} - {c[0] for c in CASES} == set(), "a rule no case triggers: add one to CASES"


def test_enums_are_the_config_models():
    from typing import get_args

    from ctrlnet.config.cluster import ClusterConfig
    from ctrlnet.k8s.rules import CLEAN_POD_POLICIES, RESTART_POLICIES

    assert RESTART_POLICIES == get_args(ClusterConfig.model_fields["restart_policy"].annotation)
    assert CLEAN_POD_POLICIES == get_args(ClusterConfig.model_fields["clean_pod_policy"].annotation)


# --- schemas ---------------------------------------------------------------------------------------


def test_unknown_field_is_a_schema_problem():
    def m(objs):
        by_kind(objs, "PyTorchJob")["spec"]["runPolicy"]["backofLimit"] = 3

    only(problems_after("single-gpu.yaml", m), "'backofLimit' was unexpected")


def test_core_kind_schema():
    def m(objs):
        by_kind(objs, "ConfigMap")["data"]["config.yaml"] = 7

    only(
        problems_after("single-gpu.yaml", m),
        "ConfigMap/fill50k-single-gpu-config: data.config.yaml: 7 is not of type 'string'",
    )


def test_schema_problems_is_importable_from_validate():
    """The test cluster's API server checks objects with it."""
    from ctrlnet.k8s import schemas, validate

    assert validate.schema_problems is schemas.schema_problems
    assert validate.schema_problems({"kind": "ConfigMap"}) == [
        validate.Problem("ConfigMap/?", "", "apiVersion and kind are required")
    ]


# --- the CLI ---------------------------------------------------------------------------------------


def test_cli_validate_ok_and_problems(tmp_path):
    ok = ctrlnet("validate", "-f", "examples/multi-node-deepspeed.yaml")
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert ok.stdout.startswith("ok: 5 object(s) valid") and "needs Secrets: hf-token, s3-credentials" in ok.stdout
    # A warning is marked, on stderr, counted on the ok line, and keeps exit code 0.
    assert ok.stdout.rstrip().endswith("; 1 warning(s)") and len(ok.stdout.strip().splitlines()) == 1
    (warned,) = ok.stderr.strip().splitlines()
    assert warned.startswith("warning: PyTorchJob/sd15-fill50k-2x8: ") and "is a tag the registry can move" in warned

    rendered = ctrlnet("render", "-f", "examples/multi-node-deepspeed.yaml").stdout
    broken = rendered.replace("name: pytorch\n", "name: trainer\n", 1).replace("resolution: 512", "resolution: 500")
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
        assert "ReadWriteMany" in self._err(
            "cluster.nodes=2", "cluster.cache.enabled=true", "cluster.cache.access_mode=ReadWriteOnce"
        )

    def test_pytorchjob_only_keys_on_trainjob(self):
        assert "PyTorchJob setting" in self._err("cluster.backend=trainjob", "cluster.ttl_seconds_after_finished=60")

    def test_grace_period(self):
        assert "cluster.termination_grace_period_seconds" in self._err("cluster.termination_grace_period_seconds=5")
