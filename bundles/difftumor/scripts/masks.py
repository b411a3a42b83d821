"""Synthetic tumor masks: elastically deformed ellipsoids inside an organ, sized in millimetres.

Why this is not plain MONAI: MONAI has no generator of tumor-shaped masks. This module implements the one of the
DiffTumor reference (SPEC 3.4) with the changes the SPEC asks for:

* **Shape.** An ellipsoid with per-axis radii, then an elastic deformation of each axis pair (a random 3 x 3 grid
  of control-point displacements drawn from ``N(0, sigma^2)``, cubic-spline interpolated, nearest-neighbour
  resampling, like ``elasticdeform.deform_random_grid(points=3, order=0)`` over a box of 4 radii), applied to the
  pairs (0, 1), (1, 2), (0, 2) in that order, then clipped to the organ. The three resamplings are composed on the
  coordinates and the ellipsoid is evaluated analytically, only at organ voxels: the result equals resampling a
  rasterised ellipsoid three times, without building the box (a large tumor's box is 256^3 voxels at 1 mm).
* **Millimetres.** Radii and sigmas are in mm and converted per axis by the voxel spacing of the affine, so the
  same class gives the same physical size on a 0.7 x 0.7 x 5 mm scan and on a 1 mm resampled one (the reference
  drew radii in voxels of its 1 mm grid, so its numbers are kept as mm). Radii are drawn uniformly in the class
  range per axis (the reference drew integers).
* **Classes.** ``tiny`` / ``small`` / ``medium`` / ``large`` with (a) the reference ranges (``preset="difftumor"``:
  radius 3-5, 6-10, 12-20, 24-64 mm; sigma 0.5-1, 1-2, 3-6, 5-10 mm; 1-3, 1-3, 1, 1 tumors), (b) the quartile-
  derived ranges of seed 001 (``preset="seed001"``: 4-7, 6-10, 7-12, 11-30 mm), or (c) ranges computed from a data
  set's own tumors: the JSON of ``python -m tools data quartiles`` (``tools.tumor_stats.dataset_tumor_stats``) or of
  ``radius_ranges`` (``{"tiny": [lo, hi], ...}``), a path or a dict. Sigmas and counts of (b) and (c) are the
  reference's of the same class.
* **What a radius measures.** ``size_measure="ellipsoid"`` (the reference's): the class range holds the ellipsoid's
  per-axis radii before the deformation and the clipping to the organ, so a tumor of a thin organ ends smaller
  than its class says (a pancreas about 15 mm thick clips a "large" 13-16 mm ellipsoid to an equivalent radius of
  about 7 mm). ``size_measure="label"``: the class range holds the equivalent radius ``(3 V / 4 pi)^(1/3)`` of the
  tumor as it ends in the label, the measure of ``tools data quartiles`` (so classes computed from a data set's
  labels mean what they say): a target is drawn in the range, and the deformed ellipsoid (the same deformation,
  radii and sigma scaled together) is grown until its clipped part reaches the target, by at most
  ``MAX_LABEL_SCALE`` times; an organ too small to hold the target keeps the largest tumor that scale allows.
* **Mixed.** ``tumor_type="mixed"`` draws the class from ``mixed_weights`` (default DiffTumor's online mix: early
  0.8 split 0.5 / 0.5 between tiny and small, medium 0.1, large 0.1); ``"early"`` draws tiny / small 0.5 / 0.5.
* **Location.** Each tumor centre is a random organ voxel of an axial slice at ``U(0.3, 0.7)`` of the organ's axial
  extent (widened to 0.2-0.8, 0.1-0.9, 0-1 when such a slice has no organ voxel, like the reference). A ``large``
  tumor of an elongated organ (``large_at_center=True``, the reference's pancreas rule) is centred on the organ's
  bounding-box centre, moved to the nearest organ voxel when that centre lies outside the organ.

Every draw uses only the ``numpy.random.RandomState`` it is given (a MONAI ``Randomizable``'s ``R``), so a seed
fixes the mask.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

SIZE_CLASSES = ("tiny", "small", "medium", "large")
EARLY_CLASSES = ("tiny", "small")
#: DiffTumor's online tumor-type mix (SPEC 3.4): early 0.8 (tiny / small 0.5 / 0.5), medium 0.1, large 0.1.
DEFAULT_MIXED_WEIGHTS = {"tiny": 0.4, "small": 0.4, "medium": 0.1, "large": 0.1}
AXIS_PAIRS = ((0, 1), (1, 2), (0, 2))
CONTROL_POINTS = 3
SIZE_MEASURES = ("ellipsoid", "label")
#: size_measure="label": the most an ellipsoid is grown to reach its target equivalent radius after the clipping, and
#: how many times its size is corrected (each step scales by target / reached; the clipped volume grows more slowly
#: than the ellipsoid's, so a few steps are needed) and how close is close enough
MAX_LABEL_SCALE = 3.0
LABEL_SCALE_STEPS = 6
LABEL_TOLERANCE = 0.05


@dataclass(frozen=True)
class SizeClass:
    """One tumor size class: per-axis radius range, elastic sigma range (both mm) and tumor count (inclusive)."""

    name: str
    radius_mm: tuple[float, float]
    sigma_mm: tuple[float, float]
    count: tuple[int, int]

    def __post_init__(self):
        lo, hi = self.radius_mm
        if not (0 < lo <= hi):
            raise ValueError(f"class {self.name}: radius range must satisfy 0 < lo <= hi, got {self.radius_mm}")
        if not (0 <= self.sigma_mm[0] <= self.sigma_mm[1]):
            raise ValueError(f"class {self.name}: sigma range must satisfy 0 <= lo <= hi, got {self.sigma_mm}")
        if not (1 <= self.count[0] <= self.count[1]):
            raise ValueError(f"class {self.name}: count range must satisfy 1 <= lo <= hi, got {self.count}")


_REFERENCE = {
    # DiffTumor get_fixed_geo: base radii 4 / 8 / 16 / 32 voxels at 1 mm, randint(0.75 r, 1.25 r) (large: 2 r)
    "tiny": SizeClass("tiny", (3.0, 5.0), (0.5, 1.0), (1, 3)),
    "small": SizeClass("small", (6.0, 10.0), (1.0, 2.0), (1, 3)),
    "medium": SizeClass("medium", (12.0, 20.0), (3.0, 6.0), (1, 1)),
    "large": SizeClass("large", (24.0, 64.0), (5.0, 10.0), (1, 1)),
}
_SEED001_RADII = {"tiny": (4.0, 7.0), "small": (6.0, 10.0), "medium": (7.0, 12.0), "large": (11.0, 30.0)}

PRESETS: dict[str, dict[str, SizeClass]] = {
    "difftumor": dict(_REFERENCE),
    "seed001": {
        name: SizeClass(name, _SEED001_RADII[name], _REFERENCE[name].sigma_mm, _REFERENCE[name].count)
        for name in SIZE_CLASSES
    },
}


def classes_from_ranges(ranges: Mapping[str, Sequence[float]], base: str = "difftumor") -> dict[str, SizeClass]:
    """Size classes with the given ``{class: (lo_mm, hi_mm)}`` radius ranges and ``base`` preset sigmas / counts."""
    reference = PRESETS[base]
    classes = {}
    for name, bounds in ranges.items():
        if name not in reference:
            raise ValueError(f"unknown size class {name!r}; expected one of {SIZE_CLASSES}")
        lo, hi = (float(v) for v in bounds)
        classes[name] = SizeClass(name, (lo, hi), reference[name].sigma_mm, reference[name].count)
    return classes


def ranges_from_stats(stats: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """``{class: (lo, hi)}`` from a tumor-statistics dict (``dataset_tumor_stats`` output or ``radius_ranges``)."""
    if "classes" in stats:  # tools.tumor_stats.dataset_tumor_stats / size_classes output
        ranges = {
            name: (float(c["lower_mm"]), float(c["upper_mm"]))
            for name, c in stats["classes"].items()
            if c.get("lower_mm") is not None
        }
    else:  # tools.tumor_stats.radius_ranges output (JSON turns the tuples into lists)
        ranges = {name: (float(v[0]), float(v[1])) for name, v in stats.items() if name in SIZE_CLASSES}
    if not ranges:
        raise ValueError("these tumor statistics hold no size class (a data set without tumors?)")
    # the smallest tumor of a data set can be a single voxel: keep radii positive
    return {name: (max(lo, 0.5), max(hi, lo, 0.5)) for name, (lo, hi) in ranges.items()}


def resolve_classes(classes: str | os.PathLike | Mapping[str, Any] | None) -> dict[str, SizeClass]:
    """Size classes from a preset name, a statistics / ranges JSON file, a dict of ranges or of ``SizeClass``."""
    if classes is None:
        return dict(PRESETS["difftumor"])
    if isinstance(classes, str) and classes in PRESETS:
        return dict(PRESETS[classes])
    if isinstance(classes, (str, os.PathLike)):
        path = Path(classes)
        if not path.is_file():
            raise ValueError(f"tumor size classes {str(classes)!r}: not a preset {sorted(PRESETS)} nor a JSON file")
        return classes_from_ranges(ranges_from_stats(json.loads(path.read_text())))
    if all(isinstance(v, SizeClass) for v in classes.values()):
        return dict(classes)
    return classes_from_ranges(ranges_from_stats(classes))


def voxel_spacing(affine: np.ndarray | None) -> np.ndarray:
    """Voxel size (mm) along each array axis: the column norms of the affine's 3 x 3 part (1 mm without affine)."""
    if affine is None:
        return np.ones(3)
    return np.linalg.norm(np.asarray(affine, dtype=np.float64)[:3, :3], axis=0)


