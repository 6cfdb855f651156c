"""SD3/SD3.5 and Flux.1 on the tiny bases (`ctrlnet model init --arch tiny-sd3 / tiny-flux`): the
family is read from the base, the conditioning has the pipelines' shapes, the ControlNet trains on
exactly what the family's stock ControlNet pipeline feeds it, the flow-matching objective is the
reference's, what these families cannot do is refused in one line, and union / schnell ControlNets
get their inputs."""

import copy
import json
import shutil
from pathlib import Path

import pytest
import torch
from PIL import Image

from ctrlnet.errors import UserError

CPU = torch.device("cpu")
CAPTION = "dark slate blue circle with light goldenrod yellow background"
SIDE = 32  # pixels: 4 x 4 latents, 2 x 2 Flux patches
MODE_COLUMN = {"control_mode_column": "mode"}  # a union ControlNet's rows: their condition type


def flow_cfg(make_cfg, output, base, **sections):
    model = {"base": str(base), **sections.pop("model", {})}
    data = {"resolution": SIDE, **sections.pop("data", {})}
    return make_cfg(output, model=model, data=data, **sections)


def base_dir(request, family: str) -> Path:
    return request.getfixturevalue({"sd3": "tiny_sd3_dir", "flux": "tiny_flux_dir"}[family])


def one_line_error(excinfo, *words):
    message = str(excinfo.value)
    assert "\n" not in message, message
    for word in words:
        assert word in message, message
    return message


def batch_of(cfg, models, rows):
    from ctrlnet_trainer import data

    examples = data.Examples.of(data.Source(rows, None), cfg.data, models, 0)
    return data.collate([examples[(i, 0)] for i in range(len(rows))])


def draws_for(encoder, batch, timestep: int = 500):
    """Draws that sample the VAE posteriors at their means (eps 0), at one timestep index."""
    from ctrlnet_trainer.step import Draws

    n = batch["pixel_values"].shape[0]
    shape = (n, *encoder.latent_shape(batch))
    noise = torch.randn(shape, generator=torch.Generator().manual_seed(1))
    return Draws(torch.zeros(shape), noise, torch.full((n,), timestep), None, torch.zeros(shape))


class Capture:
    """What a module's forward is called with (keyword arguments), call by call."""

    def __init__(self, module):
        self.calls = []
        self.handle = module.register_forward_pre_hook(self._record, with_kwargs=True)

    def _record(self, module, args, kwargs):
        self.calls.append(dict(kwargs))

    def remove(self):
        self.handle.remove()


def condition_image() -> Image.Image:
    from ctrlnet_trainer.synthetic import fill_example

    return fill_example(0, SIDE, 0)["conditioning_image"]


# ------------------------------------------------------------------ the family, from the base
def test_flow_families_are_read_from_the_base(tiny_sd3_dir, tiny_flux_dir, tmp_path):
    from ctrlnet_trainer.models import family_of_folder
    from ctrlnet_trainer.models.families import family_of_pipeline

    for folder, name, pipeline in (
        (tiny_sd3_dir, "sd3", "StableDiffusion3Pipeline"),
        (tiny_flux_dir, "flux", "FluxPipeline"),
    ):
        assert json.loads((Path(folder) / "model_index.json").read_text())["_class_name"] == pipeline
        assert family_of_folder(Path(folder)).name == name
        # Without model_index.json: from the class of transformer/config.json.
        bare = shutil.copytree(folder, tmp_path / f"bare-{name}")
        (bare / "model_index.json").unlink()
        assert family_of_folder(bare).name == name
    assert family_of_pipeline("StableDiffusion3ControlNetPipeline").name == "sd3"
    assert family_of_pipeline("FluxPipeline").name == "flux"
    assert family_of_pipeline("FluxControlNetPipeline").name == "flux"
    assert family_of_pipeline("StableDiffusionXLPipeline").name == "sdxl"
    assert family_of_pipeline("StableDiffusionPipeline").name == "sd"


