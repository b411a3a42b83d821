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

Two kinds of volume the collection writes itself are not refused. An organ map (keys :data:`ORGAN_KEYS`) of a crop
inside the body has no background voxel, so it may be all foreground (a ``label`` of pancreas / tumor may not). A
volume written by ``tools data prepare --hu_window lo,hi`` is clipped to that HU window and scaled to ``[a, b]``, so
it has no voxel below -100 HU; its datalist entry says so (``"intensity": "windowed [lo, hi] HU -> [a, b]"``, see
:func:`intensity_of`), and such a volume is checked to stay inside ``[a, b]`` instead, then mapped back to HU by
:class:`ValidateCTd` (every bundle pipeline works in HU after this check; values outside the window come back at its
ends). An MR volume or a normalised volume without that mark is still refused.

Use in a bundle config (before and after loading; the same class checks paths or arrays)::

    {"_target_": "scripts.validation.ValidateCTd", "keys": ["image", "label"], "label_keys": ["label"],
     "allowed_labels": [0, 1, 2], "base_dir": "@dataset_dir"},
    {"_target_": "LoadImaged", "keys": ["image", "label"], "image_only": true},
    {"_target_": "scripts.validation.ValidateCTd", "keys": ["image", "label"], "label_keys": ["label"],
     "allowed_labels": [0, 1, 2]},
