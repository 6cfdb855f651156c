"""The families ctrlnet trains, and how a base's family is recognised."""

from __future__ import annotations

import json
from pathlib import Path

from ctrlnet_trainer.models.family import Family
from ctrlnet_trainer.models.flux import Flux
from ctrlnet_trainer.models.sd import SD
from ctrlnet_trainer.models.sd3 import SD3
from ctrlnet_trainer.models.sdxl import SDXL

FAMILIES: dict[str, Family] = {f.name: f for f in (SD(), SDXL(), SD3(), Flux())}
DEFAULT = FAMILIES["sd"]
# Recognition asks the most specific family first: the transformer families by their
# transformer's class (they have a text_encoder_2/ too), then SDXL, whose folder test is "SD plus more".
_BY_SPECIFICITY = (FAMILIES["flux"], FAMILIES["sd3"], FAMILIES["sdxl"], FAMILIES["sd"])


def family_named(name: str) -> Family:
    """train.model.family's value (not `auto`) as its Family."""
    return FAMILIES[name]


def family_of_pipeline(class_name: str) -> Family:
    """The family of a pipeline class name (model_index.json's `_class_name`); SD when none claims it."""
    return next((f for f in _BY_SPECIFICITY if f.claims_pipeline(class_name)), DEFAULT)


def family_of_folder(root: Path) -> Family | None:
    """The family of a local base folder: model_index.json's pipeline class, else the components;
    None when neither tells (no model_index.json, no unet/config.json)."""
    index = root / "model_index.json"
    if index.is_file():
        name = json.loads(index.read_text()).get("_class_name", "")
        if name:
            return family_of_pipeline(name)
    return next((f for f in _BY_SPECIFICITY if f.claims_folder(root)), None)
