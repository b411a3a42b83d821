"""Benchmark: seconds to make one 160x160x80 phantom case, against the issue's budget of 1 s.

    python benchmarks/phantom_speed.py [--cases 10]

Prints the median and worst time over ``--cases`` seeds (after one warm-up case) and the ratio budget / median:
a ratio >= 1 meets the target. Times cover anatomy, rendering and labels (not writing to disk).
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from tools.phantom import make_case

BUDGET_S = 1.0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    args = parser.parse_args()
    make_case(0, tumor=True)  # warm-up: imports, allocator
    times = []
    for seed in range(1, args.cases + 1):
        start = time.perf_counter()
        make_case(seed, shape=(160, 160, 80), tumor=seed % 2 == 0)
        times.append(time.perf_counter() - start)
    median, worst = float(np.median(times)), float(np.max(times))
    print(f"phantom 160x160x80: median {median:.3f} s, worst {worst:.3f} s over {args.cases} cases")
    print(f"ratio budget/median = {BUDGET_S / median:.2f} (>= 1 meets the {BUDGET_S:.0f} s target)")


if __name__ == "__main__":
    main()
