"""The precompute cache for the flow families (SD3, Flux.1): it holds their text conditioning
(hidden states and pooled text per caption) and the condition's VAE posterior, and a cached run
computes exactly the latents, Conditioning and ControlNet input online encoding does, trains to
the same losses, and refuses a cache of another family or T5 length in one line.

One cache per family (its tiny base folder, synthetic rows at 32 px, T5 length 16)."""

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from testkit.training import metrics_rows, small_config

T5_LENGTH = 16


@pytest.fixture(scope="module", params=["sd3", "flux"])
def family(request):
    return request.param


@pytest.fixture(scope="module")
def sections(family, request, tmp_path_factory):
    base = request.getfixturevalue(f"tiny_{family}_dir")
    return {
        "model": {"base": str(base), "max_sequence_length": T5_LENGTH},
        "data": {
            "synthetic_rows": 8,
            "resolution": 32,
            "proportion_empty_prompts": 0.4,
            "cache": str(tmp_path_factory.mktemp(f"cache-{family}") / "cache"),
        },
        "loop": {"seed": 5, "batch_size": 4, "max_steps": 3},
        # once, at the end: the pipeline samples from the prompts encoded before the encoders went
        "validation": {"every_steps": 1000},
    }


@pytest.fixture(scope="module")
def cache_dir(sections, tmp_path_factory):
    from ctrlnet_trainer.cache.job import precompute

    result = precompute(small_config(tmp_path_factory.mktemp("unused"), **sections), 3)
    assert (result.rows, result.shards) == (8, 3)
    return Path(sections["data"]["cache"])


def with_cache(sections: dict, cache) -> dict:
    return {**sections, "data": {**sections["data"], "cache": None if cache is None else str(cache)}}


def test_the_cache_holds_the_flow_families_inputs(cache_dir, sections, family, tmp_path):
    """Batch for batch, CachedEncoder gives OnlineEncoder's latents, Conditioning (hidden and
    pooled text, with prompt dropping) and ControlNet input (the condition's latents) for the same
    draws; a union ControlNet's per-row control_mode reaches the Conditioning from the batch."""
    from ctrlnet_trainer import data
    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.accel import Ranks
    from ctrlnet_trainer.cache.reader import CachedExamples, CachedRun, CacheReader, read_manifest
    from ctrlnet_trainer.step import OnlineEncoder, draw
    from ctrlnet_trainer.storage import Prefix

    cfg = small_config(tmp_path, **sections)
    models = model_lib.load_models(cfg, 5)
    online = OnlineEncoder(models, torch.float32, torch.device("cpu"))
    examples = data.Examples.of(data.training_rows(cfg.data, cfg.model.cache_dir, 5), cfg.data, models, 5)
    reader = CacheReader(Prefix(str(cache_dir)), read_manifest(str(cache_dir)))
    row = reader.row(0)
    assert {"text.pooled_projections", "control_mean", "control_logvar"} <= row.keys()
    assert row["text"].shape[1] == T5_LENGTH + (77 if family == "sd3" else 0)  # SD3: the CLIP tokens first
    from ctrlnet_trainer.cache.reader import CachedEncoder

    encoder = CachedEncoder(
        models.vae.config.scaling_factor,
        reader.empty_text(),
        torch.float32,
        torch.device("cpu"),
        models,
        models.vae.config,
    )
    dropped = 0
    for epoch in (0, 1):
        keys = [(i, epoch) for i in range(8)]
        a = data.collate([examples[k] for k in keys])
        b = data.collate([CachedExamples(reader, 5)[k] for k in keys])
        if family == "flux":  # a union ControlNet's condition type per row comes from the data
            a["control_mode"] = b["control_mode"] = torch.arange(8) % 2
        draws = draw(a["sample_id"], 5, online.latent_shape(a), 1000, 0.4, models=models)
        assert draws.control_eps is not None
        dropped += int(draws.drop_prompt.sum())
        (la, ta, ca), (lb, tb, cb) = online.encode(a, draws), encoder.encode(b, draws)
        assert (la - lb).abs().max() <= 1e-5 and (ca - cb).abs().max() <= 1e-5
        assert ca.shape == la.shape  # the condition as latents
        assert (ta.hidden - tb.hidden).abs().max() <= 1e-5
        assert ta.added.keys() == tb.added.keys()
        for key in ta.added:
            assert (ta.added[key].float() - tb.added[key].float()).abs().max() <= 1e-5, key
    assert dropped > 0  # the stored "" tensors were used

    run = CachedRun.open(cfg, 5, models, torch.float32, Ranks(0, 1, 0), SimpleNamespace(wait_for_everyone=lambda: None))
    assert all(models.text[name] is None for name in models.family.text_components)
    batch = run.prompts.pipeline_batch(list(run.prompts.by_prompt), torch.device("cpu"), torch.float32)
    wanted = {"prompt_embeds", "pooled_prompt_embeds"}
    if family == "sd3":  # classifier-free guidance: the negative ones too
        wanted |= {"negative_prompt_embeds", "negative_pooled_prompt_embeds"}
    assert batch.keys() == wanted


