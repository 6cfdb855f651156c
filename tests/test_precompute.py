"""`ctrlnet precompute` and training from its cache (data.cache): the cached run trains on the same
rows, captions and draws as online encoding, resumes exactly, refuses a cache of another config,
and an interrupted or multi-process precompute yields exactly the cache a single one does.

One cache per module (tiny base folder, a parquet whose rows hold 1-3 captions, 32 px): 10 rows,
max_train_samples 8 (so the seed picks the rows), shards of 3 rows."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from testkit.cli import assert_user_error
from testkit.training import max_weight_diff, metrics_rows, small_config, small_config_dict

CTRLNET = Path(sys.executable).parent / "ctrlnet"
SHARD_ROWS = 3


@pytest.fixture(scope="module")
def parquet_with_caption_lists(tmp_path_factory):
    """Rows holding one to three captions: the per-epoch caption choice is part of what's cached."""
    from datasets import Dataset, Features, Sequence, Value
    from datasets import Image as ImageFeature

    from ctrlnet_trainer.synthetic import fill_example

    rows = [fill_example(i, 32, 0) for i in range(10)]
    captions = [[r["text"], f"{r['text']}, flat", f"a {r['text']}"][: 1 + i % 3] for i, r in enumerate(rows)]
    features = Features(
        {"image": ImageFeature(), "conditioning_image": ImageFeature(), "text": Sequence(Value("string"))}
    )
    columns = {
        "image": [r["image"] for r in rows],
        "conditioning_image": [r["conditioning_image"] for r in rows],
        "text": captions,
    }
    folder = tmp_path_factory.mktemp("captions")
    Dataset.from_dict(columns, features=features).to_parquet(str(folder / "train.parquet"))
    return folder


@pytest.fixture(scope="module")
def sections(parquet_with_caption_lists, tiny_base_dir, tmp_path_factory):
    from ctrlnet_trainer.synthetic import fill_example

    condition = tmp_path_factory.mktemp("validation") / "cond.png"
    fill_example(100, 32, 0)["conditioning_image"].save(condition)
    return {
        "model": {"base": str(tiny_base_dir), "cache_dir": str(tmp_path_factory.mktemp("hf-cache"))},
        "data": {
            "dataset": str(parquet_with_caption_lists),
            "resolution": 32,
            "max_train_samples": 8,
            "proportion_empty_prompts": 0.3,
            "cache": str(tmp_path_factory.mktemp("caches") / "main"),
        },
        # 8 rows / batch 4 = 2 steps an epoch: 4 steps cross into epoch 1 (another caption per row).
        "loop": {"seed": 3, "batch_size": 4, "max_steps": 4},
        "checkpoint": {"every_steps": 2},
        # Once, at the end: the prompt was encoded at the start, before the text encoder was dropped.
        "validation": {"prompts": ["red circle on blue"], "images": [str(condition)], "every_steps": 1000},
    }


@pytest.fixture(scope="module")
def cache_dir(sections, tmp_path_factory):
    from ctrlnet_trainer.cache.job import precompute

    result = precompute(small_config(tmp_path_factory.mktemp("unused"), **sections), SHARD_ROWS)
    assert (result.rows, result.shards, result.encoded) == (8, 3, 3)
    return Path(sections["data"]["cache"])


def with_cache(sections: dict, cache: Path | None) -> dict:
    return {**sections, "data": {**sections["data"], "cache": None if cache is None else str(cache)}}


def shard_files(cache: Path) -> dict[str, tuple[bytes, int]]:
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted((cache / "shards").iterdir())}


# ------------------------------------------------------------------ training from the cache
@pytest.fixture(scope="module")
def cached_run(cache_dir, sections, tmp_path_factory):
    from ctrlnet_trainer.run import train

    out = tmp_path_factory.mktemp("cached") / "run"
    result = train(small_config(out, **sections))
    assert result.steps == 4 and result.samples.endswith("samples/step-4.png")
    return out


