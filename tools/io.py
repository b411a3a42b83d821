"""Reading and writing volumes safely.

Every reader validates what it reads and raises :class:`tools.errors.InputError` naming the file; every writer
writes to a temporary file in the destination folder and renames it into place, so that a crash or a kill never
leaves a half-written file under the final name, and refuses to overwrite one of its own inputs.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator

import nibabel as nib
import numpy as np

from tools.bundle_scripts.validation import check_header
from tools.errors import InputError

#: Text put in the NIfTI ``descrip`` field of every synthetic volume (80 bytes at most).
SYNTHETIC_DESCRIP = "SYNTHETIC"
#: Voxel sizes outside this range (mm) are treated as a broken header rather than a scan.
SPACING_RANGE_MM = (0.05, 20.0)
#: What a CT in Hounsfield units may contain; values outside are not HU (some scanners pad outside the
#: reconstruction circle with -3024 HU, so the lower bound leaves room for that).
HU_VALID_RANGE = (-3100.0, 32767.0)


def _default_file_mode() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return 0o666 & ~mask


_FILE_MODE = _default_file_mode()


@contextlib.contextmanager
def atomic_path(final: str | os.PathLike, inputs: tuple[str | os.PathLike, ...] = ()) -> Iterator[Path]:
    """Yield a temporary path next to ``final``; on success rename it to ``final``, on error delete it.

    The temporary name keeps the suffixes of ``final`` (``.nii.gz``, ``.json``) because writers such as nibabel
    choose the format from them. ``inputs`` are files this write was computed from: writing over one is refused.
    """
    final = Path(final)
    for src in inputs:
        if src is not None and Path(src).exists() and final.exists() and os.path.samefile(src, final):
            raise InputError(final, "refusing to overwrite an input file; choose another output path")
    final.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(final.suffixes) or ".tmp"
    fd, tmp = tempfile.mkstemp(prefix=f".{final.name.split('.')[0]}.", suffix=".part" + suffix, dir=final.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        os.chmod(tmp_path, _FILE_MODE)  # mkstemp makes 0600 files; give the result the usual permissions
        os.replace(tmp_path, final)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()
        raise


def write_json(path: str | os.PathLike, obj: Any, inputs: tuple = ()) -> Path:
    """Write ``obj`` as indented JSON, atomically."""
    with atomic_path(path, inputs) as tmp:
        tmp.write_text(json.dumps(obj, indent=2, sort_keys=False) + "\n")
    return Path(path)


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes (used for provenance and resumable outputs)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(chunk), b""):
            digest.update(block)
    return digest.hexdigest()


def array_sha256(array: np.ndarray) -> str:
    """Hex SHA-256 of an array's dtype, shape and bytes (byte-identity checks)."""
    digest = hashlib.sha256()
    digest.update(str(array.dtype).encode())
    digest.update(str(array.shape).encode())
    digest.update(np.ascontiguousarray(array).tobytes())
    return digest.hexdigest()


def save_nifti(
    path: str | os.PathLike,
    array: np.ndarray,
    affine: np.ndarray,
    *,
    descrip: str | None = None,
    inputs: tuple = (),
    intent_label: bool = False,
) -> Path:
    """Write a NIfTI-1 volume atomically with qform and sform both set to ``affine`` (3D Slicer reads either).

    ``descrip`` goes into the header's description (e.g. :data:`SYNTHETIC_DESCRIP`); ``intent_label`` marks a
    label map so viewers show it as a segmentation.
    """
    array = np.asarray(array)
    img = nib.Nifti1Image(array, np.asarray(affine, dtype=np.float64))
    img.header.set_qform(affine, code=1)
    img.header.set_sform(affine, code=1)
    img.header.set_xyzt_units("mm", "sec")
    if descrip:
        img.header["descrip"] = descrip.encode("ascii", "replace")[:79]
    if intent_label:
        img.header.set_intent("label")
    with atomic_path(path, inputs) as tmp:
        nib.save(img, str(tmp))
    return Path(path)


