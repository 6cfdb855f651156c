"""SDXL on the same trainer, on CPU with the tiny SDXL base (`ctrlnet model init --arch tiny-sdxl`):
the family is read from the base, time_ids are what the transforms did, both encoders condition
the step, the trained ControlNet learns, loads in stock diffusers and resumes exactly."""

import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError
from testkit.training import max_weight_diff

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def sdxl_cfg(make_cfg, output, base, **sections):
    return make_cfg(output, model={"base": str(base), **sections.pop("model", {})}, **sections)


# ------------------------------------------------------------------ the family, from the base
def test_family_is_read_from_the_base(tiny_sdxl_dir, tiny_base_dir, tmp_path):
    from ctrlnet_trainer.models import family_of_folder

    assert family_of_folder(Path(tiny_sdxl_dir)).name == "sdxl"  # model_index.json names an XL pipeline
    assert family_of_folder(Path(tiny_base_dir)).name == "sd"
    # Without model_index.json: from the components (a second text encoder, the text_time UNet).
    bare = shutil.copytree(tiny_sdxl_dir, tmp_path / "bare")
    (bare / "model_index.json").unlink()
    assert family_of_folder(bare).name == "sdxl"
    shutil.rmtree(bare / "text_encoder_2")
    assert family_of_folder(bare).name == "sdxl"  # the UNet's addition_embed_type: text_time
    unet_config = json.loads((bare / "unet/config.json").read_text())
    (bare / "unet/config.json").write_text(json.dumps({**unet_config, "addition_embed_type": None}))
    assert family_of_folder(bare).name == "sd"


