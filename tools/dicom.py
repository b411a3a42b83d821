"""DICOM CT series -> NIfTI with ITK, refusing series whose geometry ITK would silently get wrong.

ITK (``GDCMSeriesFileNames`` + ``ImageSeriesReader``) stacks whatever slices it is given: a missing slice, a
duplicated one, a tilted gantry or a stray localizer all produce a volume with a plausible header and wrong
anatomy. So every slice header is read and checked first (one orientation, one size, one pixel spacing, positions
evenly spaced along the slice normal, CT modality), and only a series that passes is read and written. Errors are
:class:`tools.errors.InputError` naming the directory or file and the problem; nothing is written on error.

The NIfTI affine is derived from ITK's LPS origin / spacing / direction exactly as ITK's own NIfTI writer (and
nibabel's ITK conventions) do: flip the first two world axes (LPS -> RAS). 3D Slicer therefore opens the NIfTI at
the same place as the DICOM series.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import itk
import numpy as np

from tools.errors import InputError
from tools.io import save_nifti

logger = logging.getLogger(__name__)

#: Modality tag values accepted as CT (the tag is optional; an absent or empty tag is accepted).
CT_MODALITIES = ("CT",)
#: Largest deviation (mm) of a slice from the regular grid fitted through all slice positions, as a fraction of the
#: slice spacing, and at least this many mm. Beyond it the series cannot be stored as one regular volume.
POSITION_REL_TOLERANCE = 0.05
POSITION_ABS_TOLERANCE_MM = 0.01
#: A gap between neighbouring slices larger than this many times the smallest one is reported as missing slices.
GAP_FACTOR = 1.5
#: Tolerance on direction cosines and pixel spacing when comparing slices.
ORIENTATION_TOLERANCE = 1e-4
#: Largest in-plane drift of slice origins along the stack (tangent of the angle) before it counts as gantry tilt.
TILT_TOLERANCE = 1e-3

_TAGS = {
    "position": "0020|0032",
    "orientation": "0020|0037",
    "rows": "0028|0010",
    "columns": "0028|0011",
    "pixel_spacing": "0028|0030",
    "modality": "0008|0060",
    "frames": "0028|0008",
    "samples_per_pixel": "0028|0002",
    "patient_id": "0010|0020",
    "study_uid": "0020|000d",
    "series_uid": "0020|000e",
    "series_number": "0020|0011",
    "description": "0008|103e",
}


@dataclass(frozen=True)
class SliceHeader:
    """The geometry and identity tags of one DICOM file, as read by GDCM."""

    path: str
    position: np.ndarray  # ImagePositionPatient (LPS, mm)
    row_direction: np.ndarray  # first three ImageOrientationPatient values: direction of increasing column index
    column_direction: np.ndarray  # last three: direction of increasing row index
    rows: int
    columns: int
    pixel_spacing: tuple[float, float]  # (between rows, between columns), as DICOM stores it
    modality: str
    frames: int
    samples_per_pixel: int
    patient_id: str
    study_uid: str
    series_uid: str
    series_number: str
    description: str

    @property
    def normal(self) -> np.ndarray:
        return np.cross(self.row_direction, self.column_direction)


@dataclass(frozen=True)
class DicomSeries:
    """One series found by :func:`list_series`: where it is, ITK's identifier for it and its files in slice order."""

    directory: Path
    series_id: str  # the identifier GDCMSeriesFileNames uses (normally the SeriesInstanceUID; may be empty)
    files: tuple[str, ...]
    patient_id: str
    study_uid: str
    series_uid: str
    modality: str
    description: str

    def summary(self) -> str:
        uid = self.series_id or "<empty SeriesInstanceUID>"
        description = f", {self.description!r}" if self.description else ""
        return f"{uid} ({len(self.files)} files, modality {self.modality or '?'}{description})"


def _floats(path: str, name: str, text: str, count: int) -> np.ndarray:
    try:
        values = np.array([float(v) for v in text.split("\\")], dtype=np.float64)
    except ValueError:
        values = np.array([])
    if values.size != count or not np.isfinite(values).all():
        raise InputError(path, f"DICOM tag {name} ({_TAGS[name]}) is missing or malformed: {text!r}")
    return values


