"""The seg_unet3d evaluation metrics (bundles/seg_unet3d/scripts/seg_metrics.py) against hand-computed values.

Geometry is chosen so that every expected number can be worked out on paper: single voxels (every surface distance
is the centre distance), cubes shifted by one voxel (Dice from the overlap), blocks of known volume (equivalent
radius), and the degenerate cases (empty prediction, empty ground truth, no healthy case).
"""

from __future__ import annotations

import csv
import importlib.util
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

BUNDLE = Path(__file__).resolve().parents[1] / "bundles" / "seg_unet3d"


def _load(name: str = "seg_unet3d_scripts_metrics_test"):
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(
            name, BUNDLE / "scripts" / "__init__.py", submodule_search_locations=[str(BUNDLE / "scripts")]
        )
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return importlib.import_module(f"{name}.seg_metrics")


m = _load()


def volume(shape=(20, 20, 20)) -> np.ndarray:
    return np.zeros(shape, dtype=np.uint8)


# ----------------------------------------------------------------------------------------------------------------
# Dice, NSD, HD95


def test_dice_of_two_4_cubes_shifted_by_one_voxel_is_three_quarters():
    pred, gt = volume(), volume()
    gt[5:9, 5:9, 5:9] = 1
    pred[6:10, 5:9, 5:9] = 1  # overlap 3 x 4 x 4 = 48 of 64 + 64
    assert m.dice(pred, gt) == pytest.approx(2 * 48 / 128)


def test_identical_masks_score_perfectly():
    gt = volume()
    gt[3:12, 4:9, 2:7] = 1
    assert m.dice(gt, gt) == 1.0
    assert m.surface_dice(gt, gt, (0.8, 0.8, 2.5)) == 1.0
    assert m.hausdorff95(gt, gt, (0.8, 0.8, 2.5)) == 0.0


def test_single_voxels_three_slices_apart_use_the_real_spacing():
    """Every surface distance is the centre distance 3 voxels x 2 mm = 6 mm: HD95 6, NSD@2mm 0, Dice 0."""
    pred, gt = volume(), volume()
    gt[5, 5, 5] = 1
    pred[5, 5, 8] = 1
    spacing = (1.0, 1.0, 2.0)
    assert m.hausdorff95(pred, gt, spacing) == pytest.approx(6.0)
    assert m.surface_dice(pred, gt, spacing, tolerance_mm=2.0) == 0.0
    assert m.dice(pred, gt) == 0.0
    # the same voxels 1.5 mm apart are within the 2 mm tolerance: NSD 1, HD95 1.5
    near = volume()
    near[5, 5, 6] = 1
    assert m.surface_dice(near, gt, (1.0, 1.0, 1.5), tolerance_mm=2.0) == 1.0
    assert m.hausdorff95(near, gt, (1.0, 1.0, 1.5)) == pytest.approx(1.5)
    # and 3 mm apart (2 voxels of 1.5 mm) they are not
    far = volume()
    far[5, 5, 7] = 1
    assert m.surface_dice(far, gt, (1.0, 1.0, 1.5), tolerance_mm=2.0) == 0.0


def test_empty_masks_follow_the_documented_convention():
    gt, pred, empty = volume(), volume(), volume()
    gt[2:5, 2:5, 2:5] = 1
    pred[10:12, 10:12, 10:12] = 1
    spacing = (1.0, 1.0, 1.0)
    # empty prediction, ground truth present
    assert m.dice(empty, gt) == 0.0 and m.surface_dice(empty, gt, spacing) == 0.0
    assert m.hausdorff95(empty, gt, spacing) == math.inf
    # empty ground truth, false positives
    assert m.dice(pred, empty) == 0.0 and m.surface_dice(pred, empty, spacing) == 0.0
    assert math.isnan(m.hausdorff95(pred, empty, spacing))
    # both empty: nothing to measure
    assert math.isnan(m.dice(empty, empty)) and math.isnan(m.surface_dice(empty, empty, spacing))
    assert math.isnan(m.hausdorff95(empty, empty, spacing))


def test_regions_are_the_whole_pancreas_and_the_tumor():
    gt, pred = volume(), volume()
    gt[4:8, 4:8, 4:8] = 1
    gt[4:6, 4:8, 4:8] = 2  # half of the organ is tumor
    pred[4:8, 4:8, 4:8] = 1  # the model calls the whole organ pancreas
    row = m.region_metrics(pred, gt, (1.0, 1.0, 1.0))
    assert row["pancreas_dice"] == 1.0  # labels 1 and 2 form the pancreas region
    assert row["tumor_dice"] == 0.0 and row["tumor_gt_voxels"] == 32 and row["tumor_pred_voxels"] == 0


