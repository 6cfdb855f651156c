"""Nothing written is lost, and failures are one line: when an output counts as taken, a finished
run is never retrained into, unreadable data rows and checkpoints are named (and skipped or
replaced only when asked), and object storage that cannot be reached fails in seconds."""

import json
import time
from pathlib import Path

import pytest
import yaml

from testkit.training import metrics_rows, small_config_dict

pytestmark = pytest.mark.slow


def _snapshot(out: Path) -> dict:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


# ------------------------------------------------------------------ the taken rule
def test_a_finished_run_is_never_retrained_into(tmp_path, make_cfg, capsys):
    """A run shorter than checkpoint.every_steps finishes with no checkpoint: resume latest used to
    retrain it from step 0 over its controlnet/ and metrics.jsonl."""
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    train(make_cfg(out, loop={"max_steps": 2}))
    assert json.loads((out / "FINISHED").read_text())["step"] == 2
    before = _snapshot(out)
    with pytest.raises(UserError, match=r"finished at step 2 .*no checkpoint to continue from.*new --output"):
        train(make_cfg(out, loop={"max_steps": 3}, checkpoint={"resume": "latest"}))
    with pytest.raises(UserError, match=r"another run, finished at step 2 .*choose a new --output"):
        train(make_cfg(out, loop={"max_steps": 4}))
    # The very config it finished with, resumed (a restarted pod of a finished job): nothing to do.
    capsys.readouterr()
    assert train(make_cfg(out, loop={"max_steps": 2}, checkpoint={"resume": "latest"})).steps == 2
    assert "finished at step 2: nothing to do" in capsys.readouterr().out
    assert _snapshot(out) == before  # not a byte changed


def test_a_finished_run_with_checkpoints_is_extended_only_from_its_final_step(tmp_path, make_cfg, capsys):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    train(make_cfg(out, loop={"max_steps": 3}, checkpoint={"every_steps": 2}))  # checkpoint 2, finished at 3
    before = _snapshot(out)
    with pytest.raises(UserError, match=r"resuming from .*step-00000002 would retrain steps 3-3 and overwrite"):
        train(make_cfg(out, loop={"max_steps": 5}, checkpoint={"every_steps": 2, "resume": "latest"}))
    with pytest.raises(UserError, match=r"--resume .*/checkpoints/step-00000002 into the new output"):
        train(make_cfg(out, loop={"max_steps": 5}, checkpoint={"every_steps": 2}))
    assert _snapshot(out) == before

    # A run whose last checkpoint is its final step may be extended, and only with more steps.
    ext = tmp_path / "ext"
    train(make_cfg(ext, loop={"max_steps": 2}, checkpoint={"every_steps": 2}))
    with pytest.raises(UserError, match="nothing to train with loop.max_steps=1"):
        train(make_cfg(ext, loop={"max_steps": 1}, checkpoint={"every_steps": 2, "resume": "latest"}))
    result = train(make_cfg(ext, loop={"max_steps": 4}, checkpoint={"every_steps": 2, "resume": "latest"}))
    assert result.steps == 4 and json.loads((ext / "FINISHED").read_text())["step"] == 4
    assert [r["step"] for r in metrics_rows(ext)] == [1, 2, 3, 4]


def test_an_output_is_taken_once_the_run_has_checked_its_inputs(tmp_path, make_cfg, corrupt_data):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    # Failing on its inputs (here a base that does not exist) leaves nothing behind...
    with pytest.raises(UserError):
        train(make_cfg(out, model={"base": str(tmp_path / "no-such-base")}))
    assert not out.exists() or not any(out.iterdir())
    # ... so the output is still free. A run that fails after it started training (a bad row in
    # its first batch) has taken it: run.json, continued only by resuming.
    data = {"dataset": str(corrupt_data), "resolution": 32}
    with pytest.raises(UserError, match="not a readable image"):
        train(make_cfg(out, data=data, model={"cache_dir": str(tmp_path / "cache")}, loop={"max_steps": 4}))
    assert (out / "run.json").is_file() and not (out / "FINISHED").exists()
    with pytest.raises(UserError, match="holds another run .*--resume latest"):
        train(make_cfg(out, loop={"max_steps": 2}))
    result = train(make_cfg(out, loop={"max_steps": 2}, checkpoint={"resume": "latest"}))  # from step 0
    assert result.steps == 2
    assert json.loads((out / "run.json").read_text())["config"]["data"]["dataset"] is None  # the new config


