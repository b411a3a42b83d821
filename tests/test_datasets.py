"""Datalist readers and validation: each bad input raises InputError naming the file and the problem, writing nothing.

Volumes are small arrays saved here with tools.io.save_nifti; the real CT / MR samples of ../shared check the
CT-intensity test on real scans.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from tests.dicom_fixtures import write_ct_series
from tools.datasets import (
    case_name,
    read_datalist,
    read_dicom_folder,
    read_monai_datalist,
    read_msd,
    read_nifti_folder,
    summarize,
    validate_records,
)
from tools.errors import InputError
from tools.io import save_nifti

SHAPE = (12, 10, 8)
AFFINE = np.diag([0.8, 0.8, 2.5, 1.0])


def save_ct(path: Path, shape=SHAPE, affine=AFFINE, seed: int = 0) -> Path:
    """A CT-like volume in HU: air around a soft-tissue block with fat, so the CT intensity check accepts it."""
    rng = np.random.default_rng(seed)
    hu = np.full(shape, -1000, dtype=np.int16)
    hu[2:-2, 2:-2, :] = rng.integers(-120, 80, size=(shape[0] - 4, shape[1] - 4, shape[2]))
    return save_nifti(path, hu, affine)


def save_label(path: Path, shape=SHAPE, affine=AFFINE, values=(0, 1, 2)) -> Path:
    label = np.zeros(shape, dtype=np.uint8)
    for index, value in enumerate(values[1:], start=1):
        label[2 + index, 3:6, 2:5] = value
    return save_nifti(path, label, affine, intent_label=True)


def tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under ``root`` with its size and mtime: equal snapshots mean nothing was written."""
    return {
        str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns)
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def make_msd(task_dir: Path, training=None, test=None) -> Path:
    """A tiny MSD task: two labelled training cases (one with an explicit patient and an organ map), one test."""
    for name in ("case_a", "case_b", "case_c"):
        save_ct(task_dir / ("imagesTs" if name == "case_c" else "imagesTr") / f"{name}.nii.gz")
    save_label(task_dir / "labelsTr" / "case_a.nii.gz")
    save_label(task_dir / "labelsTr" / "case_b.nii.gz")
    save_label(task_dir / "organsTr" / "case_a.nii.gz", values=tuple(range(6)))
    if training is None:
        training = [
            {
                "image": "./imagesTr/case_a.nii.gz",
                "label": "./labelsTr/case_a.nii.gz",
                "organs": "./organsTr/case_a.nii.gz",
                "patient": "P007",
                "healthy": False,
            },
            {"image": "./imagesTr/case_b.nii.gz", "label": "./labelsTr/case_b.nii.gz"},
        ]
    content = {"name": "tiny", "labels": {"0": "background", "1": "pancreas", "2": "tumour"}, "training": training}
    content["test"] = ["./imagesTs/case_c.nii.gz"] if test is None else test
    (task_dir / "dataset.json").write_text(json.dumps(content))
    return task_dir


# ------------------------------------------------------------------ MSD folders


def test_read_msd_gives_absolute_paths_patients_and_sections(tmp_path):
    task = make_msd(tmp_path / "Task99")
    before = tree(tmp_path)
    records = read_msd(task)
    assert [(r["case"], r["patient"], r["section"]) for r in records] == [
        ("case_a", "P007", "training"),
        ("case_b", "case_b", "training"),
        ("case_c", "case_c", "test"),
    ]
    assert records[0]["image"] == str(task / "imagesTr" / "case_a.nii.gz")
    assert records[0]["organs"] == str(task / "organsTr" / "case_a.nii.gz")
    assert records[0]["healthy"] is False and "label" not in records[2]
    assert all(os.path.isabs(r["image"]) for r in records)
    assert tree(tmp_path) == before
    assert summarize(records) == {
        "records": 3,
        "labelled": 2,
        "patients": 3,
        "sections": {"training": 2, "test": 1},
    }
    assert read_msd(task, sections=("test",))[0]["case"] == "case_c"


def test_read_msd_missing_file_names_dataset_json_and_the_path(tmp_path):
    task = make_msd(tmp_path / "Task99")
    (task / "labelsTr" / "case_b.nii.gz").unlink()
    before = tree(tmp_path)
    with pytest.raises(InputError) as caught:
        read_msd(task)
    message = str(caught.value)
    assert message.startswith(str(task / "dataset.json"))
    assert "./labelsTr/case_b.nii.gz" in message and "does not exist" in message
    assert tree(tmp_path) == before