def test_spacing_from_affine_reads_column_norms():
    affine = np.array([[0, -0.7, 0, 10], [0.7, 0, 0, 5], [0, 0, 2.5, -3], [0, 0, 0, 1]])
    assert m.spacing_from_affine(affine) == pytest.approx((0.7, 0.7, 2.5))
    assert m.spacing_from_affine(torch.as_tensor(affine)) == pytest.approx((0.7, 0.7, 2.5))


# ----------------------------------------------------------------------------------------------------------------
# equivalent radius, bins, components


def test_equivalent_radius_and_bins():
    assert m.equivalent_radius_mm(4.0 / 3.0 * math.pi * 10.0**3) == pytest.approx(10.0)
    assert m.radius_bin(0.0) == "[0,5)" and m.radius_bin(4.999) == "[0,5)"
    assert m.radius_bin(5.0) == "[5,10)" and m.radius_bin(19.99) == "[15,20)"
    assert m.radius_bin(20.0) == ">=20" and m.radius_bin(70.0) == ">=20"
    assert m.bin_labels() == ["[0,5)", "[5,10)", "[10,15)", "[15,20)", ">=20"]
    with pytest.raises(ValueError):
        m.radius_bin(-1.0)


def test_components_are_26_connected_and_small_ones_are_removed_by_volume_in_mm3():
    mask = volume()
    mask[2, 2, 2] = mask[3, 3, 3] = 1  # corner neighbours: one component with full connectivity
    mask[10:13, 10:13, 10:13] = 1  # 27 voxels
    assert m.connected_components(mask)[1] == 2
    assert m.connected_components(mask, connectivity=1)[1] == 3
    spacing = (1.0, 1.0, 2.0)  # 2 mm^3 voxels: the pair is 4 mm^3, the block 54 mm^3
    kept = m.remove_small_components(mask, spacing, min_volume_mm3=50.0)
    assert kept.sum() == 27 and not kept[2, 2, 2]
    assert m.remove_small_components(mask, spacing, min_volume_mm3=0).sum() == 29


# ----------------------------------------------------------------------------------------------------------------
# lesion detection and patient level


def detection_case():
    """Three ground-truth lesions with hand-computed radii at 1 x 1 x 2 mm voxels.

    A: 3x3x3 voxels = 54 mm^3 -> r = (3*54/4pi)^(1/3) = 2.345 mm, bin [0,5), missed.
    B: 10x10x10 voxels = 2000 mm^3 -> r = 7.816 mm, bin [5,10), hit by a 2-voxel overlap.
    C: 28x28x14 voxels = 21952 mm^3 -> r = 17.370 mm, bin [15,20), hit.
    """
    gt = volume((64, 64, 40))
    gt[1:4, 1:4, 1:4] = 2
    gt[10:20, 10:20, 10:20] = 2
    gt[30:58, 30:58, 22:36] = 2
    pred = volume((64, 64, 40))
    pred[19:22, 19:22, 19:22] = 2  # 27 voxels (54 mm^3, above the 50 mm^3 minimum); only (19, 19, 19) is in B
    pred[40:45, 40:45, 30:33] = 2  # inside C
    pred[60:63, 1:4, 1:4] = 2  # a false positive away from every lesion (54 mm^3)
    return pred, gt, (1.0, 1.0, 2.0)


def test_lesions_get_their_volume_radius_bin_and_hit():
    pred, gt, spacing = detection_case()
    lesions = m.detect_lesions(pred == 2, gt == 2, spacing, min_tumor_mm3=50.0)
    assert [lesion["voxels"] for lesion in lesions] == [27, 1000, 10976]
    assert [lesion["volume_mm3"] for lesion in lesions] == [54.0, 2000.0, 21952.0]
    assert [round(lesion["radius_mm"], 3) for lesion in lesions] == [2.345, 7.816, 17.370]
    assert [lesion["bin"] for lesion in lesions] == ["[0,5)", "[5,10)", "[15,20)"]
    assert [lesion["hit"] for lesion in lesions] == [False, True, True]
    table = m.sensitivity_by_bin(lesions)
    assert {k: table["[0,5)"][k] for k in ("lesions", "detected", "sensitivity")} == {
        "lesions": 1, "detected": 0, "sensitivity": 0.0}  # fmt: skip
    assert {k: table["[5,10)"][k] for k in ("lesions", "detected", "sensitivity")} == {
        "lesions": 1, "detected": 1, "sensitivity": 1.0}  # fmt: skip
    assert table["[15,20)"]["sensitivity"] == 1.0
    assert math.isnan(table["[10,15)"]["sensitivity"]) and table[">=20"]["lesions"] == 0
    assert table["all"]["sensitivity"] == pytest.approx(2 / 3) and table["all"]["lesions"] == 3
    assert table["all"]["ci_low"] < 2 / 3 < table["all"]["ci_high"] and math.isnan(table["[10,15)"]["ci_low"])