def test_cached_training_matches_online_training(cache_dir, sections, tmp_path):
    from ctrlnet_trainer.run import train

    cached, online = tmp_path / "cached", tmp_path / "online"
    result = train(small_config(cached, **sections))
    assert result.samples.endswith("samples/step-3.png")  # validation from the encoded prompts
    train(small_config(online, **with_cache(sections, None)))
    cached_loss, online_loss = [r["loss"] for r in metrics_rows(cached)], [r["loss"] for r in metrics_rows(online)]
    assert len(cached_loss) == 3
    assert cached_loss == pytest.approx(online_loss, rel=1e-4)


def test_a_cache_of_another_family_or_t5_length_is_refused(cache_dir, sections, family, tmp_path, request):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    longer = {**sections, "model": {**sections["model"], "max_sequence_length": T5_LENGTH + 8}}
    with pytest.raises(UserError) as e:
        train(small_config(tmp_path / "run", **longer))
    message = str(e.value)
    assert "\n" not in message
    assert f"max_sequence_length (cache {T5_LENGTH}, this run {T5_LENGTH + 8})" in message.split("differs:")[1]

    other = "flux" if family == "sd3" else "sd3"
    base = request.getfixturevalue(f"tiny_{other}_dir")
    elsewhere = {**sections, "model": {**sections["model"], "base": str(base)}}
    with pytest.raises(UserError) as e:
        train(small_config(tmp_path / "run2", **elsewhere))
    message = str(e.value)
    assert "\n" not in message and f'family (cache "{family}", this run "{other}")' in message

    # the in-code tiny bases of another family are told apart too (their identity names the arch)
    from ctrlnet_trainer.cache import layout
    from ctrlnet_trainer.models.families import family_named as by_name

    assert layout.base_identity(None, None, None, 5, family=by_name(family)) != layout.base_identity(
        None, None, None, 5, family=by_name(other)
    )


def test_a_union_controlnets_condition_types_are_cached(tiny_flux_dir, tmp_path):
    """data.control_mode_column: each row's condition type (a name of model.control_modes or its
    index) is cached per row and reaches the Conditioning from the batch, not from text."""
    import json

    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.cache.job import precompute
    from ctrlnet_trainer.cache.reader import CachedExamples, CacheReader, read_manifest
    from ctrlnet_trainer.data import collate
    from ctrlnet_trainer.run import train
    from ctrlnet_trainer.step import draw
    from ctrlnet_trainer.storage import Prefix
    from ctrlnet_trainer.synthetic import fill_example

    modes = ["canny", "depth"]
    lines = []
    for i in range(4):
        row = fill_example(i, 32, 0)
        row["image"].save(tmp_path / f"{i}.png")
        row["conditioning_image"].save(tmp_path / f"{i}-cond.png")
        mode = modes[i % 2] if i < 2 else i % 2  # by name, or by index
        lines.append({"image": f"{i}.png", "conditioning_image": f"{i}-cond.png", "text": row["text"], "mode": mode})
    (tmp_path / "rows.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    cache = tmp_path / "cache"
    sections = {
        "model": {"base": str(tiny_flux_dir), "max_sequence_length": T5_LENGTH, "control_modes": modes},
        "data": {
            "dataset": str(tmp_path / "rows.jsonl"),
            "control_mode_column": "mode",
            "resolution": 32,
            "cache": str(cache),
        },
        "loop": {"seed": 5, "batch_size": 4, "max_steps": 1},
    }
    precompute(small_config(tmp_path / "unused", **sections))
    reader = CacheReader(Prefix(str(cache)), read_manifest(str(cache)))
    batch = collate([CachedExamples(reader, 5)[(i, 0)] for i in range(4)])
    assert batch["control_mode"].tolist() == [0, 1, 0, 1]

    from ctrlnet_trainer.accel import Ranks
    from ctrlnet_trainer.cache.reader import CachedRun

    cfg = small_config(tmp_path / "run", **sections)
    models = model_lib.load_models(cfg, 5)
    run = CachedRun.open(cfg, 5, models, torch.float32, Ranks(0, 1, 0), SimpleNamespace(wait_for_everyone=lambda: None))
    encoder = run.encoder(torch.float32, torch.device("cpu"))
    draws = draw(batch["sample_id"], 5, encoder.latent_shape(batch), 1000, 0.0, models=models)
    _, text, _ = encoder.encode(batch, draws)
    assert text.added["control_mode"].tolist() == [[0], [1], [0], [1]]

    assert train(small_config(tmp_path / "trained", **sections)).steps == 1  # a union ControlNet trains from it


def test_the_precompute_runs_the_vae_as_training_does_under_upcast_vae(make_cfg, tmp_path):
    """model.upcast_vae keeps the VAE in fp32 under bf16 in the precompute as in training (the cached
    latents are the ones a run computes), and names itself in the cache's fingerprint."""
    from ctrlnet_trainer.cache.encode import load_encoders, prepare_encoders
    from ctrlnet_trainer.cache.layout import build_fingerprint

    prints = []
    for upcast in (False, True):
        cfg = make_cfg(tmp_path, model={"family": "flux", "upcast_vae": upcast}, data={"resolution": 32})
        base = load_encoders(cfg, 0)
        prepare_encoders(cfg, torch.device("cpu"), torch.bfloat16, base)
        assert base.vae.dtype == (torch.float32 if upcast else torch.bfloat16)
        prints.append(
            build_fingerprint(cfg, 0, base.family, rows=4, scaling_factor=1.0, max_length=8, dtype=torch.bfloat16)
        )
    assert "upcast_vae" not in prints[0] and prints[1]["upcast_vae"] is True