@pytest.mark.parametrize("escaping", ["../outside.nii.gz", "./imagesTr/../../outside.nii.gz", "ABSOLUTE"])
def test_read_msd_refuses_paths_outside_the_data_folder(tmp_path, escaping):
    outside = save_ct(tmp_path / "outside.nii.gz")  # exists, so only the escape can be the problem
    escaping = str(outside) if escaping == "ABSOLUTE" else escaping
    task = make_msd(tmp_path / "Task99", training=[{"image": escaping}])
    with pytest.raises(InputError, match=r"dataset\.json: entry .* points outside the data folder"):
        read_msd(task)


@pytest.mark.parametrize(
    "dataset_json, problem",
    [
        ("{not json", "not valid JSON"),
        (json.dumps({"training": {"image": "x"}}), "'training' should be a list"),
        (json.dumps({"training": [{"label": "./labelsTr/case_a.nii.gz"}]}), r"training\[0\]: expected an object"),
        (json.dumps({"name": "empty"}), "no entries"),
        (
            json.dumps({"training": [{"image": "./imagesTr/case_a.nii.gz"}, {"image": "./imagesTr/./case_a.nii.gz"}]}),
            "listed twice",
        ),
    ],
    ids=["syntax", "not-a-list", "no-image", "empty", "duplicate"],
)
def test_read_msd_refuses_malformed_dataset_json(tmp_path, dataset_json, problem):
    task = make_msd(tmp_path / "Task99")
    (task / "dataset.json").write_text(dataset_json)
    with pytest.raises(InputError, match=problem) as caught:
        read_msd(task)
    assert str(caught.value).startswith(str(task / "dataset.json"))


def test_phantom_data_set_reads_and_validates(phantom_set):
    records = read_datalist(phantom_set)
    training = [r for r in records if r["section"] == "training"]
    assert training and all("label" in r and "organs" in r for r in training)
    assert all(os.path.isabs(r["image"]) and r["patient"] for r in records)
    validate_records(records, allowed_labels=(0, 1, 2))


# ------------------------------------------------------------------ NIfTI folders and datalist JSON


def test_read_nifti_folder_pairs_by_name(tmp_path):
    for name in ("b", "a", "c"):
        save_ct(tmp_path / "images" / f"{name}.nii.gz")
    save_label(tmp_path / "labels" / "a.nii.gz")
    save_label(tmp_path / "labels" / "b.nii.gz")
    records = read_nifti_folder(tmp_path / "images", label_dir=tmp_path / "labels")
    assert [(r["case"], Path(r.get("label", "-")).name) for r in records] == [
        ("a", "a.nii.gz"),
        ("b", "b.nii.gz"),
        ("c", "-"),
    ]
    assert records[0]["patient"] == "a"
    with pytest.raises(InputError, match=r"c\.nii\.gz: no label c\.nii\[\.gz\]"):
        read_nifti_folder(tmp_path / "images", label_dir=tmp_path / "labels", require_labels=True)


def test_read_nifti_folder_label_suffix_and_nnunet_names(tmp_path):
    save_ct(tmp_path / "flat" / "p1.nii.gz")
    save_label(tmp_path / "flat" / "p1_seg.nii.gz")
    records = read_nifti_folder(tmp_path / "flat", label_suffix="_seg")
    assert [(r["case"], Path(r["label"]).name) for r in records] == [("p1", "p1_seg.nii.gz")]

    save_ct(tmp_path / "imagesTr" / "pancreas_001_0000.nii.gz")
    save_label(tmp_path / "labelsTr" / "pancreas_001.nii.gz")
    records = read_nifti_folder(tmp_path / "imagesTr", label_dir=tmp_path / "labelsTr")
    assert records[0]["case"] == "pancreas_001" and records[0]["label"].endswith("labelsTr/pancreas_001.nii.gz")


def test_read_nifti_folder_refuses_a_label_without_image(tmp_path):
    save_ct(tmp_path / "images" / "a.nii.gz")
    save_label(tmp_path / "labels" / "a.nii.gz")
    save_label(tmp_path / "labels" / "typo_b.nii.gz")
    with pytest.raises(InputError, match=r"labels/typo_b\.nii\.gz: label has no image"):
        read_nifti_folder(tmp_path / "images", label_dir=tmp_path / "labels")