# ------------------------------------------------------------------ unreadable data
@pytest.fixture(scope="module")
def corrupt_data(tmp_path_factory):
    """An imagefolder of 16 rows whose conditioning images are file paths; row 3's file is not an image."""
    from ctrlnet_trainer.synthetic import fill_example

    folder = tmp_path_factory.mktemp("corrupt") / "data"
    (folder / "cond").mkdir(parents=True)
    (folder / "img").mkdir()
    lines = []
    for i in range(16):
        row = fill_example(i, 32, 0)
        row["image"].save(folder / "img" / f"{i}.png")
        row["conditioning_image"].save(folder / "cond" / f"{i}.png")
        lines.append(
            json.dumps({"file_name": f"img/{i}.png", "conditioning_image": f"cond/{i}.png", "text": row["text"]})
        )
    (folder / "cond" / "3.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated by a failed copy")
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def test_a_corrupt_image_is_named_and_skipped_only_when_asked(tmp_path, make_cfg, corrupt_data, capfd):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    sections = {
        "model": {"cache_dir": str(tmp_path / "cache")},
        "data": {"dataset": str(corrupt_data), "resolution": 32},
        "loop": {"max_steps": 4, "batch_size": 4},  # 16 rows: one epoch, every row once
    }
    with pytest.raises(UserError) as info:
        train(make_cfg(tmp_path / "strict", **sections))
    message = str(info.value)
    assert "row 3" in message and "column 'conditioning_image'" in message and "cond/3.png" in message
    assert "not a readable image" in message and "skip_bad_rows=true" in message and "\n" not in message

    skip = dict(sections, data={**sections["data"], "skip_bad_rows": True})
    result = train(make_cfg(tmp_path / "lenient", **skip))
    assert result.steps == 4
    rows = metrics_rows(tmp_path / "lenient")
    assert sum(r["skipped_rows"] for r in rows) == 1
    assert "warning: skipped data.dataset" in capfd.readouterr().err


# ------------------------------------------------------------------ unreadable checkpoints
def _interrupted_after_step_4(out: Path, make_cfg) -> None:
    """A run of 6 steps that was killed right after committing step 4 (checkpoints 2 and 4)."""
    from ctrlnet_trainer.run import train

    train(make_cfg(out, loop={"max_steps": 4}, checkpoint={"every_steps": 2}))
    (out / "FINISHED").unlink()  # as if killed before it finished


def test_a_corrupt_checkpoint_is_named_and_replaced_by_the_previous_only_when_asked(tmp_path, make_cfg, capfd):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    _interrupted_after_step_4(out, make_cfg)
    weights = out / "checkpoints" / "step-00000004" / "controlnet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # a torn write
    resume = {"every_steps": 2, "resume": "latest"}
    with pytest.raises(UserError) as info:
        train(make_cfg(out, loop={"max_steps": 6}, checkpoint=resume))
    message = str(info.value)
    assert "checkpoints/step-00000004 is unreadable" in message and "checkpoint.on_corrupt=previous" in message

    capfd.readouterr()
    result = train(make_cfg(out, loop={"max_steps": 6}, checkpoint=dict(resume, on_corrupt="previous")))
    captured = capfd.readouterr()
    assert "step-00000004 is unreadable" in captured.err and "resuming from" in captured.out
    assert f"resuming from {out}/checkpoints/step-00000002 at step 2" in captured.out
    assert result.steps == 6 and [r["step"] for r in metrics_rows(out)] == [1, 2, 3, 4, 5, 6]
    from safetensors.torch import load_file

    load_file(str(weights))  # step 4 was saved again, whole


def test_an_unreadable_trainer_state_is_named(tmp_path, make_cfg):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    _interrupted_after_step_4(out, make_cfg)
    (out / "checkpoints" / "step-00000004" / "trainer_state.json").write_text('{"step": 4, "posi')
    with pytest.raises(UserError, match=r"step-00000004 is unreadable \(trainer_state.json: JSONDecodeError"):
        train(make_cfg(out, loop={"max_steps": 6}, checkpoint={"every_steps": 2, "resume": "latest"}))


