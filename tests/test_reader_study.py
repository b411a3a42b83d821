"""Reader-study statistics against hand-computed values, degenerate cases, and the build -> rate -> score loop."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest

from tools.errors import InputError
from tools.io import save_nifti
from tools.reader_study import build_reader_study, cohen_kappa, reader_metrics, score_reader_study

S, R = "synthetic", "real"


def test_reader_metrics_by_hand():
    m = reader_metrics([S, S, S, R, R], [S, R, S, R, S])
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (2, 1, 1, 1)
    assert m["sensitivity"] == pytest.approx(2 / 3)
    assert m["specificity"] == pytest.approx(1 / 2)
    assert m["accuracy"] == pytest.approx(3 / 5)


def test_reader_metrics_degenerate_cases_are_undefined_not_zero():
    only_real = reader_metrics([R, R, R], [R, S, R])
    assert only_real["sensitivity"] is None and only_real["specificity"] == pytest.approx(2 / 3)
    only_synthetic = reader_metrics([S, S], [S, S])
    assert only_synthetic["specificity"] is None and only_synthetic["sensitivity"] == 1.0
    assert reader_metrics([], [])["accuracy"] is None
    with pytest.raises(ValueError):
        reader_metrics([S], ["maybe"])


def test_cohen_kappa_textbook_example():
    # 50 items: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> po 0.7, pe 0.5, kappa 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert cohen_kappa(a, b) == pytest.approx(0.4)


def test_cohen_kappa_degenerate_and_limits():
    assert cohen_kappa([R, R, R], [R, R, R]) is None, "one category used by both raters: 0/0"
    assert cohen_kappa([R, R, R, R], [R, R, S, S]) == pytest.approx(0.0)
    assert cohen_kappa([R, S, R, S], [R, S, R, S]) == pytest.approx(1.0)
    assert cohen_kappa([R, S, R, S], [S, R, S, R]) == pytest.approx(-1.0)
    assert cohen_kappa([], []) is None


def test_weighted_kappa_by_hand():
    cats = [0, 1, 2]
    assert cohen_kappa([0, 1, 2], [0, 1, 2], cats, "quadratic") == pytest.approx(1.0)
    # full disagreement at the extremes: observed disagreement 1, expected 0.5 -> kappa -1
    assert cohen_kappa([0, 2], [2, 0], cats, "quadratic") == pytest.approx(-1.0)
    # one step off on 2 of 4 items (linear weight 1/2): observed 0.25; marginals give expected 0.40625
    a, b = [0, 1, 1, 2], [0, 2, 1, 1]
    observed = (0.5 + 0.5) / 4
    pa = np.array([1, 2, 1]) / 4
    pb = np.array([1, 2, 1]) / 4
    w = np.abs(np.subtract.outer(np.arange(3), np.arange(3))) / 2
    expected = float((w * np.outer(pa, pb)).sum())
    assert cohen_kappa(a, b, cats, "linear") == pytest.approx(1 - observed / expected)


@pytest.fixture()
def study(tmp_path):
    rng = np.random.default_rng(0)
    affine = np.diag([2.0, 2.0, 3.0, 1.0])
    real, synthetic = [], []
    for i in range(3):
        for group in (real, synthetic):
            path = tmp_path / "src" / f"{'r' if group is real else 's'}{i}.nii.gz"
            save_nifti(path, rng.integers(-200, 200, (16, 16, 8)).astype(np.int16), affine)
            group.append(path)
    out = tmp_path / "study"
    summary = build_reader_study(real, synthetic, out, seed=3, readers=("ann", "bob"))
    return out, summary


def _fill(study_dir, rows, path):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["reader", "case_id", "call", "realism"])
        writer.writerows(rows)
    return path


def test_build_is_blinded_and_scoring_matches_hand_values(study, tmp_path):
    out, summary = study
    assert summary["n_cases"] == 6 and summary["n_real"] == 3
    hand_out = out / "readers"
    assert summary["hand_out"] == str(hand_out) and summary["key"] == str(out / "key.json")
    views = sorted(p.name for p in (hand_out / "views").glob("*.png"))
    assert views == [f"case_{i:03d}.png" for i in range(1, 7)], "readers see anonymous names only"
    template = list(csv.DictReader(open(hand_out / "ratings_template.csv")))
    assert len(template) == 12 and {r["reader"] for r in template} == {"ann", "bob"}
    # the key lies beside the readers' folder, and nothing handed out names a source file or a truth
    assert (out / "key.json").is_file()
    handed = sorted(p.relative_to(hand_out).as_posix() for p in hand_out.rglob("*") if p.is_file())
    assert handed == ["INSTRUCTIONS.txt", "ratings_template.csv", *[f"views/{v}" for v in views]]
    key = json.loads((out / "key.json").read_text())["cases"]
    for name in ("INSTRUCTIONS.txt", "ratings_template.csv"):
        text = (hand_out / name).read_text()
        assert "key.json" not in text and not any(Path(e["image"]).stem.split(".")[0] in text for e in key.values())
    truths = [key[c]["truth"] for c in sorted(key)]
    assert truths != [R, R, R, S, S, S], "cases are shuffled, not listed real first"

    rows = []
    for case_id, entry in key.items():
        rows.append(["ann", case_id, entry["truth"], 4 if entry["truth"] == R else 2])  # a perfect reader
        rows.append(["bob", case_id, R, 3])  # calls everything real, same realism for all
    scores = score_reader_study(out, _fill(out, rows, tmp_path / "ratings.csv"))
    assert score_reader_study(out / "key.json", tmp_path / "ratings.csv") == scores, "the key file itself works too"
    ann, bob = scores["readers"]["ann"], scores["readers"]["bob"]
    assert (ann["sensitivity"], ann["specificity"], ann["accuracy"]) == (1.0, 1.0, 1.0)
    assert (bob["sensitivity"], bob["specificity"], bob["accuracy"]) == (0.0, 1.0, 0.5)
    assert ann["mean_realism_real"] == 4 and ann["mean_realism_synthetic"] == 2
    pair = scores["agreement"]["ann vs bob"]
    assert pair["kappa_calls"] == pytest.approx(0.0) and pair["n_calls"] == 6
    assert pair["kappa_realism_quadratic"] == pytest.approx(0.0)


def test_bad_ratings_name_the_file_and_line(study, tmp_path):
    out, _ = study
    key = json.loads((out / "key.json").read_text())["cases"]
    first = next(iter(key))
    for rows, message in (
        ([["ann", "case_999", "real", "3"]], "unknown case id"),
        ([["ann", first, "maybe", ""]], "call must be"),
        ([["ann", first, "real", "7"]], "outside 0-5"),
        ([["ann", first, "real", "3"], ["ann", first, "real", "2"]], "twice"),
    ):
        path = _fill(out, rows, tmp_path / "bad.csv")
        with pytest.raises(InputError, match=message) as error:
            score_reader_study(out, path)
        assert "bad.csv" in str(error.value) and "line" in str(error.value)


def test_scoring_the_readers_folder_says_where_the_key_is(study, tmp_path):
    out, _ = study
    ratings = _fill(out, [], tmp_path / "ratings.csv")
    with pytest.raises(InputError, match="readers' folder: give the study folder above it") as error:
        score_reader_study(out / "readers", ratings)
    assert str(out / "readers") in str(error.value)
    with pytest.raises(InputError, match="no key.json found"):
        score_reader_study(tmp_path / "elsewhere", ratings)
