"""No accepted setting fails late: every strategy x ZeRO stage x offload combination, and every
value of every enum in the train config, either trains 2 steps, checkpoints and resumes exactly
on CPU, or is refused before training starts with one line."""

from __future__ import annotations

import json
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from ctrlnet.config.loading import validate
from ctrlnet.config.train import FLOW_FAMILIES, TrainConfig
from ctrlnet.errors import UserError
from testkit.training import max_weight_diff, merge, small_config_dict
from testkit.zero3 import torchrun

TINY = {
    "data": {"synthetic_rows": 16, "resolution": 32},
    "loop": {"batch_size": 2, "max_steps": 2},
    "checkpoint": {"every_steps": 1},
    "validation": {"num_images": 1, "num_inference_steps": 1},
}

# Values that cannot run on this CPU-only machine, and the words of their up-front refusal.
REFUSED_ON_CPU = {
    ("loop.mixed_precision", "fp16"): "fp16 needs a CUDA GPU",
    ("loop.attention", "xformers"): "xformers needs a CUDA GPU",
    ("loop.device", "cuda"): "no CUDA GPU is visible",
    ("logging.report_to", "wandb"): "wandb",
}
# Enums exercised by the DeepSpeed matrix below (they need torchrun), not in-process.
DISTRIBUTED = {"distributed.strategy", "distributed.zero_stage"}
# Values that run here but too slowly for this matrix: inductor compiles even the tiny model for
# minutes on these CPUs. tests/test_speed.py trains them (with a fast compile backend) instead.
SLOW_ON_CPU = {("loop.compile", "regional"), ("loop.compile", "full")}


def enum_values(model: type[BaseModel] = TrainConfig, prefix: str = "") -> list[tuple[str, object]]:
    """(dotted key, value) for every value of every Literal field of the train config."""
    out = []
    for name, field in model.model_fields.items():
        ann = field.annotation
        if isinstance(ann, type) and issubclass(ann, BaseModel):
            out += enum_values(ann, f"{prefix}{name}.")
            continue
        for option in (ann, *typing.get_args(ann)):
            if typing.get_origin(option) is typing.Literal:
                out += [(f"{prefix}{name}", v) for v in typing.get_args(option)]
    return out


def _section(key: str, value) -> dict:
    section, leaf = key.split(".")
    return {section: {leaf: value}}


def _train_and_resume(tmp_path: Path, sections: dict) -> float:
    from ctrlnet_trainer.run import train

    base = merge(TINY, sections)
    train(TrainConfig.model_validate(small_config_dict(tmp_path / "a", **base)))
    resumed = merge(base, {"checkpoint": {"resume": str(tmp_path / "a/checkpoints/step-00000001")}})
    assert train(TrainConfig.model_validate(small_config_dict(tmp_path / "b", **resumed))).steps == 2
    return max_weight_diff(tmp_path / "a/controlnet", tmp_path / "b/controlnet")


# Enums that mean something for some model families only: a DDPM family's prediction target (the
# config refuses it with SD3/Flux.1), flow matching's timestep density (inert for SD/SDXL). A run
# keeps only those of its family, and each of their values trains with a family it applies to.
FAMILY_SPECIFIC = {"model.prediction_type": ("auto", "sd"), "loop.weighting_scheme": FLOW_FAMILIES}


def runnable_combinations() -> list[dict[str, object]]:
    """A covering set of runs: run i takes the i-th runnable value of every enum (cycling), so each
    value trains in some run and the matrix costs about as many runs as the longest enum has
    values; a family-specific value a run had to drop gets a run of its own, on its family."""
    values: dict[str, list] = {}
    for key, value in enum_values():
        if key not in DISTRIBUTED and (key, value) not in REFUSED_ON_CPU.keys() | SLOW_ON_CPU:
            values.setdefault(key, []).append(value)
    runs = max(len(v) for v in values.values())
    matrix = [{key: vals[i % len(vals)] for key, vals in values.items()} for i in range(runs)]
    for run in matrix:
        for key, families in FAMILY_SPECIFIC.items():
            if run["model.family"] not in families:
                del run[key]
    for key, families in FAMILY_SPECIFIC.items():
        for value in values[key]:
            if not any(run.get(key) == value for run in matrix):
                matrix.append({**matrix[0], "model.family": families[-1], key: value})
                for other, others in FAMILY_SPECIFIC.items():
                    if other != key and families[-1] not in others:
                        matrix[-1].pop(other, None)
    return matrix


def _label(c: dict) -> str:
    return f"{c.get('optim.lr_scheduler')}-{c.get('model.family')}-{c.get('loop.weighting_scheme', c.get('model.prediction_type'))}"


@pytest.mark.parametrize("combination", runnable_combinations(), ids=_label)
def test_every_enum_value_trains_checkpoints_and_resumes_exactly(combination, tmp_path):
    if combination.get("optim.optimizer") == "adamw_8bit":
        pytest.importorskip("bitsandbytes")
    sections: dict = {}
    for key, value in combination.items():
        sections = merge(sections, _section(key, value))
    assert _train_and_resume(tmp_path, sections) <= 1e-6


