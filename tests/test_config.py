"""The typed config: diffusers flag table, docs complete (in sync: test_generated.py), YAML + --set
loading, one-line errors, CLI.

Fast: nothing here imports torch.
"""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from ctrlnet.config import JobConfig, TrainConfig, load_job_config, load_train_config
from ctrlnet.config.diffusers_flags import (
    DIFFUSERS_FLAGS,
    EXTRAS,
    FLAG_VALUES,
    FLUX_FLAGS,
    FLUX_NOTES,
    NEAREST,
    NOTES,
    SD3_FLAGS,
    SD3_NOTES,
    SDXL_FLAGS,
)
from ctrlnet.errors import UserError
from tools.gen.config_docs import field_at, iter_keys, render_config_docs

CTRLNET = Path(sys.executable).parent / "ctrlnet"

# The 52 flags of diffusers' examples/controlnet/train_controlnet.py (argparse dest names).
REFERENCE_FLAGS = (
    "pretrained_model_name_or_path",
    "controlnet_model_name_or_path",
    "revision",
    "variant",
    "tokenizer_name",
    "output_dir",
    "cache_dir",
    "seed",
    "resolution",
    "train_batch_size",
    "num_train_epochs",
    "max_train_steps",
    "checkpointing_steps",
    "checkpoints_total_limit",
    "resume_from_checkpoint",
    "gradient_accumulation_steps",
    "gradient_checkpointing",
    "learning_rate",
    "scale_lr",
    "lr_scheduler",
    "lr_warmup_steps",
    "lr_num_cycles",
    "lr_power",
    "use_8bit_adam",
    "dataloader_num_workers",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "adam_epsilon",
    "max_grad_norm",
    "push_to_hub",
    "hub_token",
    "hub_model_id",
    "logging_dir",
    "allow_tf32",
    "report_to",
    "mixed_precision",
    "enable_xformers_memory_efficient_attention",
    "set_grads_to_none",
    "dataset_name",
    "dataset_config_name",
    "train_data_dir",
    "image_column",
    "conditioning_image_column",
    "caption_column",
    "max_train_samples",
    "proportion_empty_prompts",
    "validation_prompt",
    "validation_image",
    "num_validation_images",
    "validation_steps",
    "tracker_project_name",
)
# The reference's `action="store_true"` flags.
REFERENCE_SWITCHES = {
    "gradient_checkpointing",
    "scale_lr",
    "use_8bit_adam",
    "push_to_hub",
    "allow_tf32",
    "enable_xformers_memory_efficient_attention",
    "set_grads_to_none",
}
# The reference's defaults, where it has one (flags defaulting to None or False left out).
REFERENCE_DEFAULTS = {
    "output_dir": "controlnet-model",
    "resolution": 512,
    "train_batch_size": 4,
    "num_train_epochs": 1,
    "checkpointing_steps": 500,
    "gradient_accumulation_steps": 1,
    "learning_rate": 5e-6,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 500,
    "lr_num_cycles": 1,
    "lr_power": 1.0,
    "dataloader_num_workers": 0,
    "adam_beta1": 0.9,
    "adam_beta2": 0.999,
    "adam_weight_decay": 1e-2,
    "adam_epsilon": 1e-8,
    "max_grad_norm": 1.0,
    "logging_dir": "logs",
    "report_to": "tensorboard",
    "image_column": "image",
    "conditioning_image_column": "conditioning_image",
    "caption_column": "text",
    "proportion_empty_prompts": 0.0,
    "num_validation_images": 4,
    "validation_steps": 100,
    "tracker_project_name": "train_controlnet",
}

# The 57 flags of diffusers' examples/controlnet/train_controlnet_sdxl.py (argparse dest names): the
# 52 above plus its own five.
SDXL_REFERENCE_FLAGS = (
    *REFERENCE_FLAGS,
    "pretrained_vae_model_name_or_path",
    "crops_coords_top_left_h",
    "crops_coords_top_left_w",
    "enable_npu_flash_attention",
    "image_interpolation_mode",
)
SDXL_REFERENCE_SWITCHES = REFERENCE_SWITCHES | {"enable_npu_flash_attention"}
# The SDXL script's defaults where ctrlnet's equal them: the SD script's, less tracker_project_name
# (`sd_xl_train_controlnet` there), crops_coords_top_left_h/_w (0, 0 there; unset here = each image's
# own offset) and image_interpolation_mode (`lanczos` there; `auto` here = lanczos for SDXL).
SDXL_REFERENCE_DEFAULTS = {flag: v for flag, v in REFERENCE_DEFAULTS.items() if flag != "tracker_project_name"}

