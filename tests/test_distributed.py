"""Two processes under torchrun (gloo on CPU): the multi-GPU code path of a cluster pod."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from safetensors.torch import load_file

from ctrlnet_trainer.base_model import write_base
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
        "noise_rng_0.pt",
        "noise_rng_1.pt",
        "random_states_0.pkl",
        "random_states_1.pkl",
        "controlnet/config.json",
    ):
        assert (ckpt / name).exists(), name
    # 32 rows / 2 ranks / batch 4 = 4 batches per epoch: after 2 steps the next batch is 2.
    assert json.loads((ckpt / "trainer_state.json").read_text())["position"] == {"epoch": 0, "batch": 2}

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


def test_resume_with_another_world_size_is_refused(setup):
    root, config = setup
    ckpt = root / "straight" / "checkpoints" / "step-00000002"
    if not ckpt.exists():
        pytest.skip("needs the two-process run")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    # One process resuming a two-process checkpoint would silently change the data order.
    single = subprocess.run(
        [
            sys.executable,
            "-m",
            "ctrlnet_trainer",
            "--config",
            str(config),
            "--set",
            f"output={root / 'single'}",
            "--set",
            f"checkpoint.resume={ckpt}",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert single.returncode == 2
    assert "Traceback" not in single.stderr
    assert single.stderr.strip().splitlines()[-1].startswith("error:")
