"""The fast step's switches on this CPU machine: `auto` leaves the CPU eager; each explicit switch
trains or says in one line why it is off; regional compile compiles exactly the UNet's and
ControlNet's blocks and trains the same numbers as eager; the frozen models build no autograd
graph; metrics.jsonl times the steps and the waits for data.

Inductor needs minutes (cold cache) to compile even the tiny model on these 2 cores, so the
compile runs here use dynamo's "aot_eager" backend: the same tracing, graph splitting and AOT
autograd, no kernel compiler. CTRLNET_INDUCTOR_TEST=1 also runs inductor itself."""

from __future__ import annotations

import os

import pytest
import torch

from ctrlnet.config.train import TrainConfig
from ctrlnet_trainer import speed
from testkit.training import controlnet_weights, metrics_rows, small_config_dict

CPU = torch.device("cpu")


def _cfg(output, **loop) -> TrainConfig:
    return TrainConfig.model_validate(small_config_dict(output, loop={"max_steps": 2, "batch_size": 2, **loop}))


def _train(output, capsys, **loop):
    from ctrlnet_trainer.run import train

    capsys.readouterr()
    result = train(_cfg(output, **loop))
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("speed: ")]
    return result, lines


@pytest.fixture(scope="module")
def tiny_models():
    """make(**loop): a fresh tiny base + ControlNet, frozen as the trainer freezes it (~1 s each)."""

    def make(**loop):
        from ctrlnet_trainer import models as model_lib

        cfg = _cfg("unused", **loop)
        models = model_lib.load_models(cfg, 0)
        model_lib.prepare_for_training(models, cfg, CPU, torch.float32)
        return cfg, models

    return make


@pytest.fixture(scope="module")
def eager(tmp_path_factory):
    """The reference: 2 steps, every switch at its default (auto: off on the CPU)."""
    from ctrlnet_trainer.run import train

    out = tmp_path_factory.mktemp("eager") / "run"
    train(_cfg(out))
    return out


def _curve(output) -> list[float]:
    """Each logged step's loss and gradient norm."""
    return [v for r in metrics_rows(output) for v in (r["loss"], r["grad_norm"])]


def _compiled(module: torch.nn.Module) -> bool:
    return getattr(module, "_compiled_call_impl", None) is not None


# ------------------------------------------------------------------ auto on the CPU
def test_auto_defaults_resolve_to_off_on_the_cpu(tiny_models):
    cfg, models = tiny_models()
    assert (cfg.loop.compile, cfg.loop.channels_last, cfg.loop.fp8) == ("auto", "auto", "off")
    assert speed.compile_mode(cfg, CPU) == "off" and not speed.channels_last(cfg, CPU)
    assert speed.compile_mode(cfg, torch.device("cuda")) == "regional" and speed.channels_last(
        cfg, torch.device("cuda")
    )
    lines = speed.apply_speed_settings(models, cfg, CPU)
    assert lines == ["channels_last: off (auto: on for CUDA only)", "compile: off (auto: on for CUDA only)"]
    modules = [*models.unet.modules(), *models.controlnet.modules()]
    assert not any(_compiled(m) for m in modules)
    assert all(p.is_contiguous() for p in models.unet.parameters())  # not re-laid as channels_last
    env, limit = os.environ.get("TORCHINDUCTOR_CACHE_DIR"), torch._dynamo.config.recompile_limit
    with speed.process_settings(cfg, CPU):  # nothing process-wide either
        assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == env and torch._dynamo.config.recompile_limit == limit


# ------------------------------------------------------------------ explicit switches on the CPU
def test_fp8_says_why_it_is_off_and_channels_last_trains_the_same_numbers(tmp_path, eager, capsys):
    result, lines = _train(tmp_path / "run", capsys, fp8="both", channels_last="on")
    assert result.steps == 2
    fp8 = [line for line in lines if "fp8" in line]
    assert len(fp8) == 1 and "compute capability 8.9" in fp8[0] and "this run is on the CPU" in fp8[0], lines
    assert "speed: channels_last: on (UNet, ControlNet, VAE)" in lines
    # channels_last changes the memory layout, not the math: the same losses and gradients, up
    # to the order of floating-point sums in the convolution kernels. (Not the weights: AdamW's
    # first steps move each weight by about lr * sign(grad), so a gradient of ~1e-9 whose sign
    # flips between kernels moves a weight by 2 * lr.)
    assert _curve(tmp_path / "run") == pytest.approx(_curve(eager), rel=1e-4)


