"""Run one test (or a few) many times, optionally beside busy loops, and count passes per test id.

    python tools/stress_test.py --reps 20 --busy 1 \
        "tests/test_strategies.py::test_zero3_on_two_processes_saves_the_trained_weights_and_resumes_bitwise"

For faults that only show now and then (the ZeRO-3 gather race showed in about one run in three
on an idle 2-core machine, more often with the cores busy): the suite runs such a test once, this
runs it enough times to say the fault is gone. `--busy N` keeps N processes spinning while it
runs (timing-dependent faults show more often when the processes share cores). Prints one line per
repetition and the pass count per test id; exit 1 if any failed. A development tool, not in the wheel.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _spin() -> None:
    while True:
        pass


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("tests", nargs="+", help="pytest node ids")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--busy", type=int, default=0, help="busy-loop processes beside the tests")
    args = p.parse_args()
    if not 1 <= args.reps <= 1000 or not 0 <= args.busy <= 64:
        p.error("--reps must be 1..1000 and --busy 0..64")
    spinners = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.busy)]
    for s in spinners:
        s.start()
    passed, failed = Counter(), Counter()
    try:
        for rep in range(1, args.reps + 1):
            start = time.monotonic()
            out = subprocess.run(
                [sys.executable, "-m", "pytest", "-q", "-rA", "-p", "no:cacheprovider", *args.tests],
                cwd=ROOT,
                capture_output=True,
                text=True,
            ).stdout
            for outcome, test in re.findall(r"^(PASSED|FAILED|ERROR) (\S+)", out, re.M):
                (passed if outcome == "PASSED" else failed)[test] += 1
            summary = out.strip().splitlines()[-1] if out.strip() else "no output"
            print(f"rep {rep}/{args.reps}: {summary} ({time.monotonic() - start:.0f} s)", flush=True)
    finally:
        for s in spinners:
            s.terminate()
    for test in sorted(passed.keys() | failed.keys()):
        print(f"{passed[test]}/{passed[test] + failed[test]} passed: {test}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
