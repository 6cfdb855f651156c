"""The demo shows control: the pretrained demo base ships in the package as its provenance says,
`builtin:demo` loads it, and validation scores condition adherence (before training, at each
validation, in metrics.jsonl, the loss plot and the run's report). Whether the demo's ControlNet
beats chance is a benchmark (tools/demo_adherence.py, docs in README), not a test: it trains for
minutes."""

import json

import pytest
import torch
from PIL import Image

from ctrlnet_trainer import selfcheck
from ctrlnet_trainer.models.demo import WEIGHTS

pytestmark = pytest.mark.slow


def test_shipped_demo_weights_are_the_ones_their_provenance_records():
    provenance = json.loads((WEIGHTS / "provenance.json").read_text())
    assert provenance["weights"]
    # Every weight file recorded, none missing, each with its sha256 and size: the image's build check.
    assert selfcheck.weight_problems(WEIGHTS) == (len(provenance["weights"]), [])
    total = sum(record["bytes"] for record in provenance["weights"].values())
    assert total < 4_000_000  # a few MB inside the wheel
    assert provenance["seed"] is not None and provenance["versions"]["torch"]


def test_builtin_demo_loads_the_shipped_base_in_fp32(tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.models.demo import DEMO_ARCH

    models = load_models(make_cfg(tmp_path / "run", model={"base": "builtin:demo"}), 0)
    assert models.family.name == "sd" and models.base == "builtin:demo"
    assert list(models.vae.config.block_out_channels) == list(DEMO_ARCH["vae"]["block_out_channels"])
    assert all(p.dtype == torch.float32 for m in (models.unet, models.vae, models.text_encoder) for p in m.parameters())


def test_validation_scores_adherence_before_training_and_at_each_validation(tmp_path, make_cfg):
    from ctrlnet_trainer.run import train

    cfg = make_cfg(
        tmp_path / "run",
        data={"synthetic_rows": 16, "resolution": 64, "synthetic_colours": "demo"},
        loop={"batch_size": 2, "max_steps": 4},
        validation={"every_steps": 2, "adherence_rows": 4, "at_start": True},
        logging={"report_to": "tensorboard"},
    )
    result = train(cfg)
    rows = [json.loads(line) for line in (tmp_path / "run/metrics.jsonl").read_text().splitlines()]
    scored = [r for r in rows if "adherence_iou" in r]
    assert [r["step"] for r in scored] == [0, 2, 4]  # before the first step, then every validation
    assert all(0 <= r["adherence_iou"] <= 1 and 0 <= r["adherence_chance"] <= 1 for r in scored)
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4]  # the loss rows are unchanged
    assert sorted(result.adherence) == [0, 2, 4] and result.adherence[4] == {
        k: v for k, v in scored[-1].items() if k != "step"
    }
    with Image.open(result.loss_curve) as plot:
        assert plot.width > plot.height * 2  # the loss and the adherence side by side
