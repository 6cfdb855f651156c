"""How errors reach the user: the `error:` line comes last, after any progress bar; a bare name
that is no folder is tried on the hub once, quickly; generated images never replace earlier ones.

In-process and quick: no training, and nothing reaches a hub (the endpoint is a closed loopback port).
"""

from __future__ import annotations

import sys
import time

import pytest

from ctrlnet.errors import UserError


def test_error_line_comes_after_an_open_progress_bar(monkeypatch, capsys):
    from tqdm import tqdm

    from ctrlnet import cli

    bars = []

    def failing_command():
        bars.append(tqdm(total=10, desc="steps", file=sys.stderr))  # left open, as an exception leaves it
        bars[0].update(3)
        raise UserError("the problem: the fix")

    monkeypatch.setattr(cli, "app", failing_command)
    with pytest.raises(SystemExit) as exit_:
        cli.main()
    assert exit_.value.code == 2
    bars[0].close()  # what garbage collection does at exit: must print nothing more now
    err = capsys.readouterr().err
    pieces = [p.strip() for p in err.replace("\r", "\n").split("\n") if p.strip()]
    assert pieces[-1] == "error: the problem: the fix", err
    assert any("3/10" in p for p in pieces[:-1])  # the bar was finished before the error, not dropped


@pytest.fixture
def unreachable_hub(monkeypatch):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")  # discard port: refused at once
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-ctrlnet-test-cache")
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)


def test_bare_name_with_the_hub_unreachable_fails_fast(unreachable_hub):
    from ctrlnet_trainer.models.hub_ids import check_hub_id

    start = time.monotonic()
    with pytest.raises(UserError) as e:
        check_hub_id("mydata", "data.dataset", "dataset")
    assert time.monotonic() - start < 5  # one try, no retries with backoff
    msg = str(e.value)
    assert "data.dataset 'mydata'" in msg and "no folder" in msg and "hub dataset id" in msg
    assert "could not be reached" in msg


def test_bare_name_offline_and_not_cached(monkeypatch):
    from huggingface_hub import constants

    from ctrlnet_trainer.models.hub_ids import check_hub_id

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", "/nonexistent-ctrlnet-test-cache")
    with pytest.raises(
        UserError, match=r"model.base 'org/model': no folder .* not in the local cache .* HF_HUB_OFFLINE"
    ):
        check_hub_id("org/model", "model.base", "model")


def test_bare_name_that_is_no_hub_id_either():
    from ctrlnet_trainer.models.hub_ids import check_hub_id

    with pytest.raises(UserError, match="not a hub id either"):
        check_hub_id("my data", "data.dataset", "dataset")


def test_generated_images_go_beside_earlier_ones(tmp_path):
    from ctrlnet_trainer.generate import free_names

    assert free_names(tmp_path, ["0000-00", "0000-01"]) == [tmp_path / "0000-00.png", tmp_path / "0000-01.png"]
    (tmp_path / "0000-01.png").write_bytes(b"earlier")
    (tmp_path / "0000-00-1.png").write_bytes(b"earlier")
    # One suffix for the whole batch, the first that frees every name.
    assert free_names(tmp_path, ["0000-00", "0000-01"]) == [tmp_path / "0000-00-2.png", tmp_path / "0000-01-2.png"]


@pytest.mark.parametrize("device, words", [("gpu", ["unknown", "cuda:N"]), ("cuda:x", ["unknown"])])
def test_unknown_device(device, words):
    from ctrlnet_trainer.generate import pick_device

    with pytest.raises(UserError) as e:
        pick_device(device)
    assert all(w in str(e.value) for w in words)
    assert pick_device("cpu") == "cpu"
