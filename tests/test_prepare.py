"""`ctrlnet prepare`: a folder of photos + captions becomes a dataset `train.data.dataset` reads as it
is (image, conditioning image, caption), every row once over one process or two, restartable
(finished shards kept, byte for byte), refusing another config's output and an unfinished one.

One source per module: 10 images of coloured shapes on plain backgrounds, 48 x 40 px (PNG and
JPEG), with captions in metadata.jsonl; prepared at 32 px in shards of 4 rows with canny."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image, ImageDraw

from testkit.cli import assert_user_error, run_in_process
from testkit.training import metrics_rows, small_config, small_config_dict

CTRLNET = Path(sys.executable).parent / "ctrlnet"
ROWS, SHARD_ROWS, RESOLUTION = 10, 4, 32
COLOURS = ["red", "blue", "green", "orange", "purple", "teal", "olive", "gray", "navy", "maroon"]


def shape_photo(i: int) -> Image.Image:
    """Row i: a filled rectangle or ellipse in one colour on a white background, placed by i."""
    image = Image.new("RGB", (48, 40), "white")
    box = (4 + i % 5 * 3, 4 + i % 3 * 4, 30 + i % 4 * 4, 30 + i % 2 * 6)
    draw = ImageDraw.Draw(image)
    (draw.ellipse if i % 2 else draw.rectangle)(box, fill=COLOURS[i])
    return image


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """An imagefolder: photo-00.png ... with a metadata.jsonl holding each one's caption."""
    folder = tmp_path_factory.mktemp("photos")
    lines = []
    for i in range(ROWS):
        name = f"photo-{i:02d}.{'jpg' if i % 3 == 0 else 'png'}"
        shape_photo(i).save(folder / name, quality=95)
        lines.append(json.dumps({"file_name": name, "text": f"a {COLOURS[i]} {'ellipse' if i % 2 else 'box'}"}))
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")
    return folder


def sections(photos: Path, out: Path, **prepare) -> dict:
    return {
        "data": {"dataset": str(out), "resolution": RESOLUTION},
        "prepare": {"source": str(photos), "shard_rows": SHARD_ROWS, **prepare},
    }


@pytest.fixture(scope="module")
def prepared(photos, tmp_path_factory) -> Path:
    from ctrlnet_trainer.prepare.job import prepare

    out = tmp_path_factory.mktemp("prepared") / "canny"
    result = prepare(small_config(tmp_path_factory.mktemp("unused"), **sections(photos, out)))
    assert (result.rows, result.skipped, result.shards, result.prepared) == (ROWS, 0, 3, 3)
    return out


def read_rows(dataset: Path) -> list[dict]:
    """The rows as training reads them (data.sources.open_source)."""
    from ctrlnet.config.train import DataConfig
    from ctrlnet_trainer.data import open_source

    source = open_source(DataConfig(dataset=str(dataset)), None, 0)
    return [source.rows[i] for i in range(len(source.rows))]


def test_prepared_dataset_is_what_training_reads(prepared, photos):
    from ctrlnet_trainer.annotators import build
    from ctrlnet_trainer.prepare.layout import file_sha256

    rows = read_rows(prepared)
    assert len(rows) == ROWS
    assert set(rows[0]) == {"image", "conditioning_image", "text"}
    canny = build("canny", small_config(prepared.parent / "x").annotators.canny)
    for i, row in enumerate(rows):  # the source's order, its captions, the image at the prepare resolution
        assert row["text"] == f"a {COLOURS[i]} {'ellipse' if i % 2 else 'box'}"
        image, condition = row["image"].convert("RGB"), row["conditioning_image"].convert("RGB")
        assert min(image.size) == RESOLUTION and image.size == condition.size == (38, 32)
        # the condition is canny's drawing of the stored image (PNG: lossless), not of another row's
        if i % 3:  # a PNG source is stored losslessly: annotating the stored image again gives the condition
            assert np.array_equal(np.asarray(condition), np.asarray(canny.annotate([image])[0]))
        assert np.asarray(condition).max() == 255  # every shape has edges
    manifest = json.loads((prepared / "prepared.json").read_text())
    assert (manifest["rows"], manifest["source_rows"], manifest["skipped"]) == (ROWS, ROWS, 0)
    assert manifest["annotator"]["name"] == "canny" and manifest["annotator_license"]
    assert [(s["first_row"], s["rows"]) for s in manifest["shards"]] == [(0, 4), (4, 4), (8, 2)]
    for record in manifest["shards"]:  # each shard's bytes are what its record says
        assert file_sha256(prepared / record["file"]) == record["sha256"]
    assert sorted(p.name for p in (prepared / "data").iterdir()) == [f"shard-0000{i}.parquet" for i in range(3)]


