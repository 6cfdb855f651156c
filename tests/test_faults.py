"""Fault injection, on CPU and loopback: a run writing to S3 (moto) is SIGKILLed at seeded moments
and resumed each time; the object store fails (500s, timeouts, dropped connections) through a
proxy in front of moto. Nothing committed is ever unreadable, every resume starts from the newest
committed checkpoint, and the result equals an uninterrupted run's.

The kill points are reached deterministically: the run is `python KILL_DRIVER --config ...`, a
driver that wraps trainer functions (never product code hooks) and SIGKILLs its own process when
CTRLNET_TEST_KILL=<point>@<step> is reached, exactly as `kill -9` from outside would."""

import json
import os
import random
import subprocess
import sys

import pytest
import torch
import yaml

from testkit.faultproxy import Fault, FaultProxy
from testkit.training import max_weight_diff, small_config_dict

pytest.importorskip("s3fs")
pytest.importorskip("moto")
pytestmark = pytest.mark.slow

KILL_DRIVER = r'''
"""python -m ctrlnet_trainer that SIGKILLs itself at CTRLNET_TEST_KILL=<point>@<step>."""
import os, signal, sys
point, _, at = os.environ.get("CTRLNET_TEST_KILL", "none@0").partition("@")
at = int(at)

import s3fs
from accelerate import Accelerator
from accelerate.optimizer import AcceleratedOptimizer
import ctrlnet_trainer.trainer as trainer
from ctrlnet_trainer.storage import Prefix
from ctrlnet_trainer.__main__ import main

training = {"step": 0}  # the step being trained (then saved)
uploaded = {"files": 0}

def die(where):
    sys.stderr.write(f"KILL {where}@{at}\n")
    sys.stderr.flush()
    os.kill(os.getpid(), signal.SIGKILL)

def wrap(owner, name, make):
    setattr(owner, name, make(getattr(owner, name)))

def train_step(f):
    def g(self):
        training["step"] = self.step + 1
        return f(self)
    return g

def optimizer_step(f):  # mid-step: forward and backward done, weights not yet updated
    def g(self, *a, **k):
        if point == "mid-step" and training["step"] == at:
            die(point)
        return f(self, *a, **k)
    return g

def save_state(f):  # mid-save: accelerate's files staged, trainer_state not yet, nothing uploaded
    def g(self, *a, **k):
        out = f(self, *a, **k)
        if point == "mid-save" and training["step"] == at:
            die(point)
        return out
    return g

def put_file(f):  # mid-upload (in the upload thread): two files of the checkpoint are in the store
    async def g(self, lpath, rpath, *a, **k):
        out = await f(self, lpath, rpath, *a, **k)
        if point == "mid-upload" and f"/step-{at:08d}/" in rpath:
            uploaded["files"] += 1
            if uploaded["files"] == 2:
                die(point)
        return out
    return g

def write_text(f):  # before-latest: COMMITTED written, the `latest` pointer not yet
    def g(self, text, *parts):
        if point == "before-latest" and parts[-1:] == ("latest",) and text.strip() == f"step-{at:08d}":
            die(point)
        return f(self, text, *parts)
    return g

def publish(f):  # mid-finish: the final controlnet/ published, metrics and FINISHED not yet
    def g(self, *parts):
        out = f(self, *parts)
        if point == "mid-finish" and parts == ("controlnet",):
            die(point)
        return out
    return g

wrap(trainer.Trainer, "train_step", train_step)
wrap(AcceleratedOptimizer, "step", optimizer_step)
wrap(Accelerator, "save_state", save_state)
wrap(s3fs.S3FileSystem, "_put_file", put_file)
wrap(Prefix, "write_text", write_text)
wrap(Prefix, "publish", publish)
sys.exit(main(sys.argv[1:]))
'''

MAX_STEPS, EVERY = 12, 2
KILL_RUN = {
    "loop": {"max_steps": MAX_STEPS},
    "checkpoint": {"every_steps": EVERY, "total_limit": 2, "resume": "latest"},
}
POINTS = ("mid-step", "mid-save", "mid-upload", "before-latest")
N_KILLS = 4  # every point once (more are drawn at random when raised); then one kill while finishing
SEED = 34  # resumes from 2, 4, 6, 8, 10 and 12: every kill point, and one while finishing
CHECKPOINT_FILES = {
    "COMMITTED",
    "trainer_state.json",
    "optimizer.bin",
    "custom_checkpoint_0.pkl",
    "random_states_0.pkl",
    "controlnet/config.json",
    "controlnet/diffusion_pytorch_model.safetensors",
}


