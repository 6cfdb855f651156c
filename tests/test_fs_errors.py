"""Nothing a user has is lost, and every filesystem error is one line naming the path and the fix:
`model init --overwrite` replaces only a base's files, and full disks, read-only mounts, names too
long and files in the way of a folder are refused in one line (before heavy work where it can)."""

import errno
import os
import subprocess
from pathlib import Path

import pytest

from testkit.cli import assert_user_error, run_in_process


@pytest.fixture
def cli(tmp_path, monkeypatch, capfd):
    """`ctrlnet ...` through its entry point, in this process."""

    def run(*args):
        return run_in_process(args, monkeypatch=monkeypatch, capture=capfd, cwd=tmp_path)

    return run


def _mount_tmpfs(folder: Path, size: str, *options: str) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    opts = ",".join([f"size={size}", *options])
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(folder)], capture_output=True, check=False)
    if proc.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.decode().strip()}")


@pytest.fixture
def mounts():
    mounted = []

    def mount(folder: Path, size: str = "2m", *options: str) -> Path:
        _mount_tmpfs(folder, size, *options)
        mounted.append(folder)
        return folder

    yield mount
    for folder in reversed(mounted):
        subprocess.run(["umount", "-l", str(folder)], check=False)


# ------------------------------------------------------------------ model init --overwrite
def test_model_init_overwrite_never_deletes_what_it_did_not_write(cli, tmp_path):
    base = tmp_path / "b"
    base.mkdir()
    (base / "model_index.json").write_text("old")
    (base / "notes.txt").write_text("mine")
    proc = cli("model", "init", "--out", base, "--overwrite")
    assert_user_error(proc, str(base), "notes.txt", "not part of a base")
    assert (base / "notes.txt").read_text() == "mine" and (base / "model_index.json").read_text() == "old"

    (base / "notes.txt").unlink()
    (base / "unet").mkdir()
    (base / "unet" / "stale.bin").write_text("old")
    proc = cli("model", "init", "--out", base, "--overwrite")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (base / "model_index.json").read_text() != "old" and not (base / "unet" / "stale.bin").exists()
    assert not [p for p in base.iterdir() if p.name.startswith(".")]  # no staging left behind


def test_model_init_into_the_current_folder(cli, tmp_path):
    proc = cli("model", "init", "--out", ".")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "model_index.json").is_file() and (tmp_path / "unet").is_dir()
    proc = cli("model", "init", "--out", ".", "--overwrite", "--seed", "1")
    assert proc.returncode == 0, proc.stderr[-3000:]


# ------------------------------------------------------------------ one line per errno
@pytest.mark.parametrize(
    ("code", "words"),
    [
        (errno.ENOSPC, ["no space left", "free some space"]),
        (errno.EROFS, ["read-only", "writable folder"]),
        (errno.EACCES, ["permission denied", "fix its permissions"]),
        (errno.ENAMETOOLONG, ["too long", "shorter name"]),
        (errno.ENOTDIR, ["is a file, not a folder"]),
        (errno.EBUSY, ["busy"]),
    ],
)
def test_each_filesystem_error_is_one_line_naming_the_path(code, words):
    from ctrlnet_trainer.fs import as_error

    error = as_error(OSError(code, os.strerror(code), "/x/y"))
    line = str(error)
    assert "\n" not in line and "/x/y" in line
    for word in words:
        assert word in line


def test_model_init_names_a_file_in_the_way_and_a_name_too_long(cli, tmp_path):
    (tmp_path / "f").write_text("a file")
    assert_user_error(cli("model", "init", "--out", tmp_path / "f" / "sub"), "lies under", "which is a file")
    assert_user_error(cli("model", "init", "--out", "/"), "root")
    assert_user_error(cli("model", "init", "--out", tmp_path / ("n" * 300)), "too long")


def test_model_init_on_a_read_only_mount_is_one_line(cli, tmp_path, mounts):
    ro = mounts(tmp_path / "ro", "2m", "ro")
    assert_user_error(cli("model", "init", "--out", ro / "base"), "read-only")


def test_model_init_on_a_full_disk_is_one_line(cli, tmp_path, mounts):
    small = mounts(tmp_path / "small", "64k")
    proc = cli("model", "init", "--out", small / "base")
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "no space left" in errors[0] and str(small) in errors[0], proc.stderr
    assert not any(small.joinpath("base").glob(".ctrlnet-partial-*"))


# ------------------------------------------------------------------ train: a full disk, then resumed
@pytest.mark.slow
def test_a_run_stopped_by_a_full_disk_resumes_from_its_last_checkpoint(tmp_path, make_cfg, mounts, monkeypatch):
    """The disk fills up after checkpoint 2 is committed: checkpoint 4 fails in one line, is not
    committed, and once space is back the run resumes from 2 and ends equal to a straight run."""
    from ctrlnet.errors import StorageError
    from ctrlnet_trainer.checkpoints import Checkpointer
    from ctrlnet_trainer.run import train
    from testkit.training import max_weight_diff

    sections = {"loop": {"max_steps": 5}, "checkpoint": {"every_steps": 2}}
    train(make_cfg(tmp_path / "straight", **sections))

    disk = mounts(tmp_path / "disk", "64m")
    out, filler = disk / "run", disk / "filler"
    real_commit = Checkpointer.commit

    def commit_then_fill(self, step):
        url = real_commit(self, step)
        if step == 2:  # leave a few KB: metrics lines fit, a checkpoint does not
            free = os.statvfs(disk).f_bavail * os.statvfs(disk).f_frsize
            with open(filler, "wb") as f:
                f.write(b"\0" * max(0, free - 64 * 1024))
        return url

    monkeypatch.setattr(Checkpointer, "commit", commit_then_fill)
    with pytest.raises(StorageError) as e:
        train(make_cfg(out, **sections))
    line = str(e.value)
    assert "\n" not in line and "step-00000004" in line and "no space left" in line and "--resume latest" in line
    assert (out / "checkpoints" / "latest").read_text().strip() == "step-00000002"
    assert not (out / "checkpoints" / "step-00000004").exists()  # the partial checkpoint is gone
    assert not (out / "FINISHED").exists()

    monkeypatch.setattr(Checkpointer, "commit", real_commit)
    filler.unlink()  # space is back
    result = train(make_cfg(out, loop={"max_steps": 5}, checkpoint={"every_steps": 2, "resume": "latest"}))
    assert result.steps == 5
    assert max_weight_diff(tmp_path / "straight" / "controlnet", out / "controlnet") <= 1e-6


# ------------------------------------------------------------------ outputs checked before the work
def test_outputs_are_checked_before_any_heavy_work(tmp_path, make_cfg, mounts):
    from PIL import Image

    from ctrlnet.errors import UserError
    from ctrlnet_trainer.generate import generate
    from ctrlnet_trainer.run import train

    (tmp_path / "afile").write_text("mine")
    with pytest.raises(UserError, match=r"--output .*afile is a file: give a folder"):
        train(make_cfg(tmp_path / "afile"))
    with pytest.raises(UserError, match=r"--output / is the file system's root"):
        train(make_cfg("/"))
    ro = mounts(tmp_path / "ro", "1m", "ro")
    with pytest.raises(UserError, match="read-only file system: choose a writable folder"):
        train(make_cfg(ro / "run"))
    Image.new("RGB", (32, 32)).save(tmp_path / "c.png")
    # The models (here: none) are never loaded: the read-only --out is found first.
    with pytest.raises(UserError, match=r"ro/gen is on a read-only file system"):
        generate(str(tmp_path), str(tmp_path), str(tmp_path / "c.png"), "p", str(ro / "gen"))