def test_restart_redoes_only_unfinished_shards(prepared, photos, tmp_path):
    from ctrlnet_trainer.prepare.job import prepare

    copy = tmp_path / "copy"
    shutil.copytree(prepared, copy)
    (copy / "prepared.json").unlink()  # died before the manifest ...
    (copy / ".ctrlnet-prepare" / "shard-00001.json").unlink()  # ... and during shard 1
    kept = {name: (copy / "data" / name).stat().st_mtime_ns for name in ("shard-00000.parquet", "shard-00002.parquet")}
    cfg = small_config(tmp_path / "unused", **sections(photos, copy))
    result = prepare(cfg)
    assert (result.rows, result.shards, result.prepared) == (ROWS, 3, 1)
    assert {name: (copy / "data" / name).stat().st_mtime_ns for name in kept} == kept  # finished shards untouched
    redone = json.loads((copy / "prepared.json").read_text())["shards"]
    first = json.loads((prepared / "prepared.json").read_text())["shards"]
    assert [s["sha256"] for s in redone] == [s["sha256"] for s in first]  # the redone shard: the same bytes
    assert prepare(cfg).prepared == 0  # finished: nothing to do


def test_another_config_or_a_foreign_folder_is_refused(prepared, photos, tmp_path):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.prepare.job import prepare

    other = small_config(tmp_path / "unused", **sections(photos, prepared))
    other.annotators.canny.low_threshold = 50
    with pytest.raises(UserError, match=r"another config; differs: annotator .*choose a new train.data.dataset"):
        prepare(other)
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    with pytest.raises(UserError, match="not empty and was not written by ctrlnet prepare"):
        prepare(small_config(tmp_path / "unused", **sections(photos, foreign)))
    assert (foreign / "notes.txt").read_text() == "mine"


def test_training_refuses_an_unfinished_prepare(prepared, tmp_path):
    from ctrlnet.errors import UserError

    copy = tmp_path / "unfinished"
    shutil.copytree(prepared, copy)
    (copy / "prepared.json").unlink()
    with pytest.raises(UserError, match="has not finished .*run the same ctrlnet prepare again"):
        read_rows(copy)


def test_unreadable_rows_are_one_line_or_left_out_and_counted(photos, tmp_path):
    from ctrlnet.errors import UserError
    from ctrlnet_trainer.prepare.job import prepare

    broken = tmp_path / "broken"
    shutil.copytree(photos, broken)
    (broken / "photo-04.png").write_bytes(b"not a png")
    cfg = small_config(tmp_path / "unused", **sections(broken, tmp_path / "out"))
    with pytest.raises(UserError, match=r"row 4, column 'image': .*set train.data.skip_bad_rows=true"):
        prepare(cfg)
    cfg.data.skip_bad_rows = True  # the same output: the failed run's finished shard 0 is kept
    result = prepare(cfg)
    assert (result.rows, result.skipped) == (ROWS - 1, 1)
    manifest = json.loads((tmp_path / "out" / "prepared.json").read_text())
    assert manifest["shards"][1]["skipped"].keys() == {"4"}
    assert len(read_rows(tmp_path / "out")) == ROWS - 1


def test_a_streamed_source_gives_the_same_rows(prepared, photos, tmp_path, capsys):
    from ctrlnet.config.progress import parse_line
    from ctrlnet_trainer.prepare.job import prepare

    out = tmp_path / "streamed"
    result = prepare(small_config(tmp_path / "unused", **sections(photos, out, streaming=True)))
    assert (result.rows, result.shards) == (ROWS, 3)
    lines = [r for r in map(parse_line, capsys.readouterr().out.splitlines()) if r and r["job"] == "prepare"]
    # rows read as rank 0 finishes its shards (no total before the stream ends), then the done line
    assert [(r["event"], r["step"], r["total"]) for r in lines] == [
        ("step", 4, None),
        ("step", 8, None),
        ("step", 10, None),
        ("done", ROWS, ROWS),
    ]
    for a, b in zip(read_rows(out), read_rows(prepared), strict=True):
        assert a["text"] == b["text"]
        assert np.array_equal(np.asarray(a["conditioning_image"]), np.asarray(b["conditioning_image"]))


