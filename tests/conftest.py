"""Shared fixtures: paths to ``../shared`` (skipped with a reason when absent) and small phantom data sets."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parents[1]
SHARED_DIR = Path(os.environ.get("PCT_SHARED_DIR", REPO_ROOT.parent / "shared"))
REAL_CT_DIR = SHARED_DIR / "data" / "real_ct"
META_SCHEMA = SHARED_DIR / "reference" / "meta_schema_20240725.json"


def shared_file(*parts: str) -> Path:
    """Path of a file under ``../shared``; skips the calling test with a reason when it is not there."""
    path = SHARED_DIR.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"{path} is absent: this test needs the project's ../shared folder (see shared/README.md)")
    return path


@pytest.fixture(scope="session")
def real_ct_dir() -> Path:
    if not REAL_CT_DIR.is_dir():
        pytest.skip(f"{REAL_CT_DIR} is absent: this test needs the real CT samples of ../shared")
    return REAL_CT_DIR


@pytest.fixture(scope="session")
def meta_schema() -> Path:
    return shared_file("reference", "meta_schema_20240725.json")


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory) -> Path:
    """A small MSD-layout phantom data set (6 patients, 2 of them healthy) shared by the whole session."""
    from tools.phantom import make_dataset

    out = tmp_path_factory.mktemp("phantom_set")
    make_dataset(out, n_cases=6, seed=7, shape=(64, 64, 32), tumor_fraction=0.67, test_fraction=0.34, progress=False)
    return out


def pytest_terminal_summary(terminalreporter):
    """List the documentation blocks the docs test did not run (marked gpu or user-data), by name."""
    import sys

    module = sys.modules.get("tests.test_docs")
    skipped = getattr(module, "SKIPPED_DOC_BLOCKS", None)
    if skipped:
        terminalreporter.section("documentation blocks not run (marked gpu / user-data)")
        for name in skipped:
            terminalreporter.write_line(name)


@pytest.fixture
def reference_bf16_convolutions():
    """bf16 trainings in the tests run with oneDNN off. On a CPU with native bf16 (AVX512-BF16), torch 2.13's oneDNN
    bf16 convolution backward returns NaN weight gradients in some steps (``tools/bundle_scripts/precision.py``),
    which stops a training at random; these tests check the bundles' precision plumbing, not that kernel."""
    with torch.backends.mkldnn.flags(enabled=False):
        yield
