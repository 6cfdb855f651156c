"""`ctrlnet train / generate / data synth-fill / model init` as a user runs them: the console script
in a subprocess (or, for bad input the trainer catches, its entry point in this process: see
ctrlnet_here). Bad input exits 2 with one `error:` line that names the problem, never a traceback."""

import hashlib
import json
import subprocess
from pathlib import Path

import pytest
import torch
from PIL import Image

from testkit.cli import CTRLNET, assert_user_error, offline_env, run_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    return offline_env(tmp_path_factory.mktemp("hf-home"))


@pytest.fixture
def ctrlnet(env, tmp_path):
    def run(*args, timeout=300):
        return subprocess.run(
            [str(CTRLNET), *map(str, args)],
            check=False,
            capture_output=True,
            text=True,
            cwd=tmp_path,
            env=env,
            timeout=timeout,
        )

    return run


@pytest.fixture
def ctrlnet_here(env, tmp_path, monkeypatch, capfd):
    """The same command line through the same entry point (`ctrlnet.cli.main`), in this process: no
    ten seconds of imports per call. For bad input caught before any hub access (what the
    libraries read from the environment at import time, such as HF_HUB_OFFLINE, is the suite's)."""

    def run(*args):
        return run_in_process(args, monkeypatch=monkeypatch, capture=capfd, cwd=tmp_path)

    return run


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def parquet_dir(tmp_path_factory):
    from ctrlnet_trainer.synthetic import write_fill_parquet

    folder = tmp_path_factory.mktemp("pq")
    write_fill_parquet(folder, rows=8, resolution=32, seed=0)
    return folder


# ------------------------------------------------------------------ bad input
@pytest.mark.parametrize(
    "args,words",
    [
        (["--resolution", "60"], ["resolution", "multiple of 8", "56"]),
        (
            [
                "--set",
                "train.validation.prompts=[a red circle, a blue circle]",
                "--set",
                "train.validation.images=[a.png, b.png, c.png]",
            ],
            ["validation.prompts", "validation.images"],
        ),
        (["--set", "train.loop.mixed_precision=fp8"], ["mixed_precision", "fp8"]),
    ],
    ids=["resolution-60", "validation-pairs", "unknown-precision"],
)
def test_invalid_config_is_one_error_line(ctrlnet, tmp_path, args, words):
    proc = ctrlnet("train", "--output", tmp_path / "out", "--max-steps", 2, *args, timeout=120)
    assert_user_error(proc, *words)
    assert not (tmp_path / "out").exists()  # refused before anything was written


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a GPU")
@pytest.mark.parametrize(
    "setting,words",
    [
        ("train.loop.mixed_precision=fp16", ["fp16", "GPU"]),
        ("train.loop.attention=xformers", ["xformers", "GPU"]),
    ],
)
def test_gpu_only_option_on_cpu_is_refused(ctrlnet_here, tmp_path, setting, words):
    proc = ctrlnet_here("train", "--output", tmp_path / "out", "--max-steps", 2, "--set", setting)
    assert_user_error(proc, *words)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_path(ctrlnet_here, tmp_path):
    missing = tmp_path / "no-such-data"
    proc = ctrlnet_here("train", "--data", missing, "--output", tmp_path / "out", "--max-steps", 2, "--resolution", 32)
    assert_user_error(proc, str(missing), "does not exist")


def test_missing_column_then_fixed_rerun_into_the_same_output(ctrlnet_here, tmp_path, parquet_dir):
    out = tmp_path / "out"
    common = ["train", "--data", parquet_dir, "--output", out, "--max-steps", 2, "--resolution", 32, "--batch-size", 2]
    proc = ctrlnet_here(*common, "--set", "train.data.caption_column=nope")
    line = assert_user_error(proc, "caption_column", "'nope'")
    assert "text" in line  # names the columns there are
    # The failed attempt trained nothing, so the corrected command may use the same output.
    proc = ctrlnet_here(*common)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()


# ------------------------------------------------------------------ the demo, shortened
@pytest.fixture(scope="module")
def demo(env, tmp_path_factory):
    cwd = tmp_path_factory.mktemp("demo")
    out = cwd / "runs" / "demo"
    proc = subprocess.run(
        [str(CTRLNET), "train", "--max-steps", "5", "--output", str(out)],
        check=False,
        capture_output=True,
        text=True,
        cwd=cwd,
        env=env,
        timeout=400,
    )
    return proc, out


