"""The ZeRO-3 two-process check shared by the SD and flow-family tests: train, resume from the
first checkpoint, and compare what was saved with DeepSpeed's own fp32 masters."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

TESTS = Path(__file__).resolve().parent.parent


def torchrun(nproc: int, *args: str) -> subprocess.CompletedProcess:
    """`torchrun --standalone` of `args` on this machine, one thread per process."""
    launcher = Path(sys.executable).parent / "torchrun"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(TESTS)}
    return subprocess.run(
        [str(launcher), "--standalone", f"--nproc-per-node={nproc}", *args],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )


def run_resume_and_check_zero3(tmp_path: Path, config: Path, load_controlnet) -> None:
    """`config` (4 steps, a checkpoint every 2, ZeRO-3, output tmp_path/run) trained on two
    processes, then resumed from step 2 into tmp_path/resumed. Each checkpoint's saved ControlNet is
    finite and equals the fp32 masters DeepSpeed's shards of it hold (zero_to_fp32, an independent
    truth); the final weights are the last checkpoint's and load with `load_controlnet`
    (the family's diffusers class' from_pretrained); the resumed run ends bitwise where the straight one did."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from testkit.training import controlnet_weights, max_weight_diff

    result = torchrun(2, "-m", "ctrlnet_trainer", "--config", str(config))
    assert result.returncode == 0, result.stderr[-3000:]
    first = tmp_path / "run/checkpoints/step-00000002"
    resume = ("--set", f"output={tmp_path / 'resumed'}", "--set", f"checkpoint.resume={first}")
    resumed = torchrun(2, "-m", "ctrlnet_trainer", "--config", str(config), *resume)
    assert resumed.returncode == 0, resumed.stderr[-3000:]

    for run in ("run", "resumed"):
        for step in (2, 4) if run == "run" else (4,):
            checkpoint = tmp_path / run / f"checkpoints/step-0000000{step}"
            saved = controlnet_weights(checkpoint / "controlnet")
            assert all(t.numel() > 0 and torch.isfinite(t).all() for t in saved.values()), checkpoint
            masters = get_fp32_state_dict_from_zero_checkpoint(str(checkpoint))
            assert saved.keys() == masters.keys()
            differ = [k for k in saved if not torch.equal(saved[k], masters[k])]
            assert not differ, f"{checkpoint}: saved ControlNet differs from the trained weights in {differ[:3]}"
        final = controlnet_weights(tmp_path / run / "controlnet")
        last = controlnet_weights(tmp_path / run / "checkpoints/step-00000004/controlnet")
        assert all(torch.equal(final[k], last[k]) for k in last)
        load_controlnet(tmp_path / run / "controlnet")
    assert max_weight_diff(tmp_path / "run/controlnet", tmp_path / "resumed/controlnet") == 0.0
    assert (tmp_path / "run/samples/step-4.png").exists()  # validation from the gathered ControlNet
