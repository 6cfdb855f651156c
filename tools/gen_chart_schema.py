"""Write charts/ctrlnet/values.yaml and values.schema.json from the config model.

    python tools/gen_chart_schema.py          # rewrite them
    python tools/gen_chart_schema.py --check  # exit 1 if either is stale (a test does the same)
"""

import argparse
import sys

from ctrlnet.k8s.chart import GENERATED, chart_dir


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if a generated file is not up to date")
    args = parser.parse_args(argv)
    stale = []
    for name, produce in GENERATED.items():
        path = chart_dir() / name
        text = produce()
        current = path.read_text(encoding="utf-8") if path.is_file() else None
        if current == text:
            print(f"{path.name} unchanged")
        elif args.check:
            stale.append(name)
        else:
            path.write_text(text, encoding="utf-8")
            print(f"wrote charts/ctrlnet/{name}")
    if stale:
        print(f"stale: {', '.join(stale)}: run python tools/gen_chart_schema.py", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