def test_a_sdxl_base_missing_its_second_encoder_is_named(tiny_sdxl_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models

    broken = shutil.copytree(tiny_sdxl_dir, tmp_path / "broken")
    shutil.rmtree(broken / "text_encoder_2")
    with pytest.raises(UserError, match=r"has no text_encoder_2/: an SDXL base"):
        load_models(sdxl_cfg(make_cfg, tmp_path / "run", broken), 0)


def test_models_load_both_encoders_and_keep_a_force_upcast_vae_in_fp32_under_fp16(tiny_sdxl_dir, tmp_path, make_cfg):
    from diffusers import AutoencoderKL

    from ctrlnet_trainer.models import load_models, vae_dtype

    models = load_models(sdxl_cfg(make_cfg, tmp_path / "run", tiny_sdxl_dir), 0)
    assert (
        models.family.name == "sdxl"
        and models.text["text_encoder_2"] is not None
        and models.text["tokenizer_2"] is not None
    )
    assert models.controlnet.config.addition_embed_type == "text_time"  # from_unet kept SDXL's embedding
    assert vae_dtype(models, torch.float16) == torch.float32  # SDXL's VAE: force_upcast
    assert vae_dtype(models, torch.bfloat16) == torch.bfloat16
    # model.vae: a replacement VAE without force_upcast (the fp16-fix kind) runs in fp16.
    fixed = AutoencoderKL.from_pretrained(tiny_sdxl_dir, subfolder="vae")
    fixed.register_to_config(force_upcast=False)
    fixed.save_pretrained(tmp_path / "vae-fix")
    models = load_models(
        sdxl_cfg(make_cfg, tmp_path / "run", tiny_sdxl_dir, model={"vae": str(tmp_path / "vae-fix")}), 0
    )
    assert models.vae.config.force_upcast is False
    assert vae_dtype(models, torch.float16) == torch.float16
    with pytest.raises(UserError, match="model.vae .* does not exist"):
        load_models(sdxl_cfg(make_cfg, tmp_path / "run", tiny_sdxl_dir, model={"vae": str(tmp_path / "nope")}), 0)


def test_a_starting_controlnet_of_another_family_is_refused_in_one_line(
    tiny_sdxl_dir, tiny_base_dir, tmp_path, make_cfg
):
    from diffusers import ControlNetModel, UNet2DConditionModel

    from ctrlnet_trainer.models import load_models

    sd_unet = UNet2DConditionModel.from_pretrained(tiny_base_dir, subfolder="unet")
    ControlNetModel.from_unet(sd_unet).save_pretrained(tmp_path / "sd-controlnet")
    cfg = sdxl_cfg(make_cfg, tmp_path / "run", tiny_sdxl_dir, model={"controlnet": str(tmp_path / "sd-controlnet")})
    with pytest.raises(
        UserError, match="was made for another kind of base .cross_attention_dim 32, the SDXL base's UNet has 64"
    ):
        load_models(cfg, 0)


# ------------------------------------------------------------------ time_ids and prompts
def _examples(cfg, rows, models):
    from ctrlnet_trainer import data

    return data.Examples.of(data.Source(rows, None), cfg.data, models, 0)


def test_time_ids_are_each_images_size_and_crop(tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models

    cfg = make_cfg(tmp_path / "run", model={"family": "sdxl"}, data={"resolution": 32})  # the in-code tiny SDXL
    models = load_models(cfg, 0)
    wide, tall = Image.new("RGB", (96, 64), "red"), Image.new("RGB", (40, 100), "blue")
    rows = [{"image": im, "conditioning_image": im, "text": "x"} for im in (wide, tall, Image.new("RGB", (32, 32)))]
    examples = _examples(cfg, rows, models)
    # (original h, w, crop top, left, target h, w): 96x64 -> 48x32, cropped 8 px from the left;
    # 40x100 -> 32x80, cropped 24 px from the top; 32x32 is not cropped.
    assert examples[(0, 0)]["time_ids"].tolist() == [64, 96, 0, 8, 32, 32]
    assert examples[(1, 0)]["time_ids"].tolist() == [100, 40, 24, 0, 32, 32]
    assert examples[(2, 0)]["time_ids"].tolist() == [32, 32, 0, 0, 32, 32]
    fixed = make_cfg(
        tmp_path / "run", model={"family": "sdxl"}, data={"resolution": 32, "crops_coords_top_left": [0, 0]}
    )
    assert _examples(fixed, rows, models)[(0, 0)]["time_ids"].tolist() == [64, 96, 0, 0, 32, 32]


def test_both_encoders_condition_the_step_and_prompt_dropout_empties_both(tmp_path, make_cfg):
    from ctrlnet_trainer import data
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.step import Draws, OnlineEncoder

    cfg = make_cfg(tmp_path / "run", model={"family": "sdxl"}, data={"resolution": 32})
    models = load_models(cfg, 0)
    rows = [
        {"image": Image.new("RGB", (32, 32)), "conditioning_image": Image.new("RGB", (32, 32)), "text": t}
        for t in ("a red circle", "")
    ]
    batch = data.collate([_examples(cfg, rows, models)[(i, 0)] for i in range(2)])
    encoder = OnlineEncoder(models, torch.float32, CPU)
    shape = (2, *encoder.latent_shape(batch))
    kept = Draws(torch.zeros(shape), torch.zeros(shape), torch.zeros(2, dtype=torch.long), None)
    _, text, _ = encoder.encode(batch, kept)
    hidden, added = text.hidden, text.added
    # Penultimate hidden states of both encoders side by side; the second encoder's pooled output.
    assert hidden.shape == (2, 77, models.unet.config.cross_attention_dim) == (2, 77, 32 + 32)
    assert added["text_embeds"].shape == (2, 32) and torch.equal(added["time_ids"], batch["time_ids"])
    assert not torch.allclose(hidden[0], hidden[1]) and not torch.allclose(
        added["text_embeds"][0], added["text_embeds"][1]
    )
    dropped = Draws(kept.latent_eps, kept.noise, kept.timesteps, torch.tensor([True, False]))
    _, text, _ = encoder.encode(batch, dropped)
    # The caption of row 0 became "": both encoders now see exactly what row 1 (an empty caption) shows.
    assert torch.equal(text.hidden[0], hidden[1]) and torch.equal(text.added["text_embeds"][0], added["text_embeds"][1])


# ------------------------------------------------------------------ it learns, it loads
LEARN_STEPS = 120


@pytest.fixture(scope="module")
def learned(tmp_path_factory, make_cfg, tiny_sdxl_dir):
    from ctrlnet_trainer.run import train

    out = tmp_path_factory.mktemp("sdxl-learn") / "run"
    cfg = sdxl_cfg(
        make_cfg,
        out,
        tiny_sdxl_dir,
        data={"synthetic_rows": 400, "resolution": 64},
        optim={"learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10},
        loop={"batch_size": 4, "max_steps": LEARN_STEPS},
        validation={"every_steps": LEARN_STEPS},
    )
    return cfg, train(cfg)


def test_trained_sdxl_controlnet_beats_the_zero_controlnet_on_heldout_rows(learned):
    from diffusers import ControlNetModel

    from ctrlnet_trainer import data
    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.validation import heldout_loss

    cfg, result = learned
    models = model_lib.load_models(cfg, 0)  # its controlnet: from_unet, zero convolutions, the baseline
    first = cfg.data.synthetic_rows + 100
    source = data.Source(data.SyntheticFillSource(first + 32, cfg.data.resolution, 0), None)
    examples = data.Examples.of(source, cfg.data, models, 0)
    batches = [data.collate([examples[(first + b + i, 0)] for i in range(8)]) for b in range(0, 32, 8)]
    zero = heldout_loss(models, models.controlnet, batches, torch.float32, CPU)
    trained = heldout_loss(models, ControlNetModel.from_pretrained(result.controlnet), batches, torch.float32, CPU)
    print(f"heldout loss: trained {trained:.4f}, zero ControlNet {zero:.4f}")
    assert trained < 0.8 * zero, (trained, zero)
    assert Path(result.samples).is_file()  # validation ran through StableDiffusionXLControlNetPipeline


def test_saved_sdxl_controlnet_runs_in_the_stock_pipeline_and_ctrlnet_generate(learned, tiny_sdxl_dir, tmp_path):
    from diffusers import ControlNetModel, StableDiffusionXLControlNetPipeline

    from ctrlnet_trainer.generate import generate
    from ctrlnet_trainer.synthetic import fill_example

    cfg, result = learned
    row = fill_example(cfg.data.synthetic_rows + 7, 64, 0)

    def render(controlnet):
        pipe = StableDiffusionXLControlNetPipeline.from_pretrained(tiny_sdxl_dir, controlnet=controlnet)
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            row["text"],
            image=row["conditioning_image"],
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    trained = ControlNetModel.from_pretrained(result.controlnet)
    image = render(trained)
    assert image.shape == (64, 64, 3) and image.std() > 0
    trained.controlnet_down_blocks.apply(lambda m: torch.nn.init.zeros_(m.weight) if hasattr(m, "weight") else None)
    torch.nn.init.zeros_(trained.controlnet_mid_block.weight)
    assert abs(image - render(trained)).max() > 1e-3  # the trained residuals steer the base
    row["conditioning_image"].save(tmp_path / "cond.png")
    paths = generate(
        str(tiny_sdxl_dir),
        result.controlnet,
        str(tmp_path / "cond.png"),
        row["text"],
        str(tmp_path / "out"),
        steps=2,
        device="cpu",
    )
    assert [p.name for p in paths] == ["0000-00.png"] and Image.open(paths[0]).size == (64, 64)


# ------------------------------------------------------------------ exact resume
def test_sdxl_resume_is_exact_with_min_snr_v_prediction_and_prompt_dropout(tiny_sdxl_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.run import train

    sections = dict(
        model={"prediction_type": "v_prediction"},
        data={"synthetic_rows": 16, "proportion_empty_prompts": 0.5},
        loop={"batch_size": 2, "max_steps": 3, "snr_gamma": 5.0, "gradient_checkpointing": True},
        checkpoint={"every_steps": 2},
        validation={"every_steps": 1000},
    )
    train(sdxl_cfg(make_cfg, tmp_path / "a", tiny_sdxl_dir, **sections))
    resumed = {**sections, "checkpoint": {"every_steps": 2, "resume": str(tmp_path / "a/checkpoints/step-00000002")}}
    assert train(sdxl_cfg(make_cfg, tmp_path / "b", tiny_sdxl_dir, **resumed)).steps == 3
    assert max_weight_diff(tmp_path / "a/controlnet", tmp_path / "b/controlnet") <= 1e-6


# ------------------------------------------------------------------ what SDXL refuses
def test_the_precompute_cache_refuses_sdxl_in_one_line(tiny_sdxl_dir, tmp_path):
    with pytest.raises(ValueError, match="SDXL encodes online"):
        TrainConfig.model_validate({"model": {"family": "sdxl"}, "data": {"cache": str(tmp_path / "c")}})
    from ctrlnet_trainer.cache.encode import load_encoders

    cfg = TrainConfig.model_validate({"model": {"base": str(tiny_sdxl_dir)}, "data": {"cache": str(tmp_path / "c")}})
    with pytest.raises(
        UserError, match="SDXL model, and the precompute cache holds the inputs of SD1.x/2.x, SD3/SD3.5 and Flux.1 only"
    ):
        load_encoders(cfg, 0)
