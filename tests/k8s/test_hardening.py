"""Pod hardening, as a scanner nobody here wrote (checkov) measures it: the chart passes its checks
by default where that costs a training job nothing (read-only root filesystem with writable
scratch volumes, a NetworkPolicy, uid >= 10000, secrets as files on request), and every check it
does not pass is skipped in the pod itself with a reason, listed in docs/kubernetes.md#hardening.

checkov itself cannot share the project's environment (its pins clash with s3fs and torch): the
test that runs it needs `make scan` (.venv-checkov) or CTRLNET_CHECKOV, and is skipped without;
the same checks run always as `ctrlnet validate` rules (tests/k8s/test_validate.py)."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctrlnet.config import contract, load_job_config
from ctrlnet.k8s.jobs import JOB_KINDS, pod_templates
from ctrlnet.k8s.validate import validate_objects

from .conftest import EXAMPLES, ROOT, by_kind, render_example

DIGEST = "cluster.image=ghcr.io/ctrlnet/trainer@sha256:" + "0" * 64
SKIP_KEY = re.compile(r"^checkov\.io/skip\d+$")
PROBES = {"CKV_K8S_8", "CKV_K8S_9"}


def _job(objs: list[dict]) -> dict:
    return next(o for o in objs if o["kind"] in JOB_KINDS)


def _templates(objs: list[dict]) -> list[dict]:
    return [tpl for _, tpl in pod_templates(_job(objs))]


def _container(tpl: dict) -> dict:
    return tpl["spec"]["containers"][0]


def _env(objs: list[dict], tpl: dict) -> list[dict]:
    job = _job(objs)
    return job["spec"]["trainer"]["env"] if job["kind"] == "TrainJob" else _container(tpl)["env"]


def _skips(tpl: dict) -> dict[str, str]:
    """{check id: reason} of the pod template's checkov skip annotations."""
    out = {}
    for key, value in (tpl["metadata"].get("annotations") or {}).items():
        if SKIP_KEY.match(key):
            check, sep, reason = value.partition("=")
            assert sep and reason.strip(), f"{key}: {value!r} gives no reason"
            assert "=" not in reason, f"{key}: checkov splits on '=': the reason may not contain one"
            out[check] = reason
    return out


def documented_checks() -> dict[str, str]:
    """{check id: its row} of the table in docs/kubernetes.md's Hardening section."""
    text = (ROOT / "docs" / "kubernetes.md").read_text()
    section = text.split("\n## Hardening", 1)[1].split("\n## ", 1)[0]
    return {m.group(1): line for line in section.splitlines() if (m := re.match(r"^\| `(CKV2?_K8S_\d+)`", line))}


# --- the defaults --------------------------------------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES)
def test_pods_are_hardened_by_default(example):
    objs = render_example(example)
    cfg = load_job_config(ROOT / "examples" / example)
    (policy,) = [o for o in objs if o["kind"] == "NetworkPolicy"]
    for tpl in _templates(objs):
        pod, c = tpl["spec"], _container(tpl)
        assert c["securityContext"]["readOnlyRootFilesystem"] is True
        assert c["securityContext"]["allowPrivilegeEscalation"] is False
        assert pod["securityContext"]["runAsUser"] == contract.TRAINER_UID >= 10000
        assert not {"livenessProbe", "readinessProbe", "startupProbe"} & c.keys()
        # The only writable paths: /tmp and HOME on the scratch emptyDir (and /dev/shm, the cache).
        mounts = {m["mountPath"]: m for m in c["volumeMounts"]}
        assert mounts[contract.TMP_DIR] == {"name": "scratch", "mountPath": "/tmp", "subPath": "tmp"}
        assert mounts[contract.HOME_DIR] == {"name": "scratch", "mountPath": contract.HOME_DIR, "subPath": "home"}
        scratch = next(v for v in pod["volumes"] if v["name"] == "scratch")
        assert scratch == {"name": "scratch", "emptyDir": {"sizeLimit": cfg.cluster.scratch_size}}
        env = {e["name"]: e.get("value") for e in _env(objs, tpl)}
        assert env["HOME"] == contract.HOME_DIR and env["TMPDIR"] == contract.TMP_DIR
        hf_home = f"{cfg.cluster.cache.mount_path}/huggingface" if cfg.cluster.cache.enabled else None
        assert env["HF_HOME"] == (hf_home or f"{contract.HOME_DIR}/.cache/huggingface")
        # The job's NetworkPolicy selects every pod of the job.
        labels = tpl["metadata"]["labels"]
        assert policy["spec"]["podSelector"]["matchLabels"].items() <= labels.items()


