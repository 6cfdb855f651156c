"""A run never diverges silently: a non-finite loss or gradient norm stops it at that step with one
line naming the step and the last committed checkpoint; nothing non-finite is committed or logged,
and the run is not marked finished."""

import json

import pytest

pytestmark = pytest.mark.slow


def _no_constants(name):
    raise AssertionError(f"metrics.jsonl holds {name}")


def test_a_huge_learning_rate_stops_the_run_at_the_step_that_diverged(tmp_path, make_cfg):
    from ctrlnet.errors import IntegrityError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    cfg = make_cfg(out, optim={"learning_rate": 1e30}, loop={"max_steps": 6}, checkpoint={"every_steps": 1})
    with pytest.raises(
        IntegrityError, match=r"training diverged at step \d+: .*not finite.*last good checkpoint is .*step-0"
    ) as e:
        train(cfg)
    assert "\n" not in str(e.value)
    assert not (out / "FINISHED").exists()
    assert not (out / "controlnet").exists()
    for line in (out / "metrics.jsonl").read_text().splitlines():
        json.loads(line, parse_constant=_no_constants)
    from ctrlnet_trainer import weights

    for ck in (out / "checkpoints").glob("step-*"):
        if (ck / "COMMITTED").exists():
            assert not weights.nonfinite_in_file(ck / "controlnet" / weights.WEIGHTS_FILE)


def test_a_nan_loss_is_caught_before_it_is_logged(tmp_path, make_cfg, monkeypatch):
    import torch

    from ctrlnet.errors import IntegrityError
    from ctrlnet_trainer import trainer as trainer_mod
    from ctrlnet_trainer.run import train

    real = trainer_mod.Trainer.train_step
    calls = {"n": 0}

    def nan_at_second(self):
        loss = real(self)
        calls["n"] += 1
        return loss * torch.nan if calls["n"] == 2 else loss

    monkeypatch.setattr(trainer_mod.Trainer, "train_step", nan_at_second)
    out = tmp_path / "run"
    with pytest.raises(IntegrityError, match=r"diverged at step 2: .*\(loss nan.*no checkpoint was committed"):
        train(make_cfg(out, loop={"max_steps": 3}, logging={"every_steps": 1}))
    rows = [json.loads(line, parse_constant=_no_constants) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1]
    assert not (out / "FINISHED").exists()


def test_metrics_rows_never_hold_nan_tokens(tmp_path):
    from ctrlnet_trainer.metrics import MetricsLog

    log = MetricsLog(tmp_path / "metrics.jsonl", 0)
    log.write({"step": 1, "loss": float("nan"), "grad_norm": float("inf")})
    log.close()
    row = json.loads((tmp_path / "metrics.jsonl").read_text(), parse_constant=_no_constants)
    assert row == {"step": 1, "loss": None, "grad_norm": None}
