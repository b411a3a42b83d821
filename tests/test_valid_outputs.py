"""Issue 13: the project's own outputs are accepted by every reader (the valid-outputs suite), and the rules that
let them through: organ maps without background, volumes marked as written in a HU window. MR volumes and unmarked
normalised volumes are still refused (tests/test_bad_inputs.py runs every other refusal)."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
import torch
from monai.data import MetaTensor
from monai.transforms import LoadImaged

from tools.bundle_scripts.validation import InputError, ValidateCTd, windowed_mark
from tools.valid_outputs import PREPARE_MODES, cases, main, run_suite

WINDOW = (-175.0, 250.0)
MARK = windowed_mark(WINDOW, (0.0, 1.0))
AFFINE = np.diag([1.5, 1.5, 2.5, 1.0])


def ct_hu(shape=(12, 10, 8), seed: int = 0) -> np.ndarray:
    """Air, fat and soft tissue in HU."""
    hu = np.full(shape, -1000.0, np.float32)
    hu[2:-2, 2:-2] = np.random.default_rng(seed).uniform(-120, 80, (shape[0] - 4, shape[1] - 4, shape[2]))
    return hu


def to_window(hu: np.ndarray) -> np.ndarray:
    return ((np.clip(hu, *WINDOW) - WINDOW[0]) / (WINDOW[1] - WINDOW[0])).astype(np.float32)


def loaded(array: np.ndarray, path: str = "/data/imagesTr/case.nii.gz") -> MetaTensor:
    """An image as LoadImaged gives it (the meta names its file)."""
    return MetaTensor(torch.as_tensor(array), meta={"filename_or_obj": path})


def save(path: Path, array: np.ndarray) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, AFFINE), str(path))
    return path


@pytest.mark.slow
def test_every_output_through_every_reader_is_accepted(capsys):
    assert main([]) == 0, capsys.readouterr().out[-6000:]
    out = capsys.readouterr().out
    last = out.strip().splitlines()[-1]
    n = int(last.split()[0])
    assert last.startswith(f"{n} cases, 0 refused") and n >= 100, out[-3000:]


def test_the_suite_covers_every_prepare_mode_generator_mix_and_bundle_pipeline():
    names = " | ".join(case.name for case in cases())
    for mode in PREPARE_MODES:
        for window in ("None", "-175,250"):
            assert f"tools data prepare --mode {mode} --hu_window {window}" in names
    for needed in ("tools data phantom", "tools synthesize vae_ct", "tools synthesize ldm_abdomen",
                   "tools synthesize difftumor", "tools mix", "tools data split", "tools data list --validate",
                   "tools data quartiles", "tools evaluate seg", "tools evaluate synthetic", "tools reader_study build",
                   "tools study ratio --real", "tools study tumor_size --data", "seg_unet3d train/evaluate",
                   "seg_unet3d inference", "vae_ct train/evaluate", "vae_ct train_3d", "vae_ct inference",
                   "ldm_abdomen train/evaluate", "ldm_abdomen train_controlnet", "ldm_abdomen inference_controlnet",
                   "difftumor train/evaluate", "difftumor train_diffusion"):  # fmt: skip
        assert needed in names, needed
    made = {case.makes for case in cases() if case.makes}
    for case in cases():
        assert set(case.reads) <= made, f"{case.name} reads a set no case makes"


def test_the_suite_reports_a_refused_output(monkeypatch):
    """The suite can fail: with the windowed mark ignored (the old rule), the windowed crops are refused, named."""
    chosen = "tools data list --validate <- prep_pancreas_windowed"
    report = run_suite(case_filter=chosen, echo=None)
    assert [r.case for r in report.results][-1] == chosen and not report.refused, report.refused
    monkeypatch.setattr("tools.datasets.intensity_of", lambda path, record=None: None)
    report = run_suite(case_filter=chosen, echo=None)
    assert [r.case for r in report.refused] == [chosen]
    assert "does not look like CT in Hounsfield units" in report.refused[0].error
    assert report.line() == f"{len(report.results)} cases, 1 refused"


# ---------------------------------------------------------------------------------------------------------------
# the bundles' ValidateCTd


def test_validate_ctd_accepts_an_organ_map_without_background_but_not_such_a_label():
    check = ValidateCTd(keys=["image", "organs", "label"], label_keys=["organs", "label"])
    label = np.zeros((12, 10, 8), np.uint8)
    label[4:6, 4:6, 3:5] = 1
    organ = np.full((12, 10, 8), 5, np.uint8)  # a crop inside the liver
    check({"image": loaded(ct_hu()), "organs": loaded(organ, "organs.nii.gz"), "label": loaded(label, "label.nii.gz")})
    with pytest.raises(InputError, match="label.nii.gz: all-foreground label"):
        check({"image": loaded(ct_hu()), "organs": organ, "label": loaded(np.ones_like(label), "label.nii.gz")})
    with pytest.raises(InputError, match="organs.nii.gz: empty label"):  # an organ map must still name some organ
        check({"image": loaded(ct_hu()), "organs": loaded(np.zeros_like(organ), "organs.nii.gz"), "label": label})
    # difftumor inference reads the pancreas label under the name "organ": the label rules hold there
    with pytest.raises(InputError, match="all-foreground label"):
        ValidateCTd(keys=["image", "organ"], label_keys=["organ"])({"image": ct_hu(), "organ": organ})


def test_validate_ctd_accepts_a_marked_windowed_image_and_gives_it_back_in_hu():
    hu = ct_hu()
    check = ValidateCTd(keys=["image"], label_keys=[])
    out = check({"image": loaded(to_window(hu)), "intensity": MARK})
    restored = out["image"]
    assert isinstance(restored, MetaTensor) and restored.meta["filename_or_obj"] == "/data/imagesTr/case.nii.gz"
    np.testing.assert_allclose(restored.numpy(), np.clip(hu, *WINDOW), atol=1e-3)
    kept = ValidateCTd(keys=["image"], label_keys=[], restore_hu=False)({"image": to_window(hu), "intensity": MARK})
    np.testing.assert_array_equal(kept["image"], to_window(hu))
    assert check({"image": hu})["image"] is hu  # HU passes through untouched


@pytest.mark.parametrize(
    "volume, mark, problem",
    [
        ("windowed", None, "does not look like CT in Hounsfield units"),
        ("windowed", "HU", "does not look like CT in Hounsfield units"),
        ("mr", None, "does not look like CT in Hounsfield units"),
        ("mr", MARK, r"outside \[0, 1\], the range its datalist mark"),
        ("hu", MARK, r"outside \[0, 1\], the range its datalist mark"),
        ("windowed", "windowed [-175, 250]", "unknown intensity mark"),
    ],
    ids=["windowed-unmarked", "windowed-marked-hu", "mr", "mr-marked-windowed", "hu-marked-windowed", "bad-mark"],
)
def test_validate_ctd_still_refuses_mr_and_unmarked_normalised_volumes(volume, mark, problem):
    arrays = {"windowed": to_window(ct_hu()), "hu": ct_hu(),
              "mr": np.random.default_rng(0).uniform(0, 900, (12, 10, 8)).astype(np.float32)}  # fmt: skip
    data = {"image": loaded(arrays[volume], "/data/imagesTr/x.nii.gz")}
    if mark is not None:
        data["intensity"] = mark
    with pytest.raises(InputError, match=problem) as caught:
        ValidateCTd(keys=["image"], label_keys=[])(data)
    assert str(caught.value).startswith("/data/imagesTr/x.nii.gz")


def test_validate_ctd_finds_the_mark_of_a_folder_scan_in_its_dataset_json(tmp_path):
    """seg_unet3d inference scans ``imagesTs`` and difftumor inference keeps only image and organ: the mark of a
    prepared folder reaches their checks through the folder's ``dataset.json``."""
    hu = ct_hu()
    image = save(tmp_path / "prepared" / "imagesTs" / "case.nii.gz", to_window(hu))
    steps = [ValidateCTd(keys="image", label_keys=[], base_dir=tmp_path / "prepared"),
             LoadImaged(keys="image", image_only=True), ValidateCTd(keys="image", label_keys=[])]  # fmt: skip

    def pipeline(data):  # the steps of a bundle's preprocessing, without Compose's wrapping of errors
        for step in steps:
            data = step(data)
        return data

    with pytest.raises(InputError, match="does not look like CT"):  # no dataset.json: no mark
        pipeline({"image": str(image)})
    for listed in (
        {"test": [{"image": "imagesTs/case.nii.gz", "intensity": MARK}]},
        {"prep": {"hu_window": list(WINDOW), "out_range": [0, 1]}, "test": ["./imagesTs/case.nii.gz"]},
    ):
        (tmp_path / "prepared" / "dataset.json").write_text(json.dumps(listed))  # fmt: skip
        restored = pipeline({"image": str(image)})["image"]
        np.testing.assert_allclose(restored.numpy(), np.clip(hu, *WINDOW), atol=1e-3)
    (tmp_path / "prepared" / "dataset.json").write_text(json.dumps({"test": [{"image": "imagesTs/case.nii.gz"}]}))
    with pytest.raises(InputError, match="does not look like CT"):  # listed without a mark: HU is expected
        pipeline({"image": str(image)})


def test_validate_ctd_refuses_a_malformed_mark_before_loading(tmp_path):
    image = save(tmp_path / "case.nii.gz", ct_hu())
    with pytest.raises(InputError, match=f"{image}: unknown intensity mark 'windowed'"):
        ValidateCTd(keys="image", label_keys=[])({"image": str(image), "intensity": "windowed"})
