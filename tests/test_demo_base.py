"""The demo base's data (ctrlnet_trainer.models.demo) and its pretraining tool, run for two steps."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest
from PIL import ImageChops

from ctrlnet_trainer.models.demo import (
    DEMO_COLOURS,
    build_demo_base,
    demo_captions,
    demo_colours,
    demo_fill_example,
)
from ctrlnet_trainer.synthetic import CSS_COLOURS, colour_words, fill_example


def two_colour_mask(image) -> np.ndarray:
    rgb = np.asarray(image)
    return (rgb != rgb[0, 0]).any(axis=-1)


@pytest.mark.parametrize("index", range(8))
def test_a_demo_row_is_the_synthetic_circle_in_demo_colours(index):
    row, original = demo_fill_example(index, 64, seed=5), fill_example(index, 64, seed=5)
    assert ImageChops.difference(row["conditioning_image"], original["conditioning_image"]).getbbox() is None
    assert np.array_equal(two_colour_mask(row["image"]), two_colour_mask(original["image"]))
    fill, background = demo_colours(index, seed=5)
    assert fill != background and {fill, background} <= set(DEMO_COLOURS)
    mask = two_colour_mask(row["image"])
    rgb = np.asarray(row["image"])
    assert tuple(rgb[mask][0]) == CSS_COLOURS[fill] and tuple(rgb[~mask][0]) == CSS_COLOURS[background]
    assert row["text"] == f"{colour_words(fill)} circle with {colour_words(background)} background"
    again = demo_fill_example(index, 64, seed=5)
    assert again["text"] == row["text"] and ImageChops.difference(again["image"], row["image"]).getbbox() is None


def test_demo_rows_use_every_colour_and_every_caption_is_listed():
    rows = [demo_fill_example(i, 32) for i in range(400)]
    captions = demo_captions()
    assert len(captions) == len(set(captions)) == 12 * 11
    assert {r["text"] for r in rows} <= set(captions)
    assert {demo_colours(i)[0] for i in range(400)} == set(DEMO_COLOURS)


def test_the_demo_base_shares_the_tiny_text_encoder():
    import torch

    from ctrlnet_trainer.models.tiny import build_base

    demo, tiny = build_demo_base(0), build_base("tiny", 0)
    for a, b in zip(demo.text_encoder.state_dict().values(), tiny.text_encoder.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert demo.unet.config.sample_size * 8 == demo.vae.config.sample_size == 64
    assert 2 ** (len(demo.vae.config.block_out_channels) - 1) == 8  # the ControlNet's conditioning embedding's


def test_the_pretraining_tool_writes_a_loadable_base_with_provenance(tmp_path):
    import torch
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from safetensors import safe_open
    from transformers import CLIPTextModel

    from tools.pretrain_demo_base import main

    out = tmp_path / "demo-base"
    threads = torch.get_num_threads()
    with torch.random.fork_rng(devices=[]):
        assert main(["--out", str(out), "--vae-steps", "2", "--unet-steps", "2", "--batch", "2", "--skip-checks"]) == 0
    assert torch.get_num_threads() == threads
    names = {p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()}
    assert {"model_index.json", "provenance.json", "unet/config.json", "vae/config.json"} <= names
    assert {"tokenizer/vocab.json", "scheduler/scheduler_config.json", "text_encoder/config.json"} <= names

    provenance = json.loads((out / "provenance.json").read_text())
    assert provenance["seed"] == 0 and provenance["vae"]["steps"] == 2 and provenance["unet"]["steps"] == 2
    assert provenance["unet"]["final_loss"] > 0 and provenance["versions"]["torch"] == torch.__version__
    weights = provenance["weights"]
    assert set(weights) == {n for n in names if n.endswith(".safetensors")} and len(weights) == 3
    for name, entry in weights.items():
        assert hashlib.sha256((out / name).read_bytes()).hexdigest() == entry["sha256"]

    def dtypes(name):
        with safe_open(out / name, "pt") as f:
            return {f.get_slice(k).get_dtype() for k in f.keys()}  # noqa: SIM118

    assert dtypes("unet/diffusion_pytorch_model.safetensors") == {"F16"}
    assert dtypes("vae/diffusion_pytorch_model.safetensors") == {"F16"}
    assert dtypes("text_encoder/model.safetensors") == {"F32"}
    # Loaded as the trainer loads a base (no dtype): fp32 models.
    vae = AutoencoderKL.from_pretrained(out, subfolder="vae")
    assert vae.dtype == torch.float32 and vae.config.scaling_factor == pytest.approx(
        provenance["vae"]["scaling_factor"]
    )
    assert UNet2DConditionModel.from_pretrained(out, subfolder="unet").dtype == torch.float32
    assert CLIPTextModel.from_pretrained(out, subfolder="text_encoder").dtype == torch.float32

    # A folder that holds files is refused unless --overwrite.
    assert main(["--out", str(out), "--vae-steps", "1", "--unet-steps", "1"]) == 2