def committed(fs, prefix: str) -> list[int]:
    """Committed steps under `<prefix>/checkpoints`, each checked to be complete and readable."""
    from safetensors.torch import load as load_safetensors

    steps = []
    fs.invalidate_cache()
    root = f"{prefix}/checkpoints"
    for folder in fs.ls(root, detail=False, refresh=True) if fs.exists(root) else []:
        name = folder.rsplit("/", 1)[-1]
        if not name.startswith("step-") or not fs.exists(f"{folder}/COMMITTED"):
            continue
        files = {f[len(folder) + 1 :] for f in fs.find(folder)}
        assert CHECKPOINT_FILES <= files, f"committed {name} lacks {CHECKPOINT_FILES - files}"
        for rel in files - {"COMMITTED"}:
            data = fs.cat(f"{folder}/{rel}")
            if rel.endswith(".json"):
                json.loads(data)
            elif rel.endswith(".safetensors"):
                load_safetensors(data)
            else:
                import io

                torch.load(io.BytesIO(data), weights_only=False)
        steps.append(int(name[len("step-") :]))
    return sorted(steps)


def plan_kills(rng: random.Random) -> list[str]:
    points = list(POINTS) + rng.choices(POINTS, k=N_KILLS - len(POINTS))
    rng.shuffle(points)
    return points


def pick_step(rng: random.Random, point: str, newest: int) -> int:
    """A step the next run reaches after its resume point `newest`: for a checkpoint point one of
    the next two steps it saves, for mid-step one of the next five steps."""
    saves = [step for step in range(EVERY, MAX_STEPS + 1, EVERY) if step > newest]
    assert saves, f"no checkpoint left after step {newest}: lower N_KILLS or raise MAX_STEPS"
    if point == "mid-step":
        return rng.randint(newest + 1, min(newest + 2 * EVERY + 1, MAX_STEPS))
    return rng.choice(saves[:2])


def test_kill_9_at_seeded_moments_then_resume_equals_uninterrupted(s3_server, tmp_path, make_cfg, monkeypatch):
    from ctrlnet_trainer.run import train

    monkeypatch.setenv("CTRLNET_WORK_DIR", str(tmp_path / "work"))  # staging of its own (others run tests too)
    reference = tmp_path / "reference"
    train(make_cfg(reference, **dict(KILL_RUN, checkpoint={"every_steps": EVERY})))

    prefix = "ctrlnet-test/runs/kill-loop"
    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(f"s3://{prefix}", **KILL_RUN)))
    driver = tmp_path / "kill_driver.py"
    driver.write_text(KILL_DRIVER)
    env = {**os.environ, **s3_server.env, "CTRLNET_WORK_DIR": str(tmp_path / "work")}

    def run(kill: str | None) -> subprocess.CompletedProcess:
        return subprocess.run(
            [sys.executable, str(driver), "--config", str(config)],
            env={**env, "CTRLNET_TEST_KILL": kill or "none@0"},
            capture_output=True,
            text=True,
            timeout=240,
        )

    rng = random.Random(SEED)
    fs = s3_server.fs
    newest, covered = 0, []
    for point in [*plan_kills(rng), "mid-finish"]:
        kill = f"{point}@{0 if point == 'mid-finish' else pick_step(rng, point, newest)}"
        result = run(kill)
        assert result.returncode == -9 and f"KILL {kill}" in result.stderr, (kill, result.stderr[-3000:])
        # This run resumed from the newest committed checkpoint the previous one left.
        resumed = [line for line in result.stdout.splitlines() if line.startswith("resuming from")]
        want = [f"resuming from s3://{prefix}/checkpoints/step-{newest:08d} at step {newest}"] if newest else []
        assert resumed == want, (kill, result.stdout[-2000:])
        steps = committed(fs, prefix)  # each one complete and loadable
        assert not steps or steps[-1] >= newest
        newest = steps[-1] if steps else 0
        covered.append(f"{kill} -> newest committed {newest}")

    final = run(None)
    assert final.returncode == 0, final.stderr[-3000:]
    assert f"resuming from s3://{prefix}/checkpoints/step-{newest:08d} at step {newest}" in final.stdout
    assert committed(fs, prefix)[-1] == MAX_STEPS
    out = tmp_path / "final"
    fs.get(f"{prefix}/controlnet/", str(out) + "/", recursive=True)
    assert max_weight_diff(reference / "controlnet", out) <= 1e-6
    assert fs.exists(f"{prefix}/FINISHED")
    print("kill points:", "; ".join(covered))  # shown with -s: the points this seed covered
    assert {c.split("@")[0] for c in covered} == {*POINTS, "mid-finish"}


