"""What the model annotators share: finding the model (a local folder, or a hub id asked about
quickly so an unreachable hub is one line, not a half-minute of retries), refusing a model of the
wrong kind from its config before its weights load, the dtype per device, and the model's identity
for a dataset's fingerprint."""

from __future__ import annotations

from pathlib import Path

from ctrlnet.errors import UserError, one_line
from ctrlnet_trainer.annotators.base import Annotator, free


def locate(model: str, key: str, revision: str | None, cache_dir: str | None) -> str:
    """A local folder's path, or the hub id once the hub (or the local cache) has it."""
    from ctrlnet_trainer.models.hub_ids import check_hub_id
    from ctrlnet_trainer.storage import local_path, looks_like_path

    path = Path(local_path(model)).expanduser()
    if path.is_dir():
        return str(path)
    if path.exists():
        raise UserError(f"{key} {model!r} is a file: give the model's folder (config.json and weights) or a hub id")
    if looks_like_path(model):
        raise UserError(
            f"{key} {model!r} does not exist: give a folder holding a transformers model (config.json and "
            "weights), or a hub id like org/name"
        )
    check_hub_id(model, key, "model", revision=revision, cache_dir=cache_dir)
    return model


KNOWN_LICENSES = {
    "depth-anything/Depth-Anything-V2-Small-hf": "Apache-2.0",
    "depth-anything/Depth-Anything-V2-Base-hf": "CC-BY-NC-4.0",
    "depth-anything/Depth-Anything-V2-Large-hf": "CC-BY-NC-4.0",
    "openmmlab/upernet-convnext-small": "MIT",
}
"""Licenses of the weights of models the docs name; another model's is read from its card."""


def model_license(location: str) -> str:
    """The model's license: known by its hub id, else the `license:` of a local folder's model card
    (README.md front matter), else unknown."""
    if location in KNOWN_LICENSES:
        return KNOWN_LICENSES[location]
    card = Path(location) / "README.md"
    if card.is_file():
        text = card.read_text(encoding="utf-8", errors="replace")
        if text.startswith("---"):
            for line in text.split("---", 2)[1].splitlines():
                if line.strip().startswith("license:"):
                    return line.split(":", 1)[1].strip().strip("'\"")
    return "unknown: see the model's card"


class ModelAnnotator(Annotator):
    """An annotator running a transformers model: subclasses name the config `key`, the `task`
    and its model `mapping` (transformers' auto-class names), and implement `load`."""

    key: str = ""
    task: str = ""

    def __init__(self, params, *, device="cpu", cache_dir: str | None = None, seed: int = 0) -> None:
        import torch
        from transformers import AutoConfig

        super().__init__(params, device=torch.device(device), seed=seed)
        self.cache_dir = cache_dir
        self.location = locate(params.model, self.key, params.revision, cache_dir)
        self.license = model_license(self.location)
        self.dtype = torch.float16 if self.device.type == "cuda" else torch.float32  # fp32: CPUs lack fast fp16
        try:
            config = AutoConfig.from_pretrained(self.location, revision=params.revision, cache_dir=cache_dir)
        except (OSError, ValueError, KeyError) as e:
            raise UserError(
                f"{self.key} {params.model!r} is not a transformers model ({one_line(e, limit=120)}): "
                f"give a {self.task} model's folder (config.json and weights) or hub id"
            ) from None
        self.check(config)
        try:
            self.processor, self.model = self.load()
        except (OSError, ValueError) as e:
            raise UserError(
                f"{self.key} {params.model!r} could not be loaded ({one_line(e, limit=160)}): "
                f"give a complete {self.task} model (config.json, preprocessor_config.json and weights)"
            ) from None
        self.model.to(device=self.device, dtype=self.dtype).eval()
        self._model_identity: str | None = None

    def mapping(self) -> dict[str, str]:
        """transformers' model_type -> class name table of this task."""
        raise NotImplementedError

    def load(self):
        """(image processor, model) from `self.location`."""
        raise NotImplementedError

    def check(self, config) -> None:
        """Refuse a model made for another task (a depth model given to segmentation): its
        model_type has no class for this task, or its checkpoint's architectures are not one."""
        mapping = self.mapping()
        architectures = set(getattr(config, "architectures", None) or [])
        if config.model_type not in mapping or (architectures and not architectures & set(mapping.values())):
            made_for = ", ".join(sorted(architectures)) or config.model_type
            raise UserError(
                f"{self.key} {self.params.model!r} is a {made_for} model, not a {self.task} model: "
                f"give a {self.task} model (the default is {type(self.params)().model})"
            )

    def from_pretrained(self, auto_class):
        return auto_class.from_pretrained(self.location, revision=self.params.revision, cache_dir=self.cache_dir)

    def identity(self) -> dict:
        """Adds the model as content: a folder by the sha256 of its files, a hub id by the commit
        its cached snapshot resolved to (both as the precompute cache's fingerprint names bases)."""
        if self._model_identity is None:
            from ctrlnet_trainer.cache.layout import _hub_commit, folder_digest

            if Path(self.location).is_dir():
                self._model_identity = folder_digest(self.location, (".",))
            else:
                commit = _hub_commit(self.location, self.params.revision, self.cache_dir)
                self._model_identity = f"hub {self.location}@{commit}"
        return {**super().identity(), "model": self._model_identity}

    def close(self) -> None:
        if getattr(self, "model", None) is not None:
            self.model = None
            self.processor = None
            free(self.device)
