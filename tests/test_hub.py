"""Hub push: only the final ControlNet goes up, the token comes from the environment and never
shows in output or errors. The hub cannot be reached here, so huggingface_hub's two calls are
replaced by recorders; everything around them (when, what folder, which token) is ours."""

import huggingface_hub
import pytest

from ctrlnet.config import TrainConfig
from ctrlnet.errors import UserError
from ctrlnet_trainer.run import train

SECRET = "hf_secret_value_never_printed"


def _cfg(tmp_path, **hub):
    return TrainConfig.model_validate(
        {
            "output": str(tmp_path / "run"),
            "data": {"resolution": 32, "synthetic_rows": 16},
            "loop": {"seed": 0, "batch_size": 4, "max_steps": 2},
            "checkpoint": {"every_steps": 1},
            "logging": {"report_to": "none"},
            "hub": {"push": True, "model_id": "me/canny", "token_env": "MY_HUB_TOKEN", **hub},
        }
    )


def test_push_uploads_final_controlnet_only_with_env_token(tmp_path, monkeypatch, capsys):
    calls = {}

    class Repo:
        repo_id = "me/canny"

    def create_repo(repo_id, token, private, exist_ok):
        calls["create"] = (repo_id, token, private)
        return Repo()

    def upload_folder(repo_id, folder_path, token, commit_message):
        from pathlib import Path

        calls["upload"] = (repo_id, sorted(p.name for p in Path(folder_path).iterdir()), token, folder_path)

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setattr(huggingface_hub, "upload_folder", upload_folder)
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    result = train(_cfg(tmp_path, private=True))
    assert result.hub_repo == "me/canny"
    assert calls["create"] == ("me/canny", SECRET, True)
    repo, files, token, folder = calls["upload"]
    assert (repo, token) == ("me/canny", SECRET)
    assert files == ["config.json", "diffusion_pytorch_model.safetensors"]  # no checkpoints, no optimizer
    assert folder.endswith("run/controlnet")
    out = capsys.readouterr()
    assert SECRET not in out.out + out.err
    assert SECRET not in (tmp_path / "run" / "run.json").read_text()


def test_push_without_token_fails_before_training(tmp_path, monkeypatch):
    monkeypatch.delenv("MY_HUB_TOKEN", raising=False)
    with pytest.raises(UserError, match=r"\$MY_HUB_TOKEN is empty"):
        train(_cfg(tmp_path))
    assert not (tmp_path / "run").exists()  # nothing written


def test_push_failure_is_scrubbed_and_keeps_local_copy(tmp_path, monkeypatch):
    def create_repo(repo_id, token, private, exist_ok):
        raise RuntimeError(f"401 Unauthorized for token {token}")

    monkeypatch.setattr(huggingface_hub, "create_repo", create_repo)
    monkeypatch.setenv("MY_HUB_TOKEN", SECRET)
    with pytest.raises(UserError) as e:
        train(_cfg(tmp_path))
    assert SECRET not in str(e.value) and "***" in str(e.value)
    assert (tmp_path / "run" / "controlnet" / "diffusion_pytorch_model.safetensors").exists()
