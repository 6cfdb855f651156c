"""Validation spread over the processes (torchrun, gloo on CPU): every rank samples its share of the
images, each image from its own generator seeded by (seed, image index), so one process and two
draw the same images; a two-process training run validates on both ranks and writes what one
process writes."""

import json
from pathlib import Path

import numpy as np
import yaml
from PIL import Image

from testkit.training import metrics_rows, small_config_dict
from testkit.zero3 import torchrun


def _pixels(path: Path) -> np.ndarray:
    with Image.open(path) as image:
        return np.asarray(image.convert("RGB")).astype(np.int16)


def _close(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for float rounding (another batch composition on the CPU): a level or two of 255."""
    diff = np.abs(a - b)
    return a.shape == b.shape and diff.max() <= 3 and diff.mean() < 0.5


def test_one_process_and_two_sample_the_same_images_and_both_ranks_sample(tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    for out, n in ((one, 1), (two, 2)):
        result = torchrun(n, "-m", "testkit.spread", str(out))
        assert result.returncode == 0, result.stderr[-3000:]
    # 2 pairs x 2 images + 3 scored rows = 7 images: 4 on rank 0, 3 on rank 1.
    shares_one = json.loads((one / "shares.json").read_text())
    shares_two = json.loads((two / "shares.json").read_text())
    assert [(s["rank"], s["images"]) for s in shares_one] == [(0, 7)]
    assert [(s["rank"], s["images"]) for s in shares_two] == [(0, 4), (1, 3)]
    images = [_pixels(one / f"image-{k}.png") for k in range(7)]
    for k, image in enumerate(images):
        assert _close(image, _pixels(two / f"image-{k}.png")), k
    # Each image has its own draws: no two are alike (the tolerance above is far below this).
    assert min(np.abs(a - b).max() for i, a in enumerate(images) for b in images[i + 1 :]) > 50


def test_two_process_training_validates_on_both_ranks_like_one_process(tmp_path):
    """At step 0 (validation.at_start) the ControlNet is the same zero-init one whatever the world
    size: the grid of two processes equals one process's; both write the scores."""
    sections = {
        "loop": {"seed": 0, "batch_size": 2, "max_steps": 2},
        "validation": {
            "every_steps": 2,
            "num_images": 2,
            "num_inference_steps": 2,
            "adherence_rows": 3,
            "at_start": True,
        },
    }
    from ctrlnet_trainer.run import train
    from testkit.training import small_config

    runs = {1: tmp_path / "world-1", 2: tmp_path / "world-2"}
    train(small_config(runs[1], **sections))  # one process: here (the imports are paid already)
    config = tmp_path / "train-2.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(runs[2], **sections)))
    result = torchrun(2, "-m", "ctrlnet_trainer", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    for n, out in runs.items():
        scored = [r for r in metrics_rows(out) if "adherence_iou" in r]
        assert [r["step"] for r in scored] == [0, 2], n
        assert (out / "samples/step-2.png").exists()
    assert _close(_pixels(runs[1] / "samples/step-0.png"), _pixels(runs[2] / "samples/step-0.png"))

    # From a precomputed cache too: every rank keeps the prompts' embeddings and the VAE decoder
    # (cache/reader.py), so both sample, and the step-0 grid is the same.
    from ctrlnet_trainer.cache.job import precompute

    cached = {**sections, "data": {"cache": str(tmp_path / "cache")}}
    precompute(small_config(tmp_path / "unused", **cached))
    out, config = tmp_path / "cached", tmp_path / "train-cached.yaml"
    config.write_text(yaml.safe_dump(small_config_dict(out, **cached)))
    result = torchrun(2, "-m", "ctrlnet_trainer", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    assert [r["step"] for r in metrics_rows(out) if "adherence_iou" in r] == [0, 2]
    assert _close(_pixels(runs[1] / "samples/step-0.png"), _pixels(out / "samples/step-0.png"))


def test_a_validation_near_the_collective_timeout_is_warned_about_once(monkeypatch, make_cfg, tmp_path):
    from types import SimpleNamespace

    from ctrlnet_trainer import validation
    from ctrlnet_trainer.validation import Share, Validator

    warnings = []
    monkeypatch.setattr(validation.log, "warning", warnings.append)
    cfg = make_cfg(tmp_path / "run", distributed={"collective_timeout_s": 100})
    me = SimpleNamespace(cfg=cfg, world=2, samplers=[0, 1], seconds={}, _warned=set())
    shares = [Share(0, 4, 10.0), Share(1, 3, 49.0)]
    Validator._check_time(me, 2, shares, 30.0)  # 49 s: under half of 100
    assert not warnings and me.seconds == {2: 49.0}
    Validator._check_time(me, 4, [Share(0, 4, 10.0), Share(1, 3, 51.0)], 30.0)
    Validator._check_time(me, 6, [Share(0, 4, 10.0), Share(1, 3, 51.0)], 30.0)
    assert len(warnings) == 1
    assert "distributed.collective_timeout_s" in warnings[0] and "validation.num_images" in warnings[0]
    me = SimpleNamespace(cfg=cfg, world=1, samplers=[0], seconds={}, _warned=set())
    Validator._check_time(me, 2, [Share(0, 7, 90.0)], 90.0)  # one process: no collective to time out
    assert len(warnings) == 1