def axial_axis(affine: np.ndarray | None) -> int:
    """The array axis closest to the world superior-inferior direction (axis 2 for RAS / LPS volumes)."""
    if affine is None:
        return 2
    return int(np.argmax(np.abs(np.asarray(affine, dtype=np.float64)[2, :3])))


@dataclass
class TumorDraw:
    """One draw: the boolean tumor mask (inside the organ), its class and the parameters of each tumor."""

    mask: np.ndarray
    tumor_class: str
    tumors: list[dict[str, Any]] = field(default_factory=list)


def choose_class(rng: np.random.RandomState, tumor_type: str, mixed_weights: Mapping[str, float] | None = None) -> str:
    """The size class of one draw: ``tumor_type`` itself, or a draw from the ``mixed`` / ``early`` distribution."""
    if tumor_type in SIZE_CLASSES:
        return tumor_type
    if tumor_type == "early":
        weights = {"tiny": 0.5, "small": 0.5}
    elif tumor_type == "mixed":
        weights = dict(mixed_weights or DEFAULT_MIXED_WEIGHTS)
    else:
        raise ValueError(f"tumor_type must be one of {SIZE_CLASSES + ('early', 'mixed')}, got {tumor_type!r}")
    names = [name for name in SIZE_CLASSES if weights.get(name, 0) > 0]
    p = np.array([float(weights[name]) for name in names])
    if not names or np.any(p < 0):
        raise ValueError(f"mixed weights must be non-negative with a positive sum, got {weights}")
    return names[int(rng.choice(len(names), p=p / p.sum()))]


