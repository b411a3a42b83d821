"""The ``--smoke`` flag shared by the benchmark scripts.

A smoke run goes through a script's whole code path (data made, the same bundle configs and functions run, the same
table printed) at tiny sizes, so that the docs test can run every documented benchmark command in seconds. Its
numbers are not measurements. Each script lists its tiny sizes as argument defaults; flags given on the command line
still win over them.
"""

from __future__ import annotations

import argparse

SMOKE_BANNER = "SMOKE RUN: tiny sizes, numbers are not measurements"


def parse_args_with_smoke(
    parser: argparse.ArgumentParser, smoke_defaults: dict, argv: list[str] | None = None
) -> argparse.Namespace:
    """Add ``--smoke`` to ``parser`` and parse ``argv``; with ``--smoke``, ``smoke_defaults`` replace the defaults of
    the arguments they name (a flag given explicitly keeps its value) and the smoke banner is printed first."""
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes, every step of the benchmark in seconds: checks that it runs (the numbers are no measurement)",
    )
    first, _ = parser.parse_known_args(argv)
    unknown = sorted(set(smoke_defaults) - set(vars(first)))
    if unknown:  # a misspelt smoke setting would otherwise leave the full-size default in place without a word
        raise ValueError(f"smoke settings name no argument of {parser.prog}: {unknown}")
    if first.smoke:
        parser.set_defaults(**smoke_defaults)
    args = parser.parse_args(argv)
    if args.smoke:
        print(SMOKE_BANNER, flush=True)
    return args
