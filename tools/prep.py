"""Preprocessing of abdominal CT for the bundles: orientation, spacing, HU window, body mask, crops, sub-volumes.

Everything here is a pure function on numpy arrays plus a 4x4 voxel-to-world affine, with file-level wrappers that
read through :mod:`tools.io` (validated) and write atomically, and MONAI dictionary transforms so bundle configs can
run the same code.

Affine conventions (the same as NIfTI / nibabel / MONAI ``MetaTensor.affine``):

* an array is indexed ``array[i, j, k]`` and ``world_mm = affine @ [i, j, k, 1]`` gives the centre of voxel
  ``(i, j, k)`` in scanner (RAS+) millimetres; voxel sizes are the column norms of ``affine[:3, :3]``;
* a crop that starts at index ``s`` gets ``affine @ T(s)`` (``T`` = translation by ``s`` voxels), so every kept
  voxel keeps its world position;
* a resize of an axis from ``n`` to ``m`` voxels keeps the field of view edge to edge (``align_corners=False``, as
  torch / MONAI ``Resize``): the spacing is multiplied by ``n / m`` and new voxel ``q`` sits at old continuous index
  ``(q + 0.5) * n / m - 0.5``. Images use trilinear interpolation (bilinear in-plane, with Gaussian anti-aliasing
  when shrinking), label maps ``nearest-exact`` (torch's plain ``nearest`` is off by half an input voxel);
* the axial axis is the array axis whose direction is closest to world z (axis 2 after RAS orientation).
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any, Hashable, Mapping, NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import (
    Compose,
    MapTransform,
    Orientationd,
    Resize,
    ScaleIntensityRange,
    ScaleIntensityRanged,
    Spacingd,
)
from scipy import ndimage

from tools.bundle_scripts.validation import (
    INTENSITY_KEY,
    MAX_SPACING_MM,
    check_label,
    intensity_of,
    parse_intensity,
    windowed_mark,
)
from tools.errors import InputError
from tools.io import check_pair, file_sha256, load_ct, load_label, save_nifti, voxel_spacing, write_json
from tools.splits import load_records

logger = logging.getLogger(__name__)

#: HU window of seed 001 / DiffTumor: clip to [-175, 250] HU, then scale.
DEFAULT_HU_WINDOW = (-175.0, 250.0)
#: Voxels above this value (HU) are body candidates: fat is about -100 HU, lung about -850 HU, air -1000 HU.
BODY_THRESHOLD_HU = -500.0
#: Crop modes of seed 002 (section 4.3).
CROP_MODES = ("full", "semi", "pancreas")
#: What :func:`prepare_dataset` can make: the three crops, seed 000's 4-slice sub-volumes, or only standardised scans.
PREPARE_MODES = CROP_MODES + ("subvolumes", "none")
#: MONAI's RAS axis labels, given explicitly (MONAI 1.5 warns about the implicit default, 1.6 changed it).
RAS_LABELS = (("L", "R"), ("P", "A"), ("I", "S"))
#: Bumped when the output of :func:`prepare_dataset` changes for the same parameters (invalidates reused outputs).
PREP_VERSION = 1

Box = tuple[tuple[int, int], tuple[int, int], tuple[int, int]]


class Volume(NamedTuple):
    """A standardised scan: image, label map (or None), voxel-to-world affine, organ map (or None)."""

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    organs: np.ndarray | None = None


class Crop(NamedTuple):
    """A crop: arrays on the crop grid, its affine, and ``box`` = ``((start, stop),) * 3`` in the input voxel grid."""

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    organs: np.ndarray | None
    box: Box


class SubVolume(NamedTuple):
    """One seed-000 sub-volume.

    ``image`` and ``label`` are ``(n_slices, rows, cols)`` (seed 000's "slices x rows x columns"), with
    ``image[s, r, c] == nifti[r, c, s]`` where ``nifti`` is the ``(rows, cols, n_slices)`` volume that ``affine``
    describes (:func:`stack_to_nifti` converts). For a RAS input, rows run along R (x), columns along A (y), slices
    along S (z). ``first_slice`` is the index of the stack's first slice along the input's axial axis.
    """

    image: np.ndarray
    label: np.ndarray | None
    affine: np.ndarray
    first_slice: int


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers
# ----------------------------------------------------------------------------------------------------------------


def voxel_to_world(affine: np.ndarray, ijk: np.ndarray | Sequence[float]) -> np.ndarray:
    """World coordinates (mm) of voxel indices ``ijk`` (shape ``(3,)`` or ``(N, 3)``, may be fractional)."""
    ijk = np.asarray(ijk, dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    return ijk @ affine[:3, :3].T + affine[:3, 3]


def world_to_voxel(affine: np.ndarray, xyz: np.ndarray | Sequence[float]) -> np.ndarray:
    """Continuous voxel indices of world points ``xyz`` (mm); the inverse of :func:`voxel_to_world`."""
    xyz = np.asarray(xyz, dtype=np.float64)
    inv = np.linalg.inv(np.asarray(affine, dtype=np.float64))
    return xyz @ inv[:3, :3].T + inv[:3, 3]


def axial_axis(affine: np.ndarray) -> int:
    """The array axis whose direction is closest to world z (superior-inferior): the slice axis of an axial CT."""
    affine = np.asarray(affine, dtype=np.float64)
    directions = affine[:3, :3] / voxel_spacing(affine)
    return int(np.argmax(np.abs(directions[2])))


def crop_affine(affine: np.ndarray, start: Sequence[int]) -> np.ndarray:
    """Affine of ``array[start[0]:, start[1]:, start[2]:]``: the same world position for every kept voxel."""
    out = np.array(affine, dtype=np.float64, copy=True)
    out[:3, 3] = voxel_to_world(affine, start)
    return out


def resize_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """Affine after resizing ``in_shape`` to ``out_shape`` over the same field of view (``align_corners=False``).

    New voxel ``q`` covers old continuous index ``(q + 0.5) * n / m - 0.5``: spacing scales by ``n / m`` and the
    outer voxel edges stay where they were. This is what MONAI ``Resize`` writes into ``MetaTensor.affine``.
    """
    scale = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    index_map = np.eye(4)
    index_map[:3, :3] = np.diag(scale)
    index_map[:3, 3] = 0.5 * scale - 0.5
    return np.asarray(affine, dtype=np.float64) @ index_map


def bounding_box(mask: np.ndarray) -> Box | None:
    """``((start, stop),) * ndim`` of the non-zero voxels of ``mask`` (stop exclusive), or None when empty."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any():
        return None
    box = []
    for axis in range(mask.ndim):
        others = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=others))
        box.append((int(present[0]), int(present[-1]) + 1))
    return tuple(box)  # type: ignore[return-value]


def _slices(box: Box) -> tuple[slice, ...]:
    return tuple(slice(start, stop) for start, stop in box)


