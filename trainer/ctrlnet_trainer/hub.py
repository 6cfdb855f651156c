"""Optional push of the final ControlNet to a hub model repo (never intermediate checkpoints).

The token comes from the environment variable named by hub.token_env, else from the file that
HF_TOKEN_PATH names (a mounted Secret: cluster.secrets.as_files), and is never logged: errors are
scrubbed of it before they are shown."""

from __future__ import annotations

import os
from pathlib import Path

from ctrlnet.config.train import HubConfig
from ctrlnet.errors import UserError, one_line


def hub_token(cfg: HubConfig) -> str:
    token = os.environ.get(cfg.token_env, "")
    if not token and (path := os.environ.get("HF_TOKEN_PATH")):
        # huggingface_hub reads the same file for downloads; here it is read for the push.
        try:
            token = Path(path).read_text().strip()
        except OSError as e:
            raise UserError(
                f"hub.push is on but the hub token file HF_TOKEN_PATH={path} cannot be read ({type(e).__name__}): "
                "check the Secret of cluster.secrets.hub_token and its key"
            ) from None
    if not token:
        raise UserError(
            f"hub.push is on but ${cfg.token_env} is empty: export the hub token in it (or set hub.token_env, "
            "or HF_TOKEN_PATH to a file holding it)"
        )
    return token


def push_controlnet(folder: Path, cfg: HubConfig, default_name: str) -> str:
    token = hub_token(cfg)
    repo = cfg.model_id or default_name
    try:
        from huggingface_hub import create_repo, upload_folder

        repo_id = create_repo(repo, token=token, private=cfg.private, exist_ok=True).repo_id
        upload_folder(
            repo_id=repo_id, folder_path=str(folder), token=token, commit_message="ctrlnet: trained ControlNet"
        )
    except Exception as e:
        reason = one_line(e).replace(token, "***")
        raise UserError(
            f"pushing the ControlNet to hub repo {repo!r} failed ({reason}); the local copy is in {folder}"
        ) from None
    return repo_id
