"""YAML file + `--set a.b=c` overrides -> a validated config, or one UserError line."""

from pathlib import Path
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ValidationError

from ctrlnet.config.job import JobConfig
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError

M = TypeVar("M", bound=BaseModel)


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if not p.is_file():
        raise UserError(f"config file {p} does not exist: pass an existing YAML file with -f")
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}" if where else ""
        raise UserError(f"config file {p} is not valid YAML{at}: fix the syntax") from None
    if not isinstance(data, dict):
        raise UserError(f"config file {p} must hold a mapping (keys like `train:`), not {type(data).__name__}")
    return data


def _allowed_keys(model: type[BaseModel], path: list[str]) -> list[str]:
    """Field names at `path` inside `model`, for naming what is allowed in an error."""
    for part in path:
        field = model.model_fields.get(part)
        sub = field.annotation if field else None
        if not (isinstance(sub, type) and issubclass(sub, BaseModel)):
            return []
        model = sub
    return sorted(model.model_fields)


def apply_override(data: dict[str, Any], assignment: str, model: type[BaseModel]) -> None:
    """Apply one `a.b.c=value`; the value is parsed as YAML (so 3, true, [a, b] and null work)."""
    key, sep, raw = assignment.partition("=")
    if not sep or not key.strip():
        raise UserError(f"--set {assignment!r} is not KEY=VALUE: write e.g. --set train.loop.max_steps=100")
    parts = key.strip().split(".")
    allowed = _allowed_keys(model, parts[:-1])
    if parts[-1] not in allowed:
        parent = ".".join(parts[:-1]) or "top level"
        raise UserError(f"--set {key}: unknown key; allowed at {parent}: {', '.join(allowed) or 'none'}")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    loc = [str(p) for p in err["loc"]]
    key = ".".join(loc) or "config"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(model, loc[:-1])
        return f"{key}: unknown key; allowed here: {', '.join(allowed)}"
    msg = err["msg"].removeprefix("Value error, ")
    if err["type"] == "literal_error":
        return f"{key}: got {err.get('input')!r}; {msg[0].lower() + msg[1:]}"
    return f"{key}: {msg} (got {err.get('input')!r})" if "input" in err and not isinstance(err["input"], dict) else f"{key}: {msg}"


def validate(model: type[M], data: dict[str, Any]) -> M:
    try:
        return model.model_validate(data)
    except ValidationError as e:
        problems = [_describe(err, model) for err in e.errors()]
        raise UserError("invalid config: " + "; ".join(problems)) from None


def _load(model: type[M], path: str | Path | None, overrides: list[str] | None) -> M:
    data = read_yaml(path) if path else {}
    for assignment in overrides or []:
        apply_override(data, assignment, model)
    return validate(model, data)


def load_job_config(path: str | Path | None = None, overrides: list[str] | None = None) -> JobConfig:
    return _load(JobConfig, path, overrides)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The trainer's view: the file holds the `train` section alone (the job's ConfigMap)."""
    return _load(TrainConfig, path, overrides)
