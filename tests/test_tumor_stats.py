"""Tumor-size statistics: tumors found and measured in mm, quartile classes equal to hand-computed values."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from tools.errors import InputError
from tools.io import save_nifti
from tools.tumor_stats import (
    classify_radius,
    dataset_tumor_stats,
    equivalent_radius,
    radius_ranges,
    size_classes,
    tumor_components,
    voxel_volume_mm3,
    write_tumor_stats,
)


def add_sphere(label, affine, centre_mm, radius_mm, value=2):
    """Set every voxel whose centre lies within ``radius_mm`` of ``centre_mm`` (world) to ``value``."""
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in label.shape], indexing="ij"), -1)
    world = idx @ affine[:3, :3].T + affine[:3, 3]
    label[((world - np.asarray(centre_mm)) ** 2).sum(-1) <= radius_mm**2] = value
    return label


def test_equivalent_radius_inverts_the_sphere_volume():
    for r in (0.5, 3.0, 17.25):
        assert equivalent_radius(4.0 / 3.0 * math.pi * r**3) == pytest.approx(r)


@pytest.mark.parametrize("spacing,flip", [((1.0, 1.0, 1.0), False), ((0.8, 0.8, 2.0), False), ((0.7, 0.9, 1.5), True)])
def test_single_spheres_measure_their_radius(spacing, flip):
    affine = np.diag([*spacing, 1.0])
    if flip:  # LPS-like: negative determinant, the voxel volume must stay positive
        affine[0, 0], affine[1, 1] = -spacing[0], -spacing[1]
    shape = tuple(int(np.ceil(44 / s)) for s in spacing)
    centre = np.asarray(affine[:3, :3] @ ((np.array(shape) - 1) / 2.0) + affine[:3, 3])
    assert voxel_volume_mm3(affine) == pytest.approx(np.prod(spacing))
    for radius in (4.0, 7.0, 12.0):
        label = add_sphere(np.ones(shape, np.uint8), affine, centre, radius)  # pancreas (1) all around
        (tumor,) = tumor_components(label, affine)
        assert tumor["radius_mm"] == pytest.approx(radius, rel=0.05)
        assert tumor["volume_mm3"] == pytest.approx(tumor["voxels"] * np.prod(spacing))
        np.testing.assert_allclose(tumor["centroid_mm"], centre, atol=max(spacing) / 2)


def test_connectivity_decides_what_is_one_tumor():
    label = np.zeros((10, 10, 10), np.uint8)
    label[1:4, 1:4, 1:4] = 2
    label[4:7, 4:7, 4:7] = 2  # touches the first cube at one corner only
    label[8, 0, 0] = 1  # pancreas is not tumor
    assert len(tumor_components(label, np.eye(4))) == 1
    assert len(tumor_components(label, np.eye(4), connectivity=18)) == 2
    assert len(tumor_components(label, np.eye(4), connectivity=6)) == 2
    assert len(tumor_components(label, np.eye(4), min_voxels=28)) == 1 and len(tumor_components(label, np.eye(4))) == 1
    with pytest.raises(InputError, match="connectivity"):
        tumor_components(label, np.eye(4), connectivity=8)
    assert tumor_components(np.ones((4, 4, 4), np.uint8), np.eye(4)) == []


RADII = [3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 12.0, 15.0]
# numpy / "type 7" quartiles of RADII, by hand: positions 0.25 * 7 = 1.75, 3.5, 5.25 in the sorted list
HAND_Q = (4.0 + 0.75 * (5.0 - 4.0), 6.0 + 0.5 * (8.0 - 6.0), 10.0 + 0.25 * (12.0 - 10.0))  # 4.75, 7.0, 10.5
HAND_CLASSES = {"tiny": [3.0, 4.0], "small": [5.0, 6.0], "medium": [8.0, 10.0], "large": [12.0, 15.0]}


def test_size_classes_of_exact_radii_match_hand_computation():
    stats = size_classes(RADII[::-1])
    assert stats["n_tumors"] == 8
    assert (stats["quartiles_mm"]["q1"], stats["quartiles_mm"]["q2"], stats["quartiles_mm"]["q3"]) == HAND_Q
    for name, members in HAND_CLASSES.items():
        assert stats["classes"][name]["count"] == 2
        assert stats["classes"][name]["representative_radius_mm"] == pytest.approx(np.median(members))
        assert stats["classes"][name]["observed_min_mm"] == min(members)
    assert radius_ranges(stats) == {
        "tiny": (3.0, 4.75),
        "small": (4.75, 7.0),
        "medium": (7.0, 10.5),
        "large": (10.5, 15.0),
    }
    assert [classify_radius(r, stats) for r in (1.0, 4.75, 4.76, 7.0, 10.0, 11.0, 99.0)] == [
        "tiny", "tiny", "small", "small", "medium", "large", "large"
    ]  # fmt: skip


def test_size_classes_edge_cases():
    empty = size_classes([])
    assert empty["n_tumors"] == 0 and empty["quartiles_mm"]["q1"] is None
    assert all(c["count"] == 0 for c in empty["classes"].values()) and radius_ranges(empty) == {}
    with pytest.raises(InputError, match="no tumors"):
        classify_radius(3.0, empty)
    one = size_classes([6.0])
    assert one["classes"]["tiny"]["count"] == 1 and one["quartiles_mm"] == {"q1": 6.0, "q2": 6.0, "q3": 6.0}
    ties = size_classes([5.0] * 7 + [9.0])
    assert sum(c["count"] for c in ties["classes"].values()) == 8


def write_cases(root, spacing=(1.0, 1.0, 1.0)):
    """Four labelled cases (8 tumors with the radii of RADII; case 3 healthy) and an unlabelled test scan."""
    affine = np.diag([*spacing, 1.0])
    shape = tuple(int(round(n / s)) for n, s in zip((80, 40, 36), spacing))
    layout = {0: [(10, 3.0), (26, 8.0), (58, 15.0)], 1: [(12, 4.0), (40, 12.0)], 2: [(10, 5.0), (26, 6.0), (48, 10.0)]}
    training = []
    for case in range(4):
        label = np.ones(shape, np.uint8)  # all pancreas, tumors inside
        for x_mm, radius in layout.get(case, []):
            add_sphere(label, affine, (x_mm, 20.0, 18.0), radius)
        save_nifti(root / "labelsTr" / f"case_{case}.nii.gz", label, affine)
        save_nifti(root / "imagesTr" / f"case_{case}.nii.gz", np.full(shape, -1000, np.int16), affine)
        training.append({"image": f"imagesTr/case_{case}.nii.gz", "label": f"labelsTr/case_{case}.nii.gz"})
    save_nifti(root / "imagesTr" / "case_9.nii.gz", np.full(shape, -1000, np.int16), affine)
    training.append({"image": "imagesTr/case_9.nii.gz"})
    (root / "dataset.json").write_text(json.dumps({"training": training}))
    return root


@pytest.mark.parametrize("spacing", [(1.0, 1.0, 1.0), (0.8, 0.8, 1.5)])
def test_dataset_quartiles_match_hand_values_for_spheres(tmp_path, spacing):
    src = write_cases(tmp_path, spacing)
    stats = write_tumor_stats(src, tmp_path / "stats" / "tumor_stats.json")
    assert json.loads((tmp_path / "stats" / "tumor_stats.json").read_text()) == json.loads(json.dumps(stats))
    assert stats["n_tumors"] == 8 and len(stats["tumors"]) == 8
    assert stats["n_cases"] == 4 and stats["n_cases_with_tumor"] == 3 and stats["n_cases_without_label"] == 1
    assert sorted(t["case"] for t in stats["tumors"]) == ["case_0"] * 3 + ["case_1"] * 2 + ["case_2"] * 3
    measured = sorted(t["radius_mm"] for t in stats["tumors"])
    # voxelisation error: a 3 mm sphere of 1 mm voxels holds 123 voxels (r_eq 3.085 mm); larger ones do better
    np.testing.assert_allclose(measured, RADII, atol=0.15)
    q = stats["quartiles_mm"]
    np.testing.assert_allclose([q["q1"], q["q2"], q["q3"]], HAND_Q, atol=0.15)
    for name, members in HAND_CLASSES.items():
        assert stats["classes"][name]["count"] == 2
        assert stats["classes"][name]["representative_radius_mm"] == pytest.approx(np.median(members), abs=0.15)


def test_dataset_stats_name_a_broken_label_file(tmp_path):
    src = write_cases(tmp_path)
    (tmp_path / "labelsTr" / "case_2.nii.gz").write_bytes(b"broken")
    with pytest.raises(InputError, match="case_2.nii.gz"):
        dataset_tumor_stats(src)


def test_stats_of_the_phantom_set_count_its_tumor_cases(phantom_set):
    source = json.loads((phantom_set / "dataset.json").read_text())
    stats = dataset_tumor_stats(phantom_set, section=None)
    entries = source["training"] + source["test"]
    assert stats["n_cases"] == len(entries)
    assert stats["n_cases_with_tumor"] == sum(bool(e["has_tumor"]) for e in entries)
    assert stats["n_tumors"] >= stats["n_cases_with_tumor"] and len(stats["tumors"]) == stats["n_tumors"]
    assert sum(c["count"] for c in stats["classes"].values()) == stats["n_tumors"]
    assert all(t["radius_mm"] > 0 for t in stats["tumors"])


def test_study_size_classes_fall_back_only_when_no_tumor_and_never_hide_a_broken_label(tmp_path):
    from tools.studies import tumor_size_classes

    src = write_cases(tmp_path / "with_tumors")
    out = tumor_size_classes(src / "dataset.json", tmp_path / "classes.json")
    assert out == tmp_path / "classes.json" and json.loads(out.read_text())["n_tumors"] == 8
    assert tumor_size_classes(src / "dataset.json", out) == out  # reused
    healthy = tmp_path / "healthy"
    save_nifti(healthy / "labelsTr" / "h.nii.gz", np.ones((8, 8, 8), np.uint8), np.eye(4))
    save_nifti(healthy / "imagesTr" / "h.nii.gz", np.zeros((8, 8, 8), np.int16), np.eye(4))
    (healthy / "dataset.json").write_text(
        json.dumps({"training": [{"image": "imagesTr/h.nii.gz", "label": "labelsTr/h.nii.gz"}]})
    )
    assert tumor_size_classes(healthy / "dataset.json", tmp_path / "none.json") is None
    assert tumor_size_classes(healthy / "dataset.json", tmp_path / "none.json") is None  # the recorded answer
    (src / "labelsTr" / "case_2.nii.gz").write_bytes(b"broken")
    with pytest.raises(InputError, match="case_2.nii.gz"):
        tumor_size_classes(src / "dataset.json", tmp_path / "broken.json")