def test_demo_trains_and_prints_where_things_are(demo):
    proc, out = demo
    assert proc.returncode == 0, proc.stderr[-3000:]
    printed = dict(line.split(":", 1) for line in proc.stdout.splitlines() if ":  " in line)
    printed = {k.strip(): v.strip() for k, v in printed.items()}
    assert printed["controlnet"] == str(out / "controlnet")
    assert printed["loss curve"] == str(out / "loss.png")
    assert printed["samples"] == str(out / "samples" / "step-5.png")
    assert (out / "controlnet" / "diffusion_pytorch_model.safetensors").is_file()
    for key in ("samples", "loss curve"):
        with Image.open(printed[key]) as img:
            assert img.format == "PNG"
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == [1, 2, 3, 4, 5]
    assert [r["step"] for r in rows if "adherence_iou" in r] == [0, 5]  # before training, and at its end
    assert printed["adherence"].startswith("IoU ") and "at step 0 ->" in printed["adherence"]


def test_output_holding_another_run_is_refused_and_left_intact(demo, ctrlnet):
    proc, out = demo
    assert proc.returncode == 0
    weights = out / "controlnet" / "diffusion_pytorch_model.safetensors"
    before = {p: sha256(p) for p in (weights, out / "run.json", out / "metrics.jsonl")}
    proc = ctrlnet("train", "--max-steps", 2, "--output", out)
    assert_user_error(proc, str(out), "another run", "--resume")
    assert {p: sha256(p) for p in before} == before