def _int(path: str, name: str, text: str, default: int | None = None) -> int:
    if not text and default is not None:
        return default
    try:
        return int(float(text))
    except ValueError:
        raise InputError(path, f"DICOM tag {name} ({_TAGS[name]}) is missing or malformed: {text!r}") from None


def _read_tags(path: str) -> dict[str, str]:
    """The tags of :data:`_TAGS` of one file as stripped strings ("" when absent); pixels are not decoded.

    Values are copied out while the GDCMImageIO object is alive: its metadata dictionary is owned by it, and reading
    that dictionary after the object is freed crashes the interpreter.
    """
    image_io = itk.GDCMImageIO.New()
    try:
        image_io.SetFileName(path)
        image_io.ReadImageInformation()
    except Exception as err:  # ITK raises RuntimeError with a long C++ trace
        raise InputError(path, f"cannot read as DICOM ({str(err).strip().splitlines()[-1]})") from None
    dictionary = image_io.GetMetaDataDictionary()
    return {
        name: str(dictionary[key]).strip().strip("\x00").strip() if dictionary.HasKey(key) else ""
        for name, key in _TAGS.items()
    }


def read_slice_header(path: str | os.PathLike) -> SliceHeader:
    """Read the tags of one DICOM file that decide where its pixels are; raise :class:`InputError` if absent."""
    path = os.fspath(path)
    tags = _read_tags(path)
    orientation = _floats(path, "orientation", tags["orientation"], 6)
    spacing = _floats(path, "pixel_spacing", tags["pixel_spacing"], 2)
    row_direction, column_direction = orientation[:3], orientation[3:]
    norms = np.linalg.norm(row_direction), np.linalg.norm(column_direction)
    if abs(norms[0] - 1) > 1e-3 or abs(norms[1] - 1) > 1e-3 or abs(row_direction @ column_direction) > 1e-3:
        raise InputError(path, f"ImageOrientationPatient {orientation.tolist()} is not two orthogonal unit vectors")
    return SliceHeader(
        path=path,
        position=_floats(path, "position", tags["position"], 3),
        row_direction=row_direction / norms[0],
        column_direction=column_direction / norms[1],
        rows=_int(path, "rows", tags["rows"]),
        columns=_int(path, "columns", tags["columns"]),
        pixel_spacing=(float(spacing[0]), float(spacing[1])),
        modality=tags["modality"].upper(),
        frames=_int(path, "frames", tags["frames"], default=1),
        samples_per_pixel=_int(path, "samples_per_pixel", tags["samples_per_pixel"], default=1),
        patient_id=tags["patient_id"],
        study_uid=tags["study_uid"],
        series_uid=tags["series_uid"],
        series_number=tags["series_number"],
        description=tags["description"],
    )


_NOT_DICOM_SUFFIXES = (".nii", ".nii.gz", ".json", ".txt", ".csv", ".md", ".png", ".jpg", ".xml", ".zip", ".gz", ".py")


