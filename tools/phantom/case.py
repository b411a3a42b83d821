"""One phantom case: sample the scanner geometry and the anatomy, render HU, derive the MSD label map."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Sequence

import numpy as np

from tools.phantom.anatomy import ORGAN_LABELS, Tissue, build_anatomy, sample_body
from tools.phantom.appearance import PHASES, render
from tools.phantom.shapes import Grid, smooth_noise

ORIENTATIONS = ("RAS", "LPS")
#: Clinical scanner ranges used by ``spacing="scanner"``.
SCANNER_INPLANE_MM = (0.6, 0.9)
SCANNER_SLICE_MM = (1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 5.0)
#: Cranio-caudal coverage (mm) when the grid is derived from a field of view.
DEFAULT_Z_FOV_MM = 200.0
#: Tumor equivalent radius distribution when none is given: log-normal around 11 mm, like resectable PDAC.
TUMOR_RADIUS_MEDIAN_MM = 11.0
TUMOR_RADIUS_RANGE_MM = (3.0, 30.0)


@dataclass
class PhantomCase:
    """A rendered case: ``ct`` int16 HU, ``label`` uint8 (0 background, 1 pancreas, 2 tumor), ``organs`` uint8
    organ map (:data:`ORGAN_LABELS`, 0 outside the body), ``affine`` voxel-to-RAS-world mm, ``meta`` facts."""

    ct: np.ndarray
    label: np.ndarray
    organs: np.ndarray
    affine: np.ndarray
    meta: dict = field(default_factory=dict)


def case_generators(seed: int | Sequence[int]) -> dict[str, np.random.Generator]:
    """Independent random streams of one case: anatomy, tumor, scanner (geometry) and appearance.

    Splitting the streams keeps the anatomy of a patient identical between its non-contrast and portal-venous
    scans, and lets a tumor be added or removed without moving any organ.
    """
    entropy = list(seed) if isinstance(seed, (list, tuple)) else [int(seed)]
    children = np.random.SeedSequence(entropy).spawn(4)
    return {
        name: np.random.Generator(np.random.PCG64(ss))
        for name, ss in zip(("anatomy", "tumor", "scanner", "appearance"), children)
    }


def _grid_for(
    shape: Sequence[int] | None, spacing, body_half_width: float, rng: np.random.Generator, center_mm: Sequence[float]
) -> Grid:
    """The voxel grid: from a shape and a spacing, or derive the missing one from a field of view.

    ``spacing`` may be a 3-tuple (mm), ``None`` or ``"fit"`` (cover the body with ``shape`` voxels: the field of
    view is the body width plus a margin, varied per case like a technologist's choice), or ``"scanner"`` (sample
    clinical in-plane and slice spacings; ``shape`` then defaults to what covers that field of view).
    """
    fov_xy = 2 * body_half_width + rng.uniform(20, 60)
    if isinstance(spacing, str) and spacing == "scanner":
        inplane = rng.uniform(*SCANNER_INPLANE_MM)
        spacing = (inplane, inplane, float(rng.choice(SCANNER_SLICE_MM)))
        if shape is None:
            shape = (int(np.ceil(fov_xy / inplane)),) * 2 + (int(np.ceil(DEFAULT_Z_FOV_MM / spacing[2])),)
    elif spacing is None or (isinstance(spacing, str) and spacing == "fit"):
        shape = tuple(shape) if shape is not None else (160, 160, 80)
        spacing = (fov_xy / shape[0], fov_xy / shape[1], DEFAULT_Z_FOV_MM / shape[2])
    else:
        spacing = tuple(float(v) for v in spacing)
        if len(spacing) != 3 or min(spacing) <= 0:
            raise ValueError(f"spacing must be three positive numbers (mm), got {spacing}")
        if shape is None:
            shape = (
                int(np.ceil(fov_xy / spacing[0])),
                int(np.ceil(fov_xy / spacing[1])),
                int(np.ceil(DEFAULT_Z_FOV_MM / spacing[2])),
            )
    shape = tuple(int(v) for v in shape)
    if len(shape) != 3 or min(shape) < 8:
        raise ValueError(f"shape must be three integers >= 8, got {shape}")
    axes = [((np.arange(n) - (n - 1) / 2.0) * sp + c).astype(np.float64) for n, sp, c in zip(shape, spacing, center_mm)]
    return Grid(*axes)


def make_case(
    seed: int | Sequence[int] = 0,
    shape: Sequence[int] | None = (160, 160, 80),
    spacing=None,
    phase: str = "portal_venous",
    tumor: bool = False,
    tumor_radius_mm: float | tuple[float, float] | None = None,
    orientation: str = "RAS",
    z_center_mm: float = 5.0,
) -> PhantomCase:
    """Make one phantom case, deterministic per ``seed`` (same seed and options, same bytes).

    ``tumor`` adds one pancreatic tumor; its equivalent radius is ``tumor_radius_mm`` (a number, or a (low, high)
    range sampled uniformly) or, by default, drawn from a log-normal distribution around 11 mm.
    ``orientation`` is the array axis order written to disk: "RAS" or "LPS" (world positions do not change).
    """
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}, got {phase!r}")
    if orientation not in ORIENTATIONS:
        raise ValueError(f"orientation must be one of {ORIENTATIONS}, got {orientation!r}")
    rngs = case_generators(seed)
    body = sample_body(rngs["anatomy"])
    body_center_y = (body["anterior"] - body["posterior"]) / 2.0
    center = (0.0, body_center_y, z_center_mm + body["z_shift"])
    grid = _grid_for(shape, spacing, body["half_width"] * 1.05, rngs["scanner"], center)
    field_rng = np.random.Generator(np.random.PCG64(rngs["anatomy"].integers(2**63)))
    shape_noise = smooth_noise(field_rng, grid.shape, grid.spacing, 16.0)
    texture = smooth_noise(field_rng, grid.shape, grid.spacing, 6.0)
    texture_fine = smooth_noise(field_rng, grid.shape, grid.spacing, 3.0)

    radius = None
    if tumor:
        trng = rngs["tumor"]
        if tumor_radius_mm is None:
            radius = float(np.clip(trng.lognormal(np.log(TUMOR_RADIUS_MEDIAN_MM), 0.45), *TUMOR_RADIUS_RANGE_MM))
        elif np.ndim(tumor_radius_mm) == 0:
            radius = float(tumor_radius_mm)
        else:
            radius = float(trng.uniform(*tumor_radius_mm))
    anatomy = build_anatomy(grid, rngs["anatomy"], body, shape_noise, texture, rngs["tumor"] if tumor else None, radius)

    app_rng = rngs["appearance"]
    pancreas_fat = float(app_rng.uniform(0.0, 0.4))
    ct = render(anatomy.tissue, grid.spacing, phase, app_rng, texture, texture_fine, pancreas_fat)

    label = np.zeros(grid.shape, dtype=np.uint8)
    label[anatomy.organs == ORGAN_LABELS["pancreas"]] = 1
    label[np.isin(anatomy.tissue, [Tissue.TUMOR, Tissue.TUMOR_NECROSIS])] = 2
    organs = anatomy.organs

    spacing_v = grid.spacing
    affine = np.diag([spacing_v[0], spacing_v[1], spacing_v[2], 1.0])
    offset = np.array([0.0, rngs["scanner"].uniform(-60, 60), rngs["scanner"].uniform(-900, -500)])
    affine[:3, 3] = np.array([grid.xs[0], grid.ys[0], grid.zs[0]]) + offset  # scanner table coordinates
    if orientation == "LPS":
        ct, label, organs = (np.ascontiguousarray(a[::-1, ::-1, :]) for a in (ct, label, organs))
        flip = np.diag([-1.0, -1.0, 1.0, 1.0])
        flip[:2, 3] = [grid.shape[0] - 1, grid.shape[1] - 1]
        affine = affine @ flip

    meta = {
        "seed": list(seed) if isinstance(seed, (list, tuple)) else int(seed),
        "phase": phase,
        "orientation": orientation,
        "shape": list(grid.shape),
        "spacing_mm": [round(float(v), 4) for v in spacing_v],
        "has_tumor": bool((label == 2).any()),
        "pancreas_fat_fraction": round(pancreas_fat, 3),
        **anatomy.info,
    }
    return PhantomCase(ct=ct, label=label, organs=organs, affine=affine, meta=meta)