def test_read_monai_datalist_resolves_relative_to_its_folder(tmp_path):
    save_ct(tmp_path / "data" / "x.nii.gz")
    save_label(tmp_path / "data" / "x_label.nii.gz")
    datalist = tmp_path / "lists" / "split.json"
    datalist.parent.mkdir()
    entry = {"image": "../data/x.nii.gz", "label": "../data/x_label.nii.gz", "patient": "P1"}
    datalist.write_text(json.dumps({"training": [entry], "validation": []}))
    records = read_monai_datalist(datalist)
    assert records == [
        {
            "image": str(tmp_path / "data" / "x.nii.gz"),
            "label": str(tmp_path / "data" / "x_label.nii.gz"),
            "patient": "P1",
            "case": "x",
            "section": "training",
        }
    ]
    save_ct(tmp_path / "data" / "y.nii.gz")
    datalist.write_text(json.dumps({"healthy": [{"image": "../data/y.nii.gz"}], "testing": [entry], "n": [1, 2]}))
    assert [(r["section"], r["case"]) for r in read_monai_datalist(datalist)] == [("testing", "x"), ("healthy", "y")]
    datalist.write_text(json.dumps({"training": [entry], "validation": [entry]}))
    with pytest.raises(InputError, match=r"split\.json: image .*x\.nii\.gz is listed twice \(records 0 and 1\)"):
        read_monai_datalist(datalist)
    datalist.write_text(json.dumps([{"image": "../data/gone.nii.gz"}]))
    with pytest.raises(InputError, match=r"split\.json: names '\.\./data/gone\.nii\.gz', which does not exist"):
        read_monai_datalist(datalist)


def test_read_datalist_dispatches_on_what_it_is_given(tmp_path):
    task = make_msd(tmp_path / "Task99")
    assert [r["case"] for r in read_datalist(task)] == ["case_a", "case_b", "case_c"]
    assert [r["case"] for r in read_datalist(task / "dataset.json")] == ["case_a", "case_b", "case_c"]

    save_ct(tmp_path / "pairs" / "images" / "k.nii.gz")
    save_label(tmp_path / "pairs" / "labels" / "k.nii.gz")
    assert read_datalist(tmp_path / "pairs")[0]["label"] == str(tmp_path / "pairs" / "labels" / "k.nii.gz")

    save_ct(tmp_path / "flat" / "m.nii.gz")
    assert read_datalist(tmp_path / "flat") == [
        {"image": str(tmp_path / "flat" / "m.nii.gz"), "patient": "m", "case": "m"}
    ]

    (tmp_path / "list.json").write_text(json.dumps([{"image": "flat/m.nii.gz"}]))
    assert read_datalist(tmp_path / "list.json")[0]["image"] == str(tmp_path / "flat" / "m.nii.gz")

    write_ct_series(tmp_path / "dicom" / "P1" / "ct", n_slices=3, patient_id="PID-1")
    assert [(r["patient"], r["case"]) for r in read_datalist(tmp_path / "dicom")] == [("PID-1", "P1_ct")]

    (tmp_path / "nothing").mkdir()
    (tmp_path / "nothing" / "notes.txt").write_text("hello")
    with pytest.raises(InputError, match="no dataset.json, datalist, NIfTI images or DICOM series"):
        read_datalist(tmp_path / "nothing")


def test_read_datalist_nnunet_v2_dataset_json_without_file_lists(tmp_path):
    task = tmp_path / "Dataset007_Pancreas"
    save_ct(task / "imagesTr" / "p_001_0000.nii.gz")
    save_label(task / "labelsTr" / "p_001.nii.gz")
    save_ct(task / "imagesTs" / "p_900_0000.nii.gz")
    (task / "dataset.json").write_text(json.dumps({"channel_names": {"0": "CT"}, "labels": {"background": 0}}))
    records = read_datalist(task)
    assert [(r["case"], r["section"], "label" in r) for r in records] == [
        ("p_001", "training", True),
        ("p_900_0000", "test", False),
    ]


# ------------------------------------------------------------------ DICOM folders