# The flags of diffusers' examples/controlnet/train_controlnet_sd3.py (argparse dest names): the SD
# script's less tokenizer_name and the xformers switch, plus its own nine.
SD3_OWN_FLAGS = {
    "num_extra_conditioning_channels": None,
    "upcast_vae": False,
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "precondition_outputs": 1,
    "max_sequence_length": 77,
    "dataset_preprocess_batch_size": 1000,
}
SD3_REFERENCE_FLAGS = (
    *(f for f in REFERENCE_FLAGS if f not in ("tokenizer_name", "enable_xformers_memory_efficient_attention")),
    *SD3_OWN_FLAGS,
)
# The flags of train_controlnet_flux.py: the SD script's less train_data_dir, the SDXL script's five,
# plus its own eleven (value: the script's default, None where the default needs a note or is None).
FLUX_OWN_FLAGS = {
    "use_adafactor": False,
    "num_double_layers": 4,
    "num_single_layers": 4,
    "jsonl_for_train": None,
    "guidance_scale": 3.5,
    "save_weight_dtype": "fp32",
    "weighting_scheme": "logit_normal",
    "logit_mean": 0.0,
    "logit_std": 1.0,
    "mode_scale": 1.29,
    "enable_model_cpu_offload": False,
}
FLUX_REFERENCE_FLAGS = (
    *(f for f in SDXL_REFERENCE_FLAGS if f != "train_data_dir"),
    *FLUX_OWN_FLAGS,
)
FLOW_SWITCHES = {"upcast_vae", "use_adafactor", "enable_model_cpu_offload"}

LEAF_KEYS = dict(iter_keys())


def _get(cfg: JobConfig, key: str):
    node = cfg
    for part in key.split("."):
        node = getattr(node, part)
    return node