def test_false_positive_lesions_are_predicted_components_touching_no_tumor():
    pred, gt, spacing = detection_case()
    # three predicted components: one touches lesion B, one lies inside C, one is away from every lesion
    assert m.false_positive_lesions(pred == 2, gt == 2, spacing, min_tumor_mm3=50.0) == 1
    assert m.false_positive_lesions(pred == 2, np.zeros_like(gt), spacing, min_tumor_mm3=50.0) == 3
    assert m.false_positive_lesions(pred == 2, gt == 2, spacing, min_tumor_mm3=100.0) == 0  # all are 54-75 mm^3
    row, _ = m.evaluate_case(pred, gt, spacing, min_tumor_mm3=50.0)
    assert row["false_positive_lesions"] == 1


@pytest.mark.parametrize("successes, trials", [(0, 1), (3, 20), (17, 20), (20, 20), (40, 57)])
def test_wilson_interval_matches_scipy(successes, trials):
    from scipy.stats import binomtest

    expected = binomtest(successes, trials).proportion_ci(confidence_level=0.95, method="wilson")
    assert m.wilson_interval(successes, trials) == pytest.approx((expected.low, expected.high), abs=1e-6)
    assert all(math.isnan(v) for v in m.wilson_interval(0, 0))


def test_a_prediction_below_the_minimum_size_does_not_detect():
    gt = volume()
    gt[5:10, 5:10, 5:10] = 1
    pred = volume()
    pred[7, 7, 7] = 1  # 1 mm^3 inside the lesion
    spacing = (1.0, 1.0, 1.0)
    assert m.detect_lesions(pred, gt, spacing, min_tumor_mm3=50.0)[0]["hit"] is False
    assert m.detect_lesions(pred, gt, spacing, min_tumor_mm3=0.0)[0]["hit"] is True
    assert m.predicts_tumor(pred, spacing, 50.0) is False and m.predicts_tumor(pred, spacing, 0.0) is True


def test_empty_prediction_detects_nothing_and_empty_ground_truth_has_no_lesions():
    pred, gt, spacing = detection_case()
    empty = np.zeros_like(gt)
    missed = m.detect_lesions(empty, gt == 2, spacing)
    assert len(missed) == 3 and not any(lesion["hit"] for lesion in missed)
    assert m.sensitivity_by_bin(missed)["all"]["sensitivity"] == 0.0
    assert m.detect_lesions(pred == 2, empty, spacing) == []
    table = m.sensitivity_by_bin([])
    assert all(math.isnan(row["sensitivity"]) and row["lesions"] == 0 for row in table.values())


def test_patient_level_specificity_and_sensitivity():
    cases = [
        {"has_tumor": False, "predicted_tumor": False},
        {"has_tumor": False, "predicted_tumor": True},
        {"has_tumor": False, "predicted_tumor": False},
        {"has_tumor": True, "predicted_tumor": True},
        {"has_tumor": True, "predicted_tumor": False},
    ]
    result = m.patient_level(cases)
    assert result["healthy_cases"] == 3 and result["true_negative"] == 2
    assert result["specificity"] == pytest.approx(2 / 3)
    assert result["patient_sensitivity"] == pytest.approx(1 / 2)
    no_healthy = m.patient_level([c for c in cases if c["has_tumor"]])
    assert no_healthy["healthy_cases"] == 0 and math.isnan(no_healthy["specificity"])
    assert result["specificity_ci"][0] < 2 / 3 < result["specificity_ci"][1]
    counted = m.patient_level([{**c, "false_positive_lesions": 2 if c["predicted_tumor"] else 0} for c in cases])
    assert counted["false_positive_lesions"] == 4 and counted["false_positive_lesions_per_scan"] == pytest.approx(0.8)
    assert counted["false_positive_lesions_per_healthy_scan"] == pytest.approx(2 / 3)


def test_evaluate_case_on_a_healthy_scan_with_a_false_positive():
    gt = volume()
    gt[4:10, 4:10, 4:10] = 1  # healthy pancreas
    pred = gt.copy()
    pred[4:8, 4:8, 4:8] = 2  # 64 mm^3 of predicted tumor inside it
    row, lesions = m.evaluate_case(pred, gt, (1.0, 1.0, 1.0), min_tumor_mm3=50.0)
    assert lesions == [] and row["has_tumor"] is False and row["predicted_tumor"] is True
    assert row["pancreas_dice"] == 1.0 and row["tumor_dice"] == 0.0 and math.isnan(row["tumor_hd95"])
    binary_row, binary_lesions = m.evaluate_case(gt, gt, (1.0, 1.0, 1.0), tumor=False)
    assert "tumor_dice" not in binary_row and "predicted_tumor" not in binary_row and binary_lesions == []


