"""bench/learning.py's command line and the commands it builds (no training: fast)."""

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench import learning  # noqa: E402


def test_defaults_and_seeds():
    a = learning.parse_args(["--family", "sd3", "--seeds", "0,1,2"])
    assert a.seeds == [0, 1, 2] and a.steps == 200 and a.lr == 1e-4
    assert a.batch_size == 8 and a.resolution == 64 and a.sides == ["reference", "ctrlnet"]
    assert a.work == Path("/tmp/ctrlnet-learning-sd3")
    a = learning.parse_args(["--family", "flux", "--sides", "ctrlnet", "--work", "/x"])
    assert a.seeds == [0] and a.sides == ["ctrlnet"] and a.work == Path("/x")


@pytest.mark.parametrize(
    "argv",
    [
        [],  # --family is required
        ["--family", "sd"],
        ["--family", "sd3", "--seeds", "a"],
        ["--family", "sd3", "--seeds", ","],
        ["--family", "sd3", "--sides", "ours"],
        ["--family", "sd3", "--steps", "0"],
        ["--family", "sd3", "--resolution", "72"],
        ["--family", "sd3", "--heldout", "12"],
    ],
)
def test_bad_arguments_are_refused(argv, capsys):
    with pytest.raises(SystemExit) as e:
        learning.parse_args(argv)
    assert e.value.code == 2


def test_both_sides_get_the_same_run(tmp_path):
    a = learning.parse_args(["--family", "flux", "--seeds", "3", "--steps", "7", "--work", str(tmp_path)])
    cfg = learning.ctrlnet_config(a, 3, tmp_path / "base", tmp_path / "data", tmp_path / "out")
    assert cfg["loop"]["seed"] == 3 and cfg["loop"]["max_steps"] == 7 and cfg["loop"]["batch_size"] == 8
    assert cfg["optim"]["learning_rate"] == 1e-4 and cfg["optim"]["lr_scheduler"] == "constant"
    assert cfg["model"]["controlnet_layers"] == 2 and cfg["model"]["controlnet_single_layers"] == 2
    from ctrlnet.config.train import TrainConfig

    TrainConfig.model_validate(cfg)  # a valid train section