"""

from __future__ import annotations

import gzip
import json
import math
import os
import re
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
#: Datalist fields of organ maps (many organ labels on the image grid, ``organsTr/`` of the phantom and of
#: ``tools data prepare``): a crop inside the body has no background in them. Not difftumor's ``organ``: in its
#: datalist mode that is the pancreas label, which keeps the label rules.
ORGAN_KEYS = ("organs",)
#: Datalist field saying how an image's intensities are stored: absent or :data:`HU_MARK` for Hounsfield units,
#: else :func:`windowed_mark` (written by ``tools data prepare --hu_window``).
INTENSITY_KEY = "intensity"
HU_MARK = "HU"
_NUMBER = r"(-?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_WINDOWED_MARK = re.compile(rf"^windowed \[{_NUMBER}, {_NUMBER}\] HU -> \[{_NUMBER}, {_NUMBER}\]$")


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


# ---------------------------------------------------------------------------------------------------------------
# intensity marks: volumes written in a HU window


def windowed_mark(hu_window: Sequence[float], out_range: Sequence[float] = (0.0, 1.0)) -> str:
    """The :data:`INTENSITY_KEY` value of a volume clipped to ``hu_window`` and scaled linearly to ``out_range``,
    e.g. ``"windowed [-175, 250] HU -> [0, 1]"``."""
    lo, hi = (float(v) for v in hu_window)
    a, b = (float(v) for v in out_range)
    return f"windowed [{lo:g}, {hi:g}] HU -> [{a:g}, {b:g}]"


def parse_intensity(
    mark: Any, path: str | os.PathLike | None = None
) -> tuple[tuple[float, float], tuple[float, float]] | None:
    """``(hu_window, out_range)`` of a :func:`windowed_mark`; None for Hounsfield units (no mark or ``"HU"``).

    Anything else is refused naming ``path``: a misspelt mark must not pass for HU."""
    if mark is None or mark == HU_MARK:
        return None
    found = _WINDOWED_MARK.match(mark) if isinstance(mark, str) else None
    if found is None:
        raise InputError(
            path,
            f"unknown {INTENSITY_KEY} mark {mark!r} in its datalist entry: expected {HU_MARK!r} or "
            f"{windowed_mark((-175, 250))!r} (what `tools data prepare --hu_window` writes)",
        )
    lo, hi, a, b = (float(v) for v in found.groups())
    if not lo < hi or a == b:
        raise InputError(path, f"{INTENSITY_KEY} mark {mark!r}: the HU window must be increasing, the range not empty")
    return (lo, hi), (a, b)


_DATALIST_MARKS: dict[str, tuple[tuple[int, int], dict[str, Any]]] = {}


def _marks_of_datalist(datalist: str) -> dict[str, Any]:
    """The :data:`INTENSITY_KEY` of every image a ``dataset.json`` lists (by real path), cached while the file is
    unchanged. Entries without the key get the folder's ``prep`` record (``tools data prepare``: ``hu_window``,
    ``out_range``), so a folder prepared before the key existed is still recognised."""
    stat = os.stat(datalist)
    cached = _DATALIST_MARKS.get(datalist)
    if cached is not None and cached[0] == (stat.st_mtime_ns, stat.st_size):
        return cached[1]
    try:
        with open(datalist, encoding="utf-8") as f:
            content = json.load(f)
    except (OSError, ValueError):
        content = None  # not ours to judge here: the datalist's own reader names that file's problem
    marks: dict[str, Any] = {}
    if isinstance(content, Mapping):
        prep = content.get("prep")
        default = None
        if isinstance(prep, Mapping) and prep.get("hu_window") is not None:
            default = windowed_mark(prep["hu_window"], prep.get("out_range") or (0.0, 1.0))
        folder = os.path.dirname(datalist)
        for entries in content.values():
            if not isinstance(entries, list):
                continue
            for entry in entries:
                if isinstance(entry, str):  # an MSD test list of bare image paths
                    entry = {"image": entry}
                if isinstance(entry, Mapping) and isinstance(entry.get("image"), str):
                    image = os.path.realpath(os.path.join(folder, entry["image"]))
                    marks[image] = entry.get(INTENSITY_KEY, default)
    _DATALIST_MARKS[datalist] = ((stat.st_mtime_ns, stat.st_size), marks)
    return marks


def recorded_intensity(path: str | os.PathLike) -> Any:
    """The intensity mark the data folder records for the image ``path``: the entry naming it in the
    ``dataset.json`` of its MSD folder (``<folder>/imagesTr/<case>.nii.gz`` -> ``<folder>/dataset.json``), else None.

    This is how a pipeline that scans a folder or drops a record's other keys (seg_unet3d inference, difftumor
    inference) still knows that ``tools data prepare`` wrote the file in a HU window."""
    image = os.path.realpath(os.fspath(path))
    datalist = os.path.join(os.path.dirname(os.path.dirname(image)), "dataset.json")
    if not os.path.isfile(datalist):
        return None
    return _marks_of_datalist(datalist).get(image)


def intensity_of(path: str | os.PathLike | None, record: Mapping[Hashable, Any] | None = None) -> Any:
    """The intensity mark of an image: its record's :data:`INTENSITY_KEY` when the record has one, else
    :func:`recorded_intensity` (None: Hounsfield units)."""
    if record is not None and record.get(INTENSITY_KEY) is not None:
        return record[INTENSITY_KEY]
    if path is None or not isinstance(path, (str, os.PathLike)) or not os.path.isfile(path):
        return None
    return recorded_intensity(path)


def check_windowed_intensity(
    path: str | os.PathLike | None, array: Any, window: tuple[tuple[float, float], tuple[float, float]]
) -> None:
    """Refuse a volume marked windowed whose values leave the range ``[a, b]`` its mark promises."""
    (lo, hi), (a, b) = window
    values = np.asarray(array)
    vmin, vmax = float(values.min()), float(values.max())
    low, high = min(a, b), max(a, b)
    slack = 1e-3 * (high - low)  # float32 rounding of the scaling
    if vmin < low - slack or vmax > high + slack:
        raise InputError(
            path,
            f"intensities [{vmin:g}, {vmax:g}] are outside [{a:g}, {b:g}], the range its datalist mark "
            f"{windowed_mark((lo, hi), (a, b))!r} promises",
        )


def windowed_to_hu(array: Any, window: tuple[tuple[float, float], tuple[float, float]]) -> Any:
    """Map a windowed volume back to HU (exact inside the window; what was clipped stays at the window's ends)."""
    (lo, hi), (a, b) = window
    return (array - a) * ((hi - lo) / (b - a)) + lo


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
    ``label_keys`` (those also in ``organ_keys`` may be all foreground: an organ map of a crop inside the body).
    Errors are :class:`InputError` naming the file.

    An image marked as written in a HU window (:func:`intensity_of`: the item's ``intensity_key``, else the entry of
    its folder's ``dataset.json``) must stay inside the range its mark names instead of looking like HU, and with
    ``restore_hu`` is mapped back to HU after loading (the transforms after this one expect HU). Everything else
    passes through unchanged.
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
        organ_keys: Sequence[Hashable] = ORGAN_KEYS,
        intensity_key: Hashable | None = INTENSITY_KEY,
        restore_hu: bool = True,
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
        self.organ_keys = tuple(organ_keys or ())
        self.intensity_key = intensity_key
        self.restore_hu = restore_hu

    def _window(self, key: Hashable, path: Any, data: Mapping[Hashable, Any]):
        """The HU window an image of ``ct_keys`` was written in (None: HU): the item's mark, else its folder's."""
        if key not in self.ct_keys:
            return None
        mark = data.get(self.intensity_key) if self.intensity_key is not None else None
        if mark is None:
            mark = intensity_of(path)
        return parse_intensity(mark, path if path is not None else f"<{key}>")

    def __call__(self, data: Mapping[Hashable, Any]) -> Mapping[Hashable, Any]:
        headers: dict[Hashable, tuple] = {}
        restored: dict[Hashable, Any] = {}
        for key in self.key_iterator(data):
            value = data[key]
            if isinstance(value, (str, os.PathLike)):
                if self.base_dir is not None:
                    check_inside(os.path.abspath(value), self.base_dir)  # a loaded path is relative to the cwd
                headers[key] = check_header(value, self.max_bytes, self.max_spacing_mm)
                self._window(key, value, data)  # a malformed mark is refused before loading
            else:
                window = self._check_voxels(key, value, data)
                if window is not None and self.restore_hu:
                    restored[key] = windowed_to_hu(value, window)
        images = [k for k in headers if k not in self.label_keys]
        for key in self.label_keys:
            if images and key in headers:
                check_same_grid(data[images[0]], data[key], *headers[images[0]], *headers[key])
        return {**data, **restored} if restored else data

    def _check_voxels(self, key: Hashable, value: Any, data: Mapping[Hashable, Any]):
        path = _source_of(value, f"<{key}>")
        array = _as_numpy(value)
        if key in self.label_keys:
            forbid_all = self.forbid_all_foreground and key not in self.organ_keys
            check_label(path, array, self.allowed_labels, self.require_foreground, forbid_all)
            return None
        check_finite(path, array)
        window = self._window(key, _source_of(value), data)
        if self.check_ct and key in self.ct_keys:
            if window is None:
                check_ct_intensity(path, array)
            else:
                check_windowed_intensity(path, array, window)
        return window
