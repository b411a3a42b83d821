"""Writers of small DICOM CT series for tests (pydicom, a test-only dependency): one defect per broken series."""

from __future__ import annotations

from pathlib import Path

import numpy as np

AXIAL = (1.0, 0.0, 0.0, 0.0, 1.0, 0.0)
#: An oblique orientation (rotated about two axes) so that a wrong axis order or sign cannot pass unnoticed.
_ROT = np.array([[0.9, -0.3, 0.0], [0.3, 0.9, 0.0], [0.0, 0.0, 1.0]])
_ROT = np.linalg.qr(_ROT @ np.array([[1.0, 0.0, 0.0], [0.0, 0.95, -0.2], [0.0, 0.2, 0.95]]))[0]
OBLIQUE = tuple(float(v) for v in np.r_[_ROT[:, 0], _ROT[:, 1]])


def write_ct_slice(
    path: Path,
    raw: np.ndarray,
    position,
    orientation=AXIAL,
    pixel_spacing=(0.8, 0.7),
    slope: float = 1.0,
    intercept: float = -1024.0,
    modality: str | None = "CT",
    patient_id: str = "PAT-001",
    study_uid: str = "1.2.826.0.1.3680043.8.498.1",
    series_uid: str = "1.2.826.0.1.3680043.8.498.2",
    instance: int = 1,
) -> Path:
    """Write one uncompressed CT slice with the tags that place it in space; ``raw`` is (rows, columns) uint16."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.PatientID = patient_id
    ds.StudyInstanceUID = study_uid
    ds.SeriesInstanceUID = series_uid
    if modality is not None:
        ds.Modality = modality
    ds.SeriesDescription = "test series"
    ds.InstanceNumber = instance
    ds.ImagePositionPatient = [round(float(v), 6) for v in position]
    ds.ImageOrientationPatient = [round(float(v), 8) for v in orientation]
    ds.PixelSpacing = [float(v) for v in pixel_spacing]
    ds.Rows, ds.Columns = raw.shape
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.RescaleSlope = slope
    ds.RescaleIntercept = intercept
    ds.PixelData = np.ascontiguousarray(raw, dtype=np.uint16).tobytes()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_rtstruct(path: Path, patient_id: str = "PAT-001") -> Path:
    """A DICOM object without pixels (an RT structure set header), as found next to CT series in TCIA downloads."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, RTStructureSetStorage, generate_uid

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = RTStructureSetStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID = RTStructureSetStorage, meta.MediaStorageSOPInstanceUID
    ds.Modality, ds.PatientID, ds.SeriesInstanceUID = "RTSTRUCT", patient_id, generate_uid()
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(path, enforce_file_format=True)
    return path


def write_ct_series(
    folder: Path,
    n_slices: int = 5,
    shape=(6, 5),
    slice_spacing: float = 2.0,
    origin=(-10.0, 20.0, 30.0),
    orientation=AXIAL,
    seed: int = 0,
    skip=(),
    **tags,
) -> tuple[list[Path], np.ndarray]:
    """Write a regular series (slice k at ``origin + k * spacing * normal``); return its files and raw pixels.

    File names run opposite to the stacking direction so that the reader has to sort by position. ``skip`` leaves
    out slice indices (a missing slice). ``raw[k]`` is slice k as (rows, columns).
    """
    rng = np.random.default_rng(seed)
    raw = rng.integers(0, 2000, size=(n_slices, *shape)).astype(np.uint16)
    normal = np.cross(orientation[:3], orientation[3:])
    files = []
    for k in range(n_slices):
        if k in skip:
            continue
        position = np.asarray(origin) + k * slice_spacing * normal
        name = f"IM{n_slices - k:04d}.dcm"
        files.append(write_ct_slice(folder / name, raw[k], position, orientation, instance=k + 1, **tags))
    return files, raw
