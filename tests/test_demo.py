"""``make demo`` (``python -m tools demo``): the whole chain at a still smaller scale than the demo's.

phantom -> vae_ct and ldm_abdomen trained (tiny) -> synthesis -> ratio study -> synthetic-set evaluation ->
tumor-size study -> report, with the same code as ``make demo`` and a scale file that shrinks data, networks,
epochs and arms, in one process (the two-process path of the studies is tested in test_studies.py); then a second
run, which must reuse everything and give the same tables.
"""

from __future__ import annotations

import csv
import json
import math
import re

import pytest

from tests.test_studies import TINY_SCALE
from tools.demo import run_demo


@pytest.mark.slow
def test_demo_chain_writes_a_report_with_measured_numbers_and_reruns_from_cache(tmp_path):
    scale = tmp_path / "scale.json"
    scale.write_text(json.dumps({**TINY_SCALE, "seeds": [0]}))
    out = tmp_path / "demo"
    summary = run_demo(out, scale=str(scale), nproc=1, shared_dir=tmp_path / "no_shared")
    for stage in ("phantom", "generative", "ratio_study", "synthetic_evaluation", "tumor_size_study", "report"):
        assert stage in summary["stages"]
    # the synthetic sets exist, with provenance, one per real training mask
    for generator in ("VAE", "DM"):
        datalist = json.loads(open(summary["generative"][generator]).read())
        assert datalist["training"] and all(r.get("synthetic") for r in datalist["training"])
    tables = {}
    for study, arms in (
        ("ratio", ["real only", "VAE 100:0", "VAE 50:50", "VAE 25:75"]),
        ("tumor_size", ["none", "large"]),
    ):
        rows = list(csv.DictReader(open(out / study / "table.csv", newline="")))
        assert [r["arm"] for r in rows] == arms
        tables[study] = (out / study / "table.csv").read_text()
    ratio_rows = list(csv.DictReader(open(out / "ratio" / "table.csv", newline="")))
    assert all(math.isfinite(float(r["pancreas_dice_mean"])) for r in ratio_rows)  # measured, not placeholders
    report = (out / "report.md").read_text()
    assert "Synthetic:real ratios" in report and "Synthetic tumor sizes" in report
    assert re.search(r"\| real only \| 1 \| \d\.\d{4} \+- 0\.0000 \|", report)
    assert (out / "report.html").is_file() and "(ratio/pancreas_dice.png)" in report
    # a second run reuses the trained models, the synthetic sets and the finished jobs
    again = run_demo(out, scale=str(scale), nproc=1, shared_dir=tmp_path / "no_shared")
    assert again["stages"]["generative"] < summary["stages"]["generative"]
    for study, text in tables.items():
        assert (out / study / "table.csv").read_text() == text