def _box_with_margin(box: Box, shape: Sequence[int], spacing: np.ndarray, margin_mm: float) -> Box:
    """Grow ``box`` by ``margin_mm`` on every side (whole voxels, rounded up) and clip it to the volume."""
    out = []
    for (start, stop), size, sp in zip(box, shape, spacing):
        pad = int(np.ceil(max(margin_mm, 0.0) / sp - 1e-6))
        out.append((max(0, start - pad), min(int(size), stop + pad)))
    return tuple(out)  # type: ignore[return-value]


def stack_to_nifti(stack: np.ndarray) -> np.ndarray:
    """``(slices, rows, cols)`` sub-volume array -> ``(rows, cols, slices)`` array that its affine describes."""
    return np.moveaxis(np.asarray(stack), 0, -1)


def nifti_to_stack(volume: np.ndarray) -> np.ndarray:
    """``(rows, cols, slices)`` NIfTI array -> seed 000's ``(slices, rows, cols)`` layout."""
    return np.moveaxis(np.asarray(volume), -1, 0)


# ----------------------------------------------------------------------------------------------------------------
# resampling and intensity (MONAI transforms)
# ----------------------------------------------------------------------------------------------------------------


def standardize_transforms(
    image_keys: Sequence[str] = ("image",),
    label_keys: Sequence[str] = ("label",),
    spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] | None = DEFAULT_HU_WINDOW,
    out_range: Sequence[float] = (0.0, 1.0),
    allow_missing_keys: bool = True,
) -> list[MapTransform]:
    """The MONAI dictionary transforms behind :func:`standardize`, for bundle configs (after ``LoadImaged`` and
    ``EnsureChannelFirstd``): ``Orientationd`` RAS, ``Spacingd`` (images bilinear, labels nearest), then
    ``ScaleIntensityRanged`` clipping ``hu_window`` to ``out_range`` on the images."""
    image_keys, label_keys = list(image_keys), list(label_keys)
    keys = image_keys + label_keys
    transforms: list[MapTransform] = [
        Orientationd(keys, axcodes="RAS", labels=RAS_LABELS, allow_missing_keys=allow_missing_keys)
    ]
    if spacing is not None:
        modes = ["bilinear"] * len(image_keys) + ["nearest"] * len(label_keys)
        transforms.append(
            Spacingd(
                keys,
                pixdim=tuple(float(s) for s in spacing),
                mode=modes,
                padding_mode="border",
                dtype=np.float32,
                allow_missing_keys=allow_missing_keys,
            )
        )
    if hu_window is not None:
        transforms.append(
            ScaleIntensityRanged(
                image_keys,
                a_min=float(hu_window[0]),
                a_max=float(hu_window[1]),
                b_min=float(out_range[0]),
                b_max=float(out_range[1]),
                clip=True,
                allow_missing_keys=allow_missing_keys,
            )
        )
    return transforms


def window_hu(
    image: np.ndarray, hu_window: Sequence[float] = DEFAULT_HU_WINDOW, out_range: Sequence[float] = (0.0, 1.0)
) -> np.ndarray:
    """Clip HU to ``hu_window`` and map it linearly to ``out_range`` (float32), with MONAI's ScaleIntensityRange."""
    scale = ScaleIntensityRange(
        a_min=float(hu_window[0]), a_max=float(hu_window[1]), b_min=float(out_range[0]), b_max=float(out_range[1]),
        clip=True,
    )  # fmt: skip
    return np.asarray(scale(np.asarray(image, dtype=np.float32)), dtype=np.float32)


def _meta(array: np.ndarray, affine: np.ndarray) -> MetaTensor:
    tensor = torch.as_tensor(np.ascontiguousarray(array))[None]
    return MetaTensor(tensor, affine=torch.as_tensor(np.asarray(affine, dtype=np.float64)))


def _label_array(tensor: torch.Tensor, like: np.ndarray) -> np.ndarray:
    """A resampled label channel back to an integer array of the original label's dtype."""
    values = np.rint(np.asarray(tensor.detach().cpu().numpy()))
    return values.astype(like.dtype if np.issubdtype(like.dtype, np.integer) else np.int16)


def standardize(
    image: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] | None = DEFAULT_HU_WINDOW,
    out_range: Sequence[float] = (0.0, 1.0),
    organs: np.ndarray | None = None,
) -> Volume:
    """Orientation RAS, resampling to ``spacing`` mm (None: keep the grid), then the HU window (None: keep HU).

    Image bilinear, label maps (``label``, ``organs``) nearest neighbour, all through MONAI's ``Orientationd``,
    ``Spacingd`` and ``ScaleIntensityRanged`` (:func:`standardize_transforms`), so a bundle config that lists the
    same transforms gets the same voxels. Returns a :class:`Volume` whose affine is the new grid's.
    """
    image = np.asarray(image)
    if image.ndim != 3:
        raise InputError(None, f"standardize expects a 3D image, got shape {image.shape}")
    data: dict[str, Any] = {"image": _meta(image.astype(np.float32, copy=False), affine)}
    label_keys = []
    for key, extra in (("label", label), ("organs", organs)):
        if extra is None:
            continue
        if np.shape(extra) != image.shape:
            raise InputError(None, f"{key} shape {np.shape(extra)} differs from image shape {image.shape}")
        data[key] = _meta(np.asarray(extra), affine)
        label_keys.append(key)
    out = Compose(standardize_transforms(["image"], label_keys, spacing, hu_window, out_range))(data)
    new_affine = np.asarray(out["image"].affine, dtype=np.float64)
    return Volume(
        image=np.asarray(out["image"][0].numpy(), dtype=np.float32),
        label=None if label is None else _label_array(out["label"][0], np.asarray(label)),
        affine=new_affine,
        organs=None if organs is None else _label_array(out["organs"][0], np.asarray(organs)),
    )


def _resize_channel_first(tensor: torch.Tensor, out_shape: Sequence[int], is_label: bool, anti_aliasing: bool):
    """MONAI ``Resize`` of a channel-first tensor: labels ``nearest-exact``, images trilinear (+ anti-aliasing)."""
    if is_label:
        return Resize(tuple(int(s) for s in out_shape), mode="nearest-exact")(tensor.float())
    return Resize(tuple(int(s) for s in out_shape), mode="trilinear", anti_aliasing=anti_aliasing)(tensor.float())


def resize_volume(
    array: np.ndarray, out_shape: Sequence[int], is_label: bool = False, anti_aliasing: bool = True
) -> np.ndarray:
    """Resize a 3D array to ``out_shape`` over the same field of view (pair with :func:`resize_affine`).

    Images are interpolated trilinearly (seed 002's "bilinear"), smoothed first when shrinking so that fine
    structures do not alias; label maps use ``nearest-exact`` and keep their dtype.
    """
    array = np.asarray(array)
    if tuple(array.shape) == tuple(int(s) for s in out_shape):
        return array.copy()
    tensor = torch.as_tensor(np.ascontiguousarray(array, dtype=np.float32))[None]
    out = _resize_channel_first(tensor, out_shape, is_label, anti_aliasing)[0]
    out = out.as_tensor() if isinstance(out, MetaTensor) else out
    if is_label:
        return _label_array(out, array)
    return np.asarray(out.numpy(), dtype=np.float32)


