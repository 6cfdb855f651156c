"""`render` and `validate` on bad input, as a user meets it: one `error:` line (exit 2) naming the
file, line or config key and the fix; problems in manifests never quote a credential."""

from __future__ import annotations

import pytest
import yaml

from ctrlnet.k8s.validate import validate_objects

from .conftest import by_kind, ctrlnet, render_example

HF = "hf_" + "Ab3dEf6hIj9kLm2nOp5qRs8tUv1wXy4zAb"


def one_error_line(proc, *words, code=2) -> str:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def _container(objs):
    return by_kind(objs, "PyTorchJob")["spec"]["pytorchReplicaSpecs"]["Master"]["template"]["spec"]["containers"][0]


# --- render: what validate refuses, with the config key named -----------------------------------


@pytest.mark.parametrize(
    "setting, words",
    [
        ("cluster.resources.memory=64GB", ["cluster.resources.memory", "64Gi"]),
        ("cluster.shm_size=8 GB", ["cluster.shm_size"]),
        ("cluster.labels={team: ml team}", ["cluster.labels"]),
        ("cluster.gpus_per_node=0", ["cluster.gpus_per_node is 0", "train.loop.device"]),
        ("train.loop.device=cpu", ["cluster.gpus_per_node is 1", "train.loop.device is cpu"]),
    ],
)
def test_render_refuses_what_the_cluster_would(setting, words):
    sets = ["--set", setting]
    if setting == "cluster.gpus_per_node=0":
        sets += ["--set", "train.loop.device=cuda"]
    one_error_line(ctrlnet("render", "-f", "examples/single-gpu.yaml", *sets), *words)


def test_render_into_a_file_or_over_files_is_refused(tmp_path):
    target = tmp_path / "out.yaml"
    target.write_text("mine\n")
    one_error_line(ctrlnet("render", "-f", "examples/single-gpu.yaml", "-o", str(target)), str(target), "is a file")
    assert target.read_text() == "mine\n"

    out = tmp_path / "out"
    out.mkdir()
    (out / "trainjob.yaml").write_text("hand-edited\n")
    (out / "notes.txt").write_text("kept\n")
    one_error_line(ctrlnet("render", "-f", "examples/single-gpu.yaml", "-o", str(out)), "trainjob.yaml", "--overwrite")
    assert (out / "trainjob.yaml").read_text() == "hand-edited\n"
    assert not (out / "configmap.yaml").exists()  # refused before anything was written

    proc = ctrlnet("render", "-f", "examples/single-gpu.yaml", "-o", str(out), "--overwrite")
    assert proc.returncode == 0, proc.stderr
    assert yaml.safe_load((out / "trainjob.yaml").read_text())["kind"] == "TrainJob"
    assert (out / "notes.txt").read_text() == "kept\n"


# --- validate: its input ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def rendered(tmp_path_factory):
    """The single-gpu example rendered as a folder of files, one per object."""
    folder = tmp_path_factory.mktemp("rendered")
    proc = ctrlnet("render", "-f", "examples/single-gpu.yaml", "-o", str(folder))
    assert proc.returncode == 0, proc.stderr
    return folder


def test_validate_takes_several_paths_after_manifests(rendered, tmp_path):
    sub = tmp_path / "sub"
    sub.mkdir()
    (sub / "trainjob.yaml").write_text((rendered / "trainjob.yaml").read_text())
    files = [str(rendered / "serviceaccount.yaml"), str(sub), str(rendered / "configmap.yaml")]
    proc = ctrlnet("validate", "--manifests", *files)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.startswith("ok: 3 object(s) valid")
    # The repeated-option form still works, and so does stdin among files.
    stdin = (rendered / "trainjob.yaml").read_text()
    proc = ctrlnet("validate", "--manifests", files[0], "--manifests", files[2], "-", stdin=stdin)
    assert proc.returncode == 0 and proc.stdout.startswith("ok: 3 object(s) valid"), proc.stdout + proc.stderr


def test_validate_paths_without_manifests_or_manifests_without_paths():
    one_error_line(ctrlnet("validate", "manifests/base"), "manifests/base", "--manifests")
    one_error_line(ctrlnet("validate", "--manifests"), "--manifests needs")