def test_read_dicom_folder_lazy_records_write_nothing(tmp_path):
    root = tmp_path / "dicom"
    write_ct_series(root / "A" / "study" / "ct", n_slices=3, patient_id="PID-A", series_uid="1.2.3.1")
    write_ct_series(root / "B" / "ct", n_slices=3, patient_id="PID-B", series_uid="1.2.3.2")
    write_ct_series(root / "B" / "pet", n_slices=3, patient_id="PID-B", series_uid="1.2.3.3", modality="PT")
    write_ct_series(root / "anon" / "s1", n_slices=3, patient_id="", series_uid="1.2.3.4")
    save_label(tmp_path / "labels" / "PID-B.nii.gz")
    before = tree(tmp_path)
    records = read_dicom_folder(root, label_dir=tmp_path / "labels")
    assert [(r["case"], r["patient"], r["series_uid"], "label" in r) for r in records] == [
        ("A_study_ct", "PID-A", "1.2.3.1", False),
        ("B_ct", "PID-B", "1.2.3.2", True),
        ("anon_s1", "anon", "1.2.3.4", False),  # no PatientID: the top folder stands in for the patient
    ]
    assert records[0]["image"] == str(root / "A" / "study" / "ct")
    assert tree(tmp_path) == before


def test_read_dicom_folder_converts_once_into_the_cache(tmp_path):
    root = tmp_path / "dicom"
    _, raw = write_ct_series(root / "P1" / "ct", n_slices=4, patient_id="PID-1")
    cache = tmp_path / "cache"
    records = read_dicom_folder(root, cache_dir=cache)
    converted = Path(records[0]["image"])
    assert converted == cache / "P1_ct.nii.gz" and records[0]["dicom_dir"] == str(root / "P1" / "ct")
    np.testing.assert_array_equal(np.asarray(nib.load(converted).dataobj)[:, :, 2], raw[2].T.astype(np.int32) - 1024)
    first = tree(cache)
    assert sorted(first) == ["P1_ct.nii.gz", "P1_ct.source.json"]
    read_dicom_folder(root, cache_dir=cache)
    assert tree(cache) == first  # reused, not rewritten
    os.utime(sorted((root / "P1" / "ct").iterdir())[0], (1e9, 1e9))
    read_dicom_folder(root, cache_dir=cache)
    assert tree(cache)["P1_ct.nii.gz"] != first["P1_ct.nii.gz"]  # a changed series is converted again


def test_read_dicom_folder_refusals(tmp_path):
    write_ct_series(tmp_path / "mr" / "s", n_slices=3, modality="MR")
    with pytest.raises(InputError, match=r"no CT series found \(only \['MR'\]\)"):
        read_dicom_folder(tmp_path / "mr")
    write_ct_series(tmp_path / "two" / "s", n_slices=3, series_uid="1.2.3.1")
    write_ct_series(tmp_path / "two" / "s2", n_slices=3, series_uid="1.2.3.2", seed=1)
    for path in (tmp_path / "two" / "s2").iterdir():
        path.rename(tmp_path / "two" / "s" / f"B{path.name}")
    with pytest.raises(InputError, match="holds 2 series; pass cache_dir"):
        read_dicom_folder(tmp_path / "two")
    records = read_dicom_folder(tmp_path / "two", cache_dir=tmp_path / "cache")
    assert [r["case"] for r in records] == ["s_s1", "s_s2"]


# ------------------------------------------------------------------ validate_records


