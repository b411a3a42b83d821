"""The procedural phantom: determinism, anatomy, labels, geometry, contrast phases, and the MSD data set writer."""

from __future__ import annotations

import json

import nibabel as nib
import numpy as np
import pytest

from tools.io import array_sha256, load_label, load_nifti
from tools.phantom import ORGAN_LABELS, make_case, make_dataset, plan_cases


def _world_centroid(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    ijk = np.argwhere(mask).mean(axis=0)
    return affine[:3, :3] @ ijk + affine[:3, 3]


def _case_hashes(case) -> tuple:
    return tuple(array_sha256(a) for a in (case.ct, case.label, case.organs, case.affine))


@pytest.fixture(scope="module")
def tumor_case():
    return make_case(11, tumor=True, tumor_radius_mm=12.0)


def test_same_seed_gives_byte_identical_arrays():
    first = make_case(5, tumor=True)
    second = make_case(5, tumor=True)
    assert _case_hashes(first) == _case_hashes(second)
    assert first.meta == second.meta


def test_different_seeds_give_different_cases():
    assert array_sha256(make_case(5).ct) != array_sha256(make_case(6).ct)


def test_default_case_shape_dtype_and_hu_range(tumor_case):
    assert tumor_case.ct.shape == (160, 160, 80)
    assert tumor_case.ct.dtype == np.int16 and tumor_case.label.dtype == np.uint8
    assert tumor_case.ct.min() >= -1024 and tumor_case.ct.max() <= 3071
    outside = tumor_case.organs == 0
    assert np.median(tumor_case.ct[outside]) < -950, "air outside the body must be about -1000 HU"
    assert set(np.unique(tumor_case.label).tolist()) == {0, 1, 2}


def test_labels_agree_with_the_organ_map(tumor_case):
    pancreas_or_tumor = np.isin(tumor_case.organs, [ORGAN_LABELS["pancreas"], ORGAN_LABELS["pancreatic_tumor"]])
    assert np.array_equal(tumor_case.label > 0, pancreas_or_tumor)
    assert np.array_equal(tumor_case.label == 2, tumor_case.organs == ORGAN_LABELS["pancreatic_tumor"])


def test_tumor_size_and_attenuation(tumor_case):
    facts = tumor_case.meta["tumors"][0]
    # the tumor is clipped to the pancreas and its surroundings, so it can only lose volume, not gain much
    assert 0.5 * 12.0 < facts["equivalent_radius_mm"] <= 12.0 * 1.15
    tumor = tumor_case.label == 2
    pancreas = tumor_case.label == 1
    assert np.median(tumor_case.ct[tumor]) < np.median(tumor_case.ct[pancreas]) - 20, "tumors are hypo-attenuating"


def test_healthy_case_has_no_tumor_and_anatomy_is_unchanged_by_tumor_choice():
    healthy = make_case(11, tumor=False)
    with_tumor = make_case(11, tumor=True, tumor_radius_mm=12.0)
    assert not (healthy.label == 2).any() and healthy.meta["tumors"] == []
    liver = ORGAN_LABELS["liver"]
    # the tumor stream is separate: every organ away from the pancreas is the same voxel for voxel
    assert np.array_equal(healthy.organs == liver, with_tumor.organs == liver)


def test_anatomy_is_where_it_belongs():
    for seed in range(4):
        case = make_case(seed, shape=(96, 96, 48))
        c = {
            name: _world_centroid(case.organs == ORGAN_LABELS[name], case.affine)
            for name in (
                "liver",
                "spleen",
                "aorta",
                "inferior_vena_cava",
                "kidney_right",
                "kidney_left",
                "pancreas",
                "vertebrae_L1",
            )
        }
        assert c["liver"][0] > c["spleen"][0], "liver on the patient's right (+x in RAS), spleen on the left"
        assert c["inferior_vena_cava"][0] > c["aorta"][0], "IVC right of the aorta"
        assert c["kidney_right"][0] > 0 > c["kidney_left"][0]
        assert c["pancreas"][1] > c["aorta"][1] > c["vertebrae_L1"][1], "pancreas anterior to aorta, aorta to spine"
        pancreas = np.argwhere(case.label > 0)
        world_x = case.affine[0, 0] * pancreas[:, 0] + case.affine[0, 3]
        assert world_x.min() < c["aorta"][0] < world_x.max(), "the pancreas crosses the midline over the aorta"


def test_portal_venous_phase_enhances_organs():
    nc = make_case(3, phase="non_contrast")
    pv = make_case(3, phase="portal_venous")
    assert np.array_equal(nc.organs, pv.organs), "both phases of a patient share one anatomy"
    for organ, min_gain in (("liver", 40), ("aorta", 80), ("pancreas", 40)):
        mask = nc.organs == ORGAN_LABELS[organ]
        assert np.median(pv.ct[mask]) - np.median(nc.ct[mask]) > min_gain, organ
    fat = nc.organs == ORGAN_LABELS["subcutaneous_fat"]
    assert abs(np.median(pv.ct[fat]) - np.median(nc.ct[fat])) < 10


def test_lps_orientation_keeps_world_positions():
    ras = make_case(8, orientation="RAS", shape=(96, 96, 48))
    lps = make_case(8, orientation="LPS", shape=(96, 96, 48))
    assert nib.aff2axcodes(ras.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(lps.affine) == ("L", "P", "S")
    np.testing.assert_allclose(
        _world_centroid(ras.label > 0, ras.affine), _world_centroid(lps.label > 0, lps.affine), atol=1e-6
    )
    np.testing.assert_array_equal(ras.ct[::-1, ::-1, :], lps.ct)


@pytest.mark.parametrize(
    "spacing, shape",
    [((1.5, 1.5, 3.0), (128, 128, 40)), ("scanner", None), ("fit", (64, 64, 32))],
)
def test_spacing_options(spacing, shape):
    case = make_case(2, spacing=spacing, shape=shape)
    zooms = np.sqrt((case.affine[:3, :3] ** 2).sum(axis=0))
    if spacing == "scanner":
        assert 0.6 <= zooms[0] <= 0.9 and zooms[0] == pytest.approx(zooms[1]) and 1.0 <= zooms[2] <= 5.0
        assert case.ct.shape[0] * zooms[0] > 300, "a scanner field of view covers the body"
    elif spacing == "fit":
        assert case.ct.shape == shape
    else:
        np.testing.assert_allclose(zooms, spacing)
        assert case.ct.shape == shape
    assert (case.label == 1).sum() > 20


def test_plan_keeps_patients_together_and_counts_tumors():
    plan = plan_cases(10, seed=3, phase="both", tumor_fraction=0.3, test_fraction=0.2, orientation="mixed")
    assert len(plan) == 20
    by_patient = {}
    for item in plan:
        by_patient.setdefault(item["patient"], set()).add(item["split"])
    assert all(len(splits) == 1 for splits in by_patient.values())
    assert sum(1 for p in {i["patient"]: i for i in plan}.values() if p["tumor"]) == 3
    assert {i["split"] for i in plan if i["patient"] in {p for p, s in by_patient.items() if "test" in s}} == {"test"}
    assert len({p for p, s in by_patient.items() if s == {"test"}}) == 2


def test_dataset_layout_marks_synthetic_and_is_reused(tmp_path):
    out = tmp_path / "set"
    dataset_json = make_dataset(
        out, n_cases=3, seed=4, shape=(48, 48, 24), tumor_fraction=0.67, test_fraction=0.34, progress=False
    )
    meta = json.loads(dataset_json.read_text())
    assert meta["numTraining"] == 2 and meta["numTest"] == 1 and meta["synthetic"] is True
    assert meta["labels"] == {"0": "background", "1": "pancreas", "2": "tumour"}
    n_tumor = 0
    for entry in meta["training"] + meta["test"]:
        ct, affine = load_nifti(out / entry["image"])
        label, label_affine = load_label(out / entry["label"])
        assert ct.shape == label.shape and np.allclose(affine, label_affine)
        header = nib.load(str(out / entry["image"])).header
        assert header["descrip"].tobytes().startswith(b"SYNTHETIC")
        sidecar = json.loads((out / entry["image"].replace(".nii.gz", ".json")).read_text())
        assert sidecar["synthetic"] is True and sidecar["patient"] == entry["patient"]
        assert entry["has_tumor"] == bool((label == 2).any())
        n_tumor += entry["has_tumor"]
    assert n_tumor == 2
    assert all(e["image"].startswith("./imagesTs/") for e in meta["test"])

    mtimes = {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")}
    make_dataset(out, n_cases=3, seed=4, shape=(48, 48, 24), tumor_fraction=0.67, test_fraction=0.34, progress=False)
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*.nii.gz")} == mtimes, "a rerun rewrites nothing"


def test_interrupted_dataset_is_completed_without_redoing_finished_cases(tmp_path):
    out = tmp_path / "set"
    kwargs = dict(n_cases=3, seed=9, shape=(40, 40, 20), tumor_fraction=0.5, test_fraction=0.0, progress=False)
    make_dataset(out, **kwargs)
    reference = {p.name: array_sha256(load_nifti(p)[0]) for p in (out / "imagesTr").glob("*.nii.gz")}
    # simulate a kill after the first case: the last case's sidecar (written last) and dataset.json are missing
    (out / "dataset.json").unlink()
    (out / "imagesTr" / "phantom_002.json").unlink()
    kept = (out / "imagesTr" / "phantom_000.nii.gz").stat().st_mtime_ns
    make_dataset(out, **kwargs)
    assert (out / "imagesTr" / "phantom_000.nii.gz").stat().st_mtime_ns == kept
    assert {p.name: array_sha256(load_nifti(p)[0]) for p in (out / "imagesTr").glob("*.nii.gz")} == reference
    assert not list(out.rglob("*.part*")), "no temporary files are left behind"
