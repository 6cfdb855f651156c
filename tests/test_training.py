"""The trainer end to end on CPU: it learns, its output loads in diffusers, checkpoints rotate and
resume exactly (also after a real SIGTERM), and each training option runs.

Tiny random-init base built in code, synthetic fill50k look-alike data, 32-64 px."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from PIL import Image

from testkit.training import controlnet_weights, max_weight_diff, metrics_rows, small_config_dict

pytestmark = pytest.mark.slow

CPU = torch.device("cpu")


def is_png(path: Path) -> bool:
    with Image.open(path) as img:
        img.verify()
        return img.format == "PNG"


def zero_conv_norm(folder) -> float:
    """Total |weight| of the zero convolutions (exactly 0 before training)."""
    weights = controlnet_weights(folder)
    return sum(
        v.abs().sum().item()
        for k, v in weights.items()
        if k.startswith(("controlnet_down_blocks.", "controlnet_mid_block."))
    )


# ------------------------------------------------------------------ it learns
LEARN_STEPS = 150


@pytest.fixture(scope="module")
def learned(tmp_path_factory, make_cfg):
    from ctrlnet_trainer.run import train

    out = tmp_path_factory.mktemp("learn") / "run"
    cfg = make_cfg(
        out,
        data={"synthetic_rows": 600, "resolution": 64},
        optim={"learning_rate": 1e-3, "lr_scheduler": "constant_with_warmup", "lr_warmup_steps": 10},
        loop={"batch_size": 4, "max_steps": LEARN_STEPS},
        validation={"every_steps": 75},
        logging={"report_to": "tensorboard"},
    )
    return cfg, train(cfg)


def heldout_batches(cfg, models, rows=32, batch=8):
    """Synthetic rows past `synthetic_rows`: never trained on."""
    from ctrlnet_trainer import data

    first = cfg.data.synthetic_rows + 100
    source = data.Source(data.SyntheticFillSource(first + rows, cfg.data.resolution, cfg.loop.seed), None)
    examples = data.Examples.of(source, cfg.data, models, cfg.loop.seed)
    return [data.collate([examples[(first + b + i, 0)] for i in range(batch)]) for b in range(0, rows, batch)]


def test_trained_controlnet_beats_the_zero_controlnet_on_heldout_rows(learned):
    from diffusers import ControlNetModel

    from ctrlnet_trainer import models as model_lib
    from ctrlnet_trainer.validation import heldout_loss

    cfg, result = learned
    models = model_lib.load_models(cfg, cfg.loop.seed)  # the same in-code base the run trained on
    model_lib.prepare_for_training(models, cfg, CPU, torch.float32)
    batches = heldout_batches(cfg, models)

    zero = ControlNetModel.from_unet(models.unet)  # zero convs: the base UNet alone
    trained = ControlNetModel.from_pretrained(result.controlnet)
    baseline = heldout_loss(models, zero, batches, torch.float32, CPU)
    loss = heldout_loss(models, trained, batches, torch.float32, CPU)
    assert math.isfinite(loss) and math.isfinite(baseline)
    # ~0.45x here; 0.8x leaves room for BLAS differences while still meaning "it learned".
    assert loss < 0.8 * baseline, f"held-out loss {loss:.4f} vs zero-ControlNet {baseline:.4f}"


def test_metrics_have_one_row_per_step(learned):
    cfg, result = learned
    assert result.steps == LEARN_STEPS
    rows = metrics_rows(cfg.output)
    assert [r["step"] for r in rows] == list(range(1, LEARN_STEPS + 1))
    for r in rows:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert r["lr"] > 0 and math.isfinite(r["grad_norm"]) and r["samples_per_s"] > 0
    assert rows[0]["lr"] < rows[-1]["lr"] == pytest.approx(1e-3)  # warmup, then constant
    first, last = [sum(r["loss"] for r in part) / 20 for part in (rows[:20], rows[-20:])]
    assert last < first


def test_loss_curve_and_samples_are_pngs(learned):
    cfg, result = learned
    out = Path(cfg.output)
    assert result.loss_curve == str(out / "loss.png") and is_png(out / "loss.png")
    assert result.samples == str(out / "samples" / f"step-{LEARN_STEPS}.png")
    for step in (75, LEARN_STEPS):
        path = out / "samples" / f"step-{step}.png"
        assert is_png(path)
        with Image.open(path) as img:  # two rows (held-out pairs) x (condition + 1 sample) of 64 px
            assert img.size == (2 * 64, 2 * 64)
    assert result.metrics == str(out / "metrics.jsonl")
    assert json.loads((out / "run.json").read_text())["seed"] == 0


def test_tensorboard_event_file_is_written(learned):
    cfg, _ = learned
    events = list((Path(cfg.output) / "logs").rglob("events.out.tfevents.*"))
    assert events and all(e.stat().st_size > 0 for e in events)


def test_saved_controlnet_generates_in_the_stock_diffusers_pipeline(learned, tiny_base_dir):
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline, UNet2DConditionModel

    from ctrlnet_trainer.synthetic import fill_example

    cfg, _ = learned
    controlnet_dir = Path(cfg.output) / "controlnet"
    assert {"config.json", "diffusion_pytorch_model.safetensors"} <= {p.name for p in controlnet_dir.iterdir()}
    row = fill_example(cfg.data.synthetic_rows + 7, 64, 0)

    def render(controlnet):
        pipe = StableDiffusionControlNetPipeline.from_pretrained(
            tiny_base_dir, controlnet=controlnet, safety_checker=None
        )
        pipe.set_progress_bar_config(disable=True)
        return pipe(
            row["text"],
            image=row["conditioning_image"],
            num_inference_steps=2,
            generator=torch.Generator().manual_seed(0),
            output_type="np",
        ).images[0]

    trained = render(ControlNetModel.from_pretrained(controlnet_dir))
    assert trained.shape == (64, 64, 3) and trained.std() > 0
    # The trained ControlNet steers the base: same seed, different image than with zero residuals.
    zero = render(ControlNetModel.from_unet(UNet2DConditionModel.from_pretrained(tiny_base_dir, subfolder="unet")))
    assert abs(trained - zero).max() > 1e-3


# ------------------------------------------------------------------ checkpoints
def checkpoint_dirs(output) -> list[str]:
    return sorted(p.name for p in (Path(output) / "checkpoints").iterdir() if p.name.startswith("step-"))


def test_checkpoint_rotation_and_uncommitted_folders(tmp_path, make_cfg, capsys):
    from ctrlnet.config.train import CheckpointConfig
    from ctrlnet_trainer.accel import Ranks
    from ctrlnet_trainer.checkpoints import Checkpointer
    from ctrlnet_trainer.run import train
    from ctrlnet_trainer.storage import Prefix

    out = tmp_path / "run"
    train(make_cfg(out, loop={"max_steps": 7}, checkpoint={"every_steps": 2, "total_limit": 2}))
    ckpts = out / "checkpoints"
    assert checkpoint_dirs(out) == ["step-00000004", "step-00000006"]
    for name in checkpoint_dirs(out):
        assert (ckpts / name / "COMMITTED").is_file()
        assert (ckpts / name / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (ckpts / "latest").read_text().strip() == "step-00000006"

    # The run was killed before it finished (a finished run is never resumed: rundir), and a crash
    # in the middle of saving step 9 left a folder without COMMITTED, and a pointer to it.
    (out / "FINISHED").unlink()
    (ckpts / "step-00000009" / "controlnet").mkdir(parents=True)
    (ckpts / "step-00000009" / "controlnet" / "config.json").write_text("{half written")
    (ckpts / "latest").write_text("step-00000009\n")
    store = Checkpointer(Prefix(str(out)), None, Ranks(0, 1, 0), CheckpointConfig(), sharded=False)
    assert store.committed_steps() == [4, 6]
    assert store.resolve("latest") == str(ckpts / "step-00000006")

    capsys.readouterr()
    result = train(
        make_cfg(out, loop={"max_steps": 8}, checkpoint={"every_steps": 2, "total_limit": 2, "resume": "latest"})
    )
    assert "resuming from" in capsys.readouterr().out and result.steps == 8
    # Rotation counted only committed checkpoints: 6 and 8 stay; the broken folder is not a checkpoint.
    assert store.committed_steps() == [6, 8]
    assert (ckpts / "latest").read_text().strip() == "step-00000008"
    assert [r["step"] for r in metrics_rows(out)] == list(range(1, 9))


def test_resume_from_an_uncommitted_path_is_refused(tmp_path, make_cfg):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.run import train

    half = tmp_path / "old" / "checkpoints" / "step-00000002"
    half.mkdir(parents=True)
    with pytest.raises(UserError, match="not a committed checkpoint"):
        train(make_cfg(tmp_path / "new", checkpoint={"resume": str(half)}))


# ------------------------------------------------------------------ resume equivalence
RESUME = {
    "optim": {"lr_scheduler": "cosine", "lr_warmup_steps": 2},
    "loop": {"max_steps": 6, "batch_size": 2, "gradient_accumulation_steps": 2, "snr_gamma": 5.0},
    "checkpoint": {"every_steps": 3},
}


@pytest.fixture(scope="module")
def parquet_data(tmp_path_factory):
    from ctrlnet_trainer.synthetic import write_fill_parquet

    # 16 rows / batch 2 = 8 micro-batches an epoch; 6 steps x 2 micro-batches cross into epoch 1.
    return write_fill_parquet(tmp_path_factory.mktemp("parquet"), rows=16, resolution=32, seed=0)


@pytest.fixture(scope="module")
def resume_sections(parquet_data, tmp_path_factory):
    cache = str(tmp_path_factory.mktemp("hf-cache"))
    return dict(
        RESUME,
        model={"cache_dir": cache},
        data={"dataset": str(parquet_data), "resolution": 32, "num_workers": 0, "proportion_empty_prompts": 0.3},
    )


@pytest.fixture(scope="module")
def straight(tmp_path_factory, make_cfg, resume_sections):
    from ctrlnet_trainer.run import train

    out = tmp_path_factory.mktemp("straight") / "run"
    result = train(make_cfg(out, **resume_sections))
    assert result.steps == 6
    return out


def test_resume_in_a_fresh_output_from_a_checkpoint_path(straight, tmp_path, make_cfg, resume_sections):
    from ctrlnet_trainer.run import train

    ckpt = straight / "checkpoints" / "step-00000003"
    sections = dict(resume_sections, checkpoint={"every_steps": 3, "resume": str(ckpt)})
    result = train(make_cfg(tmp_path / "b", **sections))
    assert result.steps == 6
    assert max_weight_diff(straight / "controlnet", tmp_path / "b" / "controlnet") <= 1e-6
    # The resumed run logs steps 4..6 only, with the straight run's losses.
    resumed, full = metrics_rows(tmp_path / "b"), metrics_rows(straight)
    assert [r["step"] for r in resumed] == [4, 5, 6]
    assert [r["loss"] for r in resumed] == pytest.approx([r["loss"] for r in full[3:]], rel=1e-5)


DRIVER = r'''
"""python -m ctrlnet_trainer, holding still after its first checkpoint until SIGTERM arrives."""
import sys, time
from pathlib import Path
import ctrlnet_trainer.checkpoints as checkpoints
import ctrlnet_trainer.preemption as preemption
from ctrlnet_trainer.__main__ import main

marker, signalled = Path(sys.argv[1]), []
handle, commit = preemption.StopFlag._handle, checkpoints.Checkpointer.commit

def on_sigterm(self, signum, frame):
    signalled.append(signum)
    handle(self, signum, frame)

def commit_then_wait(self, step):
    url = commit(self, step)
    if not marker.exists():
        marker.write_text(str(step))
        deadline = time.time() + 300
        while not signalled and time.time() < deadline:
            time.sleep(0.05)
    return url

preemption.StopFlag._handle = on_sigterm
checkpoints.Checkpointer.commit = commit_then_wait
sys.exit(main(sys.argv[2:]))
'''


def test_sigterm_checkpoints_exits_143_and_resume_latest_matches_straight(
    straight, tmp_path, make_cfg, resume_sections
):
    from ctrlnet_trainer.run import train

    out = tmp_path / "preempted"
    config = tmp_path / "train.yaml"  # the train section alone, as in the job's ConfigMap
    config.write_text(yaml.safe_dump(small_config_dict(out, **resume_sections)))
    driver, marker = tmp_path / "driver.py", tmp_path / "first-checkpoint"
    driver.write_text(DRIVER)
    log = tmp_path / "stderr.txt"
    with log.open("w") as err:  # a file, not a pipe: nothing can block on a full pipe while we wait
        proc = subprocess.Popen(
            [sys.executable, str(driver), str(marker), "--config", str(config)], stdout=subprocess.DEVNULL, stderr=err
        )
    try:
        deadline = time.time() + 240
        while not marker.exists() and proc.poll() is None and time.time() < deadline:
            time.sleep(0.1)
        assert marker.exists(), log.read_text()[-3000:]
        assert marker.read_text() == "3"
        os.kill(proc.pid, signal.SIGTERM)
        proc.wait(timeout=240)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    stderr = log.read_text()
    # The step in flight finishes (4), is checkpointed, and the exit code asks for a restart.
    assert proc.returncode == 143, stderr
    assert "preempted at step 4" in stderr and "Traceback" not in stderr
    ckpts = out / "checkpoints"
    assert (ckpts / "step-00000004" / "COMMITTED").is_file()
    assert (ckpts / "latest").read_text().strip() == "step-00000004"
    assert not (out / "controlnet").exists()

    # The restarted job: same output, resume=latest, to the end.
    sections = dict(resume_sections, checkpoint={"every_steps": 3, "resume": "latest"})
    result = train(make_cfg(out, **sections))
    assert result.steps == 6
    assert max_weight_diff(straight / "controlnet", out / "controlnet") <= 1e-6
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == list(range(1, 7))
    assert [r["loss"] for r in rows] == pytest.approx([r["loss"] for r in metrics_rows(straight)], rel=1e-5)


def test_streaming_resume_continues_at_the_same_batch(parquet_data, tmp_path, make_cfg):
    """A streamed dataset has no length: its position is a count of this rank's batches of the
    epoch, and a resumed run skips exactly those (crossing into epoch 1 on the way)."""
    from ctrlnet_trainer.run import train

    sections = {
        "model": {"cache_dir": str(tmp_path / "cache")},
        "data": {"dataset": str(parquet_data), "streaming": True, "shuffle_buffer": 8},
        "loop": {"max_steps": 6, "batch_size": 4},
        "checkpoint": {"every_steps": 3},
    }
    train(make_cfg(tmp_path / "straight", **sections))
    state = json.loads((tmp_path / "straight/checkpoints/step-00000003/trainer_state.json").read_text())
    assert state["position"] == {"epoch": 0, "sample": 12}  # 3 steps x batch 4 of a 16-row epoch

    train(make_cfg(tmp_path / "resumed", **dict(sections, loop={"max_steps": 3, "batch_size": 4})))
    result = train(make_cfg(tmp_path / "resumed", **dict(sections, checkpoint={"every_steps": 3, "resume": "latest"})))
    assert result.steps == 6
    assert max_weight_diff(tmp_path / "straight/controlnet", tmp_path / "resumed/controlnet") <= 1e-6
    # A stream learns that an epoch ended only when it asks for the next batch.
    assert [r["epoch"] for r in metrics_rows(tmp_path / "straight")] == [0, 0, 0, 0, 1, 1]


def test_streaming_decodes_in_worker_processes_with_the_same_batches_and_positions(parquet_data, tmp_path):
    """data.num_workers applies to streamed data too: rows are read in order in the main process,
    decoded ahead in workers; the batches, their sample ids and the resumable position are the same."""
    import torch

    from ctrlnet.config.train import DataConfig
    from ctrlnet_trainer import data
    from ctrlnet_trainer.models.families import FAMILIES
    from ctrlnet_trainer.models.tiny import build_tokenizer

    cfg = DataConfig(dataset=str(parquet_data), streaming=True, shuffle_buffer=8, resolution=32)
    source = data.open_source(cfg, str(tmp_path / "cache"), seed=0)
    examples = data.Examples(source, cfg, FAMILIES["sd"], {"tokenizer": build_tokenizer()}, seed=0)

    def first(workers: int, count: int, start=data.Position()):
        stream = data.StreamingBatches(source, examples, 4, 0, 1, 0, 8, start, num_workers=workers)
        it = iter(stream)
        return [next(it) for _ in range(count)], stream.position

    inline, at_inline = first(0, 6)
    pooled, at_pooled = first(2, 6)
    assert at_inline == at_pooled == data.Position(epoch=1, sample=8)  # 4 batches an epoch, then 2 more
    for a, b in zip(inline, pooled, strict=True):
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    resumed, _ = first(2, 2, start=data.Position(epoch=1, sample=0))
    assert all(torch.equal(resumed[i]["pixel_values"], inline[4 + i]["pixel_values"]) for i in range(2))


def test_streaming_without_max_steps_is_refused_by_the_config():
    from ctrlnet.config import load_train_config
    from ctrlnet.errors import UserError

    with pytest.raises(UserError, match="data.streaming needs loop.max_steps"):
        load_train_config(None, ["data.dataset=some/data", "data.streaming=true"])


def test_rank0_prints_progress_lines_that_status_reads(tmp_path, make_cfg, capsys):
    from ctrlnet.config.progress import latest_progress, parse_line
    from ctrlnet_trainer.run import train

    capsys.readouterr()
    train(make_cfg(tmp_path / "run", loop={"max_steps": 4}, checkpoint={"every_steps": 2}))
    lines = capsys.readouterr().out.splitlines()  # not a terminal: lines instead of a bar
    events = [r["event"] for r in map(parse_line, lines) if r]
    assert events == ["step", "step", "checkpoint", "step", "step", "checkpoint", "done"]
    progress = latest_progress(lines)
    assert progress["step"] == progress["total"] == 4 and progress["event"] == "done"
    assert progress["checkpoint"] == str(tmp_path / "run" / "checkpoints" / "step-00000004")
    assert progress["loss"] > 0 and progress["samples_per_s"] > 0 and progress["eta_s"] == 0


def test_a_restart_before_any_checkpoint_starts_fresh(tmp_path, make_cfg):
    """resume=latest with nothing saved yet (the first attempt of a restartable job) trains from 0."""
    from ctrlnet_trainer.run import train

    result = train(make_cfg(tmp_path / "run", loop={"max_steps": 2}, checkpoint={"resume": "latest"}))
    assert result.steps == 2 and [r["step"] for r in metrics_rows(tmp_path / "run")] == [1, 2]


# ------------------------------------------------------------------ data
def test_max_train_samples_trains_on_exactly_that_seeded_subset(tmp_path, make_cfg, monkeypatch):
    from ctrlnet_trainer import data
    from ctrlnet_trainer.run import train

    full = data.Source(data.SyntheticFillSource(64, 32, 0), None)
    a, b, other = data.subset(full, 8, 0), data.subset(full, 8, 0), data.subset(full, 8, 1)
    rows_a = [a.rows.order[i] for i in range(len(a.rows))]
    assert len(rows_a) == 8 == len(set(rows_a)) and rows_a == list(b.rows.order)
    assert set(rows_a) != set(other.rows.order)
    assert data.subset(full, 1000, 0) is full  # more than there is: everything

    seen = []
    getitem = data.SyntheticFillSource.__getitem__
    monkeypatch.setattr(
        data.SyntheticFillSource, "__getitem__", lambda self, i: (seen.append(int(i)), getitem(self, i))[1]
    )
    # No max_steps: 2 epochs of 8 rows / batch 4 = 4 steps.
    cfg = make_cfg(
        tmp_path / "run", data={"max_train_samples": 8}, loop={"max_steps": None, "num_epochs": 2, "batch_size": 4}
    )
    result = train(cfg)
    assert result.steps == 4
    assert sorted(seen) == sorted(rows_a * 2)  # each subset row once per epoch, nothing else
    assert [r["epoch"] for r in metrics_rows(tmp_path / "run")] == [0, 1, 1, 2]


def test_imagefolder_with_conditioning_paths_trains(tmp_path, make_cfg):
    from ctrlnet_trainer.run import train
    from ctrlnet_trainer.synthetic import fill_example

    folder = tmp_path / "data"
    (folder / "cond").mkdir(parents=True)
    (folder / "img").mkdir()
    lines = []
    for i in range(8):
        row = fill_example(i, 32, 0)
        row["image"].save(folder / "img" / f"{i}.png")
        row["conditioning_image"].save(folder / "cond" / f"{i}.png")
        lines.append(
            json.dumps({"file_name": f"img/{i}.png", "conditioning_image": f"cond/{i}.png", "text": row["text"]})
        )
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = train(
        make_cfg(
            out, model={"cache_dir": str(tmp_path / "cache")}, data={"dataset": str(folder)}, loop={"max_steps": 3}
        )
    )
    assert result.steps == 3
    assert all(math.isfinite(r["loss"]) for r in metrics_rows(out))
    assert zero_conv_norm(out / "controlnet") > 0


def test_a_jsonl_file_of_rows_trains(tmp_path, make_cfg):
    """train_controlnet_flux.py's --jsonl_for_train: data.dataset names a .jsonl file whose rows hold
    image paths relative to that file (absolute paths as they are)."""
    from ctrlnet_trainer.run import train
    from ctrlnet_trainer.synthetic import fill_example

    folder = tmp_path / "data"
    (folder / "cond").mkdir(parents=True)
    (folder / "img").mkdir()
    lines = []
    for i in range(8):
        row = fill_example(i, 32, 0)
        row["image"].save(folder / "img" / f"{i}.png")
        row["conditioning_image"].save(folder / "cond" / f"{i}.png")
        image = f"img/{i}.png" if i % 2 else str(folder / "img" / f"{i}.png")
        lines.append(json.dumps({"image": image, "conditioning_image": f"cond/{i}.png", "text": row["text"]}))
    (folder / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    result = train(
        make_cfg(
            out,
            model={"cache_dir": str(tmp_path / "cache")},
            data={"dataset": str(folder / "train.jsonl")},
            loop={"max_steps": 3},
        )
    )
    assert result.steps == 3
    assert all(math.isfinite(r["loss"]) for r in metrics_rows(out))
    assert zero_conv_norm(out / "controlnet") > 0


def test_a_data_file_of_another_kind_is_refused_in_one_line(tmp_path):
    from ctrlnet.config.train import DataConfig
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.data.sources import open_source

    rows = tmp_path / "rows.txt"
    rows.write_text("image,text\n")
    with pytest.raises(UserError, match=r"a file must be \.parquet, \.jsonl or \.json"):
        open_source(DataConfig(dataset=str(rows)), str(tmp_path / "cache"), 0)


def test_adafactor_is_built_as_the_flux_script_builds_it():
    """optim.optimizer=adafactor (train_controlnet_flux.py's --use_adafactor): the learning rate as
    given (the LR schedule scales it), weight decay from optim.weight_decay, no relative step,
    no parameter scaling, no warmup-init."""
    from transformers.optimization import Adafactor

    from ctrlnet.config.train import OptimConfig
    from ctrlnet_trainer.optim import build_lr_scheduler, build_optimizer

    model = torch.nn.Linear(4, 3)
    cfg = OptimConfig(optimizer="adafactor", weight_decay=0.05, lr_scheduler="linear", lr_warmup_steps=2)
    opt = build_optimizer(model.parameters(), cfg, 3e-4, torch.device("cpu"))
    assert isinstance(opt, Adafactor)
    group = opt.param_groups[0]
    assert (group["relative_step"], group["scale_parameter"], group["warmup_init"]) == (False, False, False)
    assert group["weight_decay"] == 0.05
    sched = build_lr_scheduler(opt, cfg, total_steps=10)
    before = model.weight.detach().clone()
    for _ in range(3):
        model(torch.randn(2, 4)).square().mean().backward()
        opt.step()
        sched.step()
        opt.zero_grad()
    assert group["lr"] == pytest.approx(3e-4 * 7 / 8)  # the schedule drives Adafactor's lr like AdamW's
    assert not torch.equal(model.weight, before)


VARIANTS = {
    "v_prediction_min_snr": {"model": {"prediction_type": "v_prediction"}, "loop": {"snr_gamma": 5.0}},
    "adamw_8bit": {"optim": {"optimizer": "adamw_8bit"}},
    "adafactor": {"optim": {"optimizer": "adafactor", "learning_rate": 1e-3}},
    "gradient_checkpointing": {"loop": {"gradient_checkpointing": True}},
    "bf16_on_cpu": {"loop": {"mixed_precision": "bf16"}},
}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_training_option_trains(variant, tmp_path, make_cfg):
    if variant == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    from ctrlnet_trainer.run import train

    out = tmp_path / "run"
    sections = VARIANTS[variant]
    result = train(make_cfg(out, **dict(sections, loop={"max_steps": 3, **sections.get("loop", {})})))
    assert result.steps == 3
    rows = metrics_rows(out)
    assert [r["step"] for r in rows] == [1, 2, 3]
    assert all(math.isfinite(r["loss"]) and math.isfinite(r["grad_norm"]) for r in rows)
    assert zero_conv_norm(out / "controlnet") > 0  # the zero convolutions moved: it trained
    assert is_png(Path(result.samples))  # validation ran with this option too
    config = json.loads((out / "controlnet" / "config.json").read_text())
    assert config["_class_name"] == "ControlNetModel"


def test_two_runs_in_one_process_with_different_precision(tmp_path, make_cfg):
    """A notebook calling train() twice: accelerate's process-wide state must not leak between runs."""
    from ctrlnet_trainer.run import train

    assert train(make_cfg(tmp_path / "a", loop={"max_steps": 1})).steps == 1
    result = train(
        make_cfg(tmp_path / "b", loop={"max_steps": 2, "mixed_precision": "bf16", "gradient_accumulation_steps": 2})
    )
    assert result.steps == 2 and [r["step"] for r in metrics_rows(tmp_path / "b")] == [1, 2]


def test_resume_without_a_seed_keeps_the_checkpoints_seed(tmp_path, make_cfg):
    """No loop.seed: the first run draws one; resuming elsewhere must reuse it (same data order,
    noise and in-code base), not draw another."""
    from ctrlnet_trainer.run import train

    unseeded = {"loop": {"seed": None, "max_steps": 3}, "checkpoint": {"every_steps": 1}}
    train(make_cfg(tmp_path / "a", **unseeded))
    sections = dict(unseeded, checkpoint={"every_steps": 1, "resume": str(tmp_path / "a/checkpoints/step-00000001")})
    train(make_cfg(tmp_path / "b", **sections))
    assert (
        json.loads((tmp_path / "b/run.json").read_text())["seed"]
        == json.loads((tmp_path / "a/run.json").read_text())["seed"]
    )
    assert max_weight_diff(tmp_path / "a" / "controlnet", tmp_path / "b" / "controlnet") <= 1e-6
