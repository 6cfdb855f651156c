"""`ctrlnet train / generate / data synth-fill / model init` as a user runs them: the console script
in a subprocess. Bad input exits 2 with one `error:` line that names the problem, never a traceback."""

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

pytestmark = pytest.mark.slow

CTRLNET = Path(sys.executable).parent / "ctrlnet"


@pytest.fixture(scope="module")
def env(tmp_path_factory):
    home = tmp_path_factory.mktemp("hf-home")
    return {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}


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


def assert_user_error(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-3000:])
    assert "Traceback" not in proc.stderr
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1, proc.stderr
    for word in words:
        assert word in errors[0], errors[0]
    return errors[0]


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
def test_gpu_only_option_on_cpu_is_refused(ctrlnet, tmp_path, setting, words):
    proc = ctrlnet("train", "--output", tmp_path / "out", "--max-steps", 2, "--set", setting)
    assert_user_error(proc, *words)
    assert not (tmp_path / "out").exists()


def test_missing_dataset_path(ctrlnet, tmp_path):
    missing = tmp_path / "no-such-data"
    proc = ctrlnet("train", "--data", missing, "--output", tmp_path / "out", "--max-steps", 2, "--resolution", 32)
    assert_user_error(proc, str(missing), "does not exist")


def test_missing_column_then_fixed_rerun_into_the_same_output(ctrlnet, tmp_path, parquet_dir):
    out = tmp_path / "out"
    common = ["train", "--data", parquet_dir, "--output", out, "--max-steps", 2, "--resolution", 32, "--batch-size", 2]
    proc = ctrlnet(*common, "--set", "train.data.caption_column=nope")
    line = assert_user_error(proc, "caption_column", "'nope'")
    assert "text" in line  # names the columns there are
    # The failed attempt trained nothing, so the corrected command may use the same output.
    proc = ctrlnet(*common)
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
    assert len((out / "metrics.jsonl").read_text().splitlines()) == 5


def test_output_holding_another_run_is_refused_and_left_intact(demo, ctrlnet):
    proc, out = demo
    assert proc.returncode == 0
    weights = out / "controlnet" / "diffusion_pytorch_model.safetensors"
    before = {p: sha256(p) for p in (weights, out / "run.json", out / "metrics.jsonl")}
    proc = ctrlnet("train", "--max-steps", 2, "--output", out)
    assert_user_error(proc, str(out), "another run", "--resume")
    assert {p: sha256(p) for p in before} == before


def test_model_init_then_generate_with_the_demo_controlnet(demo, ctrlnet, tmp_path):
    from ctrlnet_trainer.synthetic import fill_example

    _, out = demo
    base = tmp_path / "base"
    proc = ctrlnet("model", "init", "--out", base, "--arch", "tiny")  # seed 0: the demo's in-code base
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