# ----------------------------------------------------------------------------------------------------------------
# body mask
# ----------------------------------------------------------------------------------------------------------------


def fill_holes_axial(mask: np.ndarray, affine: np.ndarray) -> np.ndarray:
    """Fill holes in every axial slice (lungs, bowel gas, the inside of a ring of fat) of a boolean mask."""
    mask = np.asarray(mask, dtype=bool)
    axis = axial_axis(affine)
    out = np.moveaxis(mask.copy(), axis, 0)
    for z in range(out.shape[0]):
        if out[z].any():
            out[z] = ndimage.binary_fill_holes(out[z])
    return np.moveaxis(out, 0, axis)


def _largest_component(mask: np.ndarray) -> np.ndarray:
    labels, n = ndimage.label(mask)
    if n <= 1:
        return labels > 0
    sizes = np.bincount(labels.ravel())
    sizes[0] = 0
    return labels == int(np.argmax(sizes))


def body_mask(
    ct: np.ndarray, affine: np.ndarray, threshold_hu: float = BODY_THRESHOLD_HU, opening_mm: float = 3.0
) -> np.ndarray:
    """Boolean mask of the patient's body in a CT in HU, without the CT table, clothes or air.

    Threshold at ``threshold_hu`` (body tissue is above, air and lung below), open with a ball of ``opening_mm``
    (breaks thin bridges such as a blanket or a table touching the skin), keep the largest connected component,
    grow it back by half that radius inside the thresholded voxels (restores edges the opening rounded off), and fill
    holes slice by axial slice (lungs, bowel gas). Distances are in mm, so anisotropic voxels are handled.
    """
    ct = np.asarray(ct)
    spacing = voxel_spacing(affine)
    candidate = ct > threshold_hu
    if not candidate.any():
        raise InputError(None, f"no voxel above {threshold_hu} HU: no body in this CT (is it in Hounsfield units?)")
    core = candidate
    if opening_mm > 0:
        inside_depth = ndimage.distance_transform_edt(candidate, sampling=spacing)
        core = inside_depth > opening_mm
        if core.any():
            outside_dist = ndimage.distance_transform_edt(~core, sampling=spacing)
            core = outside_dist <= opening_mm
        else:
            core = candidate
    body = _largest_component(core)
    if opening_mm > 0:  # half the radius restores the rims of edges (an opening cuts at most 0.41 r off a right
        # angle) without reaching a table lying a full radius away
        grown = ndimage.distance_transform_edt(~body, sampling=spacing) <= opening_mm / 2.0
        body = _largest_component((grown & candidate) | body)
    return fill_holes_axial(body, affine)


# ----------------------------------------------------------------------------------------------------------------
# crops (seed 002 section 4.3)
# ----------------------------------------------------------------------------------------------------------------


def _windows_inside(mask2d: np.ndarray, rows: int, cols: int) -> np.ndarray:
    """Boolean map of the top-left corners ``(i, j)`` where ``mask2d[i:i+rows, j:j+cols]`` is all True."""
    n0, n1 = mask2d.shape
    if rows > n0 or cols > n1:
        return np.zeros((0, 0), dtype=bool)
    table = np.zeros((n0 + 1, n1 + 1), dtype=np.int64)
    table[1:, 1:] = mask2d.astype(np.int64).cumsum(0).cumsum(1)
    sums = table[rows:, cols:] - table[:-rows, cols:] - table[rows:, :-cols] + table[:-rows, :-cols]
    return sums == rows * cols


def largest_square(
    mask2d: np.ndarray, spacing2d: Sequence[float], prefer: Sequence[float] | None = None
) -> tuple[tuple[int, int], tuple[int, int], float] | None:
    """The largest axis-aligned square, in mm, made of True pixels of a 2D mask.

    A square of side ``s`` mm is ``round(s / spacing)`` pixels along each axis, so non-square pixels give a
    rectangle of pixels that is square in mm. Among equal squares the one whose centre is nearest to ``prefer``
    (pixel coordinates; default: the mask's centroid) wins. Returns ``((r0, r1), (c0, c1), side_mm)`` with stops
    exclusive and ``side_mm`` the shorter physical side, or None for an empty mask. Search: bisection on the side,
    each step an O(pixels) summed-area-table test.
    """
    mask2d = np.asarray(mask2d, dtype=bool)
    if not mask2d.any():
        return None
    sp = np.asarray(spacing2d, dtype=np.float64)
    fine = int(np.argmin(sp))  # parametrise by the pixel count along the finer axis
    coarse = 1 - fine

    def counts(k: int) -> tuple[int, int]:
        other = max(1, int(round(k * sp[fine] / sp[coarse])))
        return (k, other) if fine == 0 else (other, k)

    lo, hi = 1, mask2d.shape[fine]
    while counts(hi)[coarse] > mask2d.shape[coarse]:
        hi -= 1
    while lo < hi:  # largest feasible k: feasibility is monotone because both counts grow with k
        mid = (lo + hi + 1) // 2
        if _windows_inside(mask2d, *counts(mid)).any():
            lo = mid
        else:
            hi = mid - 1
    rows, cols = counts(lo)
    corners = np.argwhere(_windows_inside(mask2d, rows, cols))
    target = np.argwhere(mask2d).mean(axis=0) if prefer is None else np.asarray(prefer, dtype=np.float64)
    centres = corners + (np.array([rows, cols]) - 1) / 2.0
    r0, c0 = (int(v) for v in corners[int(np.argmin(((centres - target) ** 2).sum(axis=1)))])
    return (r0, r0 + rows), (c0, c0 + cols), float(min(rows * sp[0], cols * sp[1]))


