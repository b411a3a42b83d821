"""Input checks that refuse a bad scan, label or datalist with one clear error naming the file and the problem.

Why this is not plain MONAI: ``LoadImaged`` reads whatever it is given. A truncated ``.nii.gz`` fails deep inside
zlib with no file name, a 4D or 2D image or a label on another grid fails later with a shape error in a network, a
header claiming a huge volume is allocated before anything is checked, an MR volume or a NaN voxel goes through
and gives a model that silently learned nothing, and a datalist entry such as ``../../etc/x`` is read from outside
the data folder. These checks run first: :class:`ValidateCTd` placed *before* ``LoadImaged`` reads only the NIfTI
headers (so a truncated file, a wrong dimensionality, absurd spacing, a volume beyond the memory guard, a label on
another grid or a path outside the data folder fails before any voxel is read), and the same transform placed
right *after* ``LoadImaged`` checks the voxels (NaN / inf, CT intensities in Hounsfield units, label values, empty
or all-foreground labels). Every error is an :class:`InputError` (a ``ValueError``) whose message starts with the
offending path. Bundles travel one by one through the model zoo, so every bundle carries an identical copy of this
file in ``scripts/`` (the source is ``tools/bundle_scripts`` of the collection's repository; a test keeps the
copies equal, and the collection's ``tools`` readers use the same functions).

Use in a bundle config (before and after loading; the same class checks paths or arrays)::

    {"_target_": "scripts.validation.ValidateCTd", "keys": ["image", "label"], "label_keys": ["label"],
     "allowed_labels": [0, 1, 2], "base_dir": "@dataset_dir"},
    {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": true},
    {"_target_": "scripts.validation.ValidateCTd", "keys": ["image", "label"], "label_keys": ["label"],
     "allowed_labels": [0, 1, 2]},
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib
from pathlib import Path
from typing import Any, Hashable, Iterable, Mapping, Sequence

import nibabel as nib
import numpy as np
from monai.config import KeysCollection
from monai.transforms import MapTransform

#: Voxel sizes (mm) outside ``(0, MAX_SPACING_MM]`` mean a broken header, not a scan.
MAX_SPACING_MM = 20.0
#: Default memory guard: a volume whose voxels need more than this many bytes once loaded (as float32 at least) is
#: refused before it is read. Override with the ``max_bytes`` argument or the ``PANCREAS_CT_MAX_VOLUME_BYTES``
#: environment variable. 8 GiB holds a 1024 x 1024 x 2000 float32 CT; a typical abdominal CT needs 0.1-0.6 GB.
DEFAULT_MAX_BYTES = 8 * 1024**3
#: What a CT in Hounsfield units may contain (scanners pad outside the reconstruction circle with -3024 HU).
HU_VALID_RANGE = (-3100.0, 32767.0)
#: A CT of the abdomen (or a crop of one around an organ) always has some voxel below this (fat at about -100 HU,
#: air at -1000 HU); MR volumes and normalised images ([0, 1], [0, 1000]) have none.
CT_MUST_REACH_BELOW = -100.0
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class InputError(ValueError):
    """An input file (image, label, datalist) that cannot be used; the message starts with the offending path."""

    def __init__(self, path: str | os.PathLike | None, problem: str):
        self.path = None if path is None else os.fspath(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}" if self.path else problem)

    def __reduce__(self):  # picklable with both arguments (DataLoader workers send errors between processes)
        return (type(self), (self.path, self.problem))


def max_bytes_default() -> int:
    """The memory guard in bytes: ``PANCREAS_CT_MAX_VOLUME_BYTES`` if set, else :data:`DEFAULT_MAX_BYTES`."""
    value = os.environ.get("PANCREAS_CT_MAX_VOLUME_BYTES")
    return int(float(value)) if value else DEFAULT_MAX_BYTES


# ---------------------------------------------------------------------------------------------------------------
# paths and datalists


def data_root(dataset_dir: str | os.PathLike | None) -> str | None:
    """``dataset_dir`` when it is an existing data folder (paths read from it must stay inside it), else None.

    Configs pass this as ``base_dir``; a folder that does not exist (the default of a bundle driven by MONAI Label
    with plain datalists) switches confinement off.
    """
    if dataset_dir is None or not os.path.isdir(dataset_dir):
        return None
    return os.fspath(dataset_dir)


def _inside(path: str, base: str) -> bool:
    return path == base or os.path.commonpath([path, base]) == base


def check_inside(path: str | os.PathLike, base_dir: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    """Refuse a path that leaves ``base_dir``: ``..`` parts, an absolute path elsewhere, or a symlink pointing out."""
    where = f" (listed in {source})" if source else ""
    base = os.path.normpath(os.path.abspath(base_dir))
    lexical = os.path.normpath(os.path.join(base, os.fspath(path)))
    if not _inside(lexical, base):
        raise InputError(path, f"points outside the data folder {base_dir}{where}: it resolves to {lexical}")
    real = os.path.realpath(lexical)
    if not _inside(real, os.path.realpath(base)):
        raise InputError(path, f"points outside the data folder {base_dir}{where}: it is a symlink to {real}")


def check_exists(path: str | os.PathLike, source: str | os.PathLike | None = None) -> None:
    if not os.path.exists(path):
        where = f" (listed in {source})" if source else ""
        raise InputError(path, f"file not found{where}")
    if os.path.isdir(path):
        raise InputError(path, "is a folder, expected a NIfTI file")


def validate_datalist(
    records: Sequence[Mapping[str, Any]],
    base_dir: str | os.PathLike | None = None,
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = ("label",),
    source: str | os.PathLike | None = None,
    check_headers: bool = True,
    max_bytes: int | None = None,
) -> Sequence[Mapping[str, Any]]:
    """Check every record's files before anything is loaded; return ``records`` unchanged (usable in a config).

    Each path must exist and, with ``base_dir``, stay inside it; with ``check_headers`` each NIfTI header is read
    (:func:`check_header`) and each label must be on its image's grid (:func:`check_same_grid`).
    """
    for index, record in enumerate(records):
        if not isinstance(record, Mapping):
            raise InputError(source, f"entry {index} should be an object with file paths, got {str(record)[:80]}")
        headers = {}
        for key in (*image_keys, *label_keys):
            value = record.get(key)
            if value is None:
                continue
            if not isinstance(value, (str, os.PathLike)):
                raise InputError(source, f"entry {index}: '{key}' should be one file path, got {str(value)[:80]}")
            if base_dir is not None:
                check_inside(value, base_dir, source)
            check_exists(value, source)
            if check_headers:
                headers[key] = check_header(value, max_bytes=max_bytes)
        image_key = next((k for k in image_keys if k in headers), None)
        for key in label_keys:
            if image_key is not None and key in headers:
                check_same_grid(record[image_key], record[key], *headers[image_key], *headers[key])
    return records


# ---------------------------------------------------------------------------------------------------------------
# headers (nothing but the header is read)


def _gzip_size_ok(path: str | os.PathLike, expected: int) -> bool:
    """Whether a gzip file's trailer (uncompressed size mod 2**32) matches ``expected``: a truncated file's last
    four bytes are compressed data, not the size, so this detects truncation without decompressing anything."""
    with open(path, "rb") as f:
        if f.read(2) != b"\x1f\x8b":
            return True  # not gzip: nibabel's header read decides
        f.seek(0, os.SEEK_END)
        if f.tell() < 18:
            return False
        f.seek(-4, os.SEEK_END)
        (size,) = struct.unpack("<I", f.read(4))
    return size == expected % (1 << 32)


def _gzip_stream_ok(path: str | os.PathLike, expected: int) -> bool:
    """The slow confirmation when the trailer disagrees (a valid multi-member gzip has the last member's size
    there): decompress in 1 MiB chunks, keeping nothing, and check the stream is complete and long enough."""
    total = 0
    try:
        with gzip.open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                total += len(block)
    except (EOFError, OSError, zlib.error):
        return False
    return total >= expected


def spacing_of(affine: np.ndarray) -> np.ndarray:
    """Voxel sizes in mm along the array axes."""
    return np.sqrt((np.asarray(affine, dtype=np.float64)[:3, :3] ** 2).sum(axis=0))


def check_header(
    path: str | os.PathLike, max_bytes: int | None = None, max_spacing_mm: float = MAX_SPACING_MM
) -> tuple[tuple[int, ...], np.ndarray]:
    """Read only the header of a NIfTI file and refuse what cannot be a usable 3D volume; return (shape, affine).

    Refused: a missing file, a file that is not NIfTI or is truncated (header too short, gzip trailer or file size
    not matching the header's data size), 2D or 4D data (a trailing axis of length 1 is accepted), non-finite or
    singular affines, voxel sizes that are not finite, <= 0 or > ``max_spacing_mm``, and a volume that would need
    more than ``max_bytes`` (float32 at least) once loaded.
    """
    check_exists(path)
    name = Path(path).name
    if not name.endswith(NIFTI_SUFFIXES):
        raise InputError(path, "not a NIfTI file (expected .nii or .nii.gz)")
    try:
        image = nib.load(os.fspath(path))  # reads the header only; the voxels stay on disk
        header = image.header
        shape = tuple(int(n) for n in header.get_data_shape())
        dtype = header.get_data_dtype()
        offset = int(getattr(image.dataobj, "offset", 0))
    except Exception as err:  # nibabel raises many types (ImageFileError, EOFError, zlib.error, OSError...)
        raise InputError(path, f"not a readable NIfTI image: truncated or corrupt header ({type(err).__name__}: {err})")
    dims = tuple(n for n in shape)
    if len(dims) == 4 and dims[3] == 1:
        dims = dims[:3]
    if len(dims) != 3:
        raise InputError(path, f"expected a 3D volume, got {len(shape)}D data of shape {shape}")
    if min(dims) < 1:
        raise InputError(path, f"empty volume of shape {shape}")
    itemsize = max(int(dtype.itemsize), 4)
    needed = int(np.prod(dims, dtype=np.float64)) * itemsize
    limit = max_bytes_default() if max_bytes is None else int(max_bytes)
    if needed > limit:
        raise InputError(
            path,
            f"volume of shape {shape} would need {needed / 1024**3:.2f} GiB once loaded, more than the memory guard "
            f"of {limit / 1024**3:.2f} GiB (raise max_bytes or PANCREAS_CT_MAX_VOLUME_BYTES if this is intended)",
        )
    data_bytes = int(np.prod(shape, dtype=np.int64)) * int(dtype.itemsize)
    if name.endswith(".nii.gz"):
        if not _gzip_size_ok(path, offset + data_bytes) and not _gzip_stream_ok(path, offset + data_bytes):
            raise InputError(path, "truncated or corrupt .nii.gz: its size does not match the header's volume")
    elif os.path.getsize(path) < offset + data_bytes:
        raise InputError(
            path, f"truncated .nii file: {os.path.getsize(path)} bytes, the header needs {offset + data_bytes}"
        )
    affine = np.asarray(image.affine, dtype=np.float64)
    check_spacing(path, affine, header.get_zooms()[:3], max_spacing_mm)
    return dims, affine


def check_spacing(
    path: str | os.PathLike, affine: np.ndarray, zooms: Iterable[float] | None = None, max_mm: float = MAX_SPACING_MM
) -> None:
    """Refuse non-finite or singular affines and voxel sizes that are not finite, <= 0 or > ``max_mm``."""
    values = [float(z) for z in zooms] if zooms is not None else []
    if values and (not all(math.isfinite(z) for z in values) or min(values) <= 0 or max(values) > max_mm):
        raise InputError(path, f"absurd voxel spacing {values} mm in the header (expected > 0 and <= {max_mm} mm)")
    affine = np.asarray(affine, dtype=np.float64)
    if not np.isfinite(affine).all() or abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise InputError(path, "the affine (voxel-to-world matrix) is singular or not finite")
    spacing = spacing_of(affine)
    if (spacing <= 0).any() or (spacing > max_mm).any():
        raise InputError(path, f"absurd voxel spacing {np.round(spacing, 4).tolist()} mm (expected <= {max_mm} mm)")


def check_same_grid(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike,
    image_shape: Sequence[int],
    image_affine: np.ndarray,
    label_shape: Sequence[int],
    label_affine: np.ndarray,
    atol_mm: float = 1e-3,
) -> None:
    """Refuse a label whose shape or affine (within ``atol_mm``) differs from its image's; both files are named."""
    if tuple(image_shape) != tuple(label_shape):
        raise InputError(
            label_path,
            f"label grid mismatch: shape {tuple(label_shape)} differs from image {image_path} shape "
            f"{tuple(image_shape)}",
        )
    worst = float(np.abs(np.asarray(image_affine, dtype=float) - np.asarray(label_affine, dtype=float)).max())
    if worst > atol_mm:
        raise InputError(
            label_path, f"label grid mismatch: affine differs from image {image_path} by up to {worst:.4g} mm"
        )


# ---------------------------------------------------------------------------------------------------------------
# voxels (after loading)


def check_finite(path: str | os.PathLike | None, array: Any) -> None:
    values = np.asarray(array)
    if np.issubdtype(values.dtype, np.floating) and not np.isfinite(values).all():
        bad = int((~np.isfinite(values)).sum())
        raise InputError(path, f"{bad} voxels are NaN or infinite")


def check_ct_intensity(
    path: str | os.PathLike | None, array: Any, must_reach_below: float = CT_MUST_REACH_BELOW
) -> None:
    """Refuse a volume offered as CT that is not in Hounsfield units (an MR volume, a normalised image)."""
    values = np.asarray(array)
    vmin, vmax = float(values.min()), float(values.max())
    lo, hi = HU_VALID_RANGE
    if vmin < lo or vmax > hi:
        raise InputError(path, f"intensities [{vmin:g}, {vmax:g}] are outside the Hounsfield range: not a CT in HU")
    if vmin >= must_reach_below:
        raise InputError(
            path,
            f"does not look like CT in Hounsfield units: no voxel below {must_reach_below:g} (range [{vmin:g}, "
            f"{vmax:g}]), but CT of the abdomen contains fat (~-100 HU) or air (-1000 HU). Is this an MR volume or "
            "an already normalised image?",
        )


def check_label(
    path: str | os.PathLike | None,
    array: Any,
    allowed: Sequence[int] | None = None,
    require_foreground: bool = True,
    forbid_all_foreground: bool = True,
) -> None:
    """Refuse a label map with non-integer values, values outside ``allowed``, no foreground, or only foreground."""
    values = np.asarray(array)
    check_finite(path, values)
    if np.issubdtype(values.dtype, np.floating) and not np.equal(np.mod(values, 1), 0).all():
        raise InputError(path, "label map has non-integer values (an image given as a label?)")
    present = np.unique(values)
    if allowed is not None:
        extra = sorted(set(present.astype(np.int64).tolist()) - {int(v) for v in allowed})
        if extra:
            raise InputError(path, f"label values {extra[:10]} are outside the label set {list(allowed)}")
    if require_foreground and not (values != 0).any():
        raise InputError(path, "empty label: no foreground voxel (all 0)")
    if forbid_all_foreground and (values != 0).all():
        raise InputError(path, "all-foreground label: no background voxel (a broken mask)")


def _source_of(value: Any, fallback: Any = None) -> Any:
    meta = getattr(value, "meta", None)
    source = (meta or {}).get("filename_or_obj") if isinstance(meta, Mapping) else None
    if isinstance(source, (list, tuple)):
        source = source[0] if source else None
    return source or fallback


def _as_numpy(value: Any) -> np.ndarray:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class ValidateCTd(MapTransform):
    """Check the image and label entries of a data dictionary; placed before or after ``LoadImaged``.

    Before loading (the entries are paths): existence, ``base_dir`` confinement (only when ``base_dir`` is an
    existing folder, so a bundle's placeholder ``dataset_dir`` with plain MONAI Label datalists is no error), NIfTI
    headers (:func:`check_header`: truncation, dimensionality, spacing, memory guard) and, for each of
    ``label_keys``, the same grid as the first image key. After loading (arrays / MetaTensors): finite voxels,
    Hounsfield units for ``ct_keys`` (default: the keys that are not labels) and :func:`check_label` for
    ``label_keys``. Errors are :class:`InputError` naming the file. Items pass through unchanged.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_keys: Sequence[Hashable] = ("label",),
        ct_keys: Sequence[Hashable] | None = None,
        allowed_labels: Sequence[int] | None = None,
        base_dir: str | os.PathLike | None = None,
        max_bytes: int | None = None,
        max_spacing_mm: float = MAX_SPACING_MM,
        require_foreground: bool = True,
        forbid_all_foreground: bool = True,
        check_ct: bool = True,
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_keys = tuple(label_keys or ())
        self.ct_keys = tuple(k for k in self.keys if k not in self.label_keys) if ct_keys is None else tuple(ct_keys)
        self.allowed_labels = None if allowed_labels is None else [int(v) for v in allowed_labels]
        self.base_dir = data_root(base_dir)
        self.max_bytes = max_bytes
        self.max_spacing_mm = max_spacing_mm
        self.require_foreground = require_foreground
        self.forbid_all_foreground = forbid_all_foreground
        self.check_ct = check_ct

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        headers: dict[Hashable, tuple] = {}
        for key in self.key_iterator(data):
            value = data[key]
            if isinstance(value, (str, os.PathLike)):
                if self.base_dir is not None:
                    check_inside(value, self.base_dir)
                headers[key] = check_header(value, self.max_bytes, self.max_spacing_mm)
            else:
                self._check_voxels(key, value)
        images = [k for k in headers if k not in self.label_keys]
        for key in self.label_keys:
            if images and key in headers:
                check_same_grid(data[images[0]], data[key], *headers[images[0]], *headers[key])
        return data

    def _check_voxels(self, key: Hashable, value: Any) -> None:
        path = _source_of(value, f"<{key}>")
        array = _as_numpy(value)
        if key in self.label_keys:
            check_label(path, array, self.allowed_labels, self.require_foreground, self.forbid_all_foreground)
            return
        check_finite(path, array)
        if self.check_ct and key in self.ct_keys:
            check_ct_intensity(path, array)