def test_regional_compile_trains_the_eager_numbers_and_reports_compile_s(tmp_path, eager, capsys, monkeypatch):
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "aot_eager")
    result, lines = _train(tmp_path / "run", capsys, compile="regional", compile_cache=str(tmp_path / "cache"))
    assert result.steps == 2
    compile_line = next(line for line in lines if line.startswith("speed: compile:"))
    assert "regional (8 blocks" in compile_line and str(tmp_path / "cache") in compile_line
    assert any(line.startswith("speed: compile check: compiled and eager gradients agree") for line in lines), lines
    rows = metrics_rows(tmp_path / "run")
    assert _curve(tmp_path / "run") == pytest.approx(_curve(eager), rel=1e-4)
    # Compiled in place: the saved ControlNet has the eager run's tensor names (no `_orig_mod.`).
    assert controlnet_weights(tmp_path / "run/controlnet").keys() == controlnet_weights(eager / "controlnet").keys()
    assert [r["compile_s"] for r in rows if "compile_s" in r] == [pytest.approx(rows[-1]["compile_s"])]
    assert rows[-1]["compile_s"] > 0.5  # tracing 8 blocks (fwd + bwd) costs seconds; an eager step does not
    assert "TORCHINDUCTOR_CACHE_DIR" not in os.environ or os.environ["TORCHINDUCTOR_CACHE_DIR"] != str(
        tmp_path / "cache"
    )


def _no_gradients(gm, example_inputs):
    """A dynamo backend with a silent bug: right forward, no gradients."""

    def run(*args):
        with torch.no_grad():
            return gm(*args)

    return run