# ------------------------------------------------------------------ object storage, fail fast
def _main(tmp_path, output: str) -> int:
    from ctrlnet_trainer.__main__ import main

    config = tmp_path / "train.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(output)))
    return main(["--config", str(config)])


def test_object_storage_without_credentials_fails_in_seconds_with_one_line(tmp_path, monkeypatch, capsys):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_PROFILE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:9")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no instance-metadata lookup on this machine
    start = time.monotonic()
    assert _main(tmp_path, "s3://bucket/run") == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no credentials for s3://bucket/run (endpoint http://127.0.0.1:9)")
    assert "AWS_ACCESS_KEY_ID" in err and len(err.splitlines()) == 1


def test_an_unreachable_endpoint_fails_in_seconds_naming_it(tmp_path, monkeypatch, capsys):
    from testkit.s3 import free_port

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    endpoint = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    start = time.monotonic()
    assert _main(tmp_path, "s3://bucket/run") == 1
    assert time.monotonic() - start < 10
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"error: cannot reach the object store at {endpoint} for s3://bucket/run")
    assert "AWS_ENDPOINT_URL" in err and len(err.splitlines()) == 1


def test_a_missing_bucket_is_named(s3_server, tmp_path, capsys):
    assert _main(tmp_path, "s3://no-such-bucket/run") == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: bucket 'no-such-bucket' of s3://no-such-bucket/run does not exist at")


def test_a_checkpoint_whose_weights_are_not_finite_is_refused(tmp_path, make_cfg, capfd):
    """A committed checkpoint with a NaN in its ControlNet (a torn or garbage save, as ZeRO-3's
    gather race once wrote) is never trained from: named, and replaced only with on_corrupt=previous."""
    import torch
    from safetensors.torch import load_file, save_file

    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    _interrupted_after_step_4(out, make_cfg)
    path = out / "checkpoints" / "step-00000004" / "controlnet" / "diffusion_pytorch_model.safetensors"
    tensors = load_file(str(path))
    name = sorted(tensors)[0]
    tensors[name].view(-1)[0] = float("nan")
    save_file(tensors, str(path), metadata={"format": "pt"})
    resume = {"every_steps": 2, "resume": "latest"}
    with pytest.raises(UserError) as info:
        train(make_cfg(out, loop={"max_steps": 6}, checkpoint=resume))
    message = str(info.value)
    assert "step-00000004 is unreadable" in message and "non-finite values" in message and name in message

    result = train(make_cfg(out, loop={"max_steps": 6}, checkpoint=dict(resume, on_corrupt="previous")))
    assert "resuming from" in capfd.readouterr().out and result.steps == 6
    assert all(
        torch.isfinite(t).all() for t in load_file(str(out / "controlnet/diffusion_pytorch_model.safetensors")).values()
    )


def test_weights_that_are_not_finite_are_never_written_or_committed(tmp_path, make_cfg, monkeypatch):
    """Weights that went NaN (here: poisoned after step 3) stop the run in one line at the next
    save: that checkpoint is not committed, `latest` stays on the last good one, no final model."""
    import torch

    from ctrlnet.errors import IntegrityError
    from ctrlnet_trainer.run import train
    from ctrlnet_trainer.trainer import Trainer

    real_step = Trainer.train_step

    def poisoned(self):
        loss = real_step(self)
        if self.step == 2:  # the step counter moves after train_step: this is step 3
            with torch.no_grad():
                next(self.acc.unwrap_model(self.controlnet).parameters()).view(-1)[0] = float("nan")
        return loss

    monkeypatch.setattr(Trainer, "train_step", poisoned)
    out = tmp_path / "run"
    with pytest.raises(IntegrityError) as info:
        train(make_cfg(out, loop={"max_steps": 6}, checkpoint={"every_steps": 2}))
    message = str(info.value)
    assert "not finite" in message and "nothing was written" in message and "\n" not in message
    assert info.value.exit_code == 1
    checkpoints = out / "checkpoints"
    assert (checkpoints / "latest").read_text().strip() == "step-00000002"
    assert not (checkpoints / "step-00000004" / "COMMITTED").exists()
    assert not (out / "controlnet").exists() and not (out / "FINISHED").exists()
