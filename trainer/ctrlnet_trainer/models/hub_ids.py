"""A name that is no local folder is tried as a hub id: asked once and quickly, before a loader
that would retry an unreachable hub for half a minute (datasets' load_dataset: 5 retries, 25 s).

The question is one `repo_info` call with a short timeout and no retries; the answer is one
UserError saying that no such folder exists here and what the hub said (no such repo, private,
gated, unreachable), or nothing when the repo is there or cached for offline use.
"""

from __future__ import annotations

import os
from pathlib import Path

from ctrlnet.errors import UserError, one_line

PROBE_TIMEOUT_S = 10.0
"""How long the one request to the hub may take before it counts as unreachable."""


def _offline(repo_type: str) -> bool:
    from huggingface_hub import constants

    datasets_offline = os.environ.get("HF_DATASETS_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    return bool(constants.HF_HUB_OFFLINE) or (repo_type == "dataset" and datasets_offline)


def is_cached(name: str, repo_type: str, cache_dir: str | None = None) -> bool:
    """Best effort: does a cache the loaders read hold a copy of this repo?"""
    from huggingface_hub import constants

    hub_folder = f"{repo_type}s--{name.replace('/', '--')}"
    candidates = [Path(constants.HF_HUB_CACHE) / hub_folder]
    if cache_dir:
        candidates += [Path(cache_dir) / hub_folder, Path(cache_dir) / name.replace("/", "___")]
    if repo_type == "dataset":
        try:
            from datasets import config

            candidates.append(Path(config.HF_DATASETS_CACHE) / name.replace("/", "___"))
        except ImportError:
            pass
    return any(c.exists() for c in candidates)


def check_hub_id(
    name: str, key: str, repo_type: str, *, revision: str | None = None, cache_dir: str | None = None
) -> None:
    """Return when `name` is a hub repo of `repo_type` ("model" or "dataset") that exists or is
    cached; else one UserError naming `key`, the missing folder and what the hub said."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import GatedRepoError, RepositoryNotFoundError, RevisionNotFoundError
    from huggingface_hub.utils import validate_repo_id

    not_here = f"{key} {name!r}: no folder of that name exists here"
    try:
        validate_repo_id(name)
    except Exception:
        raise UserError(
            f"{not_here}, and it is not a hub id either: give an existing folder, a URL, or a hub id like org/name"
        ) from None
    if _offline(repo_type):
        if is_cached(name, repo_type, cache_dir):
            return
        raise UserError(
            f"{not_here}; tried as a hub {repo_type} id, it is not in the local cache and hub access is off "
            "(HF_HUB_OFFLINE): give an existing folder, or unset HF_HUB_OFFLINE to download it"
        )
    try:
        HfApi().repo_info(name, repo_type=repo_type, revision=revision, timeout=PROBE_TIMEOUT_S)
    except RevisionNotFoundError:
        raise UserError(f"{key} {name!r}: the hub has no revision {revision!r} of it: check the revision") from None
    except GatedRepoError:
        raise UserError(
            f"{key} {name!r} is gated on the hub: accept its terms on its page, then log in or set HF_TOKEN"
        ) from None
    except RepositoryNotFoundError:
        raise UserError(
            f"{not_here}, and the hub has no {repo_type} {name!r} (or it is private: log in or set HF_TOKEN): "
            "check the name, or give a local folder"
        ) from None
    except Exception as e:  # DNS, refused, timeout, proxy, 5xx: the hub cannot answer
        if is_cached(name, repo_type, cache_dir):
            return  # the loader falls back to its cached copy
        raise UserError(
            f"{not_here}, and trying it as a hub {repo_type} id failed: the hub could not be reached ({one_line(e, limit=160)}); "
            "give an existing folder, or check the network (HF_ENDPOINT, proxy settings)"
        ) from None
