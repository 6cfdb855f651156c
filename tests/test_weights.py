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
