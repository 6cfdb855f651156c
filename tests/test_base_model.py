"""Random-init SD bases built in code: they tokenize, run, save and load like real ones."""

import json

import pytest
import torch
from diffusers import (
    AutoencoderKL,
    ControlNetModel,
    DDPMScheduler,
    StableDiffusionControlNetPipeline,
    UNet2DConditionModel,
)
from transformers import CLIPTextModel, CLIPTokenizer

from ctrlnet_trainer.models.tiny import build_base, build_tokenizer, write_base
from ctrlnet_trainer.synthetic import fill_example

PROMPT = "dark slate blue circle with light goldenrod yellow background"


@pytest.fixture(scope="module")
def tiny_base(tmp_path_factory):
    return write_base(tmp_path_factory.mktemp("base") / "tiny", arch="tiny", seed=0)


def test_tokenizer_round_trip_and_text_encoder_runs():
    tokenizer = build_tokenizer()
    assert isinstance(tokenizer, CLIPTokenizer) and tokenizer.model_max_length == 77
    ids = tokenizer(
        PROMPT,
        padding="max_length",
        max_length=tokenizer.model_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    assert ids.shape == (1, 77)
    assert ids[0, 0] == tokenizer.bos_token_id and tokenizer.eos_token_id in ids[0]
    assert tokenizer.decode(ids[0], skip_special_tokens=True) == PROMPT
    assert tokenizer.decode(tokenizer("Hello World").input_ids, skip_special_tokens=True) == "hello world"

    text_encoder = build_base("tiny").text_encoder
    assert text_encoder.config.vocab_size >= len(tokenizer)
    assert text_encoder.config.eos_token_id == tokenizer.eos_token_id
    with torch.no_grad():
        hidden = text_encoder(ids)[0]
    assert hidden.shape == (1, 77, text_encoder.config.hidden_size)
    assert torch.isfinite(hidden).all()


def test_build_base_is_deterministic_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(3)
    torch.manual_seed(123)
    a, b, c = build_base("tiny", seed=0), build_base("tiny", seed=0), build_base("tiny", seed=1)
    assert torch.equal(torch.rand(3), expected_next)
    for name in ("unet", "vae", "text_encoder"):
        sa, sb, sc = (getattr(p, name).state_dict() for p in (a, b, c))
        assert all(torch.equal(sa[k], sb[k]) for k in sa), name
        assert any(not torch.equal(sa[k], sc[k]) for k in sa), name
    assert a.noise_scheduler.config.prediction_type == "epsilon"
    assert a.noise_scheduler.config.beta_schedule == "scaled_linear"


def test_sd15_has_the_real_sd15_shapes():
    # Built on the meta device: no memory, no time, but the exact architecture.
    with torch.device("meta"):
        parts = build_base("sd15")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Parameter counts of runwayml/stable-diffusion-v1-5's unet, vae and text_encoder.
    assert count(parts.unet) == 859_520_964
    assert count(parts.vae) == 83_653_863
    assert count(parts.text_encoder) == 123_060_480
    assert parts.text_encoder.config.vocab_size == 49408


def test_sdxl_has_the_real_sdxl_base_shapes():
    with torch.device("meta"):
        parts = build_base("sdxl")
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    # Parameter counts of stabilityai/stable-diffusion-xl-base-1.0's unet, vae and text encoders.
    assert count(parts.unet) == 2_567_463_684
    assert count(parts.vae) == 83_653_863
    assert count(parts.text_encoder) == 123_060_480
    assert count(parts.text["text_encoder_2"]) == 694_659_840
    assert parts.family.name == "sdxl" and parts.vae.config.force_upcast
    assert parts.unet.config.cross_attention_dim == 768 + 1280


def test_unknown_arch_is_an_error():
    with pytest.raises(ValueError, match="sdxl"):  # the message lists the known ones
        build_base("sd3")


def test_write_base_layout_and_components_load(tiny_base):
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (tiny_base / sub).is_dir()
    index = json.loads((tiny_base / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["safety_checker"] == [None, None] and index["feature_extractor"] == [None, None]
    assert index["requires_safety_checker"] is False
    assert (tiny_base / "unet" / "diffusion_pytorch_model.safetensors").is_file()

    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    vae = AutoencoderKL.from_pretrained(tiny_base, subfolder="vae")
    text_encoder = CLIPTextModel.from_pretrained(tiny_base, subfolder="text_encoder")
    tokenizer = CLIPTokenizer.from_pretrained(tiny_base, subfolder="tokenizer")
    scheduler = DDPMScheduler.from_pretrained(tiny_base, subfolder="scheduler")

    # Saved weights are the built ones.
    built = build_base("tiny", seed=0)
    saved = unet.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in built.unet.state_dict().items())
    assert tokenizer(PROMPT).input_ids == build_tokenizer()(PROMPT).input_ids
    assert scheduler.config.num_train_timesteps == 1000
    assert 2 ** (len(vae.config.block_out_channels) - 1) == 8  # latents are 1/8 of the image side
    assert text_encoder.config.hidden_size == unet.config.cross_attention_dim


def test_controlnet_pipeline_generates_from_the_written_base(tiny_base):
    unet = UNet2DConditionModel.from_pretrained(tiny_base, subfolder="unet")
    pipe = StableDiffusionControlNetPipeline.from_pretrained(
        tiny_base, controlnet=ControlNetModel.from_unet(unet), safety_checker=None
    )
    pipe.set_progress_bar_config(disable=True)
    row = fill_example(0, 64)
    image = pipe(
        row["text"],
        image=row["conditioning_image"],
        num_inference_steps=2,
        generator=torch.Generator().manual_seed(0),
    ).images[0]
    assert image.size == (64, 64) and image.mode == "RGB"
