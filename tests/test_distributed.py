"""Two processes under torchrun (gloo on CPU): the multi-GPU code path of a cluster pod."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ctrlnet_trainer.models.tiny import write_base
from ctrlnet_trainer.synthetic import write_fill_parquet


def _torchrun(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    torchrun = Path(sys.executable).parent / "torchrun"
    cmd = [
        str(torchrun),
        "--standalone",
        "--nproc-per-node",
        "2",
        "-m",
        "ctrlnet_trainer",
        "--config",
        str(config),
        *[a for o in overrides for a in ("--set", o)],
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("ddp")
    write_base(root / "base", "tiny", seed=0)
    write_fill_parquet(root / "data", rows=40, resolution=32, seed=0)
    config = root / "train.yaml"
    config.write_text(
        yaml.safe_dump(
            {
                "model": {"base": str(root / "base")},
                "data": {"dataset": str(root / "data"), "resolution": 32, "max_train_samples": 32},
                "optim": {"learning_rate": 1e-3},
                "loop": {"seed": 3, "batch_size": 4, "max_steps": 4},
                "checkpoint": {"every_steps": 2},
                "logging": {"report_to": "none"},
            }
        )
    )
    return root, config


def _weights(run: Path) -> dict:
    return load_file(run / "controlnet" / "diffusion_pytorch_model.safetensors")


def test_two_processes_checkpoint_every_rank_and_resume_exactly(setup):
    root, config = setup
    straight = _torchrun(config, f"output={root / 'straight'}")
    assert straight.returncode == 0, straight.stderr[-2000:]
    assert straight.stdout.count("done: 4 steps") == 1  # reported once, by rank 0

    ckpt = root / "straight" / "checkpoints" / "step-00000002"
    for name in (
        "COMMITTED",
        "trainer_state.json",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "controlnet/config.json",
    ):
        assert (ckpt / name).exists(), name
    # 32 rows / global batch 8 (2 ranks x 4) = 4 steps per epoch: after 2 steps, 16 samples are done.
    state = json.loads((ckpt / "trainer_state.json").read_text())
    assert state["position"] == {"epoch": 0, "sample": 16}
    assert (state["world_size"], state["batch_size"], state["gradient_accumulation_steps"]) == (2, 4, 1)

    resumed = _torchrun(config, f"output={root / 'resumed'}", f"checkpoint.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    a, b = _weights(root / "straight"), _weights(root / "resumed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def test_deepspeed_zero2_checkpoints_without_hanging_and_resumes_exactly(setup):
    """The reference's checkpoint save hangs under DeepSpeed (only rank 0 calls save_state);
    here every rank saves its ZeRO shards, the ControlNet is gathered, and resume is exact."""
    pytest.importorskip("deepspeed")
    root, config = setup
    ds = "distributed.strategy=deepspeed"
    straight = _torchrun(config, f"output={root / 'ds'}", ds)
    assert straight.returncode == 0, straight.stderr[-3000:]
    ckpt = root / "ds" / "checkpoints" / "step-00000002"
    assert (ckpt / "COMMITTED").exists() and (ckpt / "pytorch_model").is_dir()  # ZeRO shards
    assert (ckpt / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    resumed = _torchrun(config, f"output={root / 'ds-resumed'}", ds, f"checkpoint.resume={ckpt}")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    a, b = _weights(root / "ds"), _weights(root / "ds-resumed")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6


def _single(config: Path, *overrides: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [
        sys.executable,
        "-m",
        "ctrlnet_trainer",
        "--config",
        str(config),
        *[a for o in overrides for a in ("--set", o)],
    ]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_elastic_resume_from_two_processes_to_one_and_from_one_to_two(setup):
    """A checkpoint continues on another number of processes at the same sample with the same
    global batch (8 = 2 x 4 = 1 x 4 x accumulation 2 = 1 x 8): same rows per step, same draws per
    example, same optimizer state. What differs is float summation order, which Adam amplifies
    where gradients are tiny: the bound is what changing the process count alone does (the same
    run straight on 1 process x batch 8 vs 2 x 4, measured here: 2.4e-5), and the resumed runs
    must not add to it."""
    root, config = setup
    ckpt = root / "straight" / "checkpoints" / "step-00000002"
    if not ckpt.exists():
        pytest.skip("needs the two-process run")
    one = _single(config, f"output={root / 'one'}", "loop.batch_size=8")  # straight, 1 x 8
    assert one.returncode == 0, one.stderr[-2000:]

    def diff(a: Path, b: Path) -> float:
        wa, wb = _weights(a), _weights(b)
        return max((wa[k] - wb[k]).abs().max().item() for k in wa)

    noise = diff(root / "straight", root / "one")
    assert noise < 1e-3  # same data, draws and schedule: only summation order differs

    # 2 -> 1: the same batch per process, the accumulation doubled automatically.
    down = _single(config, f"output={root / 'down'}", f"checkpoint.resume={ckpt}")
    assert down.returncode == 0, down.stderr[-2000:]
    assert "gradient accumulation 2 keeps the global batch" in down.stdout
    assert diff(root / "straight", root / "down") <= noise + 1e-6

    # 1 -> 2: one process with batch 8 for 2 steps, then two processes of batch 4 finish it.
    first = _single(config, f"output={root / 'up'}", "loop.batch_size=8", "loop.max_steps=2")
    assert first.returncode == 0, first.stderr[-2000:]
    up = _torchrun(config, f"output={root / 'up'}", "checkpoint.resume=latest")
    assert up.returncode == 0, up.stderr[-2000:]
    assert diff(root / "straight", root / "up") <= noise + 1e-6
    assert diff(root / "one", root / "up") <= noise + 1e-6


def test_resume_with_a_global_batch_it_cannot_make_is_refused(setup):
    root, config = setup
    ckpt = root / "straight" / "checkpoints" / "step-00000002"
    if not ckpt.exists():
        pytest.skip("needs the two-process run")
    # Global batch 8 cannot be made of micro-batches of 3: refuse, naming both shapes.
    single = _single(config, f"output={root / 'single'}", f"checkpoint.resume={ckpt}", "loop.batch_size=3")
    assert single.returncode == 2
    assert "Traceback" not in single.stderr
    last = single.stderr.strip().splitlines()[-1]
    assert last.startswith("error:") and "global batch 8" in last and "1 processes x batch 3" in last