def _centre_in_slice_band(organ: np.ndarray, rng: np.random.RandomState, axis: int) -> np.ndarray:
    """A random organ voxel of an axial slice at U(0.3, 0.7) of the organ's axial extent (reference widening)."""
    present = np.flatnonzero(np.any(organ, axis=tuple(a for a in range(3) if a != axis)))
    start, end = int(present[0]), int(present[-1])
    for attempt in range(40):
        band = (0.3, 0.7) if attempt <= 10 else (0.2, 0.8) if attempt <= 20 else (0.1, 0.9) if attempt <= 30 else (0, 1)
        index = int(round(rng.uniform(*band) * (end - start))) + start
        plane = np.take(organ, index, axis=axis)
        coords = np.argwhere(plane)
        if len(coords):
            chosen = list(coords[rng.randint(len(coords))])
            chosen.insert(axis, index)
            return np.array(chosen)
    coords = np.argwhere(organ)  # every band was empty (cannot happen for a non-empty organ, kept as a guard)
    return coords[rng.randint(len(coords))]


def _centre_of_box(organ: np.ndarray) -> np.ndarray:
    """The organ's bounding-box centre, or the organ voxel nearest to it when the centre is outside the organ."""
    coords = np.argwhere(organ)
    centre = np.round((coords.min(0) + coords.max(0)) / 2.0).astype(int)
    if organ[tuple(centre)]:
        return centre
    return coords[np.argmin(((coords - centre) ** 2).sum(1))]