def test_a_compiler_that_breaks_gradients_is_caught_and_the_run_trains_eagerly(tmp_path, eager, capsys, monkeypatch):
    """This torch's CPU inductor returns zero input gradients from the frozen UNet's up block with an
    upsampler (its forward is right): the first step's check compares compiled and eager gradients,
    turns compile off for the run with one line, and the run trains the eager numbers."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", _no_gradients)
    result, lines = _train(tmp_path / "run", capsys, compile="regional")
    assert result.steps == 2
    off = [line for line in lines if "OFF for this run" in line]
    assert len(off) == 1 and "gradients disagree with eager ones (cosine 0.0000" in off[0], lines
    assert _curve(tmp_path / "run") == pytest.approx(_curve(eager), rel=1e-4)
    calls = []  # after the run, compiled code runs again: its "force eager" ended with it
    torch.compile(lambda x: x + 1, backend=lambda gm, inputs: calls.append(1) or gm.forward)(torch.ones(1))
    assert calls


@pytest.mark.skipif(os.environ.get("CTRLNET_INDUCTOR_TEST") != "1", reason="inductor: minutes on the CPU")
def test_regional_compile_with_inductor(tmp_path, eager, capsys, monkeypatch):
    """Inductor itself (~3 min here, cold). On this torch's CPU build it computes wrong gradients
    through the frozen UNet's up block (see above): the check turns compile off and the run still
    trains the eager numbers."""
    monkeypatch.setattr(speed, "COMPILE_BACKEND", "inductor")
    result, lines = _train(tmp_path / "run", capsys, compile="regional")
    assert result.steps == 2
    assert any(line.startswith(("speed: compile check:", "speed: compile: OFF for this run")) for line in lines)
    assert _curve(tmp_path / "run") == pytest.approx(_curve(eager), rel=1e-3)


def test_regional_and_full_compile_select_the_blocks(tiny_models, monkeypatch):
    cfg, models = tiny_models(compile="regional")
    names = [name for name, _ in speed.compile_targets(models, "regional")]
    assert names == [
        "unet.down_blocks.0",
        "unet.down_blocks.1",
        "unet.mid_block",
        "unet.up_blocks.0",
        "unet.up_blocks.1",
        "controlnet.down_blocks.0",
        "controlnet.down_blocks.1",
        "controlnet.mid_block",
    ]
    assert [n for n, _ in speed.compile_targets(models, "full")] == ["unet", "controlnet"]
    assert speed.compile_targets(models, "off") == []
    assert [n for n, _ in speed.compile_targets(models, "regional", controlnet=False)] == names[:5]
    # Applying it marks exactly those modules compiled (compilation itself waits for the first call).
    monkeypatch.setattr(speed, "compile_blocker", lambda device: None)
    lines = speed.apply_speed_settings(models, cfg, CPU)
    assert any(line.startswith("compile: regional (8 blocks") for line in lines), lines
    blocks = {id(m) for _, m in speed.compile_targets(models, "regional")}
    compiled = {id(m) for m in [*models.unet.modules(), *models.controlnet.modules()] if _compiled(m)}
    assert compiled == blocks
    assert "down_blocks.0.resnets.0.conv1.weight" in models.controlnet.state_dict()  # keys unchanged


def test_compile_without_a_compiler_falls_back_with_one_line(tiny_models, monkeypatch):
    cfg, models = tiny_models(compile="full")
    monkeypatch.setattr(speed.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert "no C++ compiler" in speed.compile_blocker(CPU)
    lines = speed.apply_speed_settings(models, cfg, CPU)
    assert [line for line in lines if "compile" in line] == [
        "loop.compile=full: off - no C++ compiler (inductor builds CPU kernels with g++ or clang++): "
        "install g++; training goes on eagerly"
    ]
    assert not any(_compiled(m) for m in [*models.unet.modules(), *models.controlnet.modules()])


def test_compile_cache_folder_defaults_into_the_model_cache(tmp_path):
    base = small_config_dict(tmp_path / "run")
    cfg = TrainConfig.model_validate({**base, "model": {"cache_dir": "/cache"}})
    assert speed.compile_cache_dir(cfg) == "/cache/torch-compile"
    cfg = TrainConfig.model_validate({**base, "model": {"cache_dir": "/cache"}, "loop": {"compile_cache": "/cc"}})
    assert speed.compile_cache_dir(cfg) == "/cc"
    assert speed.compile_cache_dir(TrainConfig.model_validate(base)) is None
    with pytest.raises(ValueError, match="must be a local folder"):
        TrainConfig.model_validate({**base, "loop": {"compile_cache": "s3://bucket/cc"}})
    # While a compiled run trains, inductor's cache is there; after it, as it was.
    cfg = TrainConfig.model_validate({**base, "loop": {"compile": "regional", "compile_cache": str(tmp_path / "cc")}})
    before = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    with speed.process_settings(cfg, CPU):
        assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(tmp_path / "cc")
        assert torch._dynamo.config.recompile_limit == speed.RECOMPILE_LIMIT
    assert os.environ.get("TORCHINDUCTOR_CACHE_DIR") == before and torch._dynamo.config.recompile_limit == 8


# ------------------------------------------------------------------ fp8 where it could run
def test_fp8_converts_the_aligned_linear_layers_of_the_chosen_model(tiny_models, monkeypatch):
    """What loop.fp8 does on a GPU that has FP8, minus the GPU: which layers torchao swaps."""
    pytest.importorskip("torchao")
    cfg, models = tiny_models(fp8="unet")
    monkeypatch.setattr(speed, "fp8_blocker", lambda device: None)
    linears = [m for m in models.unet.modules() if isinstance(m, torch.nn.Linear)]
    aligned = [m for n, m in models.unet.named_modules() if speed.fp8_filter(m, n)]
    assert aligned and all(".attentions." in f".{n}." for n, m in models.unet.named_modules() if m in aligned)
    assert not speed.fp8_filter(models.unet.time_embedding.linear_1, "time_embedding.linear_1")
    lines = speed.apply_speed_settings(models, cfg, CPU)
    assert f"fp8: unet - {len(aligned)} of {len(linears)} Linear layers run FP8 matmuls (torchao float8)" in lines
    assert "loop.fp8 without loop.compile: FP8 casts run eagerly and are usually slower than bf16" in lines
    assert sum(type(m).__name__ == "Float8Linear" for m in models.unet.modules()) == len(aligned) > 0
    assert not any(type(m).__name__ == "Float8Linear" for m in models.controlnet.modules())
    assert all(not p.requires_grad for p in models.unet.parameters())  # still frozen


def test_fp8_without_torchao_names_the_install(tiny_models, monkeypatch):
    import sys

    from ctrlnet.errors import UserError

    cfg, models = tiny_models(fp8="controlnet")
    monkeypatch.setattr(speed, "fp8_blocker", lambda device: None)
    monkeypatch.setitem(sys.modules, "torchao.float8", None)  # import fails as if not installed
    with pytest.raises(UserError, match=r"loop.fp8 needs torchao: pip install 'ctrlnet\[fp8\]'"):
        speed.apply_speed_settings(models, cfg, CPU)


# ------------------------------------------------------------------ no autograd for frozen weights
def test_frozen_models_build_no_autograd_graph(tiny_models):
    from ctrlnet_trainer import data
    from ctrlnet_trainer.step import OnlineEncoder, controlnet_loss, draw

    cfg, models = tiny_models()
    frozen = [*models.unet.parameters(), *models.vae.parameters(), *models.text_encoder.parameters()]
    assert frozen and not any(p.requires_grad for p in frozen)
    source = data.Source(data.SyntheticFillSource(4, cfg.data.resolution, 0), None)
    examples = data.Examples.of(source, cfg.data, models, 0)
    batch = data.collate([examples[(i, 0)] for i in range(2)])
    encoder = OnlineEncoder(models, torch.float32, CPU)
    draws = draw(batch["sample_id"], 0, encoder.latent_shape(batch), 1000, 0.0, models=models)
    latents, text, cond = encoder.encode(batch, draws)
    assert latents.grad_fn is None and text.hidden.grad_fn is None  # the encoders ran under no_grad
    loss = controlnet_loss(models, models.controlnet, latents, text, cond, draws, None)
    loss.backward()
    assert all(p.grad is None for p in frozen)
    assert any(p.grad is not None for p in models.controlnet.parameters())


# ------------------------------------------------------------------ metrics
def test_metrics_time_the_steps_and_the_waits_for_data(eager):
    rows = metrics_rows(eager)
    assert [r["step"] for r in rows] == [1, 2]
    for r in rows:
        assert r["step_s"] > 0 and r["data_wait_s"] >= 0
        assert r["data_wait_s"] <= r["step_s"]
    assert "compile_s" not in rows[0] and rows[1]["compile_s"] >= 0  # once, when a later step exists
    assert all("peak_memory_gib" not in r for r in rows)  # CUDA only
