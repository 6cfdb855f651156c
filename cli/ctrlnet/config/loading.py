"""YAML file + `--set a.b=c` overrides -> a validated config, or one UserError line.

YAML is read with YAML 1.2 booleans: only true/false are booleans, so `mixed_precision: no` is
the string "no" (as in diffusers' `--mixed_precision=no`) and not False. Bool keys still accept
yes/no/on/off, which pydantic parses from those strings.
"""

import difflib
import re
import types
from pathlib import Path
from typing import Any, Literal, TypeVar, Union, get_args, get_origin

import yaml
from pydantic import BaseModel, ValidationError
from pydantic.fields import FieldInfo

from ctrlnet.config.credentials import CREDENTIAL_ERROR, credential_kind, secret_env_name, shown
from ctrlnet.config.diffusers_flags import DIFFUSERS_FLAGS, FLAG_VALUES, FLUX_FLAGS, NEAREST, SD3_FLAGS, SDXL_FLAGS
from ctrlnet.config.job import JobConfig
from ctrlnet.config.train import TrainConfig
from ctrlnet.errors import UserError

M = TypeVar("M", bound=BaseModel)

# Every flag of diffusers' train_controlnet.py, _sdxl.py, _sd3.py and _flux.py -> its key, for hints.
_REFERENCE_FLAGS = {**DIFFUSERS_FLAGS, **SDXL_FLAGS, **SD3_FLAGS, **FLUX_FLAGS}


class DuplicateKeyError(yaml.constructor.ConstructorError):
    """A mapping that gives one key twice: YAML loaders silently keep the last, so a job file
    saying `max_steps: 100` and later `max_steps: 10` would train 10 steps without a word."""

    def __init__(self, key: str, first: yaml.Mark, again: yaml.Mark):
        super().__init__(problem=f"key {shown(key)} appears twice", problem_mark=again)
        self.key, self.first, self.again = key, first, again


MAX_FILE_BYTES = 1024 * 1024
"""The largest config file read (1 MiB): a job file is a few KiB; more is a wrong file."""
MAX_ALIASES = 1000
"""The most aliases (`*name`) one YAML document may use."""
MAX_NODES = 100_000
"""The most values (scalars, lists, mappings) a YAML document may hold once every alias is expanded:
a few aliases nested can stand for billions of values ("billion laughs"), which would never finish
loading; a real job file holds a few hundred."""


class YamlTooLargeError(yaml.YAMLError):
    """A document over MAX_ALIASES or MAX_NODES (or one that contains itself)."""


class BoundedSafeLoader(yaml.SafeLoader):
    """SafeLoader that refuses a document over `max_aliases` / `max_nodes` (YamlTooLargeError)
    before building it: for every YAML a user hands ctrlnet (job files, --set values, manifests)."""

    max_aliases = MAX_ALIASES
    max_nodes = MAX_NODES
    aliases = 0

    def compose_node(self, parent: Any, index: Any) -> Any:
        if self.check_event(yaml.AliasEvent):
            self.aliases += 1
            if self.aliases > self.max_aliases:
                raise YamlTooLargeError(f"it uses more than {self.max_aliases} aliases (*name), the most allowed")
        return super().compose_node(parent, index)

    def get_single_node(self) -> Any:
        node = super().get_single_node()
        if node is not None:
            _check_expanded_size(node, self.max_nodes)
        return node

    def get_node(self) -> Any:  # each document of a multi-document stream
        node = super().get_node()
        if node is not None:
            _check_expanded_size(node, self.max_nodes)
        return node


