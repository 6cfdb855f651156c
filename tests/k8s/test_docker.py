"""docker/Dockerfile, checked statically (no Docker engine here): pinned base, non-root, no secrets,
an entrypoint that exists in the package, and a .dockerignore that keeps the context small and clean."""

from __future__ import annotations

import importlib.util
import json
import re

from ctrlnet.config import contract

from .conftest import ROOT

DOCKERFILE = (ROOT / "docker" / "Dockerfile").read_text()
LINES = [
    ln.strip() for ln in re.sub(r"\\\n", " ", DOCKERFILE).splitlines() if ln.strip() and not ln.strip().startswith("#")
]


def _instr(name):
    return [ln.split(None, 1)[1] for ln in LINES if ln.split(None, 1)[0].upper() == name]


def test_base_image_pinned_by_tag():
    args = dict(a.split("=", 1) for a in _instr("ARG") if "=" in a)
    froms = [f.split()[0] for f in _instr("FROM")]
    assert froms, "no FROM"
    for ref in froms:
        ref = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], ref)
        assert re.match(r"^[\w./-]+:[\w.-]+(@sha256:[0-9a-f]{64})?$", ref), ref
        assert not ref.endswith(":latest"), ref
        assert "cuda" in ref and "runtime" in ref, ref


def test_runs_as_non_root_user():
    users = _instr("USER")
    assert users, "no USER: the image would run as root"
    user = users[-1].split(":")[0]
    assert user.isdigit() and int(user) != 0, (
        "USER must be a numeric non-root uid (runAsNonRoot can verify only numbers)"
    )
    assert LINES.index(f"USER {users[-1]}") > max(i for i, ln in enumerate(LINES) if ln.startswith("RUN"))


def test_user_and_home_are_the_charts():
    """The image's user is the chart's default uid (>= 10000) and its HOME the path the chart mounts
    the scratch volume at (the root filesystem is read-only): one constant each, in contract."""
    uid = contract.TRAINER_UID
    assert uid >= 10000
    assert _instr("USER")[-1] == f"{uid}:{uid}"
    runs = " ".join(_instr("RUN"))
    assert f"groupadd --gid {uid} ctrlnet" in runs
    assert re.search(rf"useradd --uid {uid} --gid {uid} --home-dir {re.escape(contract.HOME_DIR)} ", runs), runs
    env = " ".join(_instr("ENV"))
    assert f"HOME={contract.HOME_DIR} " in env + " " and f"HF_HOME={contract.HOME_DIR}/" in env
    assert _instr("WORKDIR")[-1] == contract.HOME_DIR, "relative paths (the default train.output) land in HOME"

    from ctrlnet.config.cluster import SecurityConfig

    assert SecurityConfig().model_dump() == {"run_as_user": uid, "run_as_group": uid, "fs_group": uid}


def test_installs_the_wheel_with_train_and_deepspeed_and_checks_it():
    """The image installs the wheel built from the context (so it holds exactly the wheel's
    files), with [train] only, and the build runs the self-check (every module imports, every
    demo weight file matches its sha256) on both stages."""
    runs = " ".join(_instr("RUN"))
    assert "pip wheel --no-deps --wheel-dir /wheels ." in runs
    assert "deepspeed==" in runs and "torch==" in runs and "xformers==" in runs
    # The trainer only: the workstation's Kubernetes tooling (ctrlnet[k8s]) has no business in a pod.
    installs = re.findall(r'pip install [^&]*?"(\$\(ls /wheels/ctrlnet-\*\.whl\)\[[^\]]*\])"', runs)
    assert installs == ["$(ls /wheels/ctrlnet-*.whl)[train]"], installs
    assert "pip install ." not in runs and '".[train]"' not in runs  # never the source tree itself
    assert runs.count("python -m ctrlnet_trainer.selfcheck") == 2


def test_no_secrets_in_image():
    secretish = re.compile(r"(TOKEN|SECRET|PASSWORD|ACCESS_KEY|API_KEY)", re.I)
    for ln in _instr("ENV") + _instr("ARG"):
        assert not secretish.search(ln), ln
    for ln in _instr("COPY") + _instr("ADD"):
        assert not re.search(r"\.env|\.pem|\.key|credentials|\.aws|\.kube", ln), ln
    assert not _instr("ADD"), "use COPY"


def test_entrypoint_is_importable():
    entry = json.loads(_instr("ENTRYPOINT")[-1])
    assert entry[:2] == ["tini", "-g"] and entry[-3:] == ["python", "-m", "ctrlnet_trainer.launch"]
    assert entry[-1] == contract.LAUNCH_MODULE
    assert importlib.util.find_spec("ctrlnet_trainer.launch") is not None
    cmd = json.loads(_instr("CMD")[-1])
    module = cmd[cmd.index("-m") + 1]
    assert module == contract.TRAINER_MODULE and cmd[cmd.index("--config") + 1] == contract.CONFIG_PATH
    assert importlib.util.find_spec(module) is not None, f"{module} is not importable"
    assert importlib.util.find_spec(f"{module}.__main__") is not None, (
        f"`python -m {module}` needs {module}/__main__.py"
    )


def test_dockerignore_is_an_allow_list_that_drops_no_file_of_the_wheel():
    """Everything is ignored but what the wheel is built from; inside that, only Python caches.
    No pattern may match a file the repository holds there (a `**/credentials*` once dropped
    ctrlnet/config/credentials.py, and `**/*.safetensors` the demo weights)."""
    import fnmatch
    import subprocess

    ignore = [ln.strip() for ln in (ROOT / ".dockerignore").read_text().splitlines()]
    ignore = [ln for ln in ignore if ln and not ln.startswith("#")]
    assert ignore[0] == "**", "ignore everything, then allow what the build needs"
    allowed = {ln[1:].rstrip("/") for ln in ignore if ln.startswith("!")}
    assert allowed == {"pyproject.toml", "README.md", "hatch_build.py", "cli", "trainer", "charts"}
    patterns = [ln for ln in ignore[1:] if not ln.startswith("!")]
    assert set(patterns) == {"**/__pycache__", "**/*.pyc"}
    tracked = subprocess.run(
        ["git", "ls-files", *sorted(allowed)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    files = tracked.stdout.split()
    assert any(f.endswith("credentials.py") for f in files) and any(f.endswith(".safetensors") for f in files)
    for f in files:
        for pattern in patterns:
            bare = pattern.removeprefix("**/")
            assert not any(fnmatch.fnmatch(part, bare) for part in f.split("/")), f"{pattern} drops {f}"
    for ln in _instr("COPY"):
        if "--from=" in ln:
            continue
        assert ln.split() == [".", "."], f"COPY {ln}: the context is the allow-list; copy it whole"