def test_model_init_then_generate_with_the_demo_controlnet(demo, ctrlnet, ctrlnet_here, tmp_path):
    from ctrlnet_trainer.synthetic import fill_example

    _, out = demo
    base = tmp_path / "base"
    proc = ctrlnet_here("model", "init", "--out", base, "--arch", "tiny")  # seed 0: the demo's in-code base
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert str(base) in proc.stdout
    for sub in ("unet", "vae", "text_encoder", "tokenizer", "scheduler"):
        assert (base / sub).is_dir()
    assert (base / "model_index.json").is_file()

    row = fill_example(12345, 64, 0)
    row["conditioning_image"].save(tmp_path / "cond.png")
    proc = ctrlnet(
        "generate",
        "--base",
        base,
        "--controlnet",
        out / "controlnet",
        "--image",
        tmp_path / "cond.png",
        "--prompt",
        row["text"],
        "--out",
        tmp_path / "gen",
        "--steps",
        2,
        "--device",
        "cpu",
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    pngs = sorted((tmp_path / "gen").glob("*.png"))
    assert len(pngs) == 1 and str(pngs[0]) in proc.stdout
    with Image.open(pngs[0]) as img:
        assert img.format == "PNG" and img.size == (64, 64)

    # Another prompt, same seed, same folder: written beside the first image, never over it.
    first = sha256(pngs[0])
    proc = ctrlnet(*generate_args(base, out / "controlnet", tmp_path / "cond.png", tmp_path / "gen"), "--prompt", "x")
    assert proc.returncode == 0, proc.stderr[-3000:]
    second = tmp_path / "gen" / "0000-00-1.png"
    assert second.is_file() and str(second) in proc.stdout
    assert sha256(pngs[0]) == first and len(list((tmp_path / "gen").glob("*.png"))) == 2

    # The shipped demo base by name, and the adherence of what it draws with the outline.
    args = generate_args("builtin:demo", out / "controlnet", tmp_path / "cond.png", tmp_path / "gen-demo")
    proc = ctrlnet_here(*args, "--prompt", row["text"], "--num-images", 2, "--adherence")
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(ln for ln in proc.stdout.splitlines() if ln.startswith("adherence:"))
    assert "IoU with the outline's disk" in line and line.count(",") == 1  # two images scored

    # A model init over what is there is refused, and leaves it as it was.
    before = sha256(base / "unet" / "diffusion_pytorch_model.safetensors")
    proc = ctrlnet("model", "init", "--out", base, "--arch", "tiny", "--seed", 1)
    assert_user_error(proc, str(base), "already holds", "model_index.json", "--overwrite")
    assert sha256(base / "unet" / "diffusion_pytorch_model.safetensors") == before


def generate_args(base, controlnet, image, out, device="cpu"):
    return [
        "generate",
        "--base",
        base,
        "--controlnet",
        controlnet,
        "--image",
        image,
        "--out",
        out,
        "--steps",
        2,
        "--device",
        device,
    ]


def test_generate_with_a_missing_image(ctrlnet, tmp_path):
    proc = ctrlnet(
        "generate",
        "--base",
        tmp_path,
        "--controlnet",
        tmp_path,
        "--image",
        tmp_path / "nope.png",
        "--prompt",
        "a circle",
        "--device",
        "cpu",
    )
    assert_user_error(proc, "nope.png", "does not exist")


# ------------------------------------------------------------------ data and model helpers
def test_data_synth_fill_writes_parquet(ctrlnet, tmp_path):
    import pyarrow.parquet as pq

    proc = ctrlnet("data", "synth-fill", "--out", tmp_path / "d", "--rows", 6, "--resolution", 32)
    assert proc.returncode == 0, proc.stderr[-3000:]
    path = tmp_path / "d" / "train.parquet"
    assert str(path) in proc.stdout
    table = pq.read_table(path)
    assert table.num_rows == 6
    assert set(table.column_names) == {"image", "conditioning_image", "text"}
    first = table.slice(0, 1).to_pylist()[0]
    import io

    with Image.open(io.BytesIO(first["image"]["bytes"])) as img:
        assert img.size == (32, 32)
    assert " circle with " in first["text"]


def test_model_init_unknown_arch(ctrlnet, tmp_path):
    proc = ctrlnet("model", "init", "--out", tmp_path / "b", "--arch", "bogus")
    assert_user_error(proc, "bogus", "tiny")
    assert not (tmp_path / "b").exists()


# ------------------------------------------------------------------ nothing already written is lost
def test_synth_fill_refuses_an_existing_parquet(ctrlnet, tmp_path):
    out = tmp_path / "d"
    assert ctrlnet("data", "synth-fill", "--out", out, "--rows", 4, "--resolution", 32).returncode == 0
    before = sha256(out / "train.parquet")
    proc = ctrlnet("data", "synth-fill", "--out", out, "--rows", 6, "--resolution", 32)
    assert_user_error(proc, str(out / "train.parquet"), "already exists", "--overwrite")
    assert sha256(out / "train.parquet") == before
    proc = ctrlnet("data", "synth-fill", "--out", out, "--rows", 6, "--resolution", 32, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sha256(out / "train.parquet") != before
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]  # no partial file left beside it
    (tmp_path / "f").write_text("mine")
    assert_user_error(ctrlnet("data", "synth-fill", "--out", tmp_path / "f", "--rows", 2), "is a file")


def test_model_init_overwrite_replaces_the_folder_whole(ctrlnet, ctrlnet_here, tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    (base / "model_index.json").write_text("mine")
    assert_user_error(ctrlnet("model", "init", "--out", base), "already holds", "model_index.json", "--overwrite")
    assert (base / "model_index.json").read_text() == "mine"
    proc = ctrlnet_here("model", "init", "--out", base, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (base / "vae" / "config.json").is_file() and (base / "model_index.json").read_text() != "mine"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["b"]  # no staging folder left behind


# ------------------------------------------------------------------ generate: bad input, before the models load
def test_generate_bad_input_is_one_line(ctrlnet_here, tmp_path):
    (tmp_path / "notes.png").write_text("not an image")
    Image.new("RGB", (64, 64)).save(tmp_path / "cond.png")
    (tmp_path / "taken").write_text("a file")
    args = generate_args(tmp_path, tmp_path, tmp_path / "cond.png", tmp_path / "gen")
    cases = [
        (["--image", tmp_path / "notes.png"], ["notes.png", "not an image"]),
        (["--image", tmp_path], [str(tmp_path), "is a folder"]),
        (["--device", "gpu"], ["--device 'gpu'", "auto, cpu, cuda"]),
        (["--out", tmp_path / "taken"], ["taken", "is a file"]),
        (["--out", tmp_path / "taken" / "sub"], ["taken", "a file"]),
    ]
    for extra, words in cases:
        # The later option wins (click), so each case overrides one of the defaults above.
        assert_user_error(ctrlnet_here(*args, "--prompt", "x", *extra), *words)
    assert not (tmp_path / "gen").exists()


# ------------------------------------------------------------------ messages
def test_bare_name_fails_at_once_naming_folder_and_hub(ctrlnet, tmp_path):
    proc = ctrlnet("train", "--data", "mydata", "--output", tmp_path / "out", "--max-steps", 2, "--resolution", 32)
    assert_user_error(proc, "data.dataset 'mydata'", "no folder", "hub dataset id", "HF_HUB_OFFLINE")
    assert "embedded demo" not in proc.stdout and "--base" in proc.stdout  # the part of the demo it would use


def test_bare_name_with_the_hub_unreachable(env, tmp_path):
    # Not offline, and the hub endpoint refuses connections (loopback, closed port): one quick try,
    # not datasets' five retries. Nothing here reaches a real hub.
    quiet = {k: v for k, v in env.items() if k not in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")}
    proc = subprocess.run(
        [str(CTRLNET), "train", "--base", "mybase", "--output", str(tmp_path / "out"), "--max-steps", "2"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={**quiet, "HF_ENDPOINT": "http://127.0.0.1:9"},
        timeout=300,
    )
    assert_user_error(proc, "model.base 'mybase'", "no folder", "could not be reached")
    assert "Retrying" not in proc.stderr


def test_missing_base_component_is_named(ctrlnet_here, tmp_path, tiny_base_dir):
    import shutil

    base = tmp_path / "base"
    shutil.copytree(tiny_base_dir, base, ignore=shutil.ignore_patterns("vae"))
    proc = ctrlnet_here("train", "--base", base, "--output", tmp_path / "out", "--max-steps", 1, "--resolution", 32)
    assert_user_error(proc, "model.base", "vae/")
    (base / "vae").mkdir()
    proc = ctrlnet_here("train", "--base", base, "--output", tmp_path / "out", "--max-steps", 1, "--resolution", 32)
    assert_user_error(proc, "vae/config.json")


def test_missing_validation_image_blames_validation_images(ctrlnet_here, tmp_path, tiny_base_dir, parquet_dir):
    missing = tmp_path / "edges.png"
    proc = ctrlnet_here(
        "train",
        "--base",
        tiny_base_dir,
        "--data",
        parquet_dir,
        "--output",
        tmp_path / "out",
        "--max-steps",
        1,
        "--resolution",
        32,
        "--batch-size",
        2,
        "--set",
        "train.validation.prompts=[a circle]",
        "--set",
        f"train.validation.images=[{missing}]",
    )
    assert_user_error(proc, "validation.images", str(missing), "does not exist")
    assert "demo" not in proc.stdout  # --base and --data given: no demo runs, no notice


def test_nproc_trains_on_several_local_processes_and_reports_like_one(ctrlnet, tmp_path):
    """`--nproc 2`: torchrun underneath (ctrlnet's launcher), one checkpoint shaped by 2 processes."""
    import json

    out = tmp_path / "run"
    result = ctrlnet(
        "train",
        "--nproc",
        "2",
        "--output",
        out,
        "--max-steps",
        "2",
        "--checkpoint-every",
        "2",
        "--set",
        "train.data.synthetic_rows=32",
        "--set",
        "train.data.resolution=32",
        "--set",
        "train.validation.num_inference_steps=1",
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert (
        f"controlnet:  {out / 'controlnet'}" in result.stdout
        and f"metrics:     {out / 'metrics.jsonl'}" in result.stdout
    )
    state = json.loads((out / "checkpoints" / "step-00000002" / "trainer_state.json").read_text())
    assert state["world_size"] == 2


def test_nproc_bad_input_is_one_error_line_last(ctrlnet, tmp_path):
    """Every process hits the same bad input: the launcher prints it once, as the last line."""
    result = ctrlnet("train", "--nproc", "2", "--output", tmp_path / "run", "--data", tmp_path / "missing")
    assert result.returncode == 2, result.stderr[-3000:]
    errors = [ln for ln in result.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and result.stderr.strip().splitlines()[-1] == errors[0]
    assert "Traceback" not in result.stderr


def test_train_without_a_base_for_a_transformer_family_trains_its_tiny_base(ctrlnet_here, tmp_path):
    """`ctrlnet train --set train.model.family=sd3` with no -f and no --base: the demo's base is
    SD-shaped, so the run takes the tiny SD3 base built in code, says so, and writes an SD3 ControlNet."""
    out = tmp_path / "run"
    proc = ctrlnet_here(
        "train",
        "--output",
        str(out),
        "--max-steps",
        "1",
        "--set",
        "train.model.family=sd3",
        "--set",
        "train.validation.num_inference_steps=1",
        "--set",
        "train.validation.adherence_rows=0",
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "tiny random-init base of that family" in proc.stdout
    assert json.loads((out / "controlnet" / "config.json").read_text())["_class_name"] == "SD3ControlNetModel"


def test_generate_with_a_union_controlnet_needs_its_condition_type(ctrlnet_here, tmp_path, tiny_flux_dir):
    """A union ControlNet (Flux.1, model.control_modes) samples one condition type per call:
    `generate` without --control-mode, or with an id it does not have, is one line; with one, it writes."""
    from types import SimpleNamespace

    from ctrlnet_trainer.models.families import family_named
    from ctrlnet_trainer.models.tiny import build_base

    flux = family_named("flux")
    union = flux.new_controlnet(build_base("tiny-flux").unet, SimpleNamespace(control_modes=["canny", "depth"]))
    union.save_pretrained(tmp_path / "union")
    Image.new("RGB", (32, 32), "white").save(tmp_path / "cond.png")
    args = ("generate", "--base", tiny_flux_dir, "--controlnet", tmp_path / "union", "--image", tmp_path / "cond.png")
    args = (*args, "--prompt", "a circle", "--out", tmp_path / "out", "--steps", "1")
    assert_user_error(ctrlnet_here(*args), "union ControlNet of 2 condition types", "--control-mode")
    assert_user_error(ctrlnet_here(*args, "--control-mode", "2"), "ids 0..1")
    assert not (tmp_path / "out").exists()
    proc = ctrlnet_here(*args, "--control-mode", "1")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["0000-00.png"]