def looks_like_dicom(path: str | os.PathLike) -> bool:
    """True for a DICOM Part-10 file ("DICM" after the 128-byte preamble) or another file GDCM can parse."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            if f.read(132)[128:132] == b"DICM":
                return True
    except OSError:
        return False
    if path.lower().endswith(_NOT_DICOM_SUFFIXES):
        return False
    return bool(itk.GDCMImageIO.New().CanReadFile(path))


def _has_dicom_files(directory: Path) -> bool:
    return any(
        entry.is_file() and not entry.name.startswith(".") and looks_like_dicom(entry.path)
        for entry in os.scandir(directory)
    )


def _series_file_names(directory: Path) -> itk.GDCMSeriesFileNames:
    """GDCM's series grouping of one folder: by SeriesInstanceUID only, so that slices of one series that differ
    in size or thickness stay together and :func:`check_series_geometry` can name the odd file."""
    names = itk.GDCMSeriesFileNames.New()
    names.SetUseSeriesDetails(False)
    names.SetRecursive(False)
    names.SetDirectory(str(directory))
    return names


def _describe(directory: Path, series_id: str, files: tuple[str, ...]) -> DicomSeries:
    """Identity of a series from its first file; geometry is not required here (SEG, RTSTRUCT, SR have none)."""
    tags = _read_tags(files[0])
    return DicomSeries(
        directory=directory,
        series_id=series_id,
        files=files,
        patient_id=tags["patient_id"],
        study_uid=tags["study_uid"],
        series_uid=tags["series_uid"],
        modality=tags["modality"].upper(),
        description=tags["description"],
    )


def series_in_directory(directory: str | os.PathLike) -> list[DicomSeries]:
    """The DICOM series whose files lie directly in ``directory`` (not in sub-folders), as GDCM groups them."""
    directory = Path(directory)
    if not directory.is_dir():
        raise InputError(directory, "not a directory (expected a folder holding one DICOM series)")
    if not _has_dicom_files(directory):
        return []
    # a folder of DICOM files without images (RTSTRUCT, SR) makes GDCM print "No Series were found" on stderr
    warnings_were_shown = itk.Object.GetGlobalWarningDisplay()
    itk.Object.SetGlobalWarningDisplay(False)
    try:
        names = _series_file_names(directory)
        grouped = [(str(uid), tuple(str(f) for f in names.GetFileNames(uid))) for uid in names.GetSeriesUIDs()]
    finally:
        itk.Object.SetGlobalWarningDisplay(warnings_were_shown)
    return [_describe(directory, series_id, files) for series_id, files in grouped if files]


def list_series(root: str | os.PathLike) -> list[DicomSeries]:
    """Every DICOM series in the folder tree under ``root``, in sorted folder order (hidden folders skipped)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(root, "not a directory")
    found: list[DicomSeries] = []
    for current, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if not d.startswith("."))
        if files:
            found.extend(series_in_directory(current))
    return found


def _select_series(series_dir: Path, series_uid: str | None) -> DicomSeries:
    available = series_in_directory(series_dir)
    if not available:
        raise InputError(series_dir, "no DICOM series found in this folder (sub-folders are not searched)")
    if series_uid is None:
        if len(available) > 1:
            listing = "; ".join(s.summary() for s in available)
            raise InputError(
                series_dir, f"{len(available)} DICOM series in this folder, choose one with series_uid: {listing}"
            )
        return available[0]
    matches = [s for s in available if series_uid in (s.series_id, s.series_uid)]
    if len(matches) != 1:
        listing = "; ".join(s.summary() for s in available)
        problem = "matches several series" if matches else "is not in this folder"
        raise InputError(series_dir, f"series_uid {series_uid!r} {problem}; available: {listing}")
    return matches[0]