def _displacement(grid: np.ndarray, coords_a: np.ndarray, coords_b: np.ndarray, sizes: Sequence[int]) -> np.ndarray:
    """Cubic-spline interpolation of a control-point grid (``points x points``) at box coordinates (a, b)."""
    points = grid.shape[0]
    ga = coords_a * (points - 1) / max(sizes[0] - 1, 1)
    gb = coords_b * (points - 1) / max(sizes[1] - 1, 1)
    return ndimage.map_coordinates(grid, [ga, gb], order=3, mode="nearest")


def deformed_ellipsoid(
    voxels: np.ndarray,
    centre: np.ndarray,
    radii_vox: np.ndarray,
    sigma_vox: np.ndarray,
    rng: np.random.RandomState,
    points: int = CONTROL_POINTS,
) -> np.ndarray:
    """Whether each voxel (``N x 3`` integer indices) lies in the elastically deformed ellipsoid.

    The box is ``4 r`` voxels per axis centred on ``centre`` (the reference's); each axis pair gets a random
    ``points x points`` grid of displacements ``N(0, sigma^2)`` (per axis, in voxels) interpolated with cubic
    splines; a voxel takes the value of the voxel it is displaced to, rounded (nearest neighbour), outside the box
    it is empty. The three pair deformations are composed on the coordinates, last one first.
    """
    sizes = np.maximum(np.round(4 * radii_vox).astype(int), 4)
    origin = np.asarray(centre) - sizes // 2
    grids = [rng.normal(0.0, 1.0, size=(2, points, points)) for _ in AXIS_PAIRS]
    p = voxels.astype(np.float64) - origin  # box coordinates
    inside = np.all((p >= 0) & (p < sizes), axis=1)
    p, keep = p[inside], np.flatnonzero(inside)
    result = np.zeros(len(voxels), dtype=bool)
    if not len(p):
        return result
    for (a, b), grid in reversed(list(zip(AXIS_PAIRS, grids))):
        da = _displacement(grid[0] * sigma_vox[a], p[:, a], p[:, b], (sizes[a], sizes[b]))
        db = _displacement(grid[1] * sigma_vox[b], p[:, a], p[:, b], (sizes[a], sizes[b]))
        p = p.copy()
        p[:, a] = np.round(p[:, a] + da)
        p[:, b] = np.round(p[:, b] + db)
        valid = np.all((p >= 0) & (p < sizes), axis=1)  # displaced out of the box: constant 0
        p, keep = p[valid], keep[valid]
    com = sizes // 2
    value = (((p - com) / np.maximum(radii_vox, 1e-6)) ** 2).sum(1)
    result[keep[value <= 1.0]] = True
    return result