def test_network_policy():
    objs = render_example("single-gpu.yaml")
    spec = by_kind(objs, "NetworkPolicy")["spec"]
    own = {"podSelector": spec["podSelector"]}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == [{"from": [own]}], "only the job's own pods may connect to them"
    assert spec["egress"] == [
        {"to": [own]},
        {"ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
        {
            "to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}, {"ipBlock": {"cidr": "::/0"}}],
            "ports": [{"protocol": "TCP", "port": 443}, {"protocol": "TCP", "port": 80}],
        },
    ]
    minio = by_kind(
        render_example(
            "single-gpu.yaml",
            "cluster.network_policy.egress_cidrs=[10.0.0.0/8]",
            "cluster.network_policy.egress_ports=[9000]",
        ),
        "NetworkPolicy",
    )
    assert minio["spec"]["egress"][2] == {
        "to": [{"ipBlock": {"cidr": "10.0.0.0/8"}}],
        "ports": [{"protocol": "TCP", "port": 9000}],
    }
    every_port = by_kind(render_example("single-gpu.yaml", "cluster.network_policy.egress_ports=[]"), "NetworkPolicy")
    assert "ports" not in every_port["spec"]["egress"][2]
    closed = by_kind(render_example("single-gpu.yaml", "cluster.network_policy.egress_cidrs=[]"), "NetworkPolicy")
    assert len(closed["spec"]["egress"]) == 2
    off = render_example("single-gpu.yaml", "cluster.network_policy.enabled=false")
    assert "NetworkPolicy" not in [o["kind"] for o in off]
    warnings = []
    assert validate_objects(off, warnings=warnings) == []
    assert "pods_have_a_network_policy" in {w.rule for w in warnings}


def test_network_policy_config_is_checked():
    from ctrlnet.errors import UserError

    for sets, needle in [
        (["cluster.network_policy.egress_cidrs=[10.0.0.1/8]"], "is not a CIDR range"),
        (["cluster.network_policy.egress_cidrs=[s3.amazonaws.com]"], "is not a CIDR range"),
        (["cluster.network_policy.egress_ports=[0]"], "0 is not a TCP port"),
        (["cluster.image=ghcr.io/org/trainer@sha256:abc"], "64 lowercase hex digits"),
        (["cluster.scratch_size=100GB"], "did you mean 100Gi"),
    ]:
        with pytest.raises(UserError, match=re.escape(needle)):
            load_job_config(None, sets)
    load_job_config(None, [DIGEST.replace("trainer@", "trainer:0.1.0@")])  # tag and digest: the digest wins


# --- what the scanner is told to skip, and why --------------------------------------------------


@pytest.mark.parametrize("example", EXAMPLES)
def test_scanner_skips_are_explained(example):
    """Probes never fit a batch job; the other skips follow the job's own settings, and go away
    when it pins a digest and mounts its secrets as files."""
    trainjob = example == "trainjob.yaml"
    for sets, expected in [
        ((), PROBES | {"CKV_K8S_43", "CKV_K8S_15", "CKV_K8S_35"}),
        ((DIGEST, "cluster.secrets.as_files=true"), PROBES),
    ]:
        objs = render_example(example, *sets)
        for tpl in _templates(objs):
            skips = _skips(tpl)
            assert skips.keys() == expected | ({"CKV_K8S_38"} if trainjob else set()), (sets, skips)
            assert skips.keys() <= documented_checks().keys(), "every skip is in docs/kubernetes.md#hardening"


def test_user_annotations_win_over_the_charts():
    objs = render_example("single-gpu.yaml", "cluster.annotations={checkov.io/skip1: CKV_K8S_8=ours, team: a}")
    (tpl,) = _templates(objs)
    assert _skips(tpl)["CKV_K8S_8"] == "ours" and tpl["metadata"]["annotations"]["team"] == "a"


def test_docs_cover_every_check_the_chart_can_skip_and_every_failing_one():
    chart = (ROOT / "charts" / "ctrlnet" / "templates" / "_helpers.tpl").read_text()
    skippable = set(re.findall(r'"(CKV2?_K8S_\d+)=', chart))
    measured = {"CKV_K8S_8", "CKV_K8S_9", "CKV_K8S_15", "CKV_K8S_22", "CKV_K8S_35", "CKV_K8S_38"}
    measured |= {"CKV_K8S_40", "CKV_K8S_43", "CKV2_K8S_6"}  # what failed before the hardening
    assert skippable | measured <= documented_checks().keys()


# --- secrets as files ----------------------------------------------------------------------------


@pytest.mark.parametrize("example", ["multi-node-deepspeed.yaml", "trainjob.yaml"])
def test_secrets_as_files(example):
    objs = render_example(example, "cluster.secrets.as_files=true")
    cfg = load_job_config(ROOT / "examples" / example)
    secrets_seen: set[str] = set()
    assert validate_objects(objs, secrets_seen=secrets_seen) == []  # HF_TOKEN_PATH is a path, not a token
    assert secrets_seen == {cfg.cluster.secrets.s3, cfg.cluster.secrets.hub_token}
    for tpl in _templates(objs):
        env = _env(objs, tpl)
        assert not [e for e in env if "valueFrom" in e], "no credential in the environment"
        values = {e["name"]: e["value"] for e in env}
        assert values["AWS_CONFIG_FILE"] == f"{contract.SECRETS_DIR}/s3/config"
        assert values["HF_TOKEN_PATH"] == f"{contract.SECRETS_DIR}/hub/token"
        volumes = {v["name"]: v for v in tpl["spec"]["volumes"]}
        assert volumes["secret-s3"]["secret"] == {
            "secretName": cfg.cluster.secrets.s3,
            "defaultMode": 0o440,
            "items": [{"key": "config", "path": "config"}],  # a Secret without it fails at mount time
        }
        assert volumes["secret-hub"]["secret"] == {
            "secretName": cfg.cluster.secrets.hub_token,
            "defaultMode": 0o440,
            "items": [{"key": cfg.cluster.secrets.hub_token_key, "path": "token"}],
        }
        mounts = {m["name"]: m for m in _container(tpl)["volumeMounts"]}
        assert mounts["secret-s3"] == {"name": "secret-s3", "mountPath": f"{contract.SECRETS_DIR}/s3", "readOnly": True}
        assert mounts["secret-hub"]["readOnly"] is True


def test_secret_env_entries_stay_variables_with_their_reason():
    wandb = "cluster.secrets.env=[{name: WANDB_API_KEY, secret: wandb, key: api-key}]"
    (tpl,) = _templates(render_example("single-gpu.yaml", "cluster.secrets.as_files=true", wandb))
    refs = [e["name"] for e in _container(tpl)["env"] if "valueFrom" in e]
    assert refs == ["WANDB_API_KEY"]
    assert "cluster.secrets.env" in _skips(tpl)["CKV_K8S_35"]


def test_cluster_env_overrides_the_scratch_paths():
    (tpl,) = _templates(render_example("single-gpu.yaml", "cluster.env={HF_HOME: /data/hf, TMPDIR: /tmp/x}"))
    names = [e["name"] for e in _container(tpl)["env"]]
    assert names.count("HF_HOME") == 1 and names.count("TMPDIR") == 1 and "HOME" in names


def test_trainer_reads_credentials_from_mounted_files(s3_server, tmp_path):
    """What cluster.secrets.as_files mounts is what the trainer's libraries read: botocore the AWS
    config file (credentials, region and endpoint; no AWS_* variable set), the hub push the token
    file HF_TOKEN_PATH names."""
    config = tmp_path / "s3" / "config"
    config.parent.mkdir()
    config.write_text(
        "[default]\naws_access_key_id = testing\naws_secret_access_key = testing\n"
        f"region = us-east-1\nendpoint_url = {s3_server.endpoint}\n"
    )
    token = tmp_path / "hub" / "token"
    token.parent.mkdir()
    token.write_text("hf_from_a_file\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "HF_TOKEN"))}
    env.update(AWS_CONFIG_FILE=str(config), HF_TOKEN_PATH=str(token), HOME=str(tmp_path / "home"))
    code = (
        "from ctrlnet_trainer.storage import Prefix, probe\n"
        "from ctrlnet_trainer.hub import hub_token\n"
        "from ctrlnet.config.train import HubConfig\n"
        f"probe([{s3_server.url('as-files')!r}])\n"  # the trainer's fail-fast check before a run
        f"p = Prefix({s3_server.url('as-files')!r})\n"
        "p.fs.pipe(p.join('probe.txt'), b'ok')\n"
        "print(p.fs.cat(p.join('probe.txt')).decode(), hub_token(HubConfig()))\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["ok", "hf_from_a_file"]


# --- the scanner itself ---------------------------------------------------------------------------


def _checkov() -> str:
    from tools.checkov_pods import find_checkov

    found = find_checkov()
    if found is None:
        pytest.skip("checkov is not installed: `make scan` puts it in .venv-checkov (its pins clash with [train])")
    return found


@pytest.mark.parametrize(
    "sets",
    [(), (DIGEST, "cluster.secrets.as_files=true")],
    ids=["defaults", "digest-and-secret-files"],
)
def test_checkov_finds_no_unexplained_failure(sets):
    """checkov on the pods of every example: no failed check; each skip has its reason in the pod
    and a row in docs/kubernetes.md#hardening."""
    checkov = _checkov()
    args = [sys.executable, str(ROOT / "tools" / "checkov_pods.py"), "--checkov", checkov, "--json"]
    proc = subprocess.run(
        args + [a for s in sets for a in ("--set", s)], capture_output=True, text=True, timeout=300, cwd=ROOT
    )
    assert proc.returncode in (0, 1), proc.stderr[-2000:]
    result = json.loads(proc.stdout)
    assert result["failed"] == 0, json.dumps(result["failed_rows"], indent=1)
    assert result["passed"] > 400, result  # it did look at the pods
    assert result["skipped_checks"].keys() <= documented_checks().keys()
    assert all(reason.strip() for reason in result["skipped_checks"].values())
    if sets:
        assert set(result["skipped_checks"]) == PROBES | {"CKV_K8S_38"}  # 38: the TrainJob example's


# --- the trainer writes to its volumes only --------------------------------------------------------

_AUDIT = r"""
import json, os, sys
_log = open(os.environ["CTRLNET_AUDIT_LOG"] + "." + str(os.getpid()), "a", buffering=1)
_WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_TRUNC
_TARGET = {"os.mkdir": 0, "os.rename": 1, "os.replace": 1, "os.remove": 0, "os.rmdir": 0, "os.symlink": 1,
           "os.link": 1, "os.truncate": 0, "os.chmod": 0, "os.utime": 0, "shutil.rmtree": 0,
           "shutil.copyfile": 1, "shutil.move": 1}

def _hook(event, args):
    if event == "open":
        path, mode, flags = args
        writes = any(c in mode for c in "wax+") if isinstance(mode, str) else bool((flags or 0) & _WRITE_FLAGS)
    elif event in _TARGET:
        path, writes = args[_TARGET[event]], True
    else:
        return
    if writes and isinstance(path, (str, bytes, os.PathLike)):
        _log.write(json.dumps([event, os.fsdecode(path), os.getcwd()]) + "\n")

sys.addaudithook(_hook)
"""


@pytest.mark.slow
def test_trainer_writes_only_to_its_volumes(s3_server, tmp_path):
    """The pod's root filesystem is read-only: a real run (torchrun launcher, checkpoints staged and
    uploaded to S3, validation samples, TensorBoard, the loss plot), with HOME and TMPDIR where the
    chart mounts the scratch volume, writes nowhere else. Every Python-level write (open for
    writing, mkdir, rename, remove, ...) of every process is recorded by an audit hook; native
    writers (torch.save's, safetensors') are seen through the folders Python makes for them."""
    home, tmp, site = tmp_path / "home", tmp_path / "tmp", tmp_path / "site"
    for d in (home, tmp, site):
        d.mkdir()
    (site / "sitecustomize.py").write_text(_AUDIT)
    cfg = tmp_path / "etc" / "config.yaml"
    cfg.parent.mkdir()
    cfg.write_text(
        yaml.safe_dump(
            {
                "output": s3_server.url("audit", "run"),
                "data": {"synthetic_rows": 32, "resolution": 32},
                "loop": {"seed": 0, "batch_size": 4, "max_steps": 4},
                "checkpoint": {"every_steps": 2},
                "validation": {"num_images": 1, "num_inference_steps": 2, "every_steps": 4},
                "logging": {"report_to": "tensorboard"},
            }
        )
    )
    env = {
        "PATH": os.environ["PATH"],
        "PYTHONPATH": os.pathsep.join([str(site), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "HOME": str(home),
        "TMPDIR": str(tmp),
        "HF_HOME": str(home / ".cache" / "huggingface"),
        "HF_HUB_OFFLINE": "1",
        "PYTHONDONTWRITEBYTECODE": "1",  # the image's bytecode is compiled at build time
        "OMP_NUM_THREADS": "1",
        "CTRLNET_AUDIT_LOG": str(tmp_path / "audit"),
        **s3_server.env,
    }
    launch = [sys.executable, "-m", contract.LAUNCH_MODULE, "--standalone", "--nnodes=1", "--nproc-per-node=1"]
    proc = subprocess.run(
        [*launch, "-m", contract.TRAINER_MODULE, "--config", str(cfg)],
        env=env,
        cwd=home,  # the image's WORKDIR is HOME
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert s3_server.fs.exists("ctrlnet-test/audit/run/controlnet/diffusion_pytorch_model.safetensors")
    writable = [str(home), str(tmp), "/dev/"]
    writes, outside = 0, []
    for log in tmp_path.glob("audit.*"):
        for line in log.read_text().splitlines():
            event, path, cwd = json.loads(line)
            full = os.path.normpath(os.path.join(cwd, path))
            writes += 1
            if not any(full == w.rstrip("/") or full.startswith(w.rstrip("/") + "/") for w in writable):
                outside.append(f"{event} {full}")
    assert writes > 20, "the audit hook saw the run's writes"
    assert sorted(set(outside)) == [], "the trainer writes outside HOME and TMPDIR"
    assert Path(tmp, "ctrlnet-work").is_dir(), "object-storage outputs are staged under TMPDIR"
