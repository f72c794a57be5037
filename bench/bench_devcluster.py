"""Time from ``meshward dev up`` to a ready API server (/readyz 200), binaries cached.

Runs the real command several times (a fresh state directory each time) and prints each time
and the median. Target: under 10 s.

    .venv/bin/python bench/bench_devcluster.py [--runs 5]
"""

from __future__ import annotations

import argparse
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    meshward = [sys.executable, "-m", "meshward", "dev"]
    subprocess.run([*meshward, "build"], check=True, capture_output=True)
    times = []
    with tempfile.TemporaryDirectory(prefix="meshward-bench-up-") as tmp:
        for run in range(args.runs):
            state = pathlib.Path(tmp) / f"cp{run}"
            start = time.perf_counter()
            subprocess.run([*meshward, "up", "--dir", str(state)], check=True, capture_output=True)
            times.append(time.perf_counter() - start)
            subprocess.run(
                [*meshward, "down", "--dir", str(state)], check=True, capture_output=True
            )
            print(f"run {run + 1}: dev up ready in {times[-1]:.2f} s")
    median = statistics.median(times)
    verdict = "" if median < 10 else "  MISSED"
    print(f"dev up to /readyz, median of {args.runs}: {median:.2f} s (target < 10 s){verdict}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