def test_summary_uses_cases_with_the_region_and_counts_non_finite_values(tmp_path):
    rows = [
        {
            "pancreas_gt_voxels": 10,
            "pancreas_dice": 0.8,
            "pancreas_nsd": 0.5,
            "pancreas_hd95": 4.0,
            "tumor_gt_voxels": 5,
            "tumor_dice": 0.5,
            "tumor_nsd": 0.25,
            "tumor_hd95": math.inf,
            "has_tumor": True,
            "predicted_tumor": False,
        },
        {
            "pancreas_gt_voxels": 12,
            "pancreas_dice": 0.6,
            "pancreas_nsd": 0.7,
            "pancreas_hd95": 6.0,
            "tumor_gt_voxels": 0,
            "tumor_dice": 0.0,
            "tumor_nsd": 0.0,
            "tumor_hd95": math.nan,
            "has_tumor": False,
            "predicted_tumor": True,
        },
    ]
    summary = m.summarize(rows, lesions=[{"bin": "[5,10)", "hit": True}])
    stats = {(r["region"], r["metric"]): r for r in summary["regions"]}
    assert stats[("pancreas", "dice")]["mean"] == pytest.approx(0.7) and stats[("pancreas", "dice")]["n"] == 2
    assert stats[("tumor", "dice")]["n"] == 1 and stats[("tumor", "dice")]["mean"] == 0.5  # healthy case left out
    assert stats[("tumor", "hd95")]["n_nonfinite"] == 1 and math.isnan(stats[("tumor", "hd95")]["mean"])
    assert summary["patient"]["specificity"] == 0.0 and summary["patient"]["patient_sensitivity"] == 0.0
    detection = {row["bin"]: row for row in summary["detection"]}
    assert detection["[5,10)"]["sensitivity"] == 1.0
    path = m.write_csv(tmp_path / "summary.csv", summary["regions"])
    with open(path, newline="") as handle:
        read = list(csv.DictReader(handle))
    assert read[0]["region"] == "pancreas" and float(read[0]["mean"]) == pytest.approx(0.7)
    assert [r["mean"] for r in read if r["region"] == "tumor" and r["metric"] == "hd95"] == ["nan"]


def test_region_output_transform_builds_region_channels_for_meandice():
    onehot = torch.zeros(3, 2, 2, 2)
    onehot[0, 0] = 1
    onehot[1, 1, 0] = 1
    onehot[2, 1, 1] = 1
    preds, labels = m.RegionOutputTransform([1, 2])([{"pred": onehot, "label": onehot}])
    assert preds[0].shape == (1, 2, 2, 2) and preds[0].sum() == 4
    tumor, _ = m.RegionOutputTransform([2])([{"pred": onehot[:2], "label": onehot[:2]}])
    assert tumor[0].sum() == 0  # a binary model has no tumor channel: an empty region


# ----------------------------------------------------------------------------------------------------------------
# the lesion-level decision rule (scripts/postprocess.py)


def test_confidence_filter_drops_only_the_unsure_tumor_component_and_gives_its_voxels_the_next_class():
    post = importlib.import_module("seg_unet3d_scripts_metrics_test.postprocess")
    prob = np.zeros((3, 20, 20, 20), dtype=np.float32)
    prob[1] = 1.0  # pancreas everywhere
    prob[:, 2:6, 2:6, 2:6] = np.array([0.0, 0.05, 0.95])[:, None, None, None]  # a confident tumor
    prob[:, 12:15, 12:15, 12:15] = np.array([0.0, 0.4, 0.6])[:, None, None, None]  # an unsure one
    prob[:, 12, 12, 12] = [0.0, 0.1, 0.9]  # one confident voxel does not save the unsure component (mean 0.61)
    data = {"pred": torch.as_tensor(prob), "other": 1}
    out = post.TumorConfidenceFilterd(keys="pred", min_confidence=0.8)(data)
    labels = out["pred"].argmax(0).numpy()
    assert (labels[2:6, 2:6, 2:6] == 2).all() and (labels[12:15, 12:15, 12:15] == 1).all()
    assert int((labels == 2).sum()) == 64 and out["other"] == 1
    assert torch.equal(data["pred"], torch.as_tensor(prob))  # the input is not changed in place
    for disabled in (0.0, 0.5):  # off, or a threshold both components pass
        kept = post.TumorConfidenceFilterd(keys="pred", min_confidence=disabled)(data)["pred"].argmax(0)
        assert int((kept == 2).sum()) == 64 + 27
    binary = {"pred": torch.as_tensor(prob[:2])}  # a 2-class model has no tumor channel: nothing to do
    assert post.TumorConfidenceFilterd(keys="pred", min_confidence=0.8)(binary)["pred"].shape[0] == 2
    with pytest.raises(ValueError, match="min_confidence"):
        post.TumorConfidenceFilterd(keys="pred", min_confidence=1.0)