def semi_box(body: np.ndarray, affine: np.ndarray, pancreas: np.ndarray | None = None) -> Box:
    """Seed 002's semi crop: the largest square (mm) inside the body in the axial plane, made an approximate cube.

    The square must lie inside the body in every slice of the crop's z-range; the z-range is centred on the
    pancreas (when ``pancreas`` has voxels, else on the body's z-extent), shifted to stay inside the body's
    z-extent, and as long as possible while not longer than the square's side (the cube), which bisection finds
    (a longer range can only shrink the square). A scan shorter than the body is wide gives the whole z-extent.
    """
    body = np.asarray(body, dtype=bool)
    if not body.any():
        raise InputError(None, "semi crop: the body mask is empty")
    z_axis = axial_axis(affine)
    plane_axes = [a for a in range(3) if a != z_axis]
    spacing = voxel_spacing(affine)
    plane_spacing, dz = spacing[plane_axes], float(spacing[z_axis])
    stack = np.transpose(body, plane_axes + [z_axis])  # (n0, n1, nz)
    present = np.flatnonzero(stack.any(axis=(0, 1)))
    z_lo, z_hi = int(present[0]), int(present[-1])
    prefer = None
    if pancreas is not None and np.any(pancreas):
        centroid = np.argwhere(np.transpose(np.asarray(pancreas, dtype=bool), plane_axes + [z_axis])).mean(axis=0)
        z_centre, prefer = float(centroid[2]), centroid[:2]
    else:
        z_centre = (z_lo + z_hi) / 2.0

    def window(k: int) -> tuple[int, int]:
        start = int(np.floor(z_centre - (k - 1) / 2.0 + 0.5))
        start = min(max(start, z_lo), z_hi + 1 - k)
        return start, start + k

    def square(k: int):
        start, stop = window(k)
        return largest_square(stack[:, :, start:stop].all(axis=2), plane_spacing, prefer)

    lo, hi = 1, z_hi - z_lo + 1
    while lo < hi:
        mid = (lo + hi + 1) // 2
        found = square(mid)
        if found is not None and found[2] >= mid * dz:
            lo = mid
        else:
            hi = mid - 1
    found = square(lo)
    if found is None:
        raise InputError(None, "semi crop: no square fits inside the body mask")
    (r0, r1), (c0, c1), _ = found
    box: list[tuple[int, int]] = [(0, 0)] * 3
    box[plane_axes[0]], box[plane_axes[1]], box[z_axis] = (r0, r1), (c0, c1), window(lo)
    return tuple(box)  # type: ignore[return-value]


def pancreas_mask(label: np.ndarray, pancreas_values: Sequence[int] = (1, 2)) -> np.ndarray:
    """Voxels whose label is one of ``pancreas_values`` (MSD: 1 pancreas + 2 tumor; TotalSegmentator: 7)."""
    return np.isin(np.asarray(label), np.asarray(list(pancreas_values)))


def crop_box(
    ct: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    mode: str,
    organs: np.ndarray | None = None,
    margin_mm: float = 10.0,
    *,
    body: np.ndarray | None = None,
    pancreas_values: Sequence[int] = (1, 2),
    body_threshold_hu: float = BODY_THRESHOLD_HU,
) -> Box:
    """The voxel box of a crop mode (see :func:`crop`) without cutting anything: ``((start, stop),) * 3``."""
    if mode not in CROP_MODES:
        raise InputError(None, f"unknown crop mode {mode!r}; choose one of {list(CROP_MODES)}")
    shape = np.shape(ct)
    spacing = voxel_spacing(affine)
    pancreas = None if label is None else pancreas_mask(label, pancreas_values)
    if mode == "pancreas":
        box = None if pancreas is None else bounding_box(pancreas)
        if box is None:
            raise InputError(None, f"pancreas crop: the label map has no voxel with value in {list(pancreas_values)}")
        return _box_with_margin(box, shape, spacing, margin_mm)
    if body is None:
        if organs is not None:  # an organ map is 0 outside the body: use it rather than a threshold
            body = fill_holes_axial(np.asarray(organs) > 0, affine)
        else:
            body = body_mask(ct, affine, threshold_hu=body_threshold_hu)
    if mode == "full":
        box = bounding_box(body)
        if box is None:
            raise InputError(None, "full crop: the body mask is empty")
        return _box_with_margin(box, shape, spacing, margin_mm)
    return semi_box(body, affine, pancreas)


def apply_box(
    array: np.ndarray,
    affine: np.ndarray,
    box: Box,
    out_shape: Sequence[int] | None = None,
    is_label: bool = False,
    anti_aliasing: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Cut ``box`` out of ``array`` and optionally resize it; return the array and its (updated) affine."""
    array = np.asarray(array)[_slices(box)]
    new_affine = crop_affine(affine, [start for start, _ in box])
    if out_shape is not None:
        new_affine = resize_affine(new_affine, array.shape, out_shape)
        array = resize_volume(array, out_shape, is_label=is_label, anti_aliasing=anti_aliasing)
    return np.ascontiguousarray(array), new_affine


def crop(
    ct: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    mode: str,
    organs: np.ndarray | None = None,
    margin_mm: float = 10.0,
    out_shape: Sequence[int] | None = None,
    *,
    body: np.ndarray | None = None,
    pancreas_values: Sequence[int] = (1, 2),
    body_threshold_hu: float = BODY_THRESHOLD_HU,
    anti_aliasing: bool = True,
) -> Crop:
    """Crop a CT (HU) and its label / organ maps by a seed-002 mode, optionally resize, with a correct affine.

    * ``full``: the bounding box of the body (whole abdomen), grown by ``margin_mm``;
    * ``semi``: the largest axis-aligned square (mm) inside the body in the axial plane, the body present in every
      slice of the crop, extended to an approximate cube along z centred on the pancreas (:func:`semi_box`;
      ``margin_mm`` is not used);
    * ``pancreas``: the bounding box of the pancreas (``pancreas_values``, tumor included) grown by ``margin_mm``.

    The body comes from ``body`` if given, else from ``organs > 0`` if given, else from :func:`body_mask`.
    ``out_shape`` (e.g. ``(240, 240, 155)``) resizes every array over the crop's field of view (see the module
    docstring); the returned affine places every voxel where it was in the scanner.
    """
    ct = np.asarray(ct)
    if ct.ndim != 3:
        raise InputError(None, f"crop expects a 3D CT, got shape {ct.shape}")
    for name, extra in (("label", label), ("organs", organs), ("body", body)):
        if extra is not None and np.shape(extra) != ct.shape:
            raise InputError(None, f"{name} shape {np.shape(extra)} differs from CT shape {ct.shape}")
    box = crop_box(
        ct, label, affine, mode, organs, margin_mm,
        body=body, pancreas_values=pancreas_values, body_threshold_hu=body_threshold_hu,
    )  # fmt: skip
    image, new_affine = apply_box(ct.astype(np.float32, copy=False), affine, box, out_shape, False, anti_aliasing)
    out_label = None if label is None else apply_box(label, affine, box, out_shape, is_label=True)[0]
    out_organs = None if organs is None else apply_box(organs, affine, box, out_shape, is_label=True)[0]
    return Crop(image, out_label, new_affine, out_organs, box)


# ----------------------------------------------------------------------------------------------------------------
# seed 000 sub-volumes
# ----------------------------------------------------------------------------------------------------------------


def _axial_last(array: np.ndarray | None, affine: np.ndarray) -> tuple[np.ndarray | None, np.ndarray]:
    """Move the axial axis of ``array`` last and permute the affine's columns to match."""
    z_axis = axial_axis(affine)
    order = [a for a in range(3) if a != z_axis] + [z_axis]
    new_affine = np.array(affine, dtype=np.float64, copy=True)
    new_affine[:3, :3] = np.asarray(affine, dtype=np.float64)[:3, order]
    return (None if array is None else np.transpose(np.asarray(array), order)), new_affine