# ------------------------------------------------------------------ a failing object store
@pytest.fixture
def proxy(s3_server, monkeypatch, tmp_path):
    """A FaultProxy in front of moto; this process's S3 clients go through it."""
    import s3fs

    monkeypatch.setenv("CTRLNET_WORK_DIR", str(tmp_path / "work"))
    host, port = s3_server.endpoint.split("//")[1].split(":")
    proxy = FaultProxy(host, int(port)).start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", proxy.endpoint)
    s3fs.S3FileSystem.clear_instance_cache()  # cached clients still know moto's own port
    yield proxy
    proxy.stop()
    s3fs.S3FileSystem.clear_instance_cache()


STORE_RUN = {
    "loop": {"max_steps": 6},
    "checkpoint": {"every_steps": 2, "upload_attempts": 3, "upload_backoff_s": 0.05, "upload_timeout_s": 3.0},
}


def _store_cfg(make_cfg, name: str, **checkpoint):
    return make_cfg(
        f"s3://ctrlnet-test/runs/{name}", **dict(STORE_RUN, checkpoint={**STORE_RUN["checkpoint"], **checkpoint})
    )


def test_uploads_retry_through_500s_timeouts_and_dropped_connections(proxy, s3_server, make_cfg, capfd):
    from ctrlnet_trainer.run import train

    ckpt = r"/runs/flaky/checkpoints/step-\d+/"
    proxy.add(Fault("500", path=ckpt + "optimizer", times=2))
    proxy.add(Fault("drop", path=ckpt + "controlnet/diffusion", times=2))
    proxy.add(Fault("hang", path=ckpt + "trainer_state", times=1))
    # Five faults may all hit one checkpoint's upload: six tries leave room.
    result = train(_store_cfg(make_cfg, "flaky", upload_attempts=6))
    assert result.steps == 6
    err = capfd.readouterr().err
    # A connection dropped on a reused keep-alive connection may be retried by aiohttp itself.
    assert err.count("retrying in") >= 3 and "giving it up" not in err, err[-3000:]
    assert {a for _, _, a in proxy.applied()} == {"500", "drop", "hang"}
    fs = s3_server.fs
    assert committed(fs, "ctrlnet-test/runs/flaky") == [2, 4, 6]
    assert fs.cat("ctrlnet-test/runs/flaky/checkpoints/latest").decode().strip() == "step-00000006"


def test_a_checkpoint_that_cannot_be_uploaded_is_never_committed_and_training_goes_on(
    proxy, s3_server, make_cfg, capfd
):
    from ctrlnet_trainer.run import train

    proxy.add(Fault("500", path=r"/runs/lost4/checkpoints/step-00000004/", times=None))
    result = train(_store_cfg(make_cfg, "lost4", upload_attempts=2))
    assert result.steps == 6
    err = capfd.readouterr().err
    assert "checkpoint step-00000004 could not be uploaded" in err and "training goes on" in err, err[-3000:]
    fs = s3_server.fs
    assert committed(fs, "ctrlnet-test/runs/lost4") == [2, 6]
    assert not fs.exists("ctrlnet-test/runs/lost4/checkpoints/step-00000004")  # its uploaded part removed
    # COMMITTED and `latest` were never written for it: `latest` went from step 2 to step 6.
    writes = [path for method, path, _ in proxy.log if method == "PUT" and "/runs/lost4/checkpoints/" in path]
    assert not any(p.endswith("step-00000004/COMMITTED") for p in writes)
    assert fs.cat("ctrlnet-test/runs/lost4/checkpoints/latest").decode().strip() == "step-00000006"


def test_the_run_stops_with_one_line_after_max_failed_uploads(proxy, s3_server, tmp_path, capfd):
    from ctrlnet_trainer.__main__ import main

    config = tmp_path / "train.yaml"
    sections = dict(STORE_RUN, checkpoint={**STORE_RUN["checkpoint"], "every_steps": 1, "max_failed_uploads": 2})
    config.write_text(yaml.safe_dump(small_config_dict("s3://ctrlnet-test/runs/down", **sections)))
    proxy.add(Fault("500", path=r"/runs/down/checkpoints/step-", times=None))
    assert main(["--config", str(config)]) == 1
    err = capfd.readouterr().err
    last = err.strip().splitlines()[-1]
    assert last.startswith(
        "error: 2 checkpoints in a row could not be uploaded to s3://ctrlnet-test/runs/down/checkpoints"
    )
    assert "continue with --resume latest" in last and "Traceback" not in err
    fs = s3_server.fs
    assert committed(fs, "ctrlnet-test/runs/down") == []
    assert not fs.exists("ctrlnet-test/runs/down/checkpoints/latest")
    assert not fs.exists("ctrlnet-test/runs/down/FINISHED")
