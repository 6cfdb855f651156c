"""The Helm chart as data: where it is, and its values (= the JobConfig).

Its generated files (values.yaml, values.schema.json, templates/_generated.tpl) are written by
`python tools/generate.py` (development only, not part of the product).
"""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

from ctrlnet.config.job import JobConfig
from ctrlnet.errors import UserError

CHART_NAME = "ctrlnet"
_REPO_CHART = Path(__file__).resolve().parents[3] / "charts" / CHART_NAME


def chart_dir() -> Path:
    """The chart: the repo's charts/ctrlnet in a source checkout (editable install), else the
    copy the wheel carries as ctrlnet/_chart."""
    if (_REPO_CHART / "Chart.yaml").is_file():
        return _REPO_CHART
    packaged = resources.files("ctrlnet").joinpath("_chart")
    if packaged.joinpath("Chart.yaml").is_file():
        return Path(str(packaged))
    raise UserError("the ctrlnet Helm chart is missing from this installation: reinstall ctrlnet")


def chart_values(cfg: JobConfig) -> dict[str, Any]:
    """The chart's values for a validated config: the config itself, as JSON-compatible data."""
    return cfg.model_dump(mode="json")


def release_namespace(cfg: JobConfig) -> str:
    return cfg.cluster.namespace or "default"