def test_auto_loads_each_flow_family_with_its_own_transformer_and_controlnet(
    tiny_sd3_dir, tiny_flux_dir, tmp_path, make_cfg
):
    from ctrlnet_trainer.models import load_models

    sd3 = load_models(flow_cfg(make_cfg, tmp_path / "a", tiny_sd3_dir), 0)
    flux = load_models(flow_cfg(make_cfg, tmp_path / "b", tiny_flux_dir), 0)
    assert (sd3.family.name, type(sd3.unet).__name__, type(sd3.controlnet).__name__) == (
        "sd3",
        "SD3Transformer2DModel",
        "SD3ControlNetModel",
    )
    assert (flux.family.name, type(flux.unet).__name__, type(flux.controlnet).__name__) == (
        "flux",
        "FluxTransformer2DModel",
        "FluxControlNetModel",
    )
    assert sd3.prediction_type == flux.prediction_type == "flow"


def test_forcing_sd3_on_a_flux_base_is_one_line(tiny_flux_dir, tmp_path, make_cfg):
    from diffusers import FluxTransformer2DModel

    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.models.families import family_named

    cfg = flow_cfg(make_cfg, tmp_path / "run", tiny_flux_dir, model={"family": "sd3"})
    with pytest.raises(UserError) as e:
        load_models(cfg, 0)
    one_line_error(e, "tokenizer_3/", "an SD3 base")
    # A transformer of the other family, loaded as this one's denoiser.
    flux_transformer = FluxTransformer2DModel.from_pretrained(tiny_flux_dir, subfolder="transformer")
    with pytest.raises(UserError) as e:
        family_named("sd3").check_unet(flux_transformer, "base")
    one_line_error(e, "FluxTransformer2DModel", "model.family")
    family_named("flux").check_unet(flux_transformer, "base")  # its own family takes it


