"""Realism of the phantom against the real non-contrast CT of ../shared (acceptance 3 of the foundation issue)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tools.realism import MEDIAN_TOLERANCE_HU, format_report, histogram_distances, realism_report, run_realism


def test_histogram_distances_behave():
    rng = np.random.default_rng(0)
    a = rng.normal(0, 30, 50_000)
    same = histogram_distances(a, a)
    assert same["wasserstein_hu"] == 0 and same["jensen_shannon"] == 0 and same["intersection"] == pytest.approx(1)
    shifted = histogram_distances(a + 50, a)
    assert shifted["wasserstein_hu"] == pytest.approx(50, abs=2)
    far = histogram_distances(a - 900, a + 200)
    assert far["jensen_shannon"] == pytest.approx(1.0, abs=1e-6) and far["intersection"] == 0


@pytest.mark.slow
def test_phantom_medians_within_25_hu_of_real_ct(real_ct_dir):
    report = realism_report(real_ct_dir, n_cases=3, seed=0)
    print("\n" + format_report(report))
    for row in report["medians"]:
        assert abs(row["difference_hu"]) <= MEDIAN_TOLERANCE_HU, row
    distance = report["histogram_distance"]
    assert 0 < distance["wasserstein_hu"] < 100 and 0 < distance["jensen_shannon"] < 0.5


@pytest.mark.slow
def test_realism_command_writes_json_and_png(real_ct_dir, tmp_path):
    result = run_realism(real_ct_dir, tmp_path, n_cases=2, seed=1)
    saved = json.loads((tmp_path / "realism.json").read_text())
    assert saved["all_within_tolerance"] == result["all_within_tolerance"]
    png = (tmp_path / "realism.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000
