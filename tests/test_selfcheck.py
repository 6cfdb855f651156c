"""`python -m ctrlnet_trainer.selfcheck`, the image's build check: passes on a whole install, and
names a module of ours that cannot be imported and a weight file that is not the recorded one."""

from __future__ import annotations

import shutil
import subprocess
import sys

from ctrlnet_trainer import selfcheck
from ctrlnet_trainer.models.demo import WEIGHTS


def test_a_whole_install_passes():
    result = subprocess.run([sys.executable, "-m", "ctrlnet_trainer.selfcheck"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "modules import, 3 demo weight files match their sha256" in result.stdout


def test_a_missing_module_of_ours_fails_and_another_extras_package_is_only_listed(tmp_path, monkeypatch):
    pkg = tmp_path / "shipped"
    pkg.mkdir()
    (pkg / "__init__.py").write_text("")
    (pkg / "fine.py").write_text("import json\n")
    (pkg / "lost.py").write_text("from shipped import credentials  # dropped from the image\n")
    (pkg / "workstation.py").write_text("import kubernetes_validate_is_not_here\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(selfcheck.OTHER_EXTRAS, "kubernetes_validate_is_not_here", "k8s")
    imported, problems, skipped = selfcheck.module_problems(("shipped",))
    assert imported == 2  # the package and fine.py
    assert len(problems) == 1 and problems[0].startswith("shipped.lost: cannot be imported: ImportError")
    assert skipped == ["shipped.workstation (needs ctrlnet[k8s]: kubernetes_validate_is_not_here)"]


def test_a_weight_file_unlike_its_provenance_fails(tmp_path):
    copy = tmp_path / "demo_weights"
    shutil.copytree(WEIGHTS, copy)
    assert selfcheck.weight_problems(copy) == (3, [])
    unet = copy / "unet" / "diffusion_pytorch_model.safetensors"
    unet.write_bytes(unet.read_bytes()[:-10])
    (copy / "vae" / "diffusion_pytorch_model.safetensors").unlink()
    checked, problems = selfcheck.weight_problems(copy)
    assert checked == 3 and len(problems) == 2
    assert any("unet/diffusion_pytorch_model.safetensors" in p and "sha256 differs" in p for p in problems)
    assert any(p.endswith("vae/diffusion_pytorch_model.safetensors is missing") for p in problems)