def check_series_geometry(series_dir: str | os.PathLike, headers: list[SliceHeader]) -> tuple[list[SliceHeader], float]:
    """Check that ``headers`` describe one regular volume; return them sorted along the slice normal and the spacing.

    Raises :class:`InputError` for: a non-CT modality tag, multi-frame or colour files, fewer than two slices,
    different orientation / size / pixel spacing between slices, two slices at one position, missing slices (a gap
    along the normal larger than :data:`GAP_FACTOR` times the smallest step, named with the files on either side),
    otherwise uneven spacing, and slice origins that drift in-plane (gantry tilt), which ITK would store as an
    orthogonal grid and so misplace every slice but the first.
    """
    for header in headers:
        if header.modality and header.modality not in CT_MODALITIES:
            raise InputError(header.path, f"modality is {header.modality!r}, not CT: this series is not a CT")
        if header.frames > 1:
            raise InputError(
                header.path, f"multi-frame DICOM ({header.frames} frames in one file) is not supported; use dcm2niix"
            )
        if header.samples_per_pixel != 1:
            raise InputError(header.path, f"{header.samples_per_pixel} samples per pixel: not a grey-scale CT slice")
    if len(headers) < 2:
        raise InputError(series_dir, f"{len(headers)} slice(s) found: a CT volume needs at least two")
    first = headers[0]
    for header in headers[1:]:
        if (header.rows, header.columns) != (first.rows, first.columns):
            raise InputError(
                header.path,
                f"slice size {header.rows}x{header.columns} differs from {first.rows}x{first.columns} of {first.path}",
            )
        if not (
            np.allclose(header.row_direction, first.row_direction, atol=ORIENTATION_TOLERANCE)
            and np.allclose(header.column_direction, first.column_direction, atol=ORIENTATION_TOLERANCE)
        ):
            raise InputError(
                header.path,
                f"ImageOrientationPatient {np.r_[header.row_direction, header.column_direction].round(5).tolist()} "
                f"differs from {np.r_[first.row_direction, first.column_direction].round(5).tolist()} of {first.path} "
                "(a localizer or a second orientation in this series?)",
            )
        if not np.allclose(header.pixel_spacing, first.pixel_spacing, atol=ORIENTATION_TOLERANCE):
            raise InputError(
                header.path, f"PixelSpacing {header.pixel_spacing} differs from {first.pixel_spacing} of {first.path}"
            )

    normal = first.normal
    ordered = sorted(headers, key=lambda h: float(h.position @ normal))
    along = np.array([h.position @ normal for h in ordered])
    steps = np.diff(along)
    for k, step in enumerate(steps):
        if step < POSITION_ABS_TOLERANCE_MM:
            raise InputError(
                series_dir,
                f"two slices at the same position {along[k]:.3f} mm along the slice normal: {ordered[k].path} and "
                f"{ordered[k + 1].path} (duplicate file or a second acquisition in this series)",
            )
    usual = float(steps.min())  # the true spacing even when a short series has lost a slice
    for k, step in enumerate(steps):
        if step > GAP_FACTOR * usual:
            missing = int(round(step / usual)) - 1
            raise InputError(
                series_dir,
                f"missing slice(s): gap of {step:.3f} mm along the slice normal between {ordered[k].path} "
                f"(position {along[k]:.3f} mm) and {ordered[k + 1].path} (position {along[k + 1]:.3f} mm), "
                f"where slices are {usual:.3f} mm apart (about {max(missing, 1)} slice(s) missing)",
            )
    mean_step = (along[-1] - along[0]) / (len(along) - 1)
    residual = along - (along[0] + mean_step * np.arange(len(along)))
    worst = int(np.argmax(np.abs(residual)))
    tolerance = max(POSITION_ABS_TOLERANCE_MM, POSITION_REL_TOLERANCE * mean_step)
    if abs(residual[worst]) > tolerance:
        raise InputError(
            ordered[worst].path,
            f"slice position {along[worst]:.3f} mm is {residual[worst]:+.3f} mm off the regular grid of spacing "
            f"{mean_step:.3f} mm: the slices are unevenly spaced and cannot form one volume",
        )
    drift = ordered[-1].position - ordered[0].position
    in_plane = drift - (drift @ normal) * normal
    if np.linalg.norm(in_plane) > max(POSITION_ABS_TOLERANCE_MM, TILT_TOLERANCE * abs(drift @ normal)):
        angle = np.degrees(np.arctan2(np.linalg.norm(in_plane), abs(drift @ normal)))
        raise InputError(
            series_dir,
            f"slice origins drift {np.linalg.norm(in_plane):.2f} mm in-plane over the stack ({angle:.2f} degrees; "
            "gantry tilt or sheared acquisition): resample it first, ITK would store it as an orthogonal grid",
        )
    return ordered, float(mean_step)


def itk_to_nifti_affine(origin, spacing, direction) -> np.ndarray:
    """The RAS-based NIfTI affine of an ITK image (LPS world): ``diag(-1, -1, 1) @ [direction * spacing | origin]``."""
    lps = np.eye(4)
    lps[:3, :3] = np.asarray(direction, dtype=np.float64) @ np.diag(np.asarray(spacing, dtype=np.float64))
    lps[:3, 3] = np.asarray(origin, dtype=np.float64)
    return np.diag([-1.0, -1.0, 1.0, 1.0]) @ lps


