"""Write manifests/base and manifests/overlays (kustomize) from the chart and examples/.

    python tools/gen_manifests.py          # regenerate (after changing the chart or an example)
    python tools/gen_manifests.py --check  # exit 1 if the checked-in manifests are stale

base/ = examples/single-gpu.yaml; overlays/multi-node = examples/multi-node-deepspeed.yaml;
overlays/kueue = base + a Kueue queue; overlays/volcano = multi-node + a Volcano queue; each
overlay is JSON patches on its parent. All share one job name (ctrlnet.k8s.manifests.JOB_NAME).
"""

import argparse
import sys
from pathlib import Path

from ctrlnet.k8s.manifests import build, stale, write

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if manifests/ is not up to date")
    args = parser.parse_args(argv)
    files = build(ROOT)
    if args.check:
        bad = stale(ROOT, files)
        if bad:
            print(f"stale: {', '.join(bad)}: run python tools/gen_manifests.py", file=sys.stderr)
            return 1
        print("manifests/ is up to date")
        return 0
    changed = write(ROOT, files)
    print("\n".join(f"wrote manifests/{c}" for c in changed) or "manifests/ unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