def subvolumes(
    ct: np.ndarray,
    label: np.ndarray | None,
    affine: np.ndarray,
    n_slices: int = 4,
    size: Sequence[int] = (256, 256),
    drop_empty: bool = True,
    *,
    pancreas_values: Sequence[int] = (1, 2),
    anti_aliasing: bool = True,
) -> list[SubVolume]:
    """Seed 000 (section 3.2): consecutive non-overlapping ``n_slices``-slice axial stacks, resized in-plane.

    Stacks start at slice 0 of the axial axis; the last ``nz % n_slices`` slices, which cannot fill a stack, are
    left out. Each stack is resized in-plane to ``size`` (image bilinear with anti-aliasing, label nearest-exact;
    the slice axis is untouched) with its affine updated, and with ``drop_empty`` a stack whose resized label has
    no pancreas voxel is dropped (seed 000: "any volume lacking pancreas annotation is excluded"). Intensities are
    left as given: apply :func:`window_hu` before or after. See :class:`SubVolume` for the array layout.
    """
    if n_slices < 1:
        raise InputError(None, f"n_slices must be >= 1, got {n_slices}")
    if drop_empty and label is None:
        raise InputError(None, "sub-volumes with drop_empty=True need a label map to find the pancreas")
    ct = np.asarray(ct)
    if label is not None and np.shape(label) != ct.shape:
        raise InputError(None, f"label shape {np.shape(label)} differs from CT shape {ct.shape}")
    stack_ct, stack_affine = _axial_last(ct, affine)
    stack_label, _ = _axial_last(label, affine)
    out_shape = (int(size[0]), int(size[1]), int(n_slices))
    result = []
    for first in range(0, stack_ct.shape[2] - n_slices + 1, n_slices):
        box: Box = ((0, stack_ct.shape[0]), (0, stack_ct.shape[1]), (first, first + n_slices))
        sub_label = None
        if stack_label is not None:
            sub_label = apply_box(stack_label, stack_affine, box, out_shape, is_label=True)[0]
            if drop_empty and not pancreas_mask(sub_label, pancreas_values).any():
                continue
        sub_image, sub_affine = apply_box(
            stack_ct.astype(np.float32, copy=False), stack_affine, box, out_shape, False, anti_aliasing
        )
        result.append(
            SubVolume(
                image=nifti_to_stack(sub_image),
                label=None if sub_label is None else nifti_to_stack(sub_label),
                affine=sub_affine,
                first_slice=first,
            )
        )
    return result


# ----------------------------------------------------------------------------------------------------------------
# MONAI dictionary transforms
# ----------------------------------------------------------------------------------------------------------------


def _tensor_affine(value: Any, key: Hashable) -> np.ndarray:
    if not isinstance(value, MetaTensor):
        raise InputError(None, f"key {key!r}: expected a MetaTensor with an affine (use LoadImaged first)")
    return np.asarray(value.affine.detach().cpu().numpy(), dtype=np.float64)


def _with_geometry(template: MetaTensor, array: torch.Tensor, affine: np.ndarray) -> MetaTensor:
    """A MetaTensor carrying ``template``'s meta data with ``affine`` and the new spatial shape."""
    out = MetaTensor(array.as_tensor() if isinstance(array, MetaTensor) else array, meta=dict(template.meta))
    out.affine = torch.as_tensor(affine, dtype=torch.float64)
    out.meta["spatial_shape"] = np.asarray(out.shape[1:])
    return out


def _modes_for(keys: Sequence[Hashable], mode: Any, label_keys: Sequence[Hashable]) -> list[str]:
    if mode is None:
        return ["nearest-exact" if key in label_keys else "trilinear" for key in keys]
    modes = [mode] * len(keys) if isinstance(mode, str) else list(mode)
    if len(modes) != len(keys):
        raise InputError(None, f"{len(modes)} interpolation modes for {len(keys)} keys")
    return modes