def test_the_cache_holds_what_online_encoding_computes(cache_dir, sections, tmp_path):
    """Batch for batch, CachedEncoder gives OnlineEncoder's latents (the same latent_eps) and text
    embeddings, with the same caption drawn per epoch and the same empty-prompt dropout."""
    from ctrlnet_trainer import data
    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.cache.reader import CachedEncoder, CachedExamples, CacheReader, read_manifest
    from ctrlnet_trainer.step import OnlineEncoder, draw
    from ctrlnet_trainer.storage import Prefix

    cfg = small_config(tmp_path, **sections)
    models = model_lib.load_models(cfg, 3)
    online = OnlineEncoder(models, torch.float32, torch.device("cpu"))
    examples = data.Examples.of(data.training_rows(cfg.data, cfg.model.cache_dir, 3), cfg.data, models, 3)
    reader = CacheReader(Prefix(str(cache_dir)), read_manifest(str(cache_dir)))
    encoder = CachedEncoder(models.vae.config.scaling_factor, reader.empty_prompt(), torch.float32, torch.device("cpu"))
    dropped = 0
    for epoch in (0, 1, 2):
        keys = [(i, epoch) for i in range(8)]
        a = data.collate([examples[k] for k in keys])
        b = data.collate([CachedExamples(reader, 3)[k] for k in keys])
        assert torch.equal(a["conditioning_pixel_values"], b["conditioning_pixel_values"])
        draws = draw(a["sample_id"], 3, online.latent_shape(a), 1000, 0.3, models=models)
        dropped += int(draws.drop_prompt.sum())
        (la, ta, ca), (lb, tb, cb) = online.encode(a, draws), encoder.encode(b, draws)
        assert (la - lb).abs().max() <= 1e-5 and (ta.hidden - tb.hidden).abs().max() <= 1e-5
        assert torch.equal(ca, cb)
    assert dropped > 0  # the stored "" embedding was used

    # A cached run takes the encoders off before the models move to the device.
    from types import SimpleNamespace

    from ctrlnet_trainer.accel import Ranks
    from ctrlnet_trainer.cache.reader import CachedRun

    run = CachedRun.open(cfg, 3, models, torch.float32, Ranks(0, 1, 0), SimpleNamespace(wait_for_everyone=lambda: None))
    assert models.text_encoder is None and models.vae.encoder is None and models.vae.decoder is not None
    assert list(run.prompts.by_prompt) == ["red circle on blue"] and len(run.examples) == 8


def test_cached_training_matches_online_training(cached_run, sections, tmp_path):
    from ctrlnet_trainer.run import train

    online = tmp_path / "online"
    train(small_config(online, **with_cache(sections, None)))
    cached_loss, online_loss = [r["loss"] for r in metrics_rows(cached_run)], [r["loss"] for r in metrics_rows(online)]
    assert len(cached_loss) == 4
    # Same rows, captions, latents and noise; the steps differ only by float rounding (the VAE
    # hands its latents over in another memory layout than the cache), which Adam's first steps
    # magnify in the weights, not in the loss.
    assert cached_loss == pytest.approx(online_loss, rel=1e-4)
    assert max_weight_diff(cached_run / "controlnet", online / "controlnet") < 4e-3  # lr 1e-3 x 4 steps


def test_cached_run_resumes_exactly(cached_run, sections, tmp_path):
    from ctrlnet_trainer.run import train

    checkpoint = cached_run / "checkpoints" / "step-00000002"  # the end of epoch 0
    resumed = tmp_path / "resumed"
    train(small_config(resumed, **{**sections, "checkpoint": {"every_steps": 2, "resume": str(checkpoint)}}))
    assert max_weight_diff(cached_run / "controlnet", resumed / "controlnet") <= 1e-6
    assert [r["loss"] for r in metrics_rows(resumed)] == pytest.approx(
        [r["loss"] for r in metrics_rows(cached_run)][2:], rel=1e-6
    )


def test_a_cache_of_another_config_is_refused_before_training(cache_dir, sections, tmp_path):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    other = {**sections, "data": {**sections["data"], "resolution": 64}, "loop": {**sections["loop"], "seed": 4}}
    with pytest.raises(UserError) as e:
        train(small_config(out, **other))
    message = str(e.value)
    assert "\n" not in message and "resolution (cache 32, this run 64)" in message and "seed (cache 3" in message
    assert "base" not in message.split("differs:")[1]  # only what differs is named
    assert not out.exists() or not any(out.iterdir())  # nothing trained, the output not claimed

    with pytest.raises(UserError, match=r"ctrlnet precompute -f"):
        train(small_config(tmp_path / "run2", **with_cache(sections, tmp_path / "no-cache")))