def _hu_array(voxels: np.ndarray) -> np.ndarray:
    """int16 when the HU values are whole numbers that fit, else float32 (e.g. a fractional rescale slope)."""
    if voxels.size and np.array_equal(voxels, np.round(voxels)):
        info = np.iinfo(np.int16)
        if voxels.min() >= info.min and voxels.max() <= info.max:
            return voxels.astype(np.int16)
    return voxels.astype(np.float32, copy=False)


def read_dicom_series(
    series_dir: str | os.PathLike, series_uid: str | None = None
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Read and check one CT series; return ``(hu, affine, meta)`` with ``hu`` indexed (x, y, z) like NIfTI.

    ``hu`` is in Hounsfield units (each slice's rescale slope / intercept applied by GDCM), int16 when integral.
    ``affine`` is the NIfTI (RAS) voxel-to-world matrix. ``meta`` holds PatientID, StudyInstanceUID,
    SeriesInstanceUID, Modality, SeriesDescription, the series directory, its ITK series id and the slice count.
    ``series_uid`` picks one series when the folder holds several (ITK's series id or the SeriesInstanceUID).
    """
    series_dir = Path(series_dir)
    series = _select_series(series_dir, series_uid)
    headers = [read_slice_header(f) for f in series.files]
    ordered, slice_spacing = check_series_geometry(series_dir, headers)

    reader = itk.ImageSeriesReader[itk.Image[itk.F, 3]].New()
    reader.SetImageIO(itk.GDCMImageIO.New())
    reader.SetFileNames([h.path for h in ordered])
    try:
        reader.Update()
    except Exception as err:
        raise InputError(series_dir, f"ITK cannot read the series ({str(err).strip().splitlines()[-1]})") from None
    image = reader.GetOutput()
    origin = np.array(image.GetOrigin(), dtype=np.float64)
    spacing = np.array(image.GetSpacing(), dtype=np.float64)
    direction = itk.array_from_matrix(image.GetDirection()).astype(np.float64)

    # ITK's geometry must agree with the checked headers; if not, some tag ITK reads differs from what we checked.
    first = ordered[0]
    expected_spacing = np.array([first.pixel_spacing[1], first.pixel_spacing[0], slice_spacing])
    if not (np.allclose(origin, first.position, atol=1e-3) and np.allclose(spacing, expected_spacing, atol=1e-3)):
        raise InputError(
            series_dir,
            f"ITK geometry (origin {origin.round(3).tolist()}, spacing {spacing.round(4).tolist()}) disagrees with the "
            f"slice headers (origin {first.position.round(3).tolist()}, spacing {expected_spacing.round(4).tolist()})",
        )

    voxels = itk.array_from_image(image).transpose(2, 1, 0)  # ITK arrays are (z, y, x); NIfTI voxels are (x, y, z)
    meta = {
        "PatientID": first.patient_id,
        "StudyInstanceUID": first.study_uid,
        "SeriesInstanceUID": first.series_uid,
        "Modality": first.modality,
        "SeriesDescription": first.description,
        "series_dir": str(series_dir),
        "series_id": series.series_id,
        "n_slices": len(ordered),
    }
    return _hu_array(voxels), itk_to_nifti_affine(origin, spacing, direction), meta


def convert_dicom_series(
    series_dir: str | os.PathLike, out_path: str | os.PathLike, series_uid: str | None = None
) -> Path:
    """Convert one CT series to a NIfTI file (HU, real geometry) after checking it; write nothing if it is bad.

    The file is written atomically (temporary file, then rename), so ``out_path`` either does not change or holds
    the complete volume. Returns ``out_path``.
    """
    out_path = Path(out_path)
    if not out_path.name.endswith((".nii.gz", ".nii")):
        raise InputError(out_path, "output path must end in .nii.gz or .nii")
    hu, affine, meta = read_dicom_series(series_dir, series_uid)
    save_nifti(out_path, hu, affine)
    logger.info("converted %s (%d slices) to %s", series_dir, meta["n_slices"], out_path)
    return out_path
