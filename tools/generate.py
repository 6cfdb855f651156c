"""Regenerate every generated file, or check that each is up to date.

    python tools/generate.py          # docs/config.md, charts/ctrlnet/values.yaml, values.schema.json,
                                      # templates/_generated.tpl, manifests/base + manifests/overlays
    python tools/generate.py --check  # exit 1 and name the stale files (tests/test_generated.py does the same)

The registry is tools/gen/__init__.py.
"""

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script: make the `tools` package importable

from tools.gen import GENERATED  # noqa: E402


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is not up to date")
    args = parser.parse_args(argv)
    if args.check:
        stale = [path for gen in GENERATED for path in gen.stale(ROOT)]
        if stale:
            print(f"stale: {', '.join(stale)}: run python tools/generate.py", file=sys.stderr)
            return 1
        print(f"up to date: {', '.join(gen.name for gen in GENERATED)}")
        return 0
    for gen in GENERATED:
        changed = gen.write(ROOT)
        print("\n".join(f"wrote {path}" for path in changed) or f"{gen.name} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