class TumorMaskGenerator:
    """Draw tumor masks inside an organ mask (see the module docstring for the rules).

    Args:
        classes: size classes: a preset (``"difftumor"``, ``"seed001"``), a statistics / ranges JSON path or dict
            (``tools data quartiles`` output, ``radius_ranges`` output), or a dict of :class:`SizeClass`.
        mixed_weights: class probabilities of ``tumor_type="mixed"``.
        large_at_center: centre large tumors on the organ's bounding-box centre (the reference's pancreas rule).
        size_measure: what the classes' radii measure: ``"ellipsoid"`` (the reference's: the ellipsoid's radii
            before the clipping to the organ) or ``"label"`` (the equivalent radius of the tumor in the label, after
            the clipping; the measure of classes computed from a data set's labels).
    """

    def __init__(
        self,
        classes: str | os.PathLike | Mapping[str, Any] | None = "difftumor",
        mixed_weights: Mapping[str, float] | None = None,
        large_at_center: bool = True,
        size_measure: str = "ellipsoid",
    ):
        if size_measure not in SIZE_MEASURES:
            raise ValueError(f"size_measure {size_measure!r}: expected one of {list(SIZE_MEASURES)}")
        self.classes = resolve_classes(classes)
        self.mixed_weights = dict(mixed_weights or DEFAULT_MIXED_WEIGHTS)
        self.large_at_center = large_at_center
        self.size_measure = size_measure

    def draw_parameters(self, rng: np.random.RandomState, tumor_class: str) -> list[dict[str, Any]]:
        """Radii and sigmas (mm, per axis / per draw) of the tumors of one draw of ``tumor_class``."""
        if tumor_class not in self.classes:
            raise ValueError(f"size class {tumor_class!r} is not defined here (have {sorted(self.classes)})")
        spec = self.classes[tumor_class]
        count = int(rng.randint(spec.count[0], spec.count[1] + 1))
        return [
            {
                "radii_mm": [float(r) for r in rng.uniform(spec.radius_mm[0], spec.radius_mm[1], size=3)],
                "sigma_mm": float(rng.uniform(*spec.sigma_mm)),
            }
            for _ in range(count)
        ]

    def __call__(
        self,
        organ: np.ndarray,
        rng: np.random.RandomState,
        tumor_type: str = "mixed",
        affine: np.ndarray | None = None,
    ) -> TumorDraw:
        """A :class:`TumorDraw` for the boolean ``organ`` mask (3D) with voxel geometry ``affine``."""
        organ = np.asarray(organ).astype(bool)
        if organ.ndim != 3:
            raise ValueError(f"organ mask must be 3D, got shape {organ.shape}")
        if not organ.any():
            raise ValueError("the organ mask is empty: no place for a tumor")
        tumor_class = choose_class(rng, tumor_type, self.mixed_weights)
        spacing = voxel_spacing(affine)
        axis = axial_axis(affine)
        organ_voxels = np.argwhere(organ)
        mask = np.zeros(organ.shape, dtype=bool)
        tumors = self.draw_parameters(rng, tumor_class)
        for tumor in tumors:
            if tumor_class == "large" and self.large_at_center:
                centre = _centre_of_box(organ)
            else:
                centre = _centre_in_slice_band(organ, rng, axis)
            radii_vox = np.asarray(tumor["radii_mm"]) / spacing
            sigma_vox = tumor["sigma_mm"] / spacing
            if self.size_measure == "label":
                inside = self._grown_to_target(organ_voxels, centre, radii_vox, sigma_vox, rng, spacing, tumor)
            else:
                inside = deformed_ellipsoid(organ_voxels, centre, radii_vox, sigma_vox, rng)
            if not inside.any():  # a sub-voxel tumor: keep its centre voxel so every drawn tumor exists
                inside = np.all(organ_voxels == centre, axis=1)
            mask[tuple(organ_voxels[inside].T)] = True
            tumor["centre_voxel"] = [int(c) for c in centre]
            tumor["voxels"] = int(inside.sum())
        return TumorDraw(mask=mask, tumor_class=tumor_class, tumors=tumors)

    @staticmethod
    def _grown_to_target(organ_voxels: np.ndarray, centre: np.ndarray, radii_vox: np.ndarray, sigma_vox: np.ndarray,
                         rng: np.random.RandomState, spacing: np.ndarray,
                         tumor: dict[str, Any]) -> np.ndarray:  # fmt: skip
        """``size_measure="label"``: the target is the equivalent radius of the drawn radii (their geometric mean);
        the same deformed ellipsoid (the same draws of ``rng``: its state is rewound for every size tried) is
        scaled until its organ part reaches the target. ``tumor`` records the target, the scale and the radius
        reached."""
        target_mm = float(np.prod(tumor["radii_mm"]) ** (1.0 / 3.0))
        voxel_mm3 = float(np.prod(spacing))
        state = rng.get_state()
        scale, inside, reached = 1.0, None, 0.0
        for _ in range(LABEL_SCALE_STEPS):
            rng.set_state(state)
            inside = deformed_ellipsoid(organ_voxels, centre, radii_vox * scale, sigma_vox * scale, rng)
            reached = (3.0 * float(inside.sum()) * voxel_mm3 / (4.0 * math.pi)) ** (1.0 / 3.0)
            if abs(reached - target_mm) <= LABEL_TOLERANCE * target_mm or (
                reached < target_mm and scale >= MAX_LABEL_SCALE
            ):
                break
            scale = min(MAX_LABEL_SCALE, scale * target_mm / max(reached, 0.5 * float(spacing.min())))
        tumor.update({"target_radius_mm": target_mm, "scale": float(scale), "label_radius_mm": reached})
        return inside


def equivalent_radius_mm(mask: np.ndarray, affine: np.ndarray | None = None) -> float:
    """Radius of the sphere with the mask's volume, ``(3 V / 4 pi)^(1/3)`` mm."""
    volume = float(np.count_nonzero(mask)) * float(np.prod(voxel_spacing(affine)))
    return (3.0 * volume / (4.0 * math.pi)) ** (1.0 / 3.0)
