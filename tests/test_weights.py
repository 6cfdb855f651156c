"""ctrlnet_trainer.weights: the copy of the ControlNet that is written is checked against the live
model (shard checksums under ZeRO-3), gathered again after a faulty gather, refused when not
finite, and read back from disk. The two-process ZeRO-3 runs are in test_strategies.py."""

from __future__ import annotations

import types

import pytest
import torch

from ctrlnet.errors import IntegrityError
from ctrlnet_trainer import weights


def _sharded(full: torch.Tensor, world: int) -> list[types.SimpleNamespace]:
    """What each of `world` ranks holds of `full` under ZeRO-3: an equal slice, the last padded."""
    flat = full.reshape(-1)
    size = -(-flat.numel() // world)
    padded = torch.cat([flat, torch.full((size * world - flat.numel(),), 7.0, dtype=flat.dtype)])
    return [
        types.SimpleNamespace(ds_tensor=padded[r * size : (r + 1) * size], ds_numel=flat.numel()) for r in range(world)
    ]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("world", [1, 2, 3])
def test_shard_checksums_add_up_to_the_full_tensor_and_miss_no_corruption(dtype, world):
    full = torch.randn(5, 7).to(dtype)  # 35 values: the last shard is padded (padding is not counted)
    total = sum(weights._shard_bitsum(p, r, world) for r, p in enumerate(_sharded(full, world)))
    assert total == weights._bitsum(full)
    for garbage in (float("nan"), 1e38 if dtype != torch.float16 else 6e4, 0.0):
        torn = full.clone()
        torn.view(-1)[11] = garbage
        if not torch.equal(torn, full):
            assert weights._bitsum(torn) != total


class _Accelerator:
    device = torch.device("cpu")

    @staticmethod
    def unwrap_model(model):
        return model


def test_a_gather_unlike_the_live_model_is_gathered_again_then_refused(monkeypatch, capsys):
    model = torch.nn.Linear(3, 2)
    good = {k: v.detach().clone() for k, v in model.state_dict().items()}
    answers = [(good, ["weight"]), (good, [])]  # first gather: a mismatch; the second is right
    monkeypatch.setattr(weights, "_gather_sharded", lambda module, device, is_main: answers.pop(0))
    state = weights.gather(_Accelerator(), model, is_main=True, sharded=True)
    assert state is good and "differs from the live model (weight; attempt 1 of 3)" in capsys.readouterr().err

    monkeypatch.setattr(weights, "_gather_sharded", lambda module, device, is_main: (good, ["bias"]))
    with pytest.raises(IntegrityError, match="equal to the live model in 3 attempts: nothing was written"):
        weights.gather(_Accelerator(), model, is_main=True, sharded=True)


def test_weights_that_are_not_finite_are_refused_and_a_copy_is_not_an_alias():
    model = torch.nn.Linear(3, 2)
    state = weights.gather(_Accelerator(), model, is_main=True, sharded=False)
    with torch.no_grad():
        model.weight.fill_(float("inf"))
    assert torch.isfinite(state["weight"]).all()  # copied, not a view of the live tensor
    with pytest.raises(IntegrityError, match=r"not finite \(weight\): training diverged"):
        weights.gather(_Accelerator(), model, is_main=True, sharded=False)


def test_write_reads_the_file_back(tmp_path, monkeypatch):
    from diffusers import ControlNetModel
    from safetensors import torch as st

    controlnet = ControlNetModel(
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        conditioning_embedding_out_channels=(4, 4),
    )
    state = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    weights.write(controlnet, tmp_path / "ok", state)
    loaded = ControlNetModel.from_pretrained(tmp_path / "ok")
    assert all(torch.equal(loaded.state_dict()[k], v) for k, v in state.items())

    real_load = st.load_file

    def flipped(path, *a, **k):  # a disk that returns other bits than were written
        out = real_load(path, *a, **k)
        first = sorted(out)[0]
        out[first] = out[first] + 1
        return out

    monkeypatch.setattr(st, "load_file", flipped)
    with pytest.raises(IntegrityError, match="does not hold what was written"):
        weights.write(controlnet, tmp_path / "bad", state)


def _tiny_controlnet():
    from diffusers import ControlNetModel

    return ControlNetModel(
        block_out_channels=(4, 8),
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        layers_per_block=1,
        cross_attention_dim=8,
        attention_head_dim=2,
        norm_num_groups=4,
        conditioning_embedding_out_channels=(4, 4),
    )


@pytest.mark.parametrize(
    ("name", "dtype"), [("fp16", torch.float16), ("bf16", torch.bfloat16), ("fp32", torch.float32)]
)
def test_write_in_the_final_dtype_loads_with_diffusers(tmp_path, name, dtype):
    """checkpoint.final_dtype (train_controlnet_flux.py's --save_weight_dtype): the final model's
    file holds that dtype, and diffusers' ControlNetModel.from_pretrained loads it as it is."""
    from diffusers import ControlNetModel
    from safetensors import safe_open

    controlnet = _tiny_controlnet()
    state = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    folder = weights.write(controlnet, tmp_path / name, state, dtype=name)
    with safe_open(str(folder / weights.WEIGHTS_FILE), "pt") as f:
        dtypes = {f.get_tensor(k).dtype for k in f.keys()}
    assert dtypes == {dtype}
    assert all(v.dtype == torch.float32 for v in state.values())  # the caller's copy is not cast in place
    loaded = ControlNetModel.from_pretrained(folder, torch_dtype=dtype)
    for k, v in loaded.state_dict().items():
        assert v.dtype == dtype and torch.equal(v, state[k].to(dtype)), k
    assert next(ControlNetModel.from_pretrained(folder).parameters()).dtype in (dtype, torch.float32)


def test_a_weight_beyond_fp16_is_refused_not_written_as_inf(tmp_path):
    controlnet = _tiny_controlnet()
    state = {k: v.detach().clone() for k, v in controlnet.state_dict().items()}
    first = sorted(k for k, v in state.items() if v.is_floating_point())[0]
    state[first].view(-1)[0] = 1e6  # finite in fp32 and bf16, inf in fp16
    with pytest.raises(IntegrityError, match=rf"do not fit fp16 \({first}"):
        weights.write(controlnet, tmp_path / "fp16", state, dtype="fp16")
    assert not (tmp_path / "fp16" / weights.WEIGHTS_FILE).exists()
    weights.write(controlnet, tmp_path / "bf16", state, dtype="bf16")


def test_a_run_writes_its_final_controlnet_in_checkpoint_final_dtype(tmp_path, make_cfg):
    """checkpoint.final_dtype (train_controlnet_flux.py's --save_weight_dtype) reaches the final
    model of a run: bf16 tensors in controlnet/, which stock diffusers loads; checkpoints keep fp32."""
    from diffusers import ControlNetModel
    from safetensors.torch import load_file

    from ctrlnet_trainer.run import train

    cfg = make_cfg(tmp_path / "run", loop={"max_steps": 1}, checkpoint={"final_dtype": "bf16", "every_steps": 1})
    result = train(cfg)
    final = load_file(str(tmp_path / "run" / "controlnet" / weights.WEIGHTS_FILE))
    assert {t.dtype for t in final.values()} == {torch.bfloat16}
    assert ControlNetModel.from_pretrained(result.controlnet, torch_dtype=torch.bfloat16).dtype == torch.bfloat16
    saved = next((tmp_path / "run" / "checkpoints").glob("step-*/controlnet/" + weights.WEIGHTS_FILE))
    assert {t.dtype for t in load_file(str(saved)).values()} == {torch.float32}
