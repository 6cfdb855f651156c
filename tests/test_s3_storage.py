"""Runs whose data, checkpoints and outputs live in S3: a real S3 HTTP endpoint on loopback
(moto's server mode), reached through s3fs exactly as a cluster run reaches object storage."""

import pytest

from ctrlnet.config import TrainConfig
from ctrlnet_trainer.run import train
from ctrlnet_trainer.synthetic import write_fill_parquet

pytest.importorskip("s3fs")
pytest.importorskip("moto")


@pytest.fixture(scope="module")
def s3(s3_server, tiny_base_dir, tmp_path_factory):
    """The session's S3 endpoint, holding the tiny base and a parquet dataset."""
    fs = s3_server.fs
    parquet = write_fill_parquet(tmp_path_factory.mktemp("s3src") / "data", rows=48, resolution=32, seed=0)
    fs.put(str(tiny_base_dir) + "/", "ctrlnet-test/models/base/", recursive=True)
    fs.put_file(str(parquet), "ctrlnet-test/data/train.parquet")
    return fs


def _cfg(output: str, **loop) -> TrainConfig:
    return TrainConfig.model_validate(
        {
            "output": output,
            "model": {"base": "s3://ctrlnet-test/models/base"},
            "data": {"dataset": "s3://ctrlnet-test/data/train.parquet", "resolution": 32},
            "optim": {"learning_rate": 1e-3},
            "loop": {"seed": 7, "batch_size": 4, "max_steps": 4, **loop},
            "checkpoint": {"every_steps": 2, "total_limit": 1},
            "logging": {"report_to": "none"},
        }
    )


def _weights(fs, prefix: str) -> dict:
    return load_file_bytes(fs.cat(f"{prefix}/controlnet/diffusion_pytorch_model.safetensors"))


def load_file_bytes(data: bytes) -> dict:
    from safetensors.torch import load

    return load(data)


def test_run_writes_committed_checkpoints_and_model_to_s3(s3):
    train(_cfg("s3://ctrlnet-test/runs/a"))
    files = set(s3.find("ctrlnet-test/runs/a"))
    assert "ctrlnet-test/runs/a/controlnet/diffusion_pytorch_model.safetensors" in files
    assert "ctrlnet-test/runs/a/metrics.jsonl" in files
    assert "ctrlnet-test/runs/a/run.json" in files
    # total_limit=1: step 2 was rotated out once step 4 committed.
    assert "ctrlnet-test/runs/a/checkpoints/step-00000004/COMMITTED" in files
    assert not any("step-00000002" in f for f in files)
    assert s3.cat("ctrlnet-test/runs/a/checkpoints/latest").decode().strip() == "step-00000004"


def test_resume_from_s3_equals_uninterrupted_run(s3):
    straight = "s3://ctrlnet-test/runs/straight"
    train(_cfg(straight))
    # Interrupted: 2 steps, then a new process resumes from `latest` in the same prefix.
    part = "s3://ctrlnet-test/runs/part"
    train(_cfg(part, max_steps=2))
    cfg = _cfg(part)
    cfg.checkpoint.resume = "latest"
    result = train(cfg)
    assert result.steps == 4
    a, b = _weights(s3, "ctrlnet-test/runs/straight"), _weights(s3, "ctrlnet-test/runs/part")
    assert max((a[k] - b[k]).abs().max().item() for k in a) < 1e-6
    rows = [r for r in s3.cat("ctrlnet-test/runs/part/metrics.jsonl").decode().splitlines() if r]
    assert [__import__("json").loads(r)["step"] for r in rows] == [1, 2, 3, 4]