@pytest.fixture(scope="module")
def ctrlnet(tmp_path_factory):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    cwd = tmp_path_factory.mktemp("cli")

    def run(*args, timeout=240):
        return subprocess.run(
            [str(CTRLNET), *map(str, args)], capture_output=True, text=True, cwd=cwd, env=env, timeout=timeout
        )

    return run


def test_two_processes_prepare_every_row_once_and_the_output_trains(prepared, photos, tiny_base_dir, tmp_path, ctrlnet):
    out = tmp_path / "two"
    train = small_config_dict(tmp_path / "run", **sections(photos, out))
    train["model"] = {"base": str(tiny_base_dir)}
    train["loop"] = {**train.get("loop", {}), "max_steps": 2, "batch_size": 2}
    conditions = [tmp_path / f"condition-{i}.png" for i in range(2)]
    for i, path in enumerate(conditions):  # two rows' canny conditions: fidelity has a chance level
        read_rows(prepared)[i]["conditioning_image"].save(path)
    train["validation"] = {
        "prompts": ["a red box"],
        "images": [str(p) for p in conditions],
        "num_images": 1,
        "num_inference_steps": 2,
        "every_steps": 100,
    }
    job = tmp_path / "job.yaml"
    job.write_text(yaml.safe_dump({"train": train}))
    proc = ctrlnet("prepare", "-f", job, "--nproc", 2)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"rows:      {ROWS}" in proc.stdout and "shards:    3" in proc.stdout
    manifest = json.loads((out / "prepared.json").read_text())
    assert [(s["first_row"], s["rows"], s["rank"]) for s in manifest["shards"]] == [(0, 4, 0), (4, 4, 1), (8, 2, 0)]
    for a, b in zip(read_rows(out), read_rows(prepared), strict=True):  # the same rows as one process made
        assert a["text"] == b["text"]
        assert np.array_equal(np.asarray(a["conditioning_image"]), np.asarray(b["conditioning_image"]))
    trained = ctrlnet("train", "-f", job, "--data", out, "--output", tmp_path / "run")
    assert trained.returncode == 0, trained.stderr[-3000:]
    assert (tmp_path / "run" / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
    scored = [r for r in metrics_rows(tmp_path / "run") if "fidelity_canny" in r]  # prepare.annotator's, at the end
    assert [r["step"] for r in scored] == [2] and 0 <= scored[0]["fidelity_canny_chance"] <= 1, scored
    assert "fidelity:" in trained.stdout


def test_validation_scores_a_prepared_dataset_with_its_own_annotator(prepared, photos, tmp_path):
    """No validation.fidelity, no prepare section: the data's manifest names the annotator and the
    parameters it was prepared with (not the run's defaults)."""
    from ctrlnet_trainer.prepare.job import prepare
    from ctrlnet_trainer.validation import fidelity_annotators

    assert {
        k: v.low_threshold
        for k, v in fidelity_annotators(small_config(tmp_path / "a", data={"dataset": str(prepared)})).items()
    } == {"canny": 100}
    custom = small_config(tmp_path / "b", **sections(photos, tmp_path / "custom", max_rows=4))
    custom.annotators.canny.low_threshold = 40
    prepare(custom)
    found = fidelity_annotators(small_config(tmp_path / "c", data={"dataset": str(tmp_path / "custom")}))
    assert {k: v.low_threshold for k, v in found.items()} == {"canny": 40}
    off = small_config(tmp_path / "d", data={"dataset": str(prepared)}, validation={"fidelity": []})
    assert fidelity_annotators(off) == {}


def test_prepare_bad_input_is_one_error_line(photos, tmp_path, monkeypatch, capfd):
    def ctrlnet(*args):
        return run_in_process(args, monkeypatch=monkeypatch, capture=capfd, cwd=tmp_path)

    def job(**prepare_keys) -> Path:
        path = tmp_path / "job.yaml"
        path.write_text(
            yaml.safe_dump({"train": {"data": {"dataset": str(tmp_path / "out")}, "prepare": prepare_keys}})
        )
        return path

    assert_user_error(ctrlnet("prepare"), "needs a job file")
    assert_user_error(ctrlnet("prepare", "-f", job()), "train.prepare.source is not set")
    assert_user_error(
        ctrlnet("prepare", "-f", job(source=str(tmp_path / "nowhere"))), "prepare.source", "does not exist"
    )
    assert_user_error(
        ctrlnet("prepare", "-f", job(source=str(photos), image_column="photo")), "prepare.image_column 'photo'"
    )
    assert_user_error(
        ctrlnet("prepare", "-f", job(source=str(photos)), "--set", f"train.data.dataset={photos}"),
        "is train.prepare.source",
    )
    assert_user_error(ctrlnet("prepare", "-f", job(source=str(photos), annotator="pose")), "annotator")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("annotator", ["depth", "segmentation"])
def test_model_annotators_prepare_through_tiny_models(annotator, photos, tmp_path):
    """Depth and segmentation through tiny random models built here: the plumbing (batches across
    shard boundaries, the model's identity in the fingerprint, the stored condition's mode)."""
    from ctrlnet_trainer.annotators import ade20k
    from ctrlnet_trainer.prepare.job import prepare
    from testkit.annotator_models import tiny_depth_model, tiny_upernet

    model = (tiny_depth_model if annotator == "depth" else tiny_upernet)(tmp_path / "model")
    cfg = small_config(tmp_path / "unused", **sections(photos, tmp_path / "out", annotator=annotator, max_rows=6))
    cfg.annotators.params(annotator).model, cfg.annotators.params(annotator).batch_size = str(model), 4
    result = prepare(cfg)
    assert (result.rows, result.shards) == (6, 2)
    manifest = json.loads((tmp_path / "out" / "prepared.json").read_text())
    assert manifest["annotator"]["model"].startswith("sha256:")
    palette = {tuple(c) for c in ade20k.PALETTE.tolist()}
    for row in read_rows(tmp_path / "out"):
        condition = row["conditioning_image"]
        assert condition.size == row["image"].size
        if annotator == "depth":  # gray, stored as one channel, the full 0-255 range
            assert condition.mode == "L" and np.asarray(condition).max() == 255
        else:  # every pixel an ADE20K colour
            colours = np.asarray(condition.convert("RGB")).reshape(-1, 3)
            assert {tuple(c) for c in np.unique(colours, axis=0).tolist()} <= palette


def test_source_and_output_in_object_storage(prepared, photos, s3_server, tmp_path):
    """A parquet source in S3 prepared into S3 (each shard staged here, then uploaded in one
    request): the same rows as the folder run; training reads it from there."""
    from datasets import Dataset, Features, Value
    from datasets import Image as ImageFeature

    from ctrlnet_trainer.prepare.job import prepare

    local = tmp_path / "source.parquet"
    features = Features({"image": ImageFeature(), "text": Value("string")})
    photos_rows = [json.loads(line) for line in (photos / "metadata.jsonl").read_text().splitlines()]
    images = [{"bytes": (photos / r["file_name"]).read_bytes(), "path": None} for r in photos_rows]  # in the file
    columns = {"image": images, "text": [r["text"] for r in photos_rows]}
    Dataset.from_dict(columns, features=features).to_parquet(str(local))
    s3_server.fs.put(str(local), f"{s3_server.url('prepare-source')}/train.parquet".removeprefix("s3://"))
    out = s3_server.url("prepared", "canny")
    cfg = small_config(tmp_path / "unused", **sections(s3_server.url("prepare-source"), out))
    cfg.model.cache_dir = str(tmp_path / "hf")  # datasets' cache of a remote source: this test's own
    result = prepare(cfg)
    assert (result.rows, result.shards) == (ROWS, 3)
    keys = s3_server.fs.find(out.removeprefix("s3://"))
    assert sum(k.endswith(".parquet") for k in keys) == 3 and any(k.endswith("prepared.json") for k in keys)
    assert not any("partial" in k for k in keys)
    for a, b in zip(read_rows(out), read_rows(prepared), strict=True):
        assert a["text"] == b["text"]
        assert np.array_equal(np.asarray(a["conditioning_image"]), np.asarray(b["conditioning_image"]))