def test_validate_yaml_error_names_file_and_line(rendered, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text((rendered / "configmap.yaml").read_text() + "---\nkind: [unclosed\n")
    line = one_error_line(ctrlnet("validate", "--manifests", str(rendered / "serviceaccount.yaml"), str(bad)), str(bad))
    assert "not valid YAML at line" in line
    n = len((rendered / "configmap.yaml").read_text().splitlines())
    assert f"line {n + 3}" in line  # the stream's end, where the flow sequence should have closed


def test_validate_scalar_document_is_named_not_quoted(tmp_path):
    f = tmp_path / "pasted.yaml"
    f.write_text(f"---\n{HF}\n")
    proc = ctrlnet("validate", "--manifests", str(f))
    one_error_line(proc, str(f), "line 2", "a string", "not a Kubernetes object")
    assert HF not in proc.stdout + proc.stderr


@pytest.mark.parametrize("version", ["1.99", "banana", "2.0", "1.2"])
def test_unknown_kube_version_lists_the_range(version):
    line = one_error_line(ctrlnet("validate", "-f", "examples/single-gpu.yaml", "--kube-version", version))
    assert f"--kube-version {version!r}" in line and " from 1." in line and " to 1." in line


def test_known_kube_versions_are_accepted():
    for version in ("1.30", "v1.31", "1.29.4"):
        proc = ctrlnet("validate", "-f", "examples/single-gpu.yaml", "--kube-version", version)
        assert proc.returncode == 0, (version, proc.stdout, proc.stderr)


# --- validate: credentials in manifests, found and never shown -----------------------------------------


@pytest.mark.parametrize(
    "name, value",
    [
        ("WANDB_KEY", "0123456789abcdef0123456789abcdef01234567"),
        ("HF_AUTH", HF),
        ("GITHUB_PAT", "plain-looking-value"),
        ("SENTRY_DSN", "https://abc@o1.ingest.sentry.io/1"),
        ("DATABASE_URL", "postgres://u:pw9secret@db/runs"),
        ("SOME_SETTING", HF),
    ],
)
def test_inline_credentials_in_env_are_problems_without_the_value(name, value):
    objs = render_example("single-gpu.yaml")
    _container(objs)["env"].append({"name": name, "value": value})
    problems = [str(p) for p in validate_objects(objs)]
    hits = [p for p in problems if name in p]
    assert hits, problems
    assert "secretKeyRef" in hits[0]
    assert all(value not in p for p in problems), problems


def test_credentials_anywhere_else_are_problems_without_the_value():
    objs = render_example("single-gpu.yaml")
    job = by_kind(objs, "PyTorchJob")
    job["metadata"].setdefault("annotations", {})["ctrlnet.io/output"] = (
        "s3://AKIAZZZZEXAMPLE7Q2XK:wJalrXUtnFEMI@bucket/x"
    )
    _container(objs)["args"].append(f"--token={HF}")
    cm = by_kind(objs, "ConfigMap")
    cm["data"]["config.yaml"] = cm["data"]["config.yaml"].replace(
        "output:", "output: https://user:tok9secret@host/runs\n  # was:", 1
    )
    problems = [str(p) for p in validate_objects(objs)]
    text = "\n".join(problems)
    assert "metadata.annotations.ctrlnet.io/output: holds a URL with a user:password" in text
    assert "args" in text and "Hugging Face token" in text
    assert "data.config.yaml" in text
    for secret in ("wJalrXUtnFEMI", HF, "tok9secret", "AKIAZZZZEXAMPLE7Q2XK"):
        assert secret not in text


def test_schema_problems_do_not_quote_env_values():
    objs = render_example("single-gpu.yaml")
    _container(objs)["env"].append({"name": "PIN", "value": 48151623})  # not a string
    problems = [str(p) for p in validate_objects(objs)]
    hits = [p for p in problems if "is not of type 'string'" in p]
    assert hits and all("48151623" not in p for p in problems), problems


def test_cli_validate_manifests_never_prints_the_secret(rendered, tmp_path):
    text = (rendered / "trainjob.yaml").read_text()
    job = yaml.safe_load(text)
    job["spec"]["trainer"]["env"].append({"name": "WANDB_KEY", "value": HF})
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(job))
    proc = ctrlnet("validate", "--manifests", str(tmp_path / "job.yaml"), str(rendered / "configmap.yaml"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "WANDB_KEY has an inline value" in proc.stdout
    assert HF not in proc.stdout + proc.stderr
