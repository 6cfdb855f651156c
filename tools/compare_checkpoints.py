"""Compare two checkpoints tensor by tensor: where do a straight run and a resumed run first differ?

    python tools/compare_checkpoints.py RUN_A/checkpoints/step-00000004 RUN_B/checkpoints/step-00000004

Reads every file both folders hold that carries tensors (DeepSpeed's model and optimizer shards
`*.pt`: partitions, fp32 master weights, Adam moments, step counters; accelerate's `*.bin`/`*.pkl`;
the ControlNet's safetensors) and prints, per file, each leaf that differs with its largest
absolute difference and whether either side holds non-finite values, then a summary line.
Exit 0 when both are bitwise equal, 1 otherwise. A development tool, not in the wheel.
"""

from __future__ import annotations

import argparse
import math
import pickle
import sys
from pathlib import Path

import torch

TENSOR_FILES = {".pt", ".bin", ".pkl", ".safetensors"}
SKIP = {"random_states_0.pkl"}  # RNG states: ctrlnet's draws are keyed by example, not by them


def load(path: Path):
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except (pickle.UnpicklingError, RuntimeError, EOFError):
        with path.open("rb") as f:
            return pickle.load(f)


def leaves(obj, prefix: str = ""):
    """(dotted path, value) for every tensor, number and string inside nested dicts/lists."""
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from leaves(v, f"{prefix}.{k}" if prefix else str(k))
    elif isinstance(obj, (list, tuple)):
        for i, v in enumerate(obj):
            yield from leaves(v, f"{prefix}[{i}]")
    elif isinstance(obj, (torch.Tensor, int, float, str, bool)) or obj is None:
        yield prefix, obj
    elif hasattr(obj, "state_dict"):
        yield from leaves(obj.state_dict(), prefix)
    else:
        yield prefix, repr(obj)


def difference(a, b) -> tuple[float, bool]:
    """(largest absolute difference, whether either side is non-finite); inf for unlike values."""
    if isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor):
        if a.shape != b.shape or a.dtype != b.dtype:
            return math.inf, False
        if a.numel() == 0:
            return 0.0, False
        if not a.is_floating_point():
            return float((a != b).any()) * math.inf if not torch.equal(a, b) else 0.0, False
        nonfinite = not (torch.isfinite(a).all() and torch.isfinite(b).all())
        diff = (a.double() - b.double()).abs().nan_to_num(nan=math.inf).max().item()
        return (0.0 if torch.equal(a, b) else diff), nonfinite
    return (0.0 if a == b else math.inf), False


def compare(a_dir: Path, b_dir: Path) -> int:
    files = sorted(
        p.relative_to(a_dir)
        for p in a_dir.rglob("*")
        if p.suffix in TENSOR_FILES and p.name not in SKIP and (b_dir / p.relative_to(a_dir)).exists()
    )
    differing = total = 0
    for rel in files:
        a, b = dict(leaves(load(a_dir / rel))), dict(leaves(load(b_dir / rel)))
        rows = []
        for key in sorted(a.keys() | b.keys()):
            total += 1
            if key not in a or key not in b:
                rows.append(f"  {key}: only in {'A' if key in a else 'B'}")
                continue
            diff, nonfinite = difference(a[key], b[key])
            if diff or nonfinite:
                rows.append(f"  {key}: max |A-B| {diff:.3g}" + (" (non-finite values)" if nonfinite else ""))
        differing += len(rows)
        print(f"{rel}: {'identical' if not rows else f'{len(rows)} of {len(a)} leaves differ'}")
        print(
            "\n".join(rows[:12]) + (f"\n  ... {len(rows) - 12} more" if len(rows) > 12 else "") if rows else "", end=""
        )
        if rows:
            print()
    print(f"{len(files)} files, {total} leaves, {differing} differ")
    return 1 if differing else 0


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("a", type=Path)
    p.add_argument("b", type=Path)
    args = p.parse_args()
    return compare(args.a, args.b)


if __name__ == "__main__":
    sys.exit(main())
