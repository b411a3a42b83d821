"""Benchmark: seconds to make one 160x160x80 phantom case, against the issue's budget of 1 s.

    python benchmarks/phantom_speed.py [--cases 10] [--shape 160,160,80]
    python benchmarks/phantom_speed.py --smoke      # seconds: tiny sizes, checks that it runs

Prints the median and worst time over ``--cases`` seeds (after one warm-up case) and the ratio budget / median:
a ratio >= 1 meets the target. Times cover anatomy, rendering and labels (not writing to disk).
"""

from __future__ import annotations

import argparse
import time

import numpy as np
from smoke import parse_args_with_smoke

from tools.phantom import make_case

BUDGET_S = 1.0
SMOKE = {"cases": 1, "shape": "32,32,16"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", type=int, default=10)
    parser.add_argument("--shape", default="160,160,80", help="voxels of each case")
    args = parse_args_with_smoke(parser, SMOKE)
    shape = tuple(int(v) for v in args.shape.split(","))
    make_case(0, shape=shape, tumor=True)  # warm-up: imports, allocator
    times = []
    for seed in range(1, args.cases + 1):
        start = time.perf_counter()
        make_case(seed, shape=shape, tumor=seed % 2 == 0)
        times.append(time.perf_counter() - start)
    median, worst = float(np.median(times)), float(np.max(times))
    print(f"phantom {'x'.join(map(str, shape))}: median {median:.3f} s, worst {worst:.3f} s over {args.cases} cases")
    print(f"ratio budget/median = {BUDGET_S / median:.2f} (>= 1 meets the {BUDGET_S:.0f} s target)")


if __name__ == "__main__":
    main()
