"""The ``--smoke`` flag of the benchmark scripts (benchmarks/smoke.py); the docs test runs the scripts themselves."""

from __future__ import annotations

import argparse
import importlib.util
from pathlib import Path

import pytest

SMOKE_MODULE = Path(__file__).resolve().parents[1] / "benchmarks" / "smoke.py"


def load_smoke():
    spec = importlib.util.spec_from_file_location("benchmarks_smoke", SMOKE_MODULE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def benchmark_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="bench")
    parser.add_argument("--out", default="runs/bench")
    parser.add_argument("--epochs", type=int, default=40)
    parser.add_argument("--shape", default="160,160,80")
    return parser


def test_smoke_replaces_defaults_and_prints_the_banner(capsys):
    smoke = load_smoke()
    settings = {"out": "runs/bench_smoke", "epochs": 1, "shape": "32,32,16"}
    args = smoke.parse_args_with_smoke(benchmark_parser(), settings, ["--smoke"])
    assert (args.smoke, args.out, args.epochs, args.shape) == (True, "runs/bench_smoke", 1, "32,32,16")
    assert capsys.readouterr().out.splitlines()[0] == smoke.SMOKE_BANNER


def test_explicit_flags_win_over_smoke_settings(capsys):
    smoke = load_smoke()
    settings = {"out": "runs/bench_smoke", "epochs": 1}
    args = smoke.parse_args_with_smoke(benchmark_parser(), settings, ["--epochs", "3", "--smoke"])
    assert (args.out, args.epochs) == ("runs/bench_smoke", 3)


def test_without_smoke_the_defaults_stay_and_no_banner(capsys):
    smoke = load_smoke()
    args = smoke.parse_args_with_smoke(benchmark_parser(), {"out": "runs/bench_smoke", "epochs": 1}, [])
    assert (args.smoke, args.out, args.epochs) == (False, "runs/bench", 40)
    assert smoke.SMOKE_BANNER not in capsys.readouterr().out


def test_a_misspelt_smoke_setting_is_refused():
    smoke = load_smoke()
    with pytest.raises(ValueError, match=r"\['epoch'\]"):
        smoke.parse_args_with_smoke(benchmark_parser(), {"epoch": 1}, ["--smoke"])
