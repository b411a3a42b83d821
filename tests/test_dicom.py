"""DICOM series -> NIfTI: geometry against a reference grid, HU values, and every refused series writing nothing.

Small series are built here with pydicom (a test-only dependency) so each broken case is exactly one defect; the
real series of ``../shared/data/real_ct`` checks real scanner headers (JPEG 2000, empty UIDs, LPS stacking).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import itk
import nibabel as nib
import numpy as np
import pytest

from tests.dicom_fixtures import OBLIQUE, write_ct_series, write_ct_slice, write_rtstruct
from tools.dicom import (
    check_series_geometry,
    convert_dicom_series,
    itk_to_nifti_affine,
    list_series,
    looks_like_dicom,
    read_dicom_series,
    read_slice_header,
)
from tools.errors import InputError

pydicom = pytest.importorskip("pydicom")


def assert_nothing_written(folder: Path) -> None:
    """The output folder holds no file at all (no result, no leftover temporary ``.part`` file)."""
    assert not folder.exists() or list(folder.iterdir()) == [], sorted(os.listdir(folder))


# ------------------------------------------------------------------ real series (../shared)


@pytest.mark.shared
def test_real_series_lands_on_reference_grid(real_ct_dir, tmp_path):
    out = convert_dicom_series(real_ct_dir / "example_ct_dicom", tmp_path / "ct.nii.gz")
    converted = nib.load(out)
    reference = nib.load(real_ct_dir / "example_seg_dicom.nii.gz")
    assert converted.get_data_dtype() == np.int16
    assert converted.header["sform_code"] == 1 and converted.header["qform_code"] == 1
    converted_ras, reference_ras = nib.as_closest_canonical(converted), nib.as_closest_canonical(reference)
    assert converted_ras.shape == reference_ras.shape == (512, 512, 20)
    np.testing.assert_allclose(converted_ras.header.get_zooms(), reference_ras.header.get_zooms(), atol=1e-5)
    np.testing.assert_allclose(converted_ras.affine, reference_ras.affine, atol=0.01)


@pytest.mark.shared
def test_real_series_values_are_hounsfield_units(real_ct_dir):
    series_dir = real_ct_dir / "example_ct_dicom"
    hu, affine, meta = read_dicom_series(series_dir)
    assert meta["Modality"] == "CT" and meta["n_slices"] == 20
    assert {"PatientID", "StudyInstanceUID", "SeriesInstanceUID"} <= set(meta)
    checked = 0
    for path in sorted(series_dir.iterdir())[7:9]:
        ds = pydicom.dcmread(path)
        expected = ds.pixel_array.astype(np.float64) * float(ds.RescaleSlope) + float(ds.RescaleIntercept)
        ras_position = np.array([-1.0, -1.0, 1.0]) * np.array(ds.ImagePositionPatient, dtype=float)
        voxel = np.linalg.solve(affine[:3, :3], ras_position - affine[:3, 3])
        np.testing.assert_allclose(voxel[:2], 0.0, atol=1e-6)  # every slice starts at voxel (0, 0)
        k = int(round(voxel[2]))
        assert abs(voxel[2] - k) < 1e-6
        # pydicom's pixel_array is (row, column) = (y, x); the NIfTI array is (x, y, z)
        np.testing.assert_array_equal(hu[:, :, k], expected.T)
        checked += 1
    assert checked == 2 and hu.min() == -1024


@pytest.mark.shared
def test_real_series_with_missing_slice_is_refused_and_nothing_written(real_ct_dir, tmp_path):
    series_dir = tmp_path / "series"
    shutil.copytree(real_ct_dir / "example_ct_dicom", series_dir)
    by_position = sorted(series_dir.iterdir(), key=lambda p: float(pydicom.dcmread(p).ImagePositionPatient[2]))
    removed = by_position[10]
    removed.unlink()
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    before = sorted(os.listdir(series_dir))
    with pytest.raises(InputError) as caught:
        convert_dicom_series(series_dir, out_dir / "ct.nii.gz")
    message = str(caught.value)
    assert message.startswith(str(series_dir))
    assert "missing slice" in message and "gap of 4.000 mm" in message and "2.000 mm apart" in message
    assert by_position[9].name in message and by_position[11].name in message
    assert_nothing_written(out_dir)
    assert sorted(os.listdir(series_dir)) == before


# ------------------------------------------------------------------ geometry and values on built series


def test_oblique_series_matches_itk_nifti_writer(tmp_path):
    files, raw = write_ct_series(tmp_path / "s", n_slices=4, shape=(6, 5), orientation=OBLIQUE, slice_spacing=2.5)
    hu, affine, _ = read_dicom_series(tmp_path / "s")

    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New()
    reader.SetImageIO(itk.GDCMImageIO.New())
    reader.SetFileNames(itk.GDCMSeriesFileNames.New(Directory=str(tmp_path / "s")).GetFileNames(""))
    reader.Update()
    itk.imwrite(reader.GetOutput(), str(tmp_path / "itk.nii.gz"))
    written_by_itk = nib.load(tmp_path / "itk.nii.gz")
    np.testing.assert_allclose(affine, written_by_itk.affine, atol=1e-4)
    np.testing.assert_array_equal(hu, np.asarray(written_by_itk.dataobj))

    # and from first principles: voxel (i, j, k) sits at origin + i*dx*row_dir + j*dy*col_dir + k*dz*normal (LPS)
    row_dir, col_dir = np.array(OBLIQUE[:3]), np.array(OBLIQUE[3:])
    lps = np.array([-10.0, 20.0, 30.0]) + 2 * 0.7 * row_dir + 3 * 0.8 * col_dir + 1 * 2.5 * np.cross(row_dir, col_dir)
    np.testing.assert_allclose(affine @ [2, 3, 1, 1], np.r_[lps * [-1, -1, 1], 1], atol=1e-4)
    assert hu.shape == (5, 6, 4) and hu.dtype == np.int16
    np.testing.assert_array_equal(hu[:, :, 1], raw[1].T.astype(np.int32) - 1024)


def test_slices_are_stacked_by_position_not_by_file_name(tmp_path):
    _, raw = write_ct_series(tmp_path / "s", n_slices=5)  # IM0005 is slice 0, IM0001 is slice 4
    hu, affine, _ = read_dicom_series(tmp_path / "s")
    for k in range(5):
        np.testing.assert_array_equal(hu[:, :, k], raw[k].T.astype(np.int32) - 1024)
    np.testing.assert_allclose(affine[:3, 3], [10.0, -20.0, 30.0])
    np.testing.assert_allclose(affine[:3, :3], np.diag([-0.7, -0.8, 2.0]))


def test_fractional_rescale_gives_float_hu(tmp_path):
    _, raw = write_ct_series(tmp_path / "s", n_slices=3, slope=0.5, intercept=-1000.0)
    hu, _, _ = read_dicom_series(tmp_path / "s")
    assert hu.dtype == np.float32
    np.testing.assert_allclose(hu[:, :, 0], raw[0].T * 0.5 - 1000.0)
    assert np.any(hu % 1 != 0)


def test_each_slice_gets_its_own_rescale(tmp_path):
    rng = np.random.default_rng(3)
    rescales = [(1.0, -1024.0), (2.0, -1024.0), (0.5, -1000.0), (1.0, 0.0)]
    raws = [rng.integers(0, 2000, size=(6, 5)).astype(np.uint16) for _ in rescales]
    for k, (slope, intercept) in enumerate(rescales):
        write_ct_slice(tmp_path / "s" / f"IM{k}.dcm", raws[k], (0.0, 0.0, 2.0 * k), slope=slope, intercept=intercept)
    hu, _, _ = read_dicom_series(tmp_path / "s")
    for k, (slope, intercept) in enumerate(rescales):
        np.testing.assert_array_equal(hu[:, :, k], raws[k].T.astype(np.float64) * slope + intercept)


def test_itk_to_nifti_affine_flips_lps_to_ras():
    affine = itk_to_nifti_affine(origin=(1.0, 2.0, 3.0), spacing=(0.5, 0.6, 2.0), direction=np.eye(3))
    np.testing.assert_allclose(affine, [[-0.5, 0, 0, -1], [0, -0.6, 0, -2], [0, 0, 2, 3], [0, 0, 0, 1]])


def test_series_uid_selects_one_of_several(tmp_path):
    write_ct_series(tmp_path / "s", n_slices=3, series_uid="1.2.3.1", seed=1)
    _, raw = write_ct_series(tmp_path / "s2", n_slices=3, series_uid="1.2.3.2", seed=2)
    for path in (tmp_path / "s2").iterdir():
        path.rename(tmp_path / "s" / ("B" + path.name))
    with pytest.raises(InputError, match=r"2 DICOM series in this folder.*1\.2\.3\.1 \(3 files.*1\.2\.3\.2 \(3 files"):
        read_dicom_series(tmp_path / "s")
    hu, _, meta = read_dicom_series(tmp_path / "s", series_uid="1.2.3.2")
    assert meta["SeriesInstanceUID"] == "1.2.3.2" and meta["PatientID"] == "PAT-001"
    np.testing.assert_array_equal(hu[:, :, 0], raw[0].T.astype(np.int32) - 1024)
    with pytest.raises(InputError, match=r"series_uid '9\.9' is not in this folder"):
        read_dicom_series(tmp_path / "s", series_uid="9.9")


def test_list_series_walks_the_tree(tmp_path):
    write_ct_series(tmp_path / "b_patient" / "ct", n_slices=3, patient_id="B", series_uid="1.2.3.20")
    write_ct_series(tmp_path / "a_patient" / "study" / "ct", n_slices=4, patient_id="A", series_uid="1.2.3.10")
    (tmp_path / "a_patient" / "notes.json").write_text("{}")
    write_rtstruct(tmp_path / "a_patient" / "study" / "rt" / "RS.dcm", patient_id="A")
    (tmp_path / "empty").mkdir()
    found = list_series(tmp_path)
    assert [(s.patient_id, s.series_uid, len(s.files)) for s in found] == [("A", "1.2.3.10", 4), ("B", "1.2.3.20", 3)]
    assert found[0].directory == tmp_path / "a_patient" / "study" / "ct"
    assert looks_like_dicom(found[0].files[0]) and not looks_like_dicom(tmp_path / "a_patient" / "notes.json")


# ------------------------------------------------------------------ refused series: named problem, nothing written


def _break_missing_slice(folder):
    write_ct_series(folder, n_slices=6, skip=(3,))
    return r"missing slice\(s\): gap of 4\.000 mm .*IM0004\.dcm.*IM0002\.dcm.*2\.000 mm apart \(about 1 slice"


def _break_modality(folder):
    write_ct_series(folder, n_slices=3, modality="MR")
    return r"IM000\d\.dcm: modality is 'MR', not CT"


def _break_size(folder):
    write_ct_series(folder, n_slices=4)
    write_ct_slice(folder / "odd.dcm", np.zeros((7, 5), np.uint16), (-10.0, 20.0, 38.0))
    return r"odd\.dcm: slice size 7x5 differs from 6x5"


def _break_orientation(folder):
    write_ct_series(folder, n_slices=4)
    write_ct_slice(folder / "odd.dcm", np.zeros((6, 5), np.uint16), (-10.0, 20.0, 38.0), orientation=OBLIQUE)
    return r"odd\.dcm: ImageOrientationPatient .* differs from"


def _break_pixel_spacing(folder):
    write_ct_series(folder, n_slices=4)
    write_ct_slice(folder / "odd.dcm", np.zeros((6, 5), np.uint16), (-10.0, 20.0, 38.0), pixel_spacing=(0.9, 0.9))
    return r"odd\.dcm: PixelSpacing \(0\.9, 0\.9\) differs"


def _break_duplicate(folder):
    write_ct_series(folder, n_slices=4)
    write_ct_slice(folder / "copy.dcm", np.zeros((6, 5), np.uint16), (-10.0, 20.0, 32.0))
    return r"two slices at the same position 32\.000 mm"


def _break_uneven(folder):
    write_ct_series(folder, n_slices=4)
    write_ct_slice(folder / "odd.dcm", np.zeros((6, 5), np.uint16), (-10.0, 20.0, 38.7))
    return r"is [+-]0\.\d+ mm off the regular grid.*unevenly spaced"


def _break_tilt(folder):
    for k in range(4):  # origins move 0.5 mm in y per 2 mm slice: a 14 degree gantry tilt
        write_ct_slice(folder / f"IM{k}.dcm", np.zeros((6, 5), np.uint16), (0.0, 0.5 * k, 2.0 * k), instance=k)
    return r"drift 1\.50 mm in-plane .*14\.04 degrees; gantry tilt"


def _break_single_slice(folder):
    write_ct_slice(folder / "only.dcm", np.zeros((6, 5), np.uint16), (0.0, 0.0, 0.0))
    return r"1 slice\(s\) found: a CT volume needs at least two"


def _break_missing_orientation_tag(folder):
    files, _ = write_ct_series(folder, n_slices=3)
    ds = pydicom.dcmread(files[1])
    del ds.ImageOrientationPatient
    ds.save_as(files[1])
    return r"IM0002\.dcm: DICOM tag orientation \(0020\|0037\) is missing or malformed"


def _break_empty(folder):
    folder.mkdir()
    (folder / "readme.txt").write_text("not a DICOM file")
    return r"no DICOM series found in this folder"


@pytest.mark.parametrize(
    "make_broken_series",
    [
        _break_missing_slice,
        _break_modality,
        _break_size,
        _break_orientation,
        _break_pixel_spacing,
        _break_duplicate,
        _break_uneven,
        _break_tilt,
        _break_single_slice,
        _break_missing_orientation_tag,
        _break_empty,
    ],
    ids=lambda f: f.__name__.removeprefix("_break_"),
)
def test_bad_series_is_refused_and_nothing_written(tmp_path, make_broken_series):
    series_dir = tmp_path / "series"
    expected = make_broken_series(series_dir)
    before = sorted(os.listdir(series_dir))
    out_dir = tmp_path / "out"
    with pytest.raises(InputError, match=expected) as caught:
        convert_dicom_series(series_dir, out_dir / "ct.nii.gz")
    assert str(caught.value).startswith(str(series_dir))  # names the folder or a file inside it
    assert_nothing_written(out_dir)
    assert sorted(os.listdir(series_dir)) == before


def test_headers_are_checked_before_itk_reads_pixels(tmp_path):
    files, _ = write_ct_series(tmp_path / "s", n_slices=4, skip=(2,))
    headers = [read_slice_header(f) for f in files]
    with pytest.raises(InputError, match="missing slice"):
        check_series_geometry(tmp_path / "s", headers)
    ordered, spacing = check_series_geometry(tmp_path / "s", headers[:2])
    assert spacing == pytest.approx(2.0) and [h.position[2] for h in ordered] == [30.0, 32.0]


def test_not_a_directory_and_bad_output_name(tmp_path):
    with pytest.raises(InputError, match="not a directory"):
        read_dicom_series(tmp_path / "nowhere")
    write_ct_series(tmp_path / "s", n_slices=3)
    with pytest.raises(InputError, match=r"must end in \.nii\.gz or \.nii"):
        convert_dicom_series(tmp_path / "s", tmp_path / "out" / "ct.mha")
    assert not (tmp_path / "out").exists()