@pytest.mark.parametrize(("key", "value"), sorted(REFUSED_ON_CPU), ids=lambda x: str(x))
def test_values_that_cannot_run_here_are_refused_before_any_work(key, value, tmp_path):
    from ctrlnet_trainer.run import train

    with pytest.raises(UserError, match=REFUSED_ON_CPU[(key, value)]):  # by the config, or by train()
        train(validate(TrainConfig, small_config_dict(tmp_path / "a", **merge(TINY, _section(key, value)))))
    assert not (tmp_path / "a" / "checkpoints").exists()


def test_the_enum_table_covers_every_value():
    """A new enum value lands in the matrix above by itself; one that cannot run here must be listed."""
    values = set(enum_values())
    assert set(REFUSED_ON_CPU) <= values and SLOW_ON_CPU <= values
    assert {k for k, _ in values} >= DISTRIBUTED
    ran = {(key, value) for run in runnable_combinations() for key, value in run.items()}
    assert values - ran <= set(REFUSED_ON_CPU) | SLOW_ON_CPU | {(k, v) for k, v in values if k in DISTRIBUTED}
    for run in runnable_combinations():  # a family-specific value runs on a family it applies to
        assert all(run["model.family"] in fams for key, fams in FAMILY_SPECIFIC.items() if key in run)


DRIVER = r"""
import json, sys
from pathlib import Path
from ctrlnet.config.train import TrainConfig
from ctrlnet_trainer.run import train
from testkit.training import max_weight_diff, merge, small_config_dict

root, tiny, combos = Path(sys.argv[1]), json.loads(sys.argv[2]), json.loads(sys.argv[3])
for stage, offload, family in combos:
    sections = merge(tiny, {"model": {"family": family},
                            "distributed": {"strategy": "deepspeed", "zero_stage": stage, "offload_optimizer": offload}})
    a, b = root / f"z{stage}-{offload}-a", root / f"z{stage}-{offload}-b"
    train(TrainConfig.model_validate(small_config_dict(a, **sections)))
    resume = merge(sections, {"checkpoint": {"resume": str(a / "checkpoints/step-00000001")}})
    train(TrainConfig.model_validate(small_config_dict(b, **resume)))
    print("RESULT", json.dumps({"stage": stage, "offload": offload, "family": family, "diff": max_weight_diff(a / "controlnet", b / "controlnet"),
                                "samples": sorted(p.name for p in (b / "samples").glob("*.png"))}), flush=True)
"""


def test_deepspeed_every_stage_and_offload_trains_checkpoints_and_resumes_exactly(tmp_path):
    """One process, one torchrun: ZeRO-1/2/3, optimizer offload on and off (the ZeRO-3 checkpoint
    used to crash: stage3_gather_16bit_weights_on_model_save was not set); two of them train the
    tiny SDXL base (in code), whose step adds pooled text and time_ids, with ZeRO-2 and ZeRO-3."""
    pytest.importorskip("deepspeed")
    (tmp_path / "driver.py").write_text(DRIVER)
    sdxl = {(2, False), (3, True)}
    combos = [
        [stage, offload, "sdxl" if (stage, offload) in sdxl else "sd"]
        for stage in (1, 2, 3)
        for offload in (False, True)
    ]
    result = torchrun(1, str(tmp_path / "driver.py"), str(tmp_path), json.dumps(TINY), json.dumps(combos))
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [json.loads(line.split(" ", 1)[1]) for line in result.stdout.splitlines() if line.startswith("RESULT ")]
    assert [[r["stage"], r["offload"], r["family"]] for r in rows] == combos
    for r in rows:
        assert r["diff"] <= 1e-6, r
        assert r["samples"] == ["step-2.png"], r  # validation runs under every stage (ZeRO-3: gathered)


@pytest.mark.parametrize("offload", [True, False], ids=["offload", "no-offload"])
def test_zero3_on_two_processes_saves_the_trained_weights_and_resumes_bitwise(tmp_path, offload):
    """ZeRO-3 on two processes writes the weights it trained and resumes exactly. The saved
    ControlNet is checked against an independent truth: the fp32 master weights that DeepSpeed's
    own shards of the same checkpoint hold (zero_to_fp32). DeepSpeed <= 0.19.7 failed this at
    random on gloo (a gather read before it arrived: NaN, 1e38; ctrlnet_trainer.weights), and
    with offload the resumed run was an ulp off (CPU Adam's bias correction: optim.py)."""
    pytest.importorskip("deepspeed")
    import yaml
    from diffusers import ControlNetModel

    from testkit.zero3 import run_resume_and_check_zero3

    config = tmp_path / "train.yaml"

    sections = merge(
        TINY,
        {
            "loop": {"max_steps": 4},
            "checkpoint": {"every_steps": 2},
            "distributed": {"strategy": "deepspeed", "zero_stage": 3, "offload_optimizer": offload},
        },
    )
    config.write_text(yaml.safe_dump(small_config_dict(tmp_path / "run", **sections)))
    run_resume_and_check_zero3(tmp_path, config, ControlNetModel.from_pretrained)
