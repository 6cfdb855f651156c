"""Write docs/config.md from the config models; `--check` exits 1 if the file is stale.

    python tools/gen_config_docs.py          # rewrite docs/config.md
    python tools/gen_config_docs.py --check  # CI: is it in sync?
"""

import argparse
import sys
from pathlib import Path

from ctrlnet.config.docs import DOC_PATH, render_config_docs

ROOT = Path(__file__).resolve().parent.parent


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="exit 1 if docs/config.md is not up to date")
    args = parser.parse_args(argv)
    path = ROOT / DOC_PATH
    text = render_config_docs()
    current = path.read_text(encoding="utf-8") if path.is_file() else None
    if args.check:
        if current != text:
            print(f"{DOC_PATH} is stale: run python tools/gen_config_docs.py", file=sys.stderr)
            return 1
        print(f"{DOC_PATH} is up to date")
        return 0
    if current != text:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {DOC_PATH}")
    else:
        print(f"{DOC_PATH} unchanged")
    return 0


if __name__ == "__main__":
    sys.exit(main())