class CropModed(MapTransform):
    """Dictionary version of :func:`crop` for bundle configs (channel-first MetaTensors, e.g. after LoadImaged and
    EnsureChannelFirstd, in HU).

    The box is computed once from ``image_key`` (HU, first channel), ``label_key`` and ``organs_key``, then cut out
    of every key in ``keys`` and resized to ``spatial_size`` if given; each output's affine is updated. ``mode``:
    interpolation per key, default ``nearest-exact`` for the label / organ keys and ``trilinear`` for the others.
    Not invertible (the affine keeps the geometry). Place it before intensity scaling: the body mask needs HU.
    """

    def __init__(
        self,
        keys: KeysCollection,
        crop_mode: str = "pancreas",
        image_key: str = "image",
        label_key: str | None = "label",
        organs_key: str | None = None,
        margin_mm: float = 10.0,
        spatial_size: Sequence[int] | None = None,
        mode: str | Sequence[str] | None = None,
        pancreas_values: Sequence[int] = (1, 2),
        body_threshold_hu: float = BODY_THRESHOLD_HU,
        anti_aliasing: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if crop_mode not in CROP_MODES:
            raise InputError(None, f"unknown crop mode {crop_mode!r}; choose one of {list(CROP_MODES)}")
        self.crop_mode = crop_mode
        self.image_key, self.label_key, self.organs_key = image_key, label_key, organs_key
        self.margin_mm = float(margin_mm)
        self.spatial_size = None if spatial_size is None else tuple(int(s) for s in spatial_size)
        self.modes = _modes_for(self.keys, mode, [k for k in (label_key, organs_key) if k is not None])
        self.pancreas_values = tuple(pancreas_values)
        self.body_threshold_hu = float(body_threshold_hu)
        self.anti_aliasing = anti_aliasing

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        affine = _tensor_affine(image, self.image_key)
        label = d.get(self.label_key) if self.label_key is not None else None
        organs = d.get(self.organs_key) if self.organs_key is not None else None
        box = crop_box(
            np.asarray(image[0].detach().cpu().numpy()),
            None if label is None else np.asarray(label[0].detach().cpu().numpy()),
            affine, self.crop_mode,
            None if organs is None else np.asarray(organs[0].detach().cpu().numpy()),
            self.margin_mm, pancreas_values=self.pancreas_values, body_threshold_hu=self.body_threshold_hu,
        )  # fmt: skip
        for key, mode in self.key_iterator(d, self.modes):
            value = d[key]
            key_affine = crop_affine(_tensor_affine(value, key), [start for start, _ in box])
            cut = value[(slice(None),) + _slices(box)]
            cut = cut.as_tensor() if isinstance(cut, MetaTensor) else cut
            if self.spatial_size is not None:
                key_affine = resize_affine(key_affine, cut.shape[1:], self.spatial_size)
                resize = Resize(self.spatial_size, mode=mode, anti_aliasing=self.anti_aliasing and "linear" in mode)
                resized = resize(cut.float())
                cut = resized.as_tensor() if isinstance(resized, MetaTensor) else resized
                cut = cut.to(value.dtype) if "nearest" in mode else cut  # interpolated values stay float
            d[key] = _with_geometry(value, cut, key_affine)
        return d


class AxialStacksd(MapTransform):
    """Dictionary version of :func:`subvolumes`: returns a list of dicts, one per kept ``n_slices`` stack.

    Each output key holds a channel-first MetaTensor ``(C, rows, cols, n_slices)`` (the NIfTI layout of
    :class:`SubVolume`) with its affine; ``first_slice`` records where the stack started. Like MONAI's
    ``RandCropByPosNegLabeld`` it turns one case into several samples.
    """

    def __init__(
        self,
        keys: KeysCollection,
        label_key: str | None = "label",
        n_slices: int = 4,
        spatial_size: Sequence[int] = (256, 256),
        mode: str | Sequence[str] | None = None,
        drop_empty: bool = True,
        pancreas_values: Sequence[int] = (1, 2),
        anti_aliasing: bool = True,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.n_slices = int(n_slices)
        self.spatial_size = (int(spatial_size[0]), int(spatial_size[1]))
        self.modes = _modes_for(self.keys, mode, [label_key] if label_key is not None else [])
        self.drop_empty = drop_empty
        self.pancreas_values = tuple(pancreas_values)
        self.anti_aliasing = anti_aliasing

    def __call__(self, data: Mapping[Hashable, Any]) -> list[dict[Hashable, Any]]:
        d = dict(data)
        keys = [key for key in self.key_iterator(d)]
        first_key = self.label_key if self.label_key in d else keys[0]
        affine = _tensor_affine(d[first_key], first_key)
        z_axis = axial_axis(affine)
        order = [a for a in range(3) if a != z_axis] + [z_axis]
        _, stack_affine = _axial_last(None, affine)
        n_z = d[first_key].shape[1 + z_axis]
        out_shape = self.spatial_size + (self.n_slices,)
        samples = []
        for first in range(0, n_z - self.n_slices + 1, self.n_slices):
            sample = dict(d)
            for key, mode in self.key_iterator(d, self.modes):
                value = d[key]
                moved = value.as_tensor().permute(0, *[a + 1 for a in order])
                box = ((0, moved.shape[1]), (0, moved.shape[2]), (first, first + self.n_slices))
                cut = moved[(slice(None),) + _slices(box)].float()
                resize = Resize(out_shape, mode=mode, anti_aliasing=self.anti_aliasing and "linear" in mode)
                resized = resize(cut)
                resized = resized.as_tensor() if isinstance(resized, MetaTensor) else resized
                resized = resized.to(value.dtype) if "nearest" in mode else resized
                key_affine = resize_affine(crop_affine(stack_affine, (0, 0, first)), cut.shape[1:], out_shape)
                sample[key] = _with_geometry(value, resized, key_affine)
            if self.drop_empty and self.label_key in sample:
                kept = pancreas_mask(sample[self.label_key].detach().cpu().numpy(), self.pancreas_values)
                if not kept.any():
                    continue
            sample["first_slice"] = first
            samples.append(sample)
        return samples


# ----------------------------------------------------------------------------------------------------------------
# file level
# ----------------------------------------------------------------------------------------------------------------


def standardize_file(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None,
    out_image: str | os.PathLike,
    out_label: str | os.PathLike | None = None,
    spacing: Sequence[float] | None = (1.0, 1.0, 1.0),
    hu_window: Sequence[float] | None = DEFAULT_HU_WINDOW,
    out_range: Sequence[float] = (0.0, 1.0),
) -> Volume:
    """Read a CT (and label), :func:`standardize` it, write the results atomically; never overwrites an input."""
    inputs = tuple(p for p in (image_path, label_path) if p is not None)
    ct, label, affine = _read_case(image_path, label_path)
    volume = standardize(ct, label, affine, spacing, hu_window, out_range)
    save_nifti(out_image, volume.image, volume.affine, inputs=inputs)
    if volume.label is not None and out_label is not None:
        save_nifti(out_label, _label_dtype(volume.label), volume.affine, inputs=inputs, intent_label=True)
    return volume


def crop_file(
    image_path: str | os.PathLike,
    label_path: str | os.PathLike | None,
    out_image: str | os.PathLike,
    out_label: str | os.PathLike | None = None,
    mode: str = "pancreas",
    margin_mm: float = 10.0,
    out_shape: Sequence[int] | None = None,
    organs_path: str | os.PathLike | None = None,
    pancreas_values: Sequence[int] = (1, 2),
) -> Crop:
    """Read a CT in HU (and label / organ map), :func:`crop` it, write image and label atomically."""
    inputs = tuple(p for p in (image_path, label_path, organs_path) if p is not None)
    ct, label, affine = _read_case(image_path, label_path)
    organs = _read_organs(organs_path, image_path, ct.shape, affine)
    try:
        result = crop(ct, label, affine, mode, organs, margin_mm, out_shape, pancreas_values=pancreas_values)
    except InputError as err:
        raise InputError(label_path if mode == "pancreas" else image_path, err.problem) from None
    save_nifti(out_image, result.image, result.affine, inputs=inputs)
    if result.label is not None and out_label is not None:
        save_nifti(out_label, _label_dtype(result.label), result.affine, inputs=inputs, intent_label=True)
    return result


def _label_dtype(label: np.ndarray) -> np.ndarray:
    label = np.asarray(label)
    if label.min() >= 0 and label.max() <= 255:
        return label.astype(np.uint8)
    return label.astype(np.int16)


def _read_case(image_path, label_path, allowed=None) -> tuple[np.ndarray, np.ndarray | None, np.ndarray]:
    ct, affine = load_ct(image_path)
    if label_path is None:
        return ct, None, affine
    label, label_affine = load_label(label_path, allowed)
    check_pair(image_path, label_path, ct.shape, affine, label.shape, label_affine)
    check_label(label_path, label, require_foreground=False)  # a label map without background is broken
    return ct, label, affine


def _label_set(extras: Mapping[str, Any]) -> tuple[int, ...] | None:
    """The label values a datalist declares (MSD ``labels``: {"0": "background", "1": ...}), or None when it
    declares no foreground class (a placeholder such as ``{"0": "background"}`` says nothing about the labels)."""
    labels = extras.get("labels")
    if not isinstance(labels, Mapping) or len(labels) < 2:
        return None
    try:
        return tuple(int(key) for key in labels)
    except (TypeError, ValueError):
        return None


def _read_organs(organs_path, image_path, shape, affine) -> np.ndarray | None:
    if organs_path is None:
        return None
    organs, organs_affine = load_label(organs_path)
    check_pair(image_path, organs_path, shape, affine, organs.shape, organs_affine)
    return organs


def _case_name(image_path: str | os.PathLike) -> str:
    name = Path(image_path).name
    for suffix in (".nii.gz", ".nii", ".mha", ".nrrd"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return Path(name).stem


def _source_descrip(image_path: str | os.PathLike) -> str | None:
    """The source NIfTI's description (e.g. "SYNTHETIC ..."), carried to its outputs so synthetic stays marked."""
    try:
        raw = nib.load(str(image_path)).header["descrip"]
    except Exception:  # not NIfTI (or unreadable header): nothing to carry; the data itself was read already
        return None
    text = bytes(np.asarray(raw).item()).split(b"\0")[0].decode("ascii", "replace").strip()
    return text or None


def _json_normal(value: Any) -> Any:
    """``value`` as it reads back from JSON (tuples become lists), so parameters compare equal after a round trip."""
    return json.loads(json.dumps(value))


def _sources_digest(record: Mapping[str, Any]) -> dict[str, Any]:
    return {
        key: {"path": str(record[key]), "sha256": file_sha256(record[key])}
        for key in ("image", "label", "organs")
        if record.get(key)
    }


#: Record keys not copied from a source record to its outputs' entries (paths are new; ``case`` names the output;
#: the outputs' intensity mark is this run's window).
_NOT_CARRIED = ("image", "label", "organs", "case", "section", INTENSITY_KEY)
SECTION_FOLDERS = {"training": "Tr", "validation": "Va", "test": "Ts", "testing": "Ts"}


def _folder_suffix(section: str) -> str:
    return SECTION_FOLDERS.get(section, "_" + section)


def _process_record(
    record: Mapping[str, Any],
    mode: str,
    params: Mapping[str, Any],
    out_dir: Path,
    suffix: str,
    allowed: Sequence[int] | None = None,
    max_spacing_mm: float = MAX_SPACING_MM,
) -> list[dict[str, Any]]:
    """Make and write the outputs of one source record; return their datalist entries (paths relative)."""
    image_path, label_path, organs_path = record["image"], record.get("label"), record.get("organs")
    inputs = tuple(p for p in (image_path, label_path, organs_path) if p)
    mark = intensity_of(image_path, record)
    if parse_intensity(mark, image_path) is not None:
        raise InputError(
            image_path,
            f"is stored in a HU window ({INTENSITY_KEY} {mark!r} in its datalist), not in HU: prepare needs scans in "
            "HU (its crops find the body by HU); run prepare on the HU source of this set instead",
        )
    ct, label, affine = _read_case(image_path, label_path, allowed)
    organs = _read_organs(organs_path, image_path, ct.shape, affine)
    if label is None and mode in ("pancreas", "subvolumes"):
        raise InputError(image_path, f"mode {mode!r} needs a label map, and this entry has none")
    volume = standardize(ct, label, affine, params["spacing"], hu_window=None, organs=organs)
    case = str(record.get("case") or _case_name(image_path))
    extra = {k: v for k, v in record.items() if k not in _NOT_CARRIED}
    extra.setdefault("patient", case)
    descrip = _source_descrip(image_path)

    def finish(image: np.ndarray) -> np.ndarray:
        if params["hu_window"] is None:
            return image.astype(np.float32)
        return window_hu(image, params["hu_window"], params["out_range"])

    pieces: list[tuple[str, np.ndarray, np.ndarray | None, np.ndarray | None, np.ndarray, dict]] = []
    if mode == "subvolumes":
        subs = subvolumes(
            volume.image, volume.label, volume.affine, params["n_slices"], params["size"], params["drop_empty"],
            pancreas_values=params["pancreas_values"],
        )  # fmt: skip
        for sub in subs:
            pieces.append(
                (
                    f"{case}_z{sub.first_slice:04d}",
                    stack_to_nifti(sub.image),
                    stack_to_nifti(sub.label),
                    None,
                    sub.affine,
                    {"scan": case, "first_slice": sub.first_slice},
                )
            )
    elif mode == "none":
        pieces.append((case, volume.image, volume.label, volume.organs, volume.affine, {"scan": case}))
    else:
        try:
            result = crop(
                volume.image, volume.label, volume.affine, mode, volume.organs, params["margin_mm"],
                params["out_shape"], pancreas_values=params["pancreas_values"],
            )  # fmt: skip
        except InputError as err:
            raise InputError(label_path if mode == "pancreas" else image_path, err.problem) from None
        box_info = {"scan": case, "crop_box": [list(b) for b in result.box]}
        pieces.append((case, result.image, result.label, result.organs, result.affine, box_info))

    for name, image, _, _, aff, _ in pieces:  # before anything is written: outputs every reader accepts
        spacing = voxel_spacing(aff)
        if spacing.max() > max_spacing_mm:
            raise InputError(
                image_path,
                f"its {mode} output {name} of shape {tuple(image.shape)} would have voxels of "
                f"{np.round(spacing, 2).tolist()} mm, more than the {max_spacing_mm:g} mm every reader of this "
                "collection accepts (they refuse such a header as broken): choose a larger out_shape / size",
            )
    entries = []
    for name, image, lab, org, aff, info in pieces:
        entry: dict[str, Any] = {"image": f"images{suffix}/{name}.nii.gz"}
        save_nifti(out_dir / entry["image"], finish(image), aff, descrip=descrip, inputs=inputs)
        if lab is not None:
            entry["label"] = f"labels{suffix}/{name}.nii.gz"
            save_nifti(
                out_dir / entry["label"], _label_dtype(lab), aff, descrip=descrip, inputs=inputs, intent_label=True
            )
        if org is not None:
            entry["organs"] = f"organs{suffix}/{name}.nii.gz"
            save_nifti(
                out_dir / entry["organs"], _label_dtype(org), aff, descrip=descrip, inputs=inputs, intent_label=True
            )
        entries.append({**entry, **extra, "case": name, **info})
    return entries


def prepare_dataset(
    src: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    out_dir: str | os.PathLike,
    mode: str = "pancreas",
    *,
    spacing: Sequence[float] | None = None,
    hu_window: Sequence[float] | None = DEFAULT_HU_WINDOW,
    out_range: Sequence[float] = (0.0, 1.0),
    margin_mm: float = 10.0,
    out_shape: Sequence[int] | None = None,
    n_slices: int = 4,
    size: Sequence[int] = (256, 256),
    drop_empty: bool = True,
    pancreas_values: Sequence[int] = (1, 2),
    sections: Sequence[str] | None = None,
    base_dir: str | os.PathLike | None = None,
    datalist_name: str = "dataset.json",
    max_spacing_mm: float = MAX_SPACING_MM,
) -> dict[str, Any]:
    """Write a new MSD-layout folder of crops / sub-volumes / standardised scans with a datalist JSON.

    ``src``: anything :func:`tools.splits.load_records` reads (MSD folder, datalist JSON, NIfTI folder, DICOM
    tree via :func:`tools.datasets.read_datalist`; or an in-memory datalist dict / list of records
    ``{"image", "label"?, "organs"?, "patient"?, ...}`` with relative paths taken from ``base_dir``).
    The sections named in ``sections`` (None: every one: ``training``, ``validation``, ``test``...) are
    processed; in the modes that need a label (``pancreas``, ``subvolumes``) entries without one are left out and
    listed in ``no_label``. Each case is oriented RAS and, with ``spacing``, resampled (:func:`standardize`);
    then cropped (``mode`` in ``full``/``semi``/``pancreas``, :func:`crop`, ``out_shape`` e.g.
    ``(240, 240, 155)``), cut into seed 000 sub-volumes (``subvolumes``, ``n_slices`` x ``size``) or kept whole
    (``none``); finally the image gets the HU window (None: stay in HU; with a window every entry is marked
    ``"intensity": "windowed [lo, hi] HU -> [a, b]"``, which the readers honour). Outputs go to ``images<Tr|Ts|Va>/``,
    ``labels..``, ``organs..`` (the source's NIfTI description, e.g. ``SYNTHETIC ...``, is kept) and the datalist
    ``out_dir/<datalist_name>`` with relative paths and the source datalist's other keys (``labels``,
    ``organ_labels``...). Every entry keeps the source record's extra keys (``patient`` defaults to the case
    name, so a split over sub-volumes stays patient-level), with ``case`` = the output's name, ``scan`` = the
    source case, and ``crop_box`` (crops) or ``first_slice`` (sub-volumes). No entry names a file outside
    ``out_dir`` (the folder stays self-contained: :func:`tools.datasets.read_msd` reads it); the source paths and
    their hashes are in the sidecars.

    Outputs whose voxels would exceed ``max_spacing_mm`` (the readers' limit, 20 mm) are refused before anything
    is written; raise it only for a test or a reader given the same ``max_spacing_mm``.

    Resumable: ``out_dir/sidecars/<case>.json`` records the parameters, the SHA-256 of the sources and the outputs;
    a case whose sidecar matches and whose outputs exist is reused, not recomputed. Inputs are never overwritten.
    Returns ``{"datalist": path, "made": [...], "reused": [...], "empty": [...], "no_label": [...]}`` (case names;
    ``empty``: cases that gave no output, e.g. no sub-volume with pancreas).
    """
    if mode not in PREPARE_MODES:
        raise InputError(None, f"unknown mode {mode!r}; choose one of {list(PREPARE_MODES)}")
    loaded = load_records(src, base_dir=base_dir)
    out_dir = Path(out_dir)
    if out_dir.exists() and loaded.base_dir is not None and out_dir.resolve() == Path(loaded.base_dir).resolve():
        raise InputError(out_dir, "the output folder is the source folder; choose a new folder")
    params = _json_normal(
        {
            "mode": mode,
            "spacing": None if spacing is None else [float(s) for s in spacing],
            "hu_window": None if hu_window is None else [float(v) for v in hu_window],
            "out_range": [float(v) for v in out_range],
            "margin_mm": float(margin_mm),
            "out_shape": None if out_shape is None else [int(s) for s in out_shape],
            "n_slices": int(n_slices),
            "size": [int(s) for s in size],
            "drop_empty": bool(drop_empty),
            "pancreas_values": [int(v) for v in pancreas_values],
            "version": PREP_VERSION,
        }
    )
    # parameters a mode does not use are blanked, so changing them does not remake its outputs
    unused = {
        "full": ("n_slices", "size", "drop_empty"),
        "pancreas": ("n_slices", "size", "drop_empty"),
        "semi": ("n_slices", "size", "drop_empty", "margin_mm"),
        "subvolumes": ("margin_mm", "out_shape"),
        "none": ("n_slices", "size", "drop_empty", "margin_mm", "out_shape"),
    }[mode]
    params.update({key: None for key in unused})
    seen: dict[str, str] = {}
    report: dict[str, Any] = {"made": [], "reused": [], "empty": [], "no_label": []}
    # the source's other keys (labels, organ_labels, modality, synthetic...) still describe the outputs
    datalist: dict[str, Any] = {k: v for k, v in loaded.extras.items() if k not in ("numTraining", "numTest")}
    datalist.setdefault("name", "prepared")
    datalist["description"] = f"tools.prep mode={mode} of: {loaded.extras.get('description', loaded.source)}"
    datalist["prep"] = {**params, "source": None if loaded.source is None else str(loaded.source)}
    # each entry says how its image is stored, so every reader (tools, the bundles' ValidateCTd) accepts a windowed
    # image as such instead of refusing it as "not CT"; mixes and splits copy the entry with its mark
    marked = {} if hu_window is None else {INTENSITY_KEY: windowed_mark(params["hu_window"], params["out_range"])}
    chosen = list(loaded.sections) if sections is None else list(sections)
    for section in chosen:
        records = loaded.records(section)
        suffix = _folder_suffix(section)
        out_entries: list[dict[str, Any]] = []
        for record in records:
            case = str(record.get("case") or _case_name(record["image"]))
            if case in seen:
                raise InputError(record["image"], f"case name {case!r} also used by {seen[case]}")
            seen[case] = str(record["image"])
            if mode in ("pancreas", "subvolumes") and not record.get("label"):
                report["no_label"].append(case)
                continue
            sidecar_path = out_dir / "sidecars" / f"{case}.json"
            sources = _sources_digest(record)
            record_keys = _json_normal({k: v for k, v in record.items() if k not in _NOT_CARRIED})
            previous = _read_sidecar(sidecar_path)
            if (
                previous is not None
                and previous.get("params") == params
                and previous.get("sources") == _json_normal(sources)
                and previous.get("record") == record_keys
                and previous.get("section") == section
                and _outputs_exist(out_dir, previous.get("outputs", []))
            ):
                entries = previous["outputs"]
                report["reused"].append(case)
            else:
                entries = _process_record(
                    record, mode, params, out_dir, suffix, _label_set(loaded.extras), max_spacing_mm
                )
                if previous is not None:
                    _remove_stale(out_dir, previous.get("outputs", []), entries)
                sidecar = {"tool": "tools.prep", "section": section, "params": params, "sources": sources}
                write_json(sidecar_path, {**sidecar, "record": record_keys, "outputs": entries})
                report["made"].append(case)
            if not entries:
                report["empty"].append(case)
            out_entries.extend({**entry, **marked} for entry in entries)
        datalist[section] = out_entries
    datalist_path = out_dir / datalist_name
    write_json(datalist_path, datalist, inputs=(loaded.source,) if loaded.source is not None else ())
    report["datalist"] = str(datalist_path)
    logger.info("prepared %d cases (%d reused) into %s", len(report["made"]), len(report["reused"]), out_dir)
    return report


def _outputs_exist(out_dir: Path, entries: Sequence[Mapping[str, Any]]) -> bool:
    return all((out_dir / e[k]).is_file() for e in entries for k in ("image", "label", "organs") if k in e)


def _read_sidecar(path: Path) -> dict[str, Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # a damaged sidecar only means the case is made again


def _remove_stale(out_dir: Path, old_entries: Sequence[Mapping[str, Any]], new_entries: Sequence[Mapping[str, Any]]):
    """Delete outputs an earlier run listed that this run did not write again (e.g. fewer sub-volumes)."""
    keep = {str(e[k]) for e in new_entries for k in ("image", "label", "organs") if k in e}
    for entry in old_entries:
        for key in ("image", "label", "organs"):
            rel = entry.get(key)
            if rel and rel not in keep:
                path = (out_dir / rel).resolve()
                if out_dir.resolve() in path.parents and path.is_file():
                    path.unlink()