# ------------------------------------------------------------------ precompute: restart, processes
def test_interrupted_precompute_redoes_only_its_unfinished_shards(cache_dir, sections, tmp_path, monkeypatch):
    from ctrlnet_trainer.cache import job

    cache = tmp_path / "cache"
    cfg = small_config(tmp_path / "unused", **with_cache(sections, cache))
    encode_shard, calls = job.RowEncoder.encode_shard, []

    def dies_at_the_third_shard(self, rows):
        calls.append(rows[0]["index"])
        if len(calls) == 3:
            raise RuntimeError("killed")
        return encode_shard(self, rows)

    monkeypatch.setattr(job.RowEncoder, "encode_shard", dies_at_the_third_shard)
    with pytest.raises(RuntimeError):
        job.precompute(cfg, SHARD_ROWS)
    assert not (cache / "cache.json").exists()
    before = shard_files(cache)
    assert sorted(before) == [
        "shard-00000.json",
        "shard-00000.safetensors",
        "shard-00001.json",
        "shard-00001.safetensors",
    ]

    monkeypatch.setattr(job.RowEncoder, "encode_shard", encode_shard)
    assert job.precompute(cfg, SHARD_ROWS).encoded == 1  # the third shard only
    after = shard_files(cache)
    assert {name: after[name] for name in before} == before  # the finished shards untouched
    reference = shard_files(cache_dir)
    for name in after:
        if name.endswith(".safetensors"):
            assert after[name][0] == reference[name][0], name  # byte-identical to an uninterrupted run
    manifest = json.loads((cache / "cache.json").read_text())
    assert [s["sha256"] for s in manifest["shards"]] == [
        s["sha256"] for s in json.loads((cache_dir / "cache.json").read_text())["shards"]
    ]

    again = job.precompute(cfg, SHARD_ROWS)  # finished: nothing to do
    assert again.encoded == 0 and shard_files(cache) == after

    other = small_config(tmp_path / "unused", **{**with_cache(sections, cache), "loop": {"seed": 9}})
    with pytest.raises(job.UserError, match=r"holds a cache of another config; differs: seed \(cache 3, this run 9\)"):
        job.precompute(other, SHARD_ROWS)


@pytest.fixture(scope="module")
def ctrlnet(tmp_path_factory):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cwd = tmp_path_factory.mktemp("cli")

    def run(*args, timeout=240):
        return subprocess.run(
            [str(CTRLNET), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
        )

    return run


def job_file(path: Path, train: dict) -> Path:
    path.write_text(yaml.safe_dump({"train": train}))
    return path


def test_two_processes_encode_every_row_exactly_once(cache_dir, sections, tmp_path, ctrlnet):
    from safetensors.torch import load_file

    cache = tmp_path / "cache"
    job = job_file(tmp_path / "job.yaml", small_config_dict(tmp_path / "out", **with_cache(sections, cache)))
    proc = ctrlnet("precompute", "-f", job, "--nproc", 2, "--shard-rows", SHARD_ROWS)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"cache:   {cache}" in proc.stdout and "rows:    8" in proc.stdout and "shards:  3" in proc.stdout
    manifest = json.loads((cache / "cache.json").read_text())
    spans = [(s["first_row"], s["rows"]) for s in manifest["shards"]]
    assert spans == [(0, 3), (3, 3), (6, 2)]  # every row once: no gap, no overlap
    assert [s["rank"] for s in manifest["shards"]] == [0, 1, 0]  # shard i on rank i % 2
    for name in ("shard-00000", "shard-00001", "shard-00002"):
        a, b = (
            load_file(cache / "shards" / f"{name}.safetensors"),
            load_file(cache_dir / "shards" / f"{name}.safetensors"),
        )
        assert a.keys() == b.keys()
        for key in a:  # one thread per process here: the same values up to float rounding
            assert torch.allclose(a[key].float(), b[key].float(), atol=1e-5), (name, key)


def test_precompute_bad_input_is_one_error_line(ctrlnet, tmp_path, sections):
    job = job_file(tmp_path / "job.yaml", small_config_dict(tmp_path / "out", **with_cache(sections, None)))
    assert_user_error(ctrlnet("precompute", "-f", job), "train.data.cache is not set")
    assert_user_error(ctrlnet("precompute", "-f", tmp_path / "missing.yaml"), "missing.yaml")
    streaming = ("--set", "train.data.streaming=true", "--set", "train.data.cache=/tmp/x")
    assert_user_error(ctrlnet("precompute", "-f", job, *streaming), "data.streaming")