# ------------------------------------------------------------------ conditioning shapes
@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize("length", [32, None])
def test_conditioning_has_the_pipelines_shapes(family, length, request, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.step import OnlineEncoder

    model = {"max_sequence_length": length} if length else {}
    cfg = flow_cfg(make_cfg, tmp_path / "run", base_dir(request, family), model=model)
    models = load_models(cfg, 0)
    image = condition_image()
    rows = [{"image": image, "conditioning_image": image, "text": t} for t in (CAPTION, "a red square")]
    batch = batch_of(cfg, models, rows)
    encoder = OnlineEncoder(models, torch.float32, CPU)
    latents, text, control = encoder.encode(batch, draws_for(encoder, batch))
    t5 = length or {"sd3": 256, "flux": 512}[family]
    pooled = text.added["pooled_projections"]
    if family == "sd3":
        # Both CLIPs' 77 tokens (padded to T5's width), then T5's; both CLIPs' projections.
        assert text.hidden.shape == (2, 77 + t5, models.unet.config.joint_attention_dim) == (2, 77 + t5, 64)
        assert pooled.shape == (2, 2 * 32) == (2, models.unet.config.pooled_projection_dim)
    else:
        assert text.hidden.shape == (2, t5, 64) and pooled.shape == (2, 32)
    assert batch["input_ids_3" if family == "sd3" else "input_ids_2"].shape == (2, t5)
    assert latents.shape == control.shape == (2, 16, SIDE // 8, SIDE // 8)
    assert not torch.allclose(text.hidden[0], text.hidden[1]) and not torch.allclose(pooled[0], pooled[1])


# ------------------------------------------------------------------ trains what the pipeline is fed
def _pipeline(models):
    family = models.family
    scheduler = family.sampler(models.noise_scheduler.config)
    pipe = family.pipeline({**models.pipeline_parts(), "scheduler": scheduler}, models.controlnet)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_prompts_are_encoded_as_the_pipeline_encodes_them(family, request, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models

    cfg = flow_cfg(make_cfg, tmp_path / "run", base_dir(request, family), model={"max_sequence_length": 32})
    models = load_models(cfg, 0)
    pipe = _pipeline(models)
    captions = [CAPTION, ""]
    with torch.no_grad():
        ids = models.family.token_ids(models.text, captions)
        mine = models.family.condition(models.text, ids, {})
        if family == "sd3":
            hidden, _, pooled, _ = pipe.encode_prompt(
                captions, captions, captions, device=CPU, do_classifier_free_guidance=False, max_sequence_length=32
            )
        else:
            hidden, pooled, text_ids = pipe.encode_prompt(captions, captions, device=CPU, max_sequence_length=32)
            assert text_ids.shape == (32, 3) and not text_ids.any()  # what predict gives as txt_ids
    assert hidden.shape == mine.hidden.shape
    torch.testing.assert_close(mine.hidden, hidden, rtol=0, atol=1e-6)
    torch.testing.assert_close(mine.added["pooled_projections"], pooled, rtol=0, atol=1e-6)


def _feed_both(models, cfg, monkeypatch):
    """What the ControlNet gets from a training step and from a 1-step pipeline call on the same
    caption and condition image, with every VAE posterior taken at its mean (the pipeline samples
    it with its own generator; the step with its draws' eps, zero here)."""
    from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

    from ctrlnet_trainer.step import OnlineEncoder, controlnet_loss

    monkeypatch.setattr(DiagonalGaussianDistribution, "sample", lambda self, generator=None: self.mean)
    image = condition_image()
    batch = batch_of(cfg, models, [{"image": image, "conditioning_image": image, "text": CAPTION}])
    encoder = OnlineEncoder(models, torch.float32, CPU)
    draws = draws_for(encoder, batch)
    capture = Capture(models.controlnet)
    with torch.no_grad():
        latents, text, control = encoder.encode(batch, draws)
        controlnet_loss(models, models.controlnet, latents, text, control, draws, None)
        pipe = _pipeline(models)
        inputs = models.family.pipeline_inputs(models, [image])
        if models.family.name == "sd3":
            inputs["guidance_scale"] = 1.0  # no classifier-free guidance: one batch, the prompt's
        pipe(
            CAPTION,
            **inputs,
            height=SIDE,
            width=SIDE,
            num_inference_steps=1,
            output_type="latent",
            generator=torch.Generator().manual_seed(0),
        )
    capture.remove()
    assert len(capture.calls) == 2, len(capture.calls)
    trained, fed = capture.calls
    return trained, fed, batch["conditioning_pixel_values"]


def _vae_mean(models, pixels):
    with torch.no_grad():
        return models.vae.encode(pixels).latent_dist.mean


def _same(a, b):
    torch.testing.assert_close(a, b, rtol=0, atol=1e-5)


@pytest.mark.parametrize("force_zeros", [False, True], ids=["made-by-ctrlnet", "instantx-config"])
def test_sd3_controlnet_trains_on_what_its_pipeline_feeds_it(
    force_zeros, tiny_sd3_dir, tmp_path, make_cfg, monkeypatch
):
    from ctrlnet_trainer.models import load_models

    cfg = flow_cfg(make_cfg, tmp_path / "run", tiny_sd3_dir, model={"max_sequence_length": 32})
    models = load_models(cfg, 0)
    assert models.controlnet.config.force_zeros_for_pooled_projection is False  # made by ctrlnet
    if force_zeros:  # InstantX's convention: zero pooled text, no VAE shift on the condition
        models.controlnet = copy.deepcopy(models.controlnet)
        models.controlnet.register_to_config(force_zeros_for_pooled_projection=True)
    trained, fed, pixels = _feed_both(models, cfg, monkeypatch)

    for key in ("controlnet_cond", "pooled_projections", "encoder_hidden_states"):
        assert trained[key].shape == fed[key].shape, key
        _same(trained[key], fed[key])
    vae = models.vae.config
    shift = 0.0 if force_zeros else vae.shift_factor
    assert vae.shift_factor > 0
    _same(fed["controlnet_cond"], (_vae_mean(models, pixels * 2 - 1) - shift) * vae.scaling_factor)
    if force_zeros:
        assert not fed["pooled_projections"].any()
    else:
        assert fed["pooled_projections"].abs().min() > 0  # the real pooled text
    # train_controlnet_sd3.py's way: the condition in [0, 1], not normalised, is not what is fed.
    reference = (_vae_mean(models, pixels) - shift) * vae.scaling_factor
    assert (reference - fed["controlnet_cond"]).abs().max() > 1e-2


def test_flux_controlnet_trains_on_what_its_pipeline_feeds_it(tiny_flux_dir, tmp_path, make_cfg, monkeypatch):
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.models.flux import pack

    cfg = flow_cfg(make_cfg, tmp_path / "run", tiny_flux_dir, model={"max_sequence_length": 32, "guidance_scale": 2.5})
    models = load_models(cfg, 0)
    assert models.unet.config.guidance_embeds and models.controlnet.config.guidance_embeds  # dev-shaped
    trained, fed, pixels = _feed_both(models, cfg, monkeypatch)

    for key in ("controlnet_cond", "pooled_projections", "encoder_hidden_states", "txt_ids", "img_ids"):
        assert trained[key].shape == fed[key].shape, key
        _same(trained[key], fed[key].to(trained[key].dtype))
    assert trained["controlnet_mode"] is None and fed["controlnet_mode"] is None
    assert trained["guidance"].tolist() == fed["guidance"].tolist() == [2.5]
    vae = models.vae.config
    packed = pack((_vae_mean(models, pixels * 2 - 1) - vae.shift_factor) * vae.scaling_factor)
    _same(fed["controlnet_cond"], packed)
    # train_controlnet_flux.py's way: the condition in [0, 1], not normalised, is not what is fed.
    reference = pack((_vae_mean(models, pixels) - vae.shift_factor) * vae.scaling_factor)
    assert (reference - fed["controlnet_cond"]).abs().max() > 1e-2


# ------------------------------------------------------------------ the flow-matching objective
def _objective(scheme, **kwargs):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ctrlnet_trainer.models.objective import FlowMatching

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    return FlowMatching(scheduler, scheme, **kwargs), scheduler


@pytest.mark.parametrize("scheme", ["logit_normal", "mode", "cosmap", "sigma_sqrt", "none"])
def test_timestep_draws_follow_the_reference_density_from_the_examples_generator(scheme):
    from diffusers.training_utils import compute_density_for_timestep_sampling, compute_loss_weighting_for_sd3

    options = dict(logit_mean=0.3, logit_std=1.2, mode_scale=1.29)
    objective, scheduler = _objective(scheme, **options)

    def draws(seed):
        g = torch.Generator().manual_seed(seed)
        return torch.cat([objective.sample_timestep(g, 1000) for _ in range(400)])

    a = draws(7)
    assert a.dtype == torch.int64 and torch.equal(a, draws(7)) and not torch.equal(a, draws(8))
    assert a.min() >= 0 and a.max() < 1000 and len(a.unique()) > 100
    # The reference's formula with the same generator: the same indices, draw by draw.
    g = torch.Generator().manual_seed(7)
    reference = torch.cat(
        [
            compute_density_for_timestep_sampling(scheme, 1, **options, generator=g).mul(1000).long().clamp(0, 999)
            for _ in range(400)
        ]
    )
    assert torch.equal(a, reference)
    # The reference's loss weights at these sigmas.
    sigmas = scheduler.sigmas[a]
    torch.testing.assert_close(objective.weights(sigmas), compute_loss_weighting_for_sd3(scheme, sigmas).float())
    torch.testing.assert_close(objective.model_time(a), scheduler.timesteps[a].float())


def test_logit_normal_concentrates_draws_in_the_middle_and_mode_scale_moves_them():
    g = torch.Generator().manual_seed(0)
    logit, _ = _objective("logit_normal")
    uniform, _ = _objective("none")
    mid = lambda o: sum(400 <= o.sample_timestep(g, 1000).item() < 600 for _ in range(2000))  # noqa: E731
    assert mid(logit) > 1.4 * mid(uniform)


def test_preconditioned_loss_is_the_sigma_squared_weighted_velocity_loss():
    objective, scheduler = _objective("none", precondition=False)
    pre, _ = _objective("none", precondition=True)
    g = torch.Generator().manual_seed(0)
    latents, noise, prediction = (torch.randn(3, 16, 4, 4, generator=g) for _ in range(3))
    timesteps = torch.tensor([50, 500, 950])
    noisy = objective.noisy(scheduler, latents, noise, timesteps)
    sigma = scheduler.sigmas[timesteps].reshape(-1, 1, 1, 1)
    torch.testing.assert_close(noisy, (1 - sigma) * latents + sigma * noise)
    plain = objective.loss(scheduler, prediction, latents, noise, noisy, timesteps)
    torch.testing.assert_close(plain, ((prediction - (noise - latents)) ** 2).mean())
    expected = (sigma**2 * (prediction - (noise - latents)) ** 2).mean()
    torch.testing.assert_close(pre.loss(scheduler, prediction, latents, noise, noisy, timesteps), expected)
    assert abs(expected - plain) > 1e-3  # the identity is not the plain loss


def test_sd3_preconditions_by_default_and_flux_does_not(tmp_path, make_cfg):
    from diffusers import FlowMatchEulerDiscreteScheduler

    from ctrlnet_trainer.models.families import family_named

    scheduler = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0)
    sd3, flux = family_named("sd3"), family_named("flux")
    defaults = make_cfg(tmp_path / "a")
    assert sd3.objective(defaults, scheduler, None).precondition is True
    assert flux.objective(defaults, scheduler, None).precondition is False
    assert sd3.objective(None, scheduler, None).precondition is True
    off = make_cfg(tmp_path / "b", loop={"precondition_outputs": False, "weighting_scheme": "mode"})
    on = make_cfg(tmp_path / "c", loop={"precondition_outputs": True})
    assert sd3.objective(off, scheduler, None).precondition is False
    assert sd3.objective(off, scheduler, None).scheme == "mode"
    assert flux.objective(on, scheduler, None).precondition is True


# ------------------------------------------------------------------ refusals, one line each
@pytest.mark.parametrize("family", ["sd3", "flux"])
@pytest.mark.parametrize(
    "sections, words",
    [
        ({"loop": {"snr_gamma": 5.0}}, ["loop.snr_gamma", "flow matching"]),
        ({"model": {"prediction_type": "epsilon"}}, ["model.prediction_type", "velocity"]),
        ({"data": {"resolution": 24}}, ["data.resolution 24", "multiple of 16"]),
    ],
    ids=["snr_gamma", "prediction_type", "resolution"],
)
def test_what_flow_matching_cannot_use_is_refused_for_an_auto_detected_base(
    family, sections, words, request, tmp_path, make_cfg
):
    from ctrlnet_trainer.models import load_models

    cfg = flow_cfg(make_cfg, tmp_path / "run", base_dir(request, family), **copy.deepcopy(sections))
    assert cfg.model.family == "auto"  # the config alone cannot know
    with pytest.raises(UserError) as e:
        load_models(cfg, 0)
    one_line_error(e, *words)


def test_controlnet_depth_beyond_the_base_is_refused(tiny_sd3_dir, tiny_flux_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models

    # SD3: 4 joint blocks, the last context_pre_only: at most 3.
    assert load_models(flow_cfg(make_cfg, tmp_path / "a", tiny_sd3_dir, model={"controlnet_layers": 3}), 0)
    with pytest.raises(UserError) as e:
        load_models(flow_cfg(make_cfg, tmp_path / "a", tiny_sd3_dir, model={"controlnet_layers": 4}), 0)
    one_line_error(e, "model.controlnet_layers 4", "3 or fewer")
    # Flux: 2 double-stream and 2 single-stream blocks.
    models = load_models(
        flow_cfg(
            make_cfg, tmp_path / "b", tiny_flux_dir, model={"controlnet_layers": 2, "controlnet_single_layers": 0}
        ),
        0,
    )
    assert (models.controlnet.config.num_layers, models.controlnet.config.num_single_layers) == (2, 0)
    for key in ("controlnet_layers", "controlnet_single_layers"):
        with pytest.raises(UserError) as e:
            load_models(flow_cfg(make_cfg, tmp_path / "b", tiny_flux_dir, model={key: 3}), 0)
        one_line_error(e, f"model.{key} 3", "2 or fewer")


@pytest.mark.parametrize("as_file", [False, True], ids=["folder", "file"])
def test_an_xlabs_layout_flux_controlnet_is_refused(as_file, tiny_flux_dir, tmp_path, make_cfg):
    from safetensors.torch import save_file

    from ctrlnet_trainer.models import load_models

    folder = tmp_path / "xlabs"
    folder.mkdir()
    save_file({"double_blocks.0.img_attn.qkv.weight": torch.zeros(2, 2)}, folder / "flux-canny-controlnet.safetensors")
    where = folder / "flux-canny-controlnet.safetensors" if as_file else folder
    cfg = flow_cfg(make_cfg, tmp_path / "run", tiny_flux_dir, model={"controlnet": str(where)})
    with pytest.raises(UserError) as e:
        load_models(cfg, 0)
    one_line_error(e, "XLabs-AI", "diffusers")


def test_control_modes_are_refused_for_an_sd3_base(tiny_sd3_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models

    cfg = flow_cfg(
        make_cfg,
        tmp_path / "run",
        tiny_sd3_dir,
        model={"control_modes": ["canny", "depth"]},
        data={"control_mode_column": "mode"},
    )
    with pytest.raises(UserError) as e:
        load_models(cfg, 0)
    one_line_error(e, "model.control_modes", "Flux.1")


def test_a_starting_union_controlnet_must_have_control_modes_types(tiny_flux_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models

    union = {"control_modes": ["canny", "depth", "tile"]}
    made = load_models(flow_cfg(make_cfg, tmp_path / "a", tiny_flux_dir, model=union, data=MODE_COLUMN), 0)
    assert made.controlnet.config.num_mode == 3
    made.controlnet.save_pretrained(tmp_path / "union3")
    plain = load_models(flow_cfg(make_cfg, tmp_path / "a", tiny_flux_dir), 0).controlnet
    plain.save_pretrained(tmp_path / "plain")

    def start(controlnet, modes):
        model = {"controlnet": str(tmp_path / controlnet), **({"control_modes": modes} if modes else {})}
        data = MODE_COLUMN if modes else {}
        return load_models(flow_cfg(make_cfg, tmp_path / "b", tiny_flux_dir, model=model, data=data), 0)

    assert start("union3", ["canny", "depth", "tile"]).controlnet.config.num_mode == 3
    with pytest.raises(UserError) as e:
        start("union3", ["canny", "depth"])
    one_line_error(e, "3 condition types", "model.control_modes names 2")
    with pytest.raises(UserError) as e:
        start("plain", ["canny", "depth"])
    one_line_error(e, "not a union ControlNet")
    with pytest.raises(UserError) as e:
        start("union3", [])
    one_line_error(e, "3 condition types")


# ------------------------------------------------------------------ union ControlNets, schnell
def test_a_union_controlnet_gets_each_rows_control_mode(tiny_flux_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.step import OnlineEncoder, controlnet_loss

    cfg = flow_cfg(
        make_cfg, tmp_path / "run", tiny_flux_dir, model={"control_modes": ["canny", "depth"]}, data=MODE_COLUMN
    )
    models = load_models(cfg, 0)
    image = condition_image()
    modes = ["depth", "canny", "depth", 0]  # names of model.control_modes, or their ids
    rows = [{"image": image, "conditioning_image": image, "text": CAPTION, "mode": m} for m in modes]
    batch = batch_of(cfg, models, rows)
    encoder = OnlineEncoder(models, torch.float32, CPU)
    draws = draws_for(encoder, batch)
    capture = Capture(models.controlnet)
    with torch.no_grad():
        latents, text, control = encoder.encode(batch, draws)
        controlnet_loss(models, models.controlnet, latents, text, control, draws, None)
    capture.remove()
    assert capture.calls[0]["controlnet_mode"].reshape(-1).tolist() == [1, 0, 1, 0]


def test_a_schnell_base_trains_and_its_controlnet_gets_no_guidance(tmp_path_factory, tmp_path, make_cfg, monkeypatch):
    from diffusers import FluxControlNetModel

    from ctrlnet_trainer.models.tiny import write_base
    from ctrlnet_trainer.run import train

    base = write_base(tmp_path_factory.mktemp("tiny-flux-schnell") / "base", arch="tiny-flux-schnell", seed=0)
    assert json.loads((base / "transformer/config.json").read_text())["guidance_embeds"] is False
    guidance = []
    forward = FluxControlNetModel.forward

    def recording(self, *args, **kwargs):
        guidance.append(kwargs.get("guidance"))
        return forward(self, *args, **kwargs)

    monkeypatch.setattr(FluxControlNetModel, "forward", recording)
    cfg = flow_cfg(
        make_cfg,
        tmp_path / "run",
        base,
        data={"synthetic_rows": 4},
        loop={"batch_size": 2, "max_steps": 1},
        validation={"every_steps": 1000},
    )
    result = train(cfg)
    assert result.steps == 1 and guidance and all(g is None for g in guidance)
    saved = FluxControlNetModel.from_pretrained(result.controlnet)
    assert saved.config.guidance_embeds is False


# ------------------------------------------------------------------ mixed precision
class _Stop(Exception):
    pass


def test_sd3_timesteps_reach_the_controlnet_as_the_pipeline_gives_them_under_bf16(tiny_sd3_dir, tmp_path, make_cfg):
    from ctrlnet_trainer.models import load_models
    from ctrlnet_trainer.models.family import Conditioning

    models = load_models(flow_cfg(make_cfg, tmp_path / "run", tiny_sd3_dir, model={"max_sequence_length": 32}), 0)
    t = models.objective.model_time(torch.tensor([700]))
    # The pipeline hands the ControlNet its scheduler's float32 timesteps whatever the weights'
    # dtype (`timestep = t.expand(...)`); this one is not a bfloat16 number.
    assert t.dtype == torch.float32 and t.to(torch.bfloat16).float().item() != t.item()
    seen = []

    def stop(module, args, kwargs):
        seen.append(kwargs["timestep"])
        raise _Stop

    handle = models.controlnet.register_forward_pre_hook(stop, with_kwargs=True)
    bf16 = dict(dtype=torch.bfloat16)
    text = Conditioning(torch.zeros(1, 77 + 32, 64, **bf16), {"pooled_projections": torch.zeros(1, 64, **bf16)})
    latents = torch.zeros(1, 16, SIDE // 8, SIDE // 8, **bf16)
    with pytest.raises(_Stop):
        models.family.predict(models, models.controlnet, latents, t, text, latents)
    handle.remove()
    assert seen[0].float().item() == t.item()


@pytest.mark.parametrize(("family", "denoiser"), [("sd", False), ("sdxl", True), ("sd3", True), ("flux", True)])
def test_gradient_checkpointing_covers_the_frozen_denoiser_the_backward_runs_through(
    make_cfg, tmp_path, family, denoiser
):
    """loop.gradient_checkpointing recomputes the ControlNet's activations, and the frozen
    denoiser's where the reference scripts do (SDXL, Flux.1) and SD3 (its transformer is as large):
    Flux.1-dev's 12 B transformer at 1024 px would otherwise keep tens of GB of activations."""
    from ctrlnet_trainer.models import load_models, prepare_for_training

    resolution = 32 if family in ("sd", "sdxl") else 64
    cfg = make_cfg(
        tmp_path, model={"family": family}, data={"resolution": resolution}, loop={"gradient_checkpointing": True}
    )
    models = load_models(cfg, 0)
    prepare_for_training(models, cfg, torch.device("cpu"), torch.float32)
    assert models.controlnet.is_gradient_checkpointing
    assert models.unet.is_gradient_checkpointing is denoiser
