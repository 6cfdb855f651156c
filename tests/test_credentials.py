"""Credentials never reach a rendered object, a log or an error: what looks like one (names and
values, ctrlnet.config.credentials), refused by the config model with a line that names the key
and the Secret-based way instead, and never quotes the value.

Fast: nothing here imports torch; the CLI cases run `ctrlnet config show` / `render` in a subprocess.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from ctrlnet.config import load_job_config, load_train_config
from ctrlnet.config.credentials import credential_kind, find_credentials, secret_env_name, shown
from ctrlnet.errors import UserError

ROOT = Path(__file__).resolve().parent.parent

# Made-up credentials in the real formats (none of them works anywhere).
HF = "hf_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb"
GH = "ghp_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4O5p6Q7r8"
GH_PAT = "github_pat_" + "11ABCDEFG0abcdefghijkl_mnopqrstuvwxyzABCDEFGHIJ0123456789"
AWS_ID = "AKIA" + "ZZZZEXAMPLE7Q2XK"
AWS_SECRET = "wJalrXUtnFEMI" + "K7MDENGbPxRfiCYEXAMPLEKEY"
OPENAI = "sk-proj-" + "Zq8vN2rT5yW1xK4mB7cF0hJ3"
SLACK = "xoxb-" + "123456789012-abcdefghijkl"
GITLAB = "glpat-" + "AbCdEf0123456789xyzW"
WANDB = "0123456789abcdef0123456789abcdef01234567"  # 40 hex: a W&B API key's shape

TOKENS = [HF, GH, GH_PAT, AWS_ID, OPENAI, SLACK, GITLAB]


# --- what looks like a credential -----------------------------------------------------------------


@pytest.mark.parametrize(
    "name",
    [
        "AWS_SECRET_ACCESS_KEY",
        "HF_TOKEN",
        "HUGGING_FACE_HUB_TOKEN",
        "WANDB_API_KEY",
        "WANDB_KEY",
        "HF_AUTH",
        "GITHUB_PAT",
        "SENTRY_DSN",
        "DB_PASSWORD",
        "DB_PASS",
        "MY_CREDENTIALS",
        "OPENAI_APIKEY",
        "hftoken",
    ],
)
def test_secret_env_names(name):
    assert secret_env_name(name)


@pytest.mark.parametrize(
    "name", ["NCCL_DEBUG", "AWS_REGION", "AWS_ENDPOINT_URL", "HF_HOME", "TOKENIZERS_PARALLELISM", "PWD", "KEY_PATH"]
)
def test_plain_env_names(name):
    assert not secret_env_name(name)


@pytest.mark.parametrize(
    "value",
    [
        *TOKENS,
        f"s3://{AWS_ID}:{AWS_SECRET}@bucket/runs",
        "https://user:t0ken@git.example.com/org/data.parquet",
        "postgres://u:pw@db.internal:5432/runs",
        "Server=db;User Id=sa;Password=hunter22;",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        f"Bearer {HF}",
    ],
)
def test_credential_values(value):
    assert credential_kind(value)


@pytest.mark.parametrize(
    "value",
    [
        "s3://bucket/runs/canny",
        "hf://datasets/org/fill50k@main/data.parquet",
        "ssh://git@github.com/org/repo",
        "runwayml/stable-diffusion-v1-5",
        "a red circle with a blue background",
        WANDB,  # a commit hash has the same shape: only refused where a *name* belongs
        "64Gi",
    ],
)
def test_plain_values(value):
    assert credential_kind(value) is None


def test_blobs_only_where_a_name_belongs():
    assert credential_kind(WANDB, blobs=True)
    assert credential_kind("Zm9vYmFyYmF6cXV4MTIzNDU2Nzg5MGFiY2RlZg", blobs=True)
    assert credential_kind("hf-token", blobs=True) is None


def test_find_credentials_names_the_path_never_the_value():
    data = {"env": {"A": "x", "B": HF}, "images": ["ok.png", f"https://u:{HF}@h/x.png"], HF: 1}
    found = list(find_credentials(data))
    assert [p for p, _ in found] == [("env", "B"), ("images[1]",), ()]
    assert all(HF not in kind for _, kind in found)
    assert HF not in shown(HF) and shown("fp8") == "'fp8'"


# --- refused by the config model, the value never echoed -------------------------------------------

# (--set assignment, the secret it carries, words the one line must hold)
REFUSED = [
    (f"train.output=s3://{AWS_ID}:{AWS_SECRET}@bucket/runs", AWS_SECRET, ["train.output", "cluster.secrets.s3"]),
    (f"train.model.base=https://user:{HF}@host/sd15", HF, ["train.model.base", "Secret"]),
    ("train.data.dataset=postgres://u:pw9secret@db/x", "pw9secret", ["train.data.dataset", "Secret"]),
    (f"train.checkpoint.resume=s3://K:{AWS_SECRET}@b/ck", AWS_SECRET, ["train.checkpoint.resume"]),
    (f"train.hub.token_env={HF}", HF, ["train.hub.token_env", "HF_TOKEN", "name of the environment variable"]),
    (f"cluster.secrets.hub_token={HF}", HF, ["cluster.secrets.hub_token", "name"]),
    (f"cluster.secrets.s3={AWS_SECRET}", AWS_SECRET, ["cluster.secrets.s3", "Secret"]),
    (f"cluster.secrets.hub_token={WANDB}", WANDB, ["cluster.secrets.hub_token", "hex"]),
    (f"cluster.image_pull_secrets=[{GH}]", GH, ["cluster.image_pull_secrets[0]", "GitHub token"]),
    (f"cluster.secrets.env=[{{name: WANDB_API_KEY, secret: {WANDB}, key: k}}]", WANDB, ["secrets.env[0].secret"]),
    (f"cluster.secrets.env=[{{name: {GH}, secret: gh, key: k}}]", GH, ["cluster.secrets.env"]),
    (f"cluster.env={{WANDB_KEY: {WANDB}}}", WANDB, ["WANDB_KEY", "cluster.secrets.env"]),
    (f"cluster.env={{HF_AUTH: {HF}}}", HF, ["HF_AUTH", "cluster.secrets.env"]),
    ("cluster.env={GITHUB_PAT: abc123}", "abc123", ["GITHUB_PAT", "cluster.secrets.env"]),
    ("cluster.env={DATABASE_URL: 'postgres://u:pw9secret@db/x'}", "pw9secret", ["cluster.env.DATABASE_URL"]),
    (f"cluster.env={{MY_SETTING: {OPENAI}}}", OPENAI, ["cluster.env.MY_SETTING", "cluster.secrets.env"]),
    (f"cluster.env=[{{name: HF_TOKEN, value: {HF}}}]", HF, ["cluster.env"]),
    (f"cluster.annotations={{team: '{SLACK}'}}", SLACK, ["cluster.annotations.team"]),
    (f"cluster.labels={{owner: {GITLAB}}}", GITLAB, ["cluster.labels.owner"]),
    (f"cluster.service_account.annotations={{x: 'https://a:{HF}@h'}}", HF, ["service_account.annotations.x"]),
]


def _refusal(assignment: str, **kw) -> str:
    with pytest.raises(UserError) as e:
        load_job_config(None, [assignment], **kw)
    return str(e.value)


@pytest.mark.parametrize("assignment, secret, words", REFUSED, ids=[r[0].split("=")[0] for r in REFUSED])
def test_refused_without_echo(assignment, secret, words):
    msg = _refusal(assignment)
    assert "\n" not in msg
    assert secret not in msg, msg
    for word in words:
        assert word in msg, msg


@pytest.mark.parametrize(
    "assignment, secret",
    [
        # Shapes that are wrong for the key: the message describes the shape, never the value.
        ("cluster.env=[{name: X, value: plainbutprivate}]", "plainbutprivate"),
        ("cluster.secrets.hub_token=[my-hf-token-secret]", "my-hf-token-secret"),
        ("cluster.secrets.hub_token={a: plainbutprivate}", "plainbutprivate"),
        ("cluster.secrets.hub_token=Not_A_Name_Secret9", "Not_A_Name_Secret9"),
        ("train.hub.token_env=not a var", "not a var"),
        ("cluster.image_pull_secrets=[Not_A_Name_Secret9]", "Not_A_Name_Secret9"),
        ("cluster.env={X: [plainbutprivate]}", "plainbutprivate"),
    ],
)
def test_wrong_shape_where_a_secret_may_be_is_not_echoed(assignment, secret):
    msg = _refusal(assignment)
    assert secret not in msg, msg
    assert assignment.split("=")[0] in msg, msg


def test_kubernetes_env_list_gets_the_right_shape_named():
    msg = _refusal("cluster.env=[{name: NCCL_DEBUG, value: WARN}]")
    assert "cluster.env is a mapping NAME: value" in msg and "cluster.secrets.env" in msg


def test_unknown_key_that_is_a_token_is_not_echoed(tmp_path):
    p = tmp_path / "job.yaml"
    p.write_text(f"train:\n  {HF}: 1\n")
    with pytest.raises(UserError) as e:
        load_job_config(p)
    assert HF not in str(e.value) and "train" in str(e.value)
    with pytest.raises(UserError) as e:
        load_job_config(None, [f"{HF}=1"])
    assert HF not in str(e.value)
    with pytest.raises(UserError) as e:
        load_job_config(None, [f"cluster.{HF}"])  # no '=': the whole text is shown as typed otherwise
    assert HF not in str(e.value)


def test_the_trainer_view_refuses_too(tmp_path):
    p = tmp_path / "config.yaml"
    p.write_text(f"output: s3://{AWS_ID}:{AWS_SECRET}@bucket/x\n")
    with pytest.raises(UserError) as e:
        load_train_config(p)
    assert "output" in str(e.value) and AWS_SECRET not in str(e.value) and AWS_ID not in str(e.value)


def test_plain_values_still_load():
    cfg = load_job_config(
        None,
        [
            "train.output=s3://bucket/runs",
            "train.model.base=runwayml/stable-diffusion-v1-5",
            f"train.model.revision={WANDB}",  # a commit hash
            "cluster.env={TOKENIZERS_PARALLELISM: 'false', NCCL_DEBUG: WARN}",
            "cluster.secrets.hub_token=hf-token",
            "cluster.secrets.env=[{name: WANDB_API_KEY, secret: wandb, key: api-key}]",
            "cluster.image_pull_secrets=[ghcr-pull]",
        ],
    )
    assert cfg.cluster.secrets.hub_token == "hf-token" and cfg.train.model.revision == WANDB


# --- through the CLI: the value appears in no output -------------------------------------------------


def _ctrlnet(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-c", "from ctrlnet.cli import main; main()", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=120,
    )


@pytest.mark.parametrize(
    "args, key, secret",
    [
        (["render", "--set", f"train.output=s3://{AWS_ID}:{AWS_SECRET}@bucket/runs"], "train.output", AWS_SECRET),
        (["render", "--set", f"cluster.secrets.hub_token={HF}"], "cluster.secrets.hub_token", HF),
        (["validate", "--set", f"cluster.env={{WANDB_KEY: {WANDB}}}"], "WANDB_KEY", WANDB),
        (["render", "--set", f"cluster.env=[{{name: HF_TOKEN, value: {HF}}}]"], "cluster.env", HF),
        (["config", "show", "--set", f"train.hub.token_env={HF}"], "train.hub.token_env", HF),
        (["train", "--output", f"s3://{AWS_ID}:{AWS_SECRET}@bucket/runs"], "train.output", AWS_SECRET),
        (["train", "--data", f"https://user:{HF}@host/data.parquet"], "train.data.dataset", HF),
    ],
    ids=lambda v: v[0] if isinstance(v, list) else None,
)
def test_cli_never_prints_the_secret(args, key, secret):
    if args[0] in ("render", "validate"):
        args = [args[0], "-f", "examples/single-gpu.yaml", *args[1:]]
    proc = _ctrlnet(*args)
    assert proc.returncode == 2, (proc.stdout, proc.stderr)
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and "Traceback" not in proc.stderr, proc.stderr
    assert key in lines[0]
    assert secret not in proc.stdout + proc.stderr
