"""Control fidelity in validation: each validation (validation.at_start included) re-annotates the
generated images and scores them against their conditions, to metrics.jsonl, the run's result, the
plot and the `ctrlnet train` summary; `ctrlnet generate --fidelity` scores its images."""

import math

import pytest
from PIL import Image

from testkit.cli import run_in_process
from testkit.training import metrics_rows


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    """A short run of the demo base on the synthetic circles, validated at the start and the end."""
    from ctrlnet_trainer.run import train
    from testkit.training import small_config

    out = tmp_path_factory.mktemp("fidelity") / "run"
    cfg = small_config(
        out,
        model={"base": "builtin:demo"},
        data={"synthetic_rows": 16, "resolution": 64, "synthetic_colours": "demo"},
        loop={"batch_size": 2, "max_steps": 2},
        validation={"every_steps": 2, "adherence_rows": 4, "at_start": True, "fidelity": ["canny"]},
    )
    return out, train(cfg)


def test_validation_writes_canny_fidelity_at_the_start_and_the_end(demo_run):
    out, result = demo_run
    rows = [r for r in metrics_rows(out) if "fidelity_canny" in r]
    assert [r["step"] for r in rows] == [0, 2]
    for row in rows:
        for key in ("fidelity_canny", "fidelity_canny_chance"):
            assert isinstance(row[key], float) and math.isfinite(row[key]) and 0 <= row[key] <= 1, row
        assert "adherence_iou" in row  # one row of scores per validation
    assert sorted(result.fidelity) == [0, 2]
    assert result.fidelity[2] == {k: v for k, v in rows[-1].items() if k.startswith("fidelity_")}
    with Image.open(result.loss_curve) as plot:  # the loss beside adherence and fidelity
        assert plot.width > plot.height * 2


def test_fidelity_line_and_plot_without_a_chance_level(tmp_path):
    from ctrlnet.commands.local import _fidelity_line
    from ctrlnet_trainer.metrics import MetricsLog

    line = _fidelity_line(
        {
            0: {"fidelity_canny": 0.1, "fidelity_canny_chance": 0.1},
            4: {"fidelity_canny": 0.5, "fidelity_canny_chance": float("nan")},
        }
    )
    assert line == "fidelity:    canny 0.10 at step 0 -> 0.50 at step 4 (chance 0.10 -> none)"
    log = MetricsLog(tmp_path / "metrics.jsonl", 0)
    log.write({"step": 1, "loss": 0.5})
    log.write({"step": 1, "fidelity_depth": 0.4, "fidelity_depth_chance": float("nan")})  # null in the file
    log.write({"step": 2, "loss": 0.4})
    log.write({"step": 2, "fidelity_depth": 0.6, "fidelity_depth_chance": float("nan")})
    log.close()
    assert log.plot_loss(tmp_path / "loss.png").is_file()


def test_generate_reports_canny_fidelity_with_a_chance_level(demo_run, tmp_path, monkeypatch, capfd):
    from ctrlnet_trainer.synthetic import fill_example

    out, _ = demo_run
    row = fill_example(12345, 64, 0)
    row["conditioning_image"].save(tmp_path / "cond.png")
    args = ["generate", "--base", "builtin:demo", "--controlnet", out / "controlnet", "--image", tmp_path / "cond.png"]
    args += ["--prompt", row["text"], "--out", tmp_path / "gen", "--steps", 2, "--device", "cpu", "--num-images", 2]
    proc = run_in_process([*args, "--fidelity", "canny"], monkeypatch=monkeypatch, capture=capfd, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("fidelity:"))
    assert line.startswith("fidelity:    canny ") and "chance" in line
    assert line.split("(per image: ")[1].count(",") == 1  # two images scored

    bad = run_in_process([*args, "--fidelity", "canny,pose"], monkeypatch=monkeypatch, capture=capfd, cwd=tmp_path)
    assert bad.returncode == 2 and "--fidelity 'pose' is unknown" in bad.stderr