def _write(tmp_path: Path, text: str, name: str = "job.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


# --- the diffusers flag table and the docs -----------------------------------------------------


def test_every_reference_flag_is_mapped():
    assert len(REFERENCE_FLAGS) == len(set(REFERENCE_FLAGS)) == 52
    assert set(DIFFUSERS_FLAGS) == set(REFERENCE_FLAGS)


@pytest.mark.parametrize("flag", REFERENCE_FLAGS)
def test_each_flag_maps_to_a_real_key(flag):
    key = DIFFUSERS_FLAGS[flag]
    assert key.startswith("train."), key
    assert key in LEAF_KEYS, f"--{flag} -> {key}: no such key in JobConfig"
    field = field_at(key)
    if flag in FLAG_VALUES:  # the value the switch stands for is one the key accepts
        cfg = load_job_config(overrides=[f"{key}={FLAG_VALUES[flag]}"])
        assert _get(cfg, key) == FLAG_VALUES[flag]
    elif flag in REFERENCE_SWITCHES:
        assert field.annotation is bool, f"--{flag} is a switch but {key} is not a bool"


def test_defaults_follow_the_reference():
    cfg = JobConfig()
    for flag, default in REFERENCE_DEFAULTS.items():
        assert _get(cfg, DIFFUSERS_FLAGS[flag]) == default, flag
    for flag in REFERENCE_SWITCHES - set(FLAG_VALUES):
        assert _get(cfg, DIFFUSERS_FLAGS[flag]) is False, flag


def test_notes_and_extras_name_real_things():
    every = set(DIFFUSERS_FLAGS) | set(SDXL_FLAGS) | set(SD3_FLAGS) | set(FLUX_FLAGS)
    assert set(NOTES) <= every
    assert set(FLAG_VALUES) <= every
    assert NEAREST <= set(NOTES)  # a flag with no equivalent says why, and what ctrlnet does instead
    assert set(SD3_NOTES) <= set(SD3_REFERENCE_FLAGS) | set(REFERENCE_FLAGS)
    assert set(FLUX_NOTES) <= set(FLUX_REFERENCE_FLAGS) | set(REFERENCE_FLAGS)
    for key in EXTRAS:
        field_at(key)  # a section or a leaf; KeyError if it is not a key
    tables = (DIFFUSERS_FLAGS, SDXL_FLAGS, SD3_FLAGS, FLUX_FLAGS)
    mapped = {k for table in tables for flag, k in table.items() if flag not in NEAREST}  # nearest: not the same
    for key in EXTRAS:
        assert key not in mapped, f"{key} is in EXTRAS but a reference flag maps to it"


def test_docs_cover_every_flag_and_key():
    text = render_config_docs()
    for flag in REFERENCE_FLAGS:
        assert f"`--{flag}`" in text
    for key in LEAF_KEYS:
        assert f"| `{key}` |" in text, f"{key} missing from the key reference"


def _sdxl_key(flag: str) -> str:
    return SDXL_FLAGS.get(flag) or DIFFUSERS_FLAGS[flag]


def test_every_sdxl_reference_flag_is_mapped():
    assert len(SDXL_REFERENCE_FLAGS) == len(set(SDXL_REFERENCE_FLAGS)) == 57
    assert set(REFERENCE_FLAGS) < set(SDXL_REFERENCE_FLAGS)
    assert set(SDXL_FLAGS) == set(SDXL_REFERENCE_FLAGS) - set(REFERENCE_FLAGS)
    assert not set(SDXL_FLAGS) & set(DIFFUSERS_FLAGS)


@pytest.mark.parametrize("flag", sorted(set(SDXL_REFERENCE_FLAGS) - set(REFERENCE_FLAGS)))
def test_each_sdxl_flag_maps_to_a_real_key(flag):
    key = SDXL_FLAGS[flag]
    assert key.startswith("train."), key
    assert key in LEAF_KEYS, f"--{flag} -> {key}: no such key in JobConfig"
    field = field_at(key)
    if flag in FLAG_VALUES:
        cfg = load_job_config(overrides=[f"{key}={FLAG_VALUES[flag]}"])
        assert _get(cfg, key) == FLAG_VALUES[flag]
    elif flag in SDXL_REFERENCE_SWITCHES:
        assert field.annotation is bool, f"--{flag} is a switch but {key} is not a bool"


def test_sdxl_mapping_values():
    assert SDXL_FLAGS["pretrained_vae_model_name_or_path"] == "train.model.vae"
    assert SDXL_FLAGS["crops_coords_top_left_h"] == SDXL_FLAGS["crops_coords_top_left_w"]
    assert SDXL_FLAGS["crops_coords_top_left_h"] == "train.data.crops_coords_top_left"
    assert SDXL_FLAGS["image_interpolation_mode"] == "train.data.interpolation"
    cfg = load_job_config(
        overrides=[
            "train.model.vae=madebyollin/sdxl-vae-fp16-fix",
            "train.data.crops_coords_top_left=[0, 0]",
            "train.data.interpolation=lanczos",  # the SDXL script's default
        ]
    )
    assert cfg.train.model.vae == "madebyollin/sdxl-vae-fp16-fix"
    assert cfg.train.data.crops_coords_top_left == [0, 0]
    assert cfg.train.data.interpolation == "lanczos"


def test_sdxl_defaults_follow_the_reference():
    cfg = JobConfig()
    for flag, default in SDXL_REFERENCE_DEFAULTS.items():
        assert _get(cfg, _sdxl_key(flag)) == default, flag
    for flag in SDXL_REFERENCE_SWITCHES - set(FLAG_VALUES):
        assert _get(cfg, _sdxl_key(flag)) is False, flag
    # where they differ, the docs say so
    for flag in ("tracker_project_name", "crops_coords_top_left_h", "image_interpolation_mode"):
        assert flag in NOTES, flag
    assert cfg.train.model.vae is None  # the script's default: the base's own VAE
    assert cfg.train.data.interpolation == "auto" and cfg.train.data.crops_coords_top_left is None


def test_sdxl_docs_cover_every_flag():
    text = render_config_docs()
    for flag in SDXL_REFERENCE_FLAGS:
        assert f"`--{flag}`" in text, flag
    assert "train_controlnet_sdxl.py" in text
    for flag, key in SDXL_FLAGS.items():
        shown = f"{key}={FLAG_VALUES[flag]}" if flag in FLAG_VALUES else key
        assert f"| `--{flag}` | `{shown}` |" in text, flag


@pytest.mark.parametrize(
    ("script", "flags", "own", "table"),
    [
        ("sd3", SD3_REFERENCE_FLAGS, SD3_OWN_FLAGS, SD3_FLAGS),
        ("flux", FLUX_REFERENCE_FLAGS, FLUX_OWN_FLAGS, FLUX_FLAGS),
    ],
)
def test_every_flow_reference_flag_is_mapped(script, flags, own, table):
    assert len(flags) == len(set(flags)) == {"sd3": 59, "flux": 67}[script]
    shared = set(DIFFUSERS_FLAGS) | set(SDXL_FLAGS)
    assert set(table) == set(flags) - shared == set(own)
    for flag in flags:  # every flag of the script has a key, in its own table or a shared one
        key = table.get(flag) or DIFFUSERS_FLAGS.get(flag) or SDXL_FLAGS[flag]
        assert key in LEAF_KEYS, f"--{flag} -> {key}: no such key in JobConfig"


@pytest.mark.parametrize("flag", sorted(set(SD3_FLAGS) | set(FLUX_FLAGS)))
def test_each_flow_flag_maps_to_a_real_key(flag):
    key = SD3_FLAGS.get(flag) or FLUX_FLAGS[flag]
    assert SD3_FLAGS.get(flag, key) == FLUX_FLAGS.get(flag, key), "a flag of both scripts maps to one key"
    assert key.startswith("train."), key
    assert key in LEAF_KEYS, f"--{flag} -> {key}: no such key in JobConfig"
    field = field_at(key)
    if flag in FLAG_VALUES:
        cfg = load_job_config(overrides=[f"{key}={FLAG_VALUES[flag]}"])
        assert _get(cfg, key) == FLAG_VALUES[flag]
    elif flag in FLOW_SWITCHES and flag not in NEAREST:
        assert field.annotation is bool, f"--{flag} is a switch but {key} is not a bool"
    if flag in NEAREST:
        assert flag in NOTES and NOTES[flag].startswith("No key of its own")


def test_flow_mapping_values():
    assert FLUX_FLAGS["num_double_layers"] == "train.model.controlnet_layers"
    assert FLUX_FLAGS["num_single_layers"] == "train.model.controlnet_single_layers"
    assert FLUX_FLAGS["use_adafactor"] == "train.optim.optimizer" and FLAG_VALUES["use_adafactor"] == "adafactor"
    assert FLUX_FLAGS["save_weight_dtype"] == "train.checkpoint.final_dtype"
    assert FLUX_FLAGS["jsonl_for_train"] == DIFFUSERS_FLAGS["dataset_name"] == "train.data.dataset"
    cfg = load_job_config(
        overrides=[
            "train.model.family=flux",
            "train.model.controlnet_layers=2",
            "train.model.controlnet_single_layers=0",
            "train.optim.optimizer=adafactor",
            "train.checkpoint.final_dtype=bf16",
            "train.data.dataset=./train.jsonl",
            "train.loop.weighting_scheme=mode",
        ]
    )
    t = cfg.train
    assert (t.model.controlnet_layers, t.model.controlnet_single_layers, t.optim.optimizer) == (2, 0, "adafactor")
    assert (t.checkpoint.final_dtype, t.data.dataset, t.loop.weighting_scheme) == ("bf16", "./train.jsonl", "mode")
    for bad in ("train.checkpoint.final_dtype=fp8", "train.optim.optimizer=adafactor8bit"):
        with pytest.raises(UserError):
            load_job_config(overrides=[bad])


def test_flow_defaults_follow_the_references_or_say_why():
    cfg = JobConfig()
    for own in (SD3_OWN_FLAGS, FLUX_OWN_FLAGS):
        for flag, default in own.items():
            if flag in NEAREST or flag in FLOW_SWITCHES:
                continue
            table = SD3_FLAGS if flag in SD3_FLAGS else FLUX_FLAGS
            value = _get(cfg, table[flag])
            if value != default and flag not in NOTES:
                raise AssertionError(f"--{flag}: ctrlnet's default {value!r} differs from {default!r} without a note")
    assert cfg.train.optim.optimizer == "adamw" and cfg.train.checkpoint.final_dtype == "fp32"
    # where the scripts' defaults or meanings differ from ctrlnet's, the docs say so
    for flag in ("max_sequence_length", "precondition_outputs"):
        assert flag in NOTES, flag
    assert "conditioning_image_column" in SD3_NOTES and "conditioning_image_column" in FLUX_NOTES
    for flag in ("tracker_project_name", "num_validation_images", "weighting_scheme"):
        assert flag in FLUX_NOTES, flag
    assert "77" in NOTES["max_sequence_length"] and "256" in NOTES["max_sequence_length"]
    assert "flux_train_controlnet" in FLUX_NOTES["tracker_project_name"]
    assert "[-1, 1]" in FLUX_NOTES["conditioning_image_column"]


def test_flow_docs_cover_every_flag():
    text = render_config_docs()
    for script, table, notes in (("sd3", SD3_FLAGS, SD3_NOTES), ("flux", FLUX_FLAGS, FLUX_NOTES)):
        section = text.split(f"### From `train_controlnet_{script}.py`", 1)[1].split("\n### ", 1)[0]
        for flag, key in table.items():
            if flag in NEAREST:
                shown = f"none (nearest: `{key}`)"
            else:
                shown = f"`{key}={FLAG_VALUES[flag]}`" if flag in FLAG_VALUES else f"`{key}`"
            assert f"| `--{flag}` | {shown} |" in section, flag
        for flag in notes:
            assert f"| `--{flag}` |" in section, flag
    for key in ("train.model.control_modes", "train.data.control_mode_column", "train.validation.control_modes"):
        assert f"| `{key}` |" in text.split("### What ctrlnet adds", 1)[1].split("## Every key", 1)[0], key


# --- YAML + --set ------------------------------------------------------------------------------


def test_yaml_file_loads(tmp_path):
    p = _write(
        tmp_path,
        """
train:
  output: s3://bucket/run
  loop: {batch_size: 2, seed: 3, mixed_precision: bf16}
  validation:
    prompts: [a red circle]
    images: [cond.png]
cluster:
  nodes: 2
  resources: {memory: 32Gi}
""",
    )
    cfg = load_job_config(p)
    assert cfg.train.output == "s3://bucket/run"
    assert (cfg.train.loop.batch_size, cfg.train.loop.seed, cfg.train.loop.mixed_precision) == (2, 3, "bf16")
    assert cfg.train.validation.pairs() == [("a red circle", "cond.png")]
    assert cfg.cluster.nodes == 2 and cfg.cluster.resources.memory == "32Gi"
    assert cfg.train.optim.learning_rate == 5e-6  # untouched keys keep their defaults


def test_overrides_parse_values_as_yaml(tmp_path):
    p = _write(tmp_path, "train:\n  loop:\n    seed: 3\n")
    cfg = load_job_config(
        p,
        [
            "train.loop.max_steps=100",  # int
            "train.optim.learning_rate=1e-4",  # float without a dot
            "train.data.proportion_empty_prompts=0.5",  # float
            "train.loop.gradient_checkpointing=true",  # bool
            "train.validation.prompts=[a red circle, a blue square]",  # list
            "train.validation.images=[c.png]",
            "train.loop.seed=null",  # null overrides the file's value
            "train.optim.max_grad_norm=null",
        ],
    )
    assert cfg.train.loop.max_steps == 100
    assert cfg.train.optim.learning_rate == pytest.approx(1e-4)
    assert cfg.train.data.proportion_empty_prompts == 0.5
    assert cfg.train.loop.gradient_checkpointing is True
    assert cfg.train.validation.prompts == ["a red circle", "a blue square"]
    assert cfg.train.loop.seed is None
    assert cfg.train.optim.max_grad_norm is None


def test_later_overrides_win_and_nested_keys_are_created(tmp_path):
    p = _write(tmp_path, "train:\n  output: runs/a\n")
    cfg = load_job_config(
        p,
        [
            "train.loop.max_steps=10",
            "train.loop.max_steps=20",
            "train.output=runs/b",
            "cluster.resources.memory=8Gi",  # neither cluster nor resources is in the file
            "cluster.secrets.s3=my-s3-secret",
        ],
    )
    assert cfg.train.loop.max_steps == 20
    assert cfg.train.output == "runs/b"
    assert cfg.cluster.resources.memory == "8Gi"
    assert cfg.cluster.secrets.s3 == "my-s3-secret"


def test_override_replaces_a_scalar_in_the_way(tmp_path):
    p = _write(tmp_path, "train:\n  loop: {batch_size: 2}\n")
    cfg = load_job_config(p, ["train.loop.batch_size=8", "train.loop.allow_tf32=true"])
    assert (cfg.train.loop.batch_size, cfg.train.loop.allow_tf32) == (8, True)


def test_text_stays_text(tmp_path):
    """YAML 1.1 turns `no` into False and `0123` into 83; a config means the words typed."""
    p = _write(tmp_path, "train:\n  loop:\n    mixed_precision: no\ncluster:\n  resources:\n    cpu: 8\n")
    cfg = load_job_config(p)
    assert cfg.train.loop.mixed_precision == "no"
    assert cfg.cluster.resources.cpu == "8"
    cfg = load_job_config(
        overrides=[
            "train.loop.mixed_precision=no",
            "train.model.revision=0123",
            "cluster.name=yes",
            "train.hub.push=yes",
            "train.validation.prompts=a photo: red circle",
            "train.validation.images=c.png",
        ]
    )
    assert cfg.train.loop.mixed_precision == "no"
    assert cfg.train.model.revision == "0123"
    assert cfg.cluster.name == "yes"
    assert cfg.train.hub.push is True  # bool keys still take yes/no
    assert cfg.train.validation.prompts == ["a photo: red circle"]  # one value -> one-item list
    assert cfg.train.validation.images == ["c.png"]


def test_empty_file_and_empty_sections_give_defaults(tmp_path):
    assert load_job_config(_write(tmp_path, "")) == JobConfig()
    assert load_job_config(_write(tmp_path, "# nothing yet\ntrain:\ncluster:\n", "e.yaml")) == JobConfig()


def test_trainer_view_loads_the_train_section_alone(tmp_path):
    p = _write(tmp_path, "output: runs/x\nloop: {max_steps: 5}\n")
    cfg = load_train_config(p, ["data.resolution=64"])
    assert isinstance(cfg, TrainConfig)
    assert (cfg.output, cfg.loop.max_steps, cfg.data.resolution) == ("runs/x", 5, 64)
    with pytest.raises(UserError, match="drop the `train:` level"):
        load_train_config(_write(tmp_path, "train:\n  output: x\n", "job.yaml"))


def test_shown_config_round_trips(tmp_path):
    cfg = load_job_config(overrides=["train.loop.mixed_precision=no", "train.model.revision=0123"])
    dumped = yaml.safe_dump(cfg.model_dump(mode="json"), sort_keys=False)
    assert load_job_config(_write(tmp_path, dumped)) == cfg


# --- errors: one UserError line naming the key and what is allowed -----------------------------


def _error(tmp_path, file_text=None, overrides=(), path=None) -> str:
    if file_text is not None:
        path = _write(tmp_path, file_text)
    with pytest.raises(UserError) as info:
        load_job_config(path, list(overrides))
    msg = str(info.value)
    assert "\n" not in msg, msg
    return msg


def test_unknown_key_in_file(tmp_path):
    msg = _error(tmp_path, "train:\n  optim:\n    lr: 1.0e-4\n")
    assert "train.optim.lr" in msg and "learning_rate" in msg


def test_unknown_key_in_set(tmp_path):
    msg = _error(tmp_path, overrides=["train.optim.lr=1e-4"])
    assert "train.optim.lr" in msg and "learning_rate" in msg
    msg = _error(tmp_path, overrides=["train.nope.x=1"])
    assert "'nope'" in msg and "optim" in msg  # names the first bad part and the keys allowed there
    msg = _error(tmp_path, overrides=["train.output.x=1"])
    assert "train.output is a value" in msg
    msg = _error(tmp_path, overrides=["nope=1"])
    assert "'nope'" in msg and "cluster" in msg and "train" in msg


def test_unknown_key_that_is_a_diffusers_flag_points_to_its_key(tmp_path):
    msg = _error(tmp_path, overrides=["train.loop.train_batch_size=8"])
    assert "train.loop.batch_size" in msg
    msg = _error(tmp_path, "train:\n  max_train_steps: 10\n")
    assert "train.max_train_steps" in msg and "train.loop.max_steps" in msg


def test_unknown_key_that_is_an_sdxl_flag_points_to_its_key(tmp_path):
    msg = _error(tmp_path, "train:\n  model:\n    pretrained_vae_model_name_or_path: madebyollin/sdxl-vae-fp16-fix\n")
    assert "train.model.pretrained_vae_model_name_or_path" in msg
    assert "diffusers' --pretrained_vae_model_name_or_path is train.model.vae" in msg
    msg = _error(tmp_path, overrides=["train.data.image_interpolation_mode=lanczos"])
    assert "diffusers' --image_interpolation_mode is train.data.interpolation" in msg
    msg = _error(tmp_path, overrides=["train.data.crops_coords_top_left_h=0"])
    assert "diffusers' --crops_coords_top_left_h is train.data.crops_coords_top_left" in msg


def test_unknown_key_that_is_an_sd3_or_flux_flag_points_to_its_key(tmp_path):
    msg = _error(tmp_path, overrides=["train.num_double_layers=2"])
    assert "diffusers' --num_double_layers is train.model.controlnet_layers" in msg
    msg = _error(tmp_path, "train:\n  model:\n    weighting_scheme: mode\n")
    assert "train.model.weighting_scheme" in msg
    assert "diffusers' --weighting_scheme is train.loop.weighting_scheme" in msg
    msg = _error(tmp_path, overrides=["train.model.num_single_layers=0"])
    assert "diffusers' --num_single_layers is train.model.controlnet_single_layers" in msg
    msg = _error(tmp_path, overrides=["train.optim.use_adafactor=true"])
    assert "diffusers' --use_adafactor is train.optim.optimizer=adafactor" in msg
    msg = _error(tmp_path, overrides=["train.save_weight_dtype=bf16"])
    assert "diffusers' --save_weight_dtype is train.checkpoint.final_dtype" in msg
    msg = _error(tmp_path, overrides=["train.data.jsonl_for_train=./rows.jsonl"])
    assert "diffusers' --jsonl_for_train is train.data.dataset" in msg
    msg = _error(tmp_path, overrides=["train.upcast_vae=true"])
    assert "diffusers' --upcast_vae is train.model.upcast_vae" in msg
    # a flag with no equivalent names the nearest key without calling it the same thing
    msg = _error(tmp_path, overrides=["train.data.dataset_preprocess_batch_size=1000"])
    assert "--dataset_preprocess_batch_size has no equivalent here" in msg and "train.data.cache" in msg
    msg = _error(tmp_path, overrides=["train.loop.enable_model_cpu_offload=true"])
    assert "--enable_model_cpu_offload has no equivalent here" in msg


def test_bad_set_syntax(tmp_path):
    assert "KEY=VALUE" in _error(tmp_path, overrides=["train.loop.max_steps"])
    assert "empty parts" in _error(tmp_path, overrides=["train..max_steps=1"])


def test_resolution_must_be_a_multiple_of_8(tmp_path):
    msg = _error(tmp_path, overrides=["train.data.resolution=63"])
    assert "train.data.resolution" in msg and "multiple of 8" in msg and "56" in msg


def test_unknown_mixed_precision(tmp_path):
    msg = _error(tmp_path, overrides=["train.loop.mixed_precision=fp8"])
    assert "train.loop.mixed_precision" in msg and "'fp8'" in msg
    assert all(v in msg for v in ("'no'", "'fp16'", "'bf16'"))


@pytest.mark.parametrize("value", ["[1]", "[1, 2, 3]", "[]"])
def test_crops_coords_top_left_is_one_pair(tmp_path, value):
    msg = _error(tmp_path, overrides=[f"train.data.crops_coords_top_left={value}"])
    assert "train.data.crops_coords_top_left" in msg and "two offsets" in msg


def test_crops_coords_top_left_is_not_negative(tmp_path):
    msg = _error(tmp_path, overrides=["train.data.crops_coords_top_left=[-1, 0]"])
    assert "train.data.crops_coords_top_left" in msg and ">= 0" in msg and "[top, left]" in msg


def test_unknown_interpolation(tmp_path):
    msg = _error(tmp_path, overrides=["train.data.interpolation=hamming"])
    assert "train.data.interpolation" in msg and "'hamming'" in msg
    assert all(v in msg for v in ("'auto'", "'bilinear'", "'lanczos'"))


def test_validation_prompts_and_images_must_pair(tmp_path):
    msg = _error(tmp_path, overrides=["train.validation.prompts=[a, b]", "train.validation.images=[x, y, z]"])
    assert "validation.prompts has 2" in msg and "validation.images has 3" in msg and "same number" in msg
    msg = _error(tmp_path, overrides=["train.validation.prompts=[a]"])
    assert "validation.images" in msg


def test_section_given_a_scalar(tmp_path):
    msg = _error(tmp_path, "train:\n  data: 3\n")
    assert "train.data" in msg and "section" in msg


def test_bad_yaml(tmp_path):
    msg = _error(tmp_path, "train:\n  loop: [\n")
    assert "not valid YAML" in msg and "line" in msg


def test_missing_file(tmp_path):
    msg = _error(tmp_path, path=tmp_path / "nope.yaml")
    assert "nope.yaml" in msg and "does not exist" in msg
    assert "directory" in _error(tmp_path, path=tmp_path)


def test_top_level_list(tmp_path):
    msg = _error(tmp_path, "- train\n- cluster\n")
    assert "mapping" in msg and "list" in msg


# --- the CLI -----------------------------------------------------------------------------------


def _ctrlnet(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    assert CTRLNET.exists(), f"console script {CTRLNET} missing: pip install -e ."
    return subprocess.run([str(CTRLNET), *args], capture_output=True, text=True, cwd=cwd, timeout=60)


@pytest.mark.parametrize(
    "args, word",
    [
        (["--set", "train.data.resolution=63"], "resolution"),
        (["--set", "train.optim.lr=1"], "train.optim.lr"),
        (["-f", "missing.yaml"], "missing.yaml"),
    ],
)
def test_cli_bad_input_is_one_error_line(tmp_path, args, word):
    r = _ctrlnet("config", "show", *args, cwd=tmp_path)
    assert r.returncode == 2, r
    assert "Traceback" not in r.stderr
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith("error:") and word in lines[0]
    assert r.stdout == ""


def test_cli_show_prints_the_effective_config(tmp_path):
    _write(tmp_path, "train:\n  loop:\n    batch_size: 2\ncluster:\n  nodes: 3\n", "x.yaml")
    sets = [
        "train.loop.max_steps=7",
        "train.validation.prompts=[p]",
        "train.validation.images=[c.png]",
        "train.loop.mixed_precision=no",
        "cluster.resources.cpu=4",
    ]
    r = _ctrlnet("config", "show", "-f", "x.yaml", *[a for s in sets for a in ("--set", s)], cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    shown = JobConfig.model_validate(yaml.safe_load(r.stdout))
    assert shown == load_job_config(tmp_path / "x.yaml", sets)
    assert (shown.train.loop.batch_size, shown.train.loop.max_steps, shown.cluster.nodes) == (2, 7, 3)
    assert shown.train.loop.mixed_precision == "no" and shown.cluster.resources.cpu == "4"
    assert shown.train.validation.pairs() == [("p", "c.png")]


def test_cli_schema(tmp_path):
    r = _ctrlnet("config", "schema", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    schema = json.loads(r.stdout)
    assert {"train", "cluster"} <= set(schema["properties"])


# --- what the cluster would refuse, refused by the model with the config key named -----------------


def test_duplicate_key_names_the_key_and_both_lines(tmp_path):
    msg = _error(tmp_path, "train:\n  loop:\n    max_steps: 100\n    batch_size: 2\n    max_steps: 10\n")
    assert "'max_steps'" in msg and "lines 3 and 5" in msg and "job.yaml" in msg
    msg = _error(tmp_path, "train: {}\ncluster: {}\ntrain: {}\n")
    assert "'train'" in msg and "lines 1 and 3" in msg
    # A merge key may be overridden: that is what it is for.
    anchors = "x: &d {batch_size: 2}\n"
    with pytest.raises(UserError, match="unknown key 'x'"):  # loads as YAML; x itself is no config key
        load_job_config(_write(tmp_path, anchors + "train:\n  loop:\n    <<: *d\n    batch_size: 4\n"))


@pytest.mark.parametrize(
    "setting, words",
    [
        ("cluster.resources.memory=64GB", ["cluster.resources.memory", "'64GB'", "64Gi"]),
        ("cluster.resources.cpu=8 cores", ["cluster.resources.cpu", "7500m"]),
        ("cluster.resources.ephemeral_storage=100 GiB", ["cluster.resources.ephemeral_storage"]),
        ("cluster.shm_size=16gb", ["cluster.shm_size", "16Gi"]),
        ("cluster.cache.size=-5Gi", ["cluster.cache.size", "quantity"]),
        ("cluster.labels={team: ml team}", ["cluster.labels", "team", "label value"]),
        ("cluster.labels={'Team Name': ml}", ["cluster.labels", "label key"]),
        (f"cluster.labels={{team: {'x' * 64}}}", ["cluster.labels", "63"]),
        ("cluster.annotations={'example.com/a/b': x}", ["cluster.annotations", "annotation key"]),
        ("cluster.service_account.annotations={'bad key': x}", ["cluster.service_account.annotations"]),
        ("cluster.node_selector={gpu: A100 80GB}", ["cluster.node_selector", "label value"]),
        ("cluster.kueue.queue=team queue", ["cluster.kueue.queue", "label value"]),
    ],
)
def test_kubernetes_syntax_is_checked_by_the_model(tmp_path, setting, words):
    msg = _error(tmp_path, overrides=[setting])
    for word in words:
        assert word in msg, msg


def test_valid_kubernetes_values_load():
    cfg = load_job_config(
        None,
        [
            "cluster.resources={cpu: 7500m, memory: 64Gi, ephemeral_storage: 100G}",
            "cluster.shm_size=1.5Gi",
            "cluster.labels={team: ml, example.com/cost-center: a-1}",
            "cluster.annotations={example.com/note: 'free text, spaces ok'}",
            "cluster.node_selector={nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3}",
        ],
    )
    assert cfg.cluster.resources.cpu == "7500m" and cfg.cluster.labels["example.com/cost-center"] == "a-1"


def test_gpu_and_device_must_agree_for_a_cluster_job():
    def err(*sets):
        with pytest.raises(UserError) as e:
            load_job_config(None, list(sets), for_cluster=True)
        return str(e.value)

    msg = err("cluster.gpus_per_node=0", "train.loop.device=cuda")
    assert "cluster.gpus_per_node is 0" in msg and "train.loop.device" in msg
    msg = err("cluster.gpus_per_node=2", "train.loop.device=cpu")
    assert "cluster.gpus_per_node is 2" in msg and "gpus_per_node: 0" in msg
    msg = err("train.loop.device=cpu")  # the default is one GPU per pod
    assert "cluster.gpus_per_node is 1" in msg
    # What agrees loads; a local run ignores the cluster section.
    load_job_config(None, ["cluster.gpus_per_node=0", "train.loop.device=cpu"], for_cluster=True)
    load_job_config(None, ["cluster.gpus_per_node=4", "train.loop.device=auto"], for_cluster=True)
    load_job_config(None, ["train.loop.device=cpu"])


# --- bounds: what a slip can cost ------------------------------------------------------------------


def _leaf_fields(model, path=()):
    from ctrlnet.config.loading import submodel

    for name, field in model.model_fields.items():
        sub = submodel(field.annotation)
        if sub is not None:
            yield from _leaf_fields(sub, (*path, name))
        else:
            yield ".".join((*path, name)), field


def _numeric(field, kind) -> bool:
    import types
    import typing

    union = typing.get_origin(field.annotation) in (typing.Union, types.UnionType)
    options = typing.get_args(field.annotation) if union else (field.annotation,)
    return kind in options  # a scalar (lists are checked by their own validators: ports, offsets)


def test_every_int_key_has_an_upper_bound():
    """Every count and size a user types is bounded in the model (so render, validate and config
    show refuse a slip too), and the bound is in the schema the chart checks values against."""
    import annotated_types as at

    unbounded = [
        key
        for key, field in _leaf_fields(JobConfig)
        if _numeric(field, int) and not any(isinstance(m, (at.Le, at.Lt)) for m in field.metadata)
    ]
    assert unbounded == []
    schema = JobConfig.model_json_schema()
    data = schema["$defs"]["DataConfig"]["properties"]
    assert data["resolution"]["maximum"] == 4096 and data["synthetic_rows"]["maximum"] == 100_000_000


@pytest.mark.parametrize("value", ["1e309", "-1e309", "inf", "-inf", ".inf", "-.inf", "nan", ".nan", "NaN"])
def test_every_float_key_refuses_non_finite_numbers(tmp_path, value):
    floats = [key for key, field in _leaf_fields(JobConfig) if _numeric(field, float)]
    assert "train.optim.learning_rate" in floats and "train.optim.lr_power" in floats
    for key in floats:
        msg = _error(tmp_path, overrides=[f"{key}={value}"])
        assert f"{key}: Input should be a finite number" in msg, msg


def test_non_finite_numbers_in_the_file_are_refused(tmp_path):
    msg = _error(tmp_path, "train:\n  optim:\n    learning_rate: .inf\n    lr_power: 1.0e309\n")
    assert "train.optim.learning_rate: Input should be a finite number" in msg
    assert "train.optim.lr_power: Input should be a finite number" in msg


@pytest.mark.parametrize(
    ("override", "key"),
    [
        ("train.data.resolution=100000", "train.data.resolution"),
        ("train.data.synthetic_rows=1000000000000", "train.data.synthetic_rows"),
        ("train.loop.max_steps=1000000000000", "train.loop.max_steps"),
        ("train.loop.batch_size=1000000", "train.loop.batch_size"),
        ("train.data.num_workers=1000", "train.data.num_workers"),
        ("train.validation.num_images=1000", "train.validation.num_images"),
        ("train.validation.num_inference_steps=100000", "train.validation.num_inference_steps"),
        ("cluster.gpus_per_node=1000", "cluster.gpus_per_node"),
    ],
)
def test_sizes_over_their_bound_are_refused(tmp_path, override, key):
    msg = _error(tmp_path, overrides=[override])
    assert f"{key}: Input should be less than or equal to" in msg


def test_text_over_its_bound_is_refused(tmp_path):
    msg = _error(
        tmp_path, overrides=["train.validation.prompts=[" + "a" * 5000 + "]", "train.validation.images=[c.png]"]
    )
    assert "train.validation.prompts[0]: String should have at most 4096 characters" in msg
    assert "aaaa" not in msg


def test_bounds_at_their_limit_are_accepted(tmp_path):
    cfg = load_job_config(None, ["train.data.resolution=4096", "train.loop.max_steps=100000000"])
    assert cfg.train.data.resolution == 4096


# --- the YAML reader's own bounds ---------------------------------------------------------------


@pytest.mark.timeout(30)
def test_an_alias_bomb_is_refused_quickly(tmp_path):
    lines = ["train:", '  a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    lines += [f"  {n}: &{n} [{','.join([f'*{p}'] * 9)}]" for p, n in zip("abcdefgh", "bcdefghi", strict=True)]
    p = _write(tmp_path, "\n".join(lines) + "\n")
    msg = _error(tmp_path, path=p)
    assert msg.startswith(f"config file {p} is refused: it holds more than 100000 values with its aliases expanded")


def test_too_many_aliases_are_refused(tmp_path):
    text = "x: &x 1\ntrain:\n  validation:\n    prompts: [" + ", ".join(["*x"] * 1001) + "]\n"
    msg = _error(tmp_path, text)
    assert "is refused: it uses more than 1000 aliases" in msg


def test_anchors_and_aliases_within_bounds_still_work(tmp_path):
    p = _write(tmp_path, "train:\n  checkpoint: {every_steps: &n 50}\n  validation: {every_steps: *n}\n")
    cfg = load_job_config(p)
    assert cfg.train.checkpoint.every_steps == cfg.train.validation.every_steps == 50


def test_a_file_over_the_size_bound_is_refused_unread(tmp_path):
    p = tmp_path / "big.yaml"
    p.write_text("# " + "x" * (1024 * 1024) + "\n", encoding="utf-8")
    msg = _error(tmp_path, path=p)
    assert msg == f"config file {p} is larger than 1024 KiB (the most read): pass the job's YAML file (a few KiB)"


def test_a_value_containing_itself_is_refused(tmp_path):
    msg = _error(tmp_path, "train: &t\n  model: *t\n")
    assert "is refused: a value contains itself" in msg