def _truncated(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    label = save_label(tmp_path / "label.nii.gz")
    data = image.read_bytes()
    image.write_bytes(data[: len(data) // 2])
    return {"image": str(image), "label": str(label)}, image, "truncated or corrupt"


def _shape_mismatch(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    label = save_label(tmp_path / "label.nii.gz", shape=(12, 10, 7))
    return {"image": str(image), "label": str(label)}, label, r"label shape \(12, 10, 7\) differs from image"


def _affine_mismatch(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    shifted = AFFINE.copy()
    shifted[:3, 3] = [0.0, 0.0, 5.0]
    label = save_label(tmp_path / "label.nii.gz", affine=shifted)
    return {"image": str(image), "label": str(label)}, label, r"label affine differs from image .* by up to 5 mm"


def _organs_mismatch(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    label = save_label(tmp_path / "label.nii.gz")
    organs = save_label(tmp_path / "organs.nii.gz", affine=np.diag([0.8, 0.8, 3.0, 1.0]))
    return {"image": str(image), "label": str(label), "organs": str(organs)}, organs, "label affine differs"


def _not_hounsfield(tmp_path):
    image = save_nifti(tmp_path / "ct.nii.gz", np.random.default_rng(0).random(SHAPE).astype(np.float32), AFFINE)
    return {"image": str(image)}, image, "does not look like CT in Hounsfield units"


def _nan_voxels(tmp_path):
    hu = np.full(SHAPE, -1000.0, dtype=np.float32)
    hu[3, 3, 3] = np.nan
    image = save_nifti(tmp_path / "ct.nii.gz", hu, AFFINE)
    return {"image": str(image)}, image, "1 voxels are NaN"


def _missing_image(tmp_path):
    return {"image": str(tmp_path / "gone.nii.gz")}, tmp_path / "gone.nii.gz", "file not found"


def _label_outside_set(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    label = save_label(tmp_path / "label.nii.gz", values=(0, 1, 2, 5))
    return {"image": str(image), "label": str(label)}, label, r"label values \[5\] are outside the label set"


@pytest.mark.parametrize(
    "make_bad_record",
    [
        _truncated,
        _shape_mismatch,
        _affine_mismatch,
        _organs_mismatch,
        _not_hounsfield,
        _nan_voxels,
        _missing_image,
        _label_outside_set,
    ],
    ids=lambda f: f.__name__.lstrip("_"),
)
def test_validate_records_names_the_bad_file(tmp_path, make_bad_record):
    good = {
        "image": str(save_ct(tmp_path / "good" / "ct.nii.gz")),
        "label": str(save_label(tmp_path / "good" / "l.nii.gz")),
    }
    bad, offending, problem = make_bad_record(tmp_path)
    before = tree(tmp_path)
    with pytest.raises(InputError, match=problem) as caught:
        validate_records([good, bad], allowed_labels=(0, 1, 2))
    assert str(caught.value).startswith(str(offending))
    assert tree(tmp_path) == before
    assert validate_records([good], allowed_labels=(0, 1, 2)) == [good]


@pytest.mark.shared
def test_validate_records_refuses_mr_offered_as_ct(real_ct_dir, tmp_path):
    mr = real_ct_dir / "example_mr_sm.nii.gz"
    before = tree(tmp_path)
    with pytest.raises(InputError, match="does not look like CT in Hounsfield units.*MR volume") as caught:
        validate_records([{"image": str(mr), "patient": "mr", "case": "mr"}])
    assert str(caught.value).startswith(str(mr))
    assert tree(tmp_path) == before
    validate_records([{"image": str(mr)}], check_ct=False)  # readable as a volume: only the modality is wrong


@pytest.mark.shared
def test_validate_records_accepts_real_ct_and_segmentation(real_ct_dir):
    records = read_nifti_folder(real_ct_dir, image_glob="example_ct_sm.nii.gz")
    assert records == [
        {"image": str(real_ct_dir / "example_ct_sm.nii.gz"), "patient": "example_ct_sm", "case": "example_ct_sm"}
    ]
    records[0]["label"] = str(real_ct_dir / "example_seg.nii.gz")
    assert validate_records(records) is records
    with pytest.raises(
        InputError, match=r"example_seg\.nii\.gz: label values \[\d+, .* outside the label set \[0, 7\]"
    ):
        validate_records(records, allowed_labels=(0, 7))


def test_validate_records_reads_dicom_series_folders(tmp_path):
    write_ct_series(tmp_path / "P1" / "ct", n_slices=4, patient_id="PID-1")
    write_ct_series(tmp_path / "P2" / "ct", n_slices=5, patient_id="PID-2", skip=(2,))
    records = read_dicom_folder(tmp_path)
    validate_records(records[:1])
    with pytest.raises(InputError, match=r"P2/ct: missing slice"):
        validate_records(records)


def test_case_name_strips_nifti_endings():
    assert case_name("/x/pancreas_001.nii.gz") == "pancreas_001"
    assert case_name("y.nii") == "y" and case_name("z.mha") == "z.mha"


@pytest.mark.shared
def test_converted_dicom_and_reference_label_validate_once_in_one_orientation(real_ct_dir, tmp_path):
    from tools.dicom import convert_dicom_series

    ct = convert_dicom_series(real_ct_dir / "example_ct_dicom", tmp_path / "ct.nii.gz")
    seg = real_ct_dir / "example_seg_dicom.nii.gz"
    with pytest.raises(InputError, match="same physical grid stored as LAS while the image is LPS") as caught:
        validate_records([{"image": str(ct), "label": str(seg)}])
    assert str(caught.value).startswith(str(seg))

    seg_img = nib.load(seg)
    to_image = nib.orientations.ornt_transform(
        nib.orientations.io_orientation(seg_img.affine), nib.orientations.io_orientation(nib.load(ct).affine)
    )
    reoriented = seg_img.as_reoriented(to_image)
    save_nifti(tmp_path / "seg_lps.nii.gz", np.asarray(reoriented.dataobj), reoriented.affine, intent_label=True)
    validate_records([{"image": str(ct), "label": str(tmp_path / "seg_lps.nii.gz")}])


def test_transposed_label_gets_a_reorientation_hint(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    label = np.zeros(SHAPE, np.uint8)
    label[3, 4, 5] = 1
    swapped_affine = AFFINE[:, [1, 0, 2, 3]]  # axes 0 and 1 exchanged: same voxels in world space
    save_nifti(tmp_path / "label.nii.gz", label.transpose(1, 0, 2), swapped_affine)
    with pytest.raises(InputError, match=r"shape \(10, 12, 8\) differs.*same physical grid stored as ARS") as caught:
        validate_records([{"image": str(image), "label": str(tmp_path / "label.nii.gz")}])
    assert str(caught.value).startswith(str(tmp_path / "label.nii.gz"))


# ------------------------------------------------------------------ the project's own outputs: organ maps, windows


WINDOW = (-175.0, 250.0)
MARK = "windowed [-175, 250] HU -> [0, 1]"


def save_windowed(path: Path, seed: int = 0) -> tuple[Path, np.ndarray]:
    """What ``data prepare --hu_window -175,250`` writes: the CT of :func:`save_ct` clipped and scaled to [0, 1]."""
    hu = np.asarray(nib.load(save_ct(path.with_name("hu_" + path.name), seed=seed)).dataobj).astype(np.float32)
    windowed = (np.clip(hu, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])
    return save_nifti(path, windowed.astype(np.float32), AFFINE), hu


def test_an_organ_map_may_have_no_background_a_pancreas_label_may_not(tmp_path):
    image = save_ct(tmp_path / "ct.nii.gz")
    label = save_label(tmp_path / "label.nii.gz")
    inside_body = np.full(SHAPE, 5, np.uint8)  # a crop inside the liver: every voxel is organ 5
    inside_body[:3] = 7
    organs = save_nifti(tmp_path / "organs.nii.gz", inside_body, AFFINE, intent_label=True)
    validate_records([{"image": str(image), "label": str(label), "organs": str(organs)}], allowed_labels=(0, 1, 2))
    all_pancreas = save_nifti(tmp_path / "all_pancreas.nii.gz", np.ones(SHAPE, np.uint8), AFFINE)
    with pytest.raises(InputError, match="all-foreground label") as caught:
        validate_records([{"image": str(image), "label": str(all_pancreas), "organs": str(organs)}])
    assert str(caught.value).startswith(str(all_pancreas))
    empty = save_nifti(tmp_path / "empty.nii.gz", np.zeros(SHAPE, np.uint8), AFFINE)
    with pytest.raises(InputError, match="empty label"):
        validate_records([{"image": str(image), "label": str(empty)}])


def test_a_windowed_image_is_accepted_when_marked_and_refused_when_not(tmp_path):
    windowed, _ = save_windowed(tmp_path / "windowed.nii.gz")
    label = str(save_label(tmp_path / "label.nii.gz"))
    marked = {"image": str(windowed), "label": label, "intensity": MARK}
    assert validate_records([marked], allowed_labels=(0, 1, 2)) == [marked]
    validate_records([{**marked, "intensity": "HU"}], check_ct=False)  # readable: only the intensity is in question
    for unmarked in ({"image": str(windowed)}, {"image": str(windowed), "intensity": "HU"}):
        with pytest.raises(InputError, match="does not look like CT in Hounsfield units") as caught:
            validate_records([unmarked])
        assert str(caught.value).startswith(str(windowed))
    # the mark is a promise checked against the voxels, and a misspelt mark is no mark
    hu = str(save_ct(tmp_path / "ct.nii.gz"))
    with pytest.raises(InputError, match=r"outside \[0, 1\], the range its datalist mark"):
        validate_records([{"image": hu, "intensity": MARK}])
    with pytest.raises(InputError, match="unknown intensity mark 'windowed -175,250'") as caught:
        validate_records([{"image": str(windowed), "intensity": "windowed -175,250"}])
    assert str(caught.value).startswith(str(windowed))


def test_mr_and_normalised_volumes_are_still_refused_marked_or_not(tmp_path):
    rng = np.random.default_rng(0)
    mr = save_nifti(tmp_path / "mr.nii.gz", rng.integers(0, 900, SHAPE).astype(np.int16), AFFINE)
    normalised = save_nifti(tmp_path / "z.nii.gz", rng.normal(0, 1, SHAPE).astype(np.float32), AFFINE)
    for path in (mr, normalised):
        with pytest.raises(InputError, match="does not look like CT|outside the Hounsfield range"):
            validate_records([{"image": str(path)}])
        with pytest.raises(InputError, match=r"outside \[0, 1\]"):
            validate_records([{"image": str(path), "intensity": MARK}])


def test_the_mark_is_found_in_the_prepared_folders_dataset_json(tmp_path):
    """A reader that lost the record's other keys (a folder scan, a datalist of its own) still finds the mark in the
    ``dataset.json`` of the file's folder: the entry's ``intensity``, or the folder's ``prep`` record."""
    from tools.bundle_scripts.validation import intensity_of

    windowed, _ = save_windowed(tmp_path / "prepared" / "imagesTr" / "case.nii.gz")
    datalist = tmp_path / "prepared" / "dataset.json"
    datalist.write_text(json.dumps({"training": [{"image": "imagesTr/case.nii.gz", "intensity": MARK}]}))
    assert intensity_of(windowed) == MARK and intensity_of(windowed, {"intensity": "HU"}) == "HU"
    validate_records([{"image": str(windowed)}])
    # a folder prepared before entries carried the mark: its prep record says which window (each rewrite changes
    # the file's size, so the cache sees it even within one mtime tick)
    prep_record = {"hu_window": [-175, 250], "out_range": [0, 1]}
    datalist.write_text(json.dumps({"prep": prep_record, "training": [{"image": "./imagesTr/case.nii.gz"}]}))
    assert intensity_of(windowed) == MARK
    datalist.write_text(json.dumps({"prep": {"hu_window": None}, "training": [{"image": "imagesTr/case.nii.gz"}]}))
    assert intensity_of(windowed) is None
    with pytest.raises(InputError, match="does not look like CT"):
        validate_records([{"image": str(windowed)}])


def test_load_image_hu_maps_a_windowed_image_back_to_hounsfield_units(tmp_path):
    from tools.datasets import load_image_hu

    windowed, hu = save_windowed(tmp_path / "windowed.nii.gz")
    restored, affine = load_image_hu({"image": str(windowed), "intensity": MARK})
    np.testing.assert_allclose(restored, np.clip(hu, *WINDOW), atol=1e-3)
    np.testing.assert_allclose(affine, AFFINE)
    assert restored.dtype == np.float32
    np.testing.assert_array_equal(load_image_hu(str(tmp_path / "hu_windowed.nii.gz"), check_ct=True)[0], hu)
    with pytest.raises(InputError, match="does not look like CT"):
        load_image_hu(str(windowed), check_ct=True)


def test_read_datalist_reads_a_synthesize_output_folder_by_its_datalist(tmp_path):
    image = save_ct(tmp_path / "syn" / "case_s000_image.nii.gz")
    label = save_label(tmp_path / "syn" / "case_s000_label.nii.gz")
    (tmp_path / "syn" / "datalist.json").write_text(
        json.dumps({"synthetic": True, "training": [{"image": image.name, "label": label.name, "synthetic": True}]})
    )
    (record,) = read_datalist(tmp_path / "syn")
    assert record["image"] == str(image) and record["label"] == str(label) and record["synthetic"] is True
    validate_records([record], allowed_labels=(0, 1, 2))