def load_nifti(path: str | os.PathLike, *, dtype: Any = None, ndim: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """Read a NIfTI volume fully and validate it; return ``(array, affine)``.

    Raises :class:`InputError` for a missing, truncated or corrupt file, a volume that is not ``ndim``-D, a
    non-invertible affine, absurd voxel sizes, a volume beyond the memory guard, or NaN / inf voxels. For 3D volumes
    the header is checked (:func:`tools.bundle_scripts.validation.check_header`) before any voxel is read.
    """
    path = Path(path)
    if not path.is_file():
        raise InputError(path, "file not found")
    if ndim == 3:  # header first (shared with the bundles): truncation, 2D / 4D, spacing, memory guard, unread data
        check_header(path)
    try:
        img = nib.load(str(path))
        array = np.asanyarray(img.dataobj)
    except Exception as err:  # nibabel raises many types (EOFError, zlib.error, ImageFileError, ValueError)
        raise InputError(path, f"cannot read as NIfTI: truncated or corrupt file ({type(err).__name__}: {err})")
    if array.ndim == 4 and array.shape[-1] == 1 and ndim == 3:
        array = array[..., 0]
    if array.ndim != ndim:
        raise InputError(path, f"expected a {ndim}D volume, got shape {tuple(array.shape)}")
    affine = np.asarray(img.affine, dtype=np.float64)
    check_affine(path, affine)
    if np.issubdtype(array.dtype, np.floating) and not np.isfinite(array).all():
        bad = int((~np.isfinite(array)).sum())
        raise InputError(path, f"{bad} voxels are NaN or infinite")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    return array, affine


def check_affine(path: str | os.PathLike, affine: np.ndarray) -> None:
    """Raise :class:`InputError` if the affine is not finite and invertible or its voxel sizes are absurd."""
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-9:
        raise InputError(path, "the affine (voxel-to-world matrix) is singular or not finite")
    spacing = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    lo, hi = SPACING_RANGE_MM
    if (spacing < lo).any() or (spacing > hi).any():
        raise InputError(path, f"voxel spacing {np.round(spacing, 4).tolist()} mm is outside [{lo}, {hi}] mm")


def voxel_spacing(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm along the array axes."""
    return np.sqrt((np.asarray(affine)[:3, :3] ** 2).sum(axis=0))


def check_pair(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    image_shape: tuple,
    image_affine: np.ndarray,
    label_shape: tuple,
    label_affine: np.ndarray,
    atol_mm: float = 1e-3,
) -> None:
    """Raise :class:`InputError` naming both files when an image and its label are not on the same grid."""
    if tuple(image_shape) != tuple(label_shape):
        raise InputError(
            label_path, f"label shape {tuple(label_shape)} differs from image {image_path} shape {tuple(image_shape)}"
        )
    if not np.allclose(image_affine, label_affine, atol=atol_mm):
        worst = float(np.abs(np.asarray(image_affine) - np.asarray(label_affine)).max())
        raise InputError(
            label_path, f"label affine differs from image {image_path} affine by up to {worst:.4g} mm (different grid)"
        )


def check_ct_intensity(path: str | os.PathLike, array: np.ndarray) -> None:
    """Raise :class:`InputError` when a volume offered as CT does not look like CT in Hounsfield units.

    An abdominal CT always contains fat (about -100 HU) or air (-1000 HU) inside its field of view, so its 1st
    percentile lies well below -100 HU, and its values stay inside the range of 12-bit or 16-bit HU. An MR volume
    or an already normalised image (values around [0, 1] or [0, 1000]) has neither.
    """
    values = np.asarray(array)
    lo_valid, hi_valid = HU_VALID_RANGE
    vmin, vmax = float(values.min()), float(values.max())
    if vmin < lo_valid or vmax > hi_valid:
        raise InputError(path, f"intensities [{vmin:g}, {vmax:g}] are outside the Hounsfield range: not a CT in HU")
    sample = values.reshape(-1)[:: max(1, values.size // 200_000)]
    p1, p50 = (float(v) for v in np.percentile(sample, [1, 50]))
    if p1 > -150.0:
        raise InputError(
            path,
            f"does not look like CT in Hounsfield units (1st percentile {p1:.0f}, median {p50:.0f}, range "
            f"[{vmin:g}, {vmax:g}]): a CT of the abdomen contains fat (~-100 HU) or air (-1000 HU). "
            "Is this an MR volume or an already normalised image?",
        )


def load_ct(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    """Read a CT volume in HU (float32) and check that it is one."""
    array, affine = load_nifti(path, dtype=np.float32)
    check_ct_intensity(path, array)
    return array, affine


def load_label(path: str | os.PathLike, allowed: tuple[int, ...] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Read an integer label map; with ``allowed``, refuse any value outside that set."""
    array, affine = load_nifti(path)
    if np.issubdtype(array.dtype, np.floating):
        if not np.all(np.equal(np.mod(array, 1), 0)):
            raise InputError(path, "label map has non-integer values")
    array = array.astype(np.int16 if array.max() < 32767 else np.int32, copy=False)
    if allowed is not None:
        extra = sorted(set(np.unique(array).tolist()) - set(allowed))
        if extra:
            raise InputError(path, f"label values {extra[:10]} are outside the label set {list(allowed)}")
    return array, affine


def load_pair(
    image_path: str | os.PathLike, label_path: str | os.PathLike, allowed: tuple[int, ...] | None = None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Read a CT and its label map, checking both and that they share one grid; return ``(ct, label, affine)``."""
    ct, affine = load_ct(image_path)
    label, label_affine = load_label(label_path, allowed)
    check_pair(image_path, label_path, ct.shape, affine, label.shape, label_affine)
    return ct, label, affine