class _Yaml12Loader(BoundedSafeLoader):
    """BoundedSafeLoader whose booleans are YAML 1.2's: true/false only (yes/no/on/off stay
    strings), and that refuses a key given twice in one mapping."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict:
        seen: dict[Any, yaml.Mark] = {}
        for key_node, _ in node.value:
            # `<<` merge keys may repeat and be overridden: that is what they are for.
            if not isinstance(key_node, yaml.ScalarNode) or key_node.tag == "tag:yaml.org,2002:merge":
                continue
            if key_node.value in seen:
                raise DuplicateKeyError(key_node.value, seen[key_node.value], key_node.start_mark)
            seen[key_node.value] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


def _check_expanded_size(root: yaml.Node, limit: int) -> None:
    """Count the values `root` stands for with every alias expanded, without expanding them (a
    node reached by several aliases is counted once per alias from the sizes already known)."""
    sizes: dict[int, int] = {}
    on_path: set[int] = set()

    def size(node: yaml.Node) -> int:
        key = id(node)
        if key in sizes:
            return sizes[key]
        if key in on_path:
            raise YamlTooLargeError("a value contains itself (an alias to an enclosing anchor)")
        on_path.add(key)
        total = 1
        if isinstance(node, yaml.SequenceNode):
            total += sum(size(child) for child in node.value)
        elif isinstance(node, yaml.MappingNode):
            total += sum(size(k) + size(v) for k, v in node.value)
        if total > limit:
            raise YamlTooLargeError(f"it holds more than {limit} values with its aliases expanded, the most allowed")
        on_path.discard(key)
        sizes[key] = total
        return total

    size(root)


_BOOL_TAG = "tag:yaml.org,2002:bool"
_Yaml12Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != _BOOL_TAG]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(_BOOL_TAG, re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF"))


def parse_yaml(text: str) -> Any:
    """Parse YAML text the way config files and --set values are parsed: a YamlTooLargeError for a
    document over the bounds above (or nested past Python's recursion limit)."""
    try:
        return yaml.load(text, Loader=_Yaml12Loader)  # noqa: S506 - a SafeLoader subclass
    except RecursionError:
        raise YamlTooLargeError("its values are nested too deeply") from None


def read_yaml(path: str | Path) -> dict[str, Any]:
    p = Path(path)
    if p.is_dir():
        raise UserError(f"config file {p} is a directory: pass a YAML file with -f")
    if not p.is_file():
        raise UserError(f"config file {p} does not exist: pass an existing YAML file with -f")
    try:
        with p.open("rb") as f:
            raw = f.read(MAX_FILE_BYTES + 1)
        if len(raw) > MAX_FILE_BYTES:
            raise UserError(
                f"config file {p} is larger than {MAX_FILE_BYTES // 1024} KiB (the most read): "
                "pass the job's YAML file (a few KiB)"
            )
        text = raw.decode("utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise UserError(
            f"config file {p} cannot be read ({e.__class__.__name__}): pass a readable UTF-8 YAML file"
        ) from None
    try:
        data = parse_yaml(text)
    except DuplicateKeyError as e:
        raise UserError(
            f"config file {p}: key {shown(e.key)} is given twice (lines {e.first.line + 1} and {e.again.line + 1}): "
            "keep one (YAML would silently use the last)"
        ) from None
    except YamlTooLargeError as e:
        raise UserError(f"config file {p} is refused: {e}: write the values out instead of nesting aliases") from None
    except yaml.YAMLError as e:
        where = getattr(e, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        problem = getattr(e, "problem", None)
        what = f" ({problem})" if problem else ""
        raise UserError(f"config file {p} is not valid YAML{at}{what}: fix the syntax") from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise UserError(
            f"config file {p} must hold a mapping of config keys (like `train:`), not a {type(data).__name__}"
        )
    return data


# --- walking the models ------------------------------------------------------------------------


def submodel(annotation: Any) -> type[BaseModel] | None:
    """The section model behind a field's annotation (`Model` or `Model | None`), else None."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    if get_origin(annotation) in (Union, types.UnionType):
        models = [a for a in get_args(annotation) if isinstance(a, type) and issubclass(a, BaseModel)]
        if len(models) == 1:
            return models[0]
    return None


def _non_null(annotation: Any) -> list[Any]:
    if get_origin(annotation) in (Union, types.UnionType):
        return [a for a in get_args(annotation) if a is not type(None)]
    return [annotation]


def _is_str_field(annotation: Any) -> bool:
    """`str`, `str | None` or a Literal of strings: a scalar the user means as text."""
    options = _non_null(annotation)
    return len(options) == 1 and (
        options[0] is str
        or (get_origin(options[0]) is Literal and all(isinstance(v, str) for v in get_args(options[0])))
    )


def _is_list_field(annotation: Any) -> bool:
    options = _non_null(annotation)
    return len(options) == 1 and get_origin(options[0]) is list


def _hint(model: type[BaseModel], path: list[str], part: str) -> str:
    """A pointer for an unknown key: a diffusers flag name, a near miss, or a misplaced `train:`."""
    if not path and model is TrainConfig and part in JobConfig.model_fields:
        return f" (this file holds the train section alone: drop the `{part}:` level)"
    if part in _REFERENCE_FLAGS:
        return f" ({_flag_hint(part)})"
    close = difflib.get_close_matches(part, list(model.model_fields), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _flag_hint(flag: str) -> str:
    """Which key does what diffusers' --flag did: the key (with the value a switch stands for), or,
    for a flag with no equivalent, the nearest key and where the difference is explained."""
    key = _REFERENCE_FLAGS[flag]
    if flag in NEAREST:
        return f"diffusers' --{flag} has no equivalent here; the nearest key is {key}: see docs/config.md"
    if flag in FLAG_VALUES:
        return f"diffusers' --{flag} is {key}={FLAG_VALUES[flag]}"
    return f"diffusers' --{flag} is {key}"


def _unknown_key(model: type[BaseModel], path: list[str], part: str) -> str:
    where = ".".join(path) or "the top level"
    return f"unknown key {shown(part)} at {where}{_hint(model, path, part)}; allowed: {', '.join(sorted(model.model_fields))}"


def resolve_key(model: type[BaseModel], parts: list[str]) -> FieldInfo:
    """The field at a dotted key; a ValueError naming the first bad part and what is allowed."""
    current: type[BaseModel] | None = model
    field: FieldInfo | None = None
    for i, part in enumerate(parts):
        if current is None:
            raise ValueError(f"{'.'.join(parts[:i])} is a value, not a section: it has no key {shown(part)}")
        field = current.model_fields.get(part)
        if field is None:
            raise ValueError(_unknown_key(current, parts[:i], part))
        current = submodel(field.annotation)
    if field is None:
        raise ValueError("empty key")
    return field


def _model_at(model: type[BaseModel], path: list[str]) -> type[BaseModel] | None:
    for part in path:
        field = model.model_fields.get(part)
        sub = submodel(field.annotation) if field else None
        if sub is None:
            return None
        model = sub
    return model


# --- overrides and coercions -------------------------------------------------------------------


def _override_value(raw: str, field: FieldInfo) -> Any:
    """A --set value: YAML, except that text meant for a string key stays the text typed."""
    text = raw.strip()
    if not text:
        return ""
    try:
        value = parse_yaml(text)
    except yaml.YAMLError:
        value = text
    if _is_str_field(field.annotation) and isinstance(value, (bool, int, float, dict)):
        return text  # `--set train.model.revision=0123` is the text 0123, not the number 83
    if _is_list_field(field.annotation) and value is not None and not isinstance(value, list):
        return [text if isinstance(value, (bool, int, float, dict)) else value]  # one prompt -> [prompt]
    return value


def apply_override(data: dict[str, Any], assignment: str, model: type[BaseModel]) -> None:
    """Apply one `a.b.c=value`; the value is parsed as YAML (so 3, true, [a, b] and null work)."""
    key, sep, raw = assignment.partition("=")
    key = key.strip()
    if not sep or not key:
        raise UserError(f"--set {shown(assignment)} is not KEY=VALUE: write e.g. --set train.loop.max_steps=100")
    parts = key.split(".")
    if not all(parts):
        raise UserError(
            f"--set {_key_shown(parts)}: a key is dotted names like train.loop.max_steps, without empty parts"
        )
    try:
        field = resolve_key(model, parts)
    except ValueError as e:
        raise UserError(f"--set {_key_shown(parts)}: {e}") from None
    value = _override_value(raw, field)
    node = data
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[parts[-1]] = value


def _coerce(model: type[BaseModel], data: dict[str, Any]) -> dict[str, Any]:
    """Forgive what YAML does to a hand-written file: an empty section (`train:` with everything
    commented out) is {}, and a number on a string key (`cpu: 8`) is its text."""
    out = dict(data)
    for name, value in data.items():
        field = model.model_fields.get(name) if isinstance(name, str) else None
        if field is None:
            continue
        sub = submodel(field.annotation)
        if sub is not None and value is None and sub is field.annotation:
            out[name] = {}
        elif sub is not None and isinstance(value, dict):
            out[name] = _coerce(sub, value)
        elif _is_str_field(field.annotation) and isinstance(value, (int, float)) and not isinstance(value, bool):
            out[name] = str(value)
    return out


# --- validation --------------------------------------------------------------------------------


# Keys whose value may be a credential put in the wrong place: an error about them never quotes
# the value (it names the key and the shape expected), whatever the value looks like.
_SECRET_CAPABLE = frozenset({"env", "secrets", "hub", "image_pull_secrets", "annotations"})


def _may_hold_secret(loc: list[str]) -> bool:
    parts = [p.split("[")[0] for p in loc]
    return bool(_SECRET_CAPABLE.intersection(parts)) or any(secret_env_name(p) for p in parts)


def _got(loc: list[str], value: Any) -> str:
    """What the user gave, for a message: the value itself only when it is a short scalar that
    cannot be a credential; else its shape (a list, a mapping, a string)."""
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, (list, tuple)):
        return "a list"
    text = repr(value)
    if _may_hold_secret(loc) or credential_kind(str(value), blobs=True) or len(text) > 80:
        return "a string" if isinstance(value, str) else f"a {type(value).__name__}"
    return text


def _key_shown(loc: list[str]) -> str:
    """The dotted key, with any part that looks like a credential (a token given as a key) hidden."""
    return ".".join("<hidden>" if credential_kind(p, blobs=True) else p for p in loc)


def _describe(err: dict[str, Any], model: type[BaseModel]) -> str:
    # List indices as [i] (validation.images[1]), as a user would write them.
    loc: list[str] = []
    for p in err["loc"]:
        if isinstance(p, int) and loc:
            loc[-1] += f"[{p}]"
        else:
            loc.append(str(p))
    if err["type"] == CREDENTIAL_ERROR:  # raised for a section: ctx names the key inside it
        where = err.get("ctx", {}).get("where", "")
        return f"{'.'.join([*loc, where] if where else loc) or 'the config'}: {err['msg']}"
    if not loc:  # a rule across sections (a model validator): its message names the keys
        return err["msg"].removeprefix("Value error, ")
    key = _key_shown(loc)
    if err["type"] == "extra_forbidden":
        if credential_kind(loc[-1], blobs=True):
            return f"{_key_shown(loc[:-1]) or 'the top level'}: an unknown key that looks like a credential (not shown): remove it"
        parent = _model_at(model, loc[:-1])
        if parent is not None:
            return f"{key}: {_unknown_key(parent, loc[:-1], loc[-1])}"
        return f"{key}: unknown key"
    msg = err["msg"].removeprefix("Value error, ")
    value = err.get("input")
    if err["type"] == "literal_error":
        return f"{key}: got {_got(loc, value)}; {msg[0].lower() + msg[1:]}"
    if err["type"] in ("model_type", "model_attributes_type", "dict_type"):
        if isinstance(value, list) and value and all(isinstance(v, dict) and "name" in v for v in value):
            # cluster.env written as a Pod's env list: [{name: X, value: y}]
            return (
                f"{key} is a mapping NAME: value, not a Kubernetes list of {{name, value}} entries: write "
                "e.g. `NCCL_DEBUG: WARN` (credentials go in cluster.secrets.env, by Secret reference)"
            )
        if err["type"] == "dict_type":
            return f"{key}: {msg} (got {_got(loc, value)})"
        return f"{key} is a section: give it keys (a mapping), not {_got(loc, value)}"
    if err["type"] != "value_error" and "input" in err and not isinstance(value, dict):
        # Pydantic's own messages ("Input should be a valid integer") need the value shown; ours
        # (value_error) say what is wrong with it themselves, quoting it only when that is safe.
        return f"{key}: {msg} (got {_got(loc, value)})"
    return f"{key}: {msg}"


def validate(model: type[M], data: dict[str, Any], context: dict[str, Any] | None = None) -> M:
    """`data` as a `model`, or one UserError listing every problem. `context` reaches the
    validators (`{"target": "cluster"}`: the config is about to become a job on a cluster)."""
    try:
        return model.model_validate(_coerce(model, data), context=context)
    except ValidationError as e:
        problems = [_describe(err, model) for err in e.errors()]
        raise UserError("invalid config: " + "; ".join(problems)) from None


def _load(
    model: type[M], path: str | Path | None, overrides: list[str] | None, context: dict[str, Any] | None = None
) -> M:
    data = read_yaml(path) if path else {}
    for assignment in overrides or []:
        apply_override(data, assignment, model)
    return validate(model, data, context)


def load_job_config(
    path: str | Path | None = None, overrides: list[str] | None = None, *, for_cluster: bool = False
) -> JobConfig:
    """The job config. `for_cluster`: it is about to run on a cluster (render, validate, submit),
    so the rules about pods apply too (e.g. GPUs per pod against train.loop.device); a local
    `ctrlnet train` ignores the cluster section."""
    return _load(JobConfig, path, overrides, {"target": "cluster"} if for_cluster else None)


def load_train_config(path: str | Path | None = None, overrides: list[str] | None = None) -> TrainConfig:
    """The trainer's view: the file holds the `train` section alone (the job's ConfigMap)."""
    return _load(TrainConfig, path, overrides)
