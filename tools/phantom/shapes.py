"""Geometric primitives of the phantom, evaluated on a voxel grid in world millimetres.

Everything is vectorised numpy on the bounding box of each structure (never on the whole volume), which is what
keeps a 160x160x80 case under a second. All operations are deterministic, so the same seed gives the same bytes.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass
class Grid:
    """Voxel centres along each array axis, in world mm (RAS: +x right, +y anterior, +z superior)."""

    xs: np.ndarray
    ys: np.ndarray
    zs: np.ndarray

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.xs.size, self.ys.size, self.zs.size)

    @property
    def spacing(self) -> np.ndarray:
        return np.array([self.xs[1] - self.xs[0], self.ys[1] - self.ys[0], self.zs[1] - self.zs[0]])

    def box(self, lo, hi) -> tuple[slice, slice, slice] | None:
        """Index slices of the voxels whose centres lie in the mm box [lo, hi]; None if the box misses the grid."""
        slices = []
        for axis, (a, b) in zip((self.xs, self.ys, self.zs), zip(lo, hi)):
            i0 = int(np.searchsorted(axis, a, side="left"))
            i1 = int(np.searchsorted(axis, b, side="right"))
            if i1 <= i0:
                return None
            slices.append(slice(i0, i1))
        return tuple(slices)

    def coords(self, box: tuple[slice, slice, slice]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Broadcastable (n,1,1), (1,m,1), (1,1,k) coordinate arrays of a box."""
        return (
            self.xs[box[0]][:, None, None],
            self.ys[box[1]][None, :, None],
            self.zs[box[2]][None, None, :],
        )


def rotation(yaw_deg: float = 0.0, pitch_deg: float = 0.0, roll_deg: float = 0.0) -> np.ndarray:
    """Rotation matrix about z (yaw), then y (pitch), then x (roll); columns are the local axes in world."""
    a, b, c = np.deg2rad([yaw_deg, pitch_deg, roll_deg])
    rz = np.array([[np.cos(a), -np.sin(a), 0], [np.sin(a), np.cos(a), 0], [0, 0, 1]])
    ry = np.array([[np.cos(b), 0, np.sin(b)], [0, 1, 0], [-np.sin(b), 0, np.cos(b)]])
    rx = np.array([[1, 0, 0], [0, np.cos(c), -np.sin(c)], [0, np.sin(c), np.cos(c)]])
    return rz @ ry @ rx


def ellipsoid_radius(grid: Grid, box, center, semi_axes, rot: np.ndarray | None = None) -> np.ndarray:
    """Normalised ellipsoidal radius over a box: < 1 inside, 1 on the surface (a smooth implicit function)."""
    x, y, z = grid.coords(box)
    d = (x - center[0], y - center[1], z - center[2])
    if rot is None:
        return np.sqrt((d[0] / semi_axes[0]) ** 2 + (d[1] / semi_axes[1]) ** 2 + (d[2] / semi_axes[2]) ** 2)
    total = 0.0
    for k in range(3):
        u = rot[0, k] * d[0] + rot[1, k] * d[1] + rot[2, k] * d[2]
        total = total + (u / semi_axes[k]) ** 2
    return np.sqrt(total)


def ellipsoid_box(center, semi_axes, rot: np.ndarray | None = None, margin: float = 1.2):
    """Axis-aligned mm bounding box of an ellipsoid (loosened by ``margin`` for boundary noise)."""
    semi = np.asarray(semi_axes, dtype=float)
    if rot is None:
        half = semi
    else:
        half = np.sqrt(((np.abs(rot) * semi[None, :]) ** 2).sum(axis=1))
    half = half * margin
    return np.asarray(center) - half, np.asarray(center) + half


def superellipse_radius(
    grid: Grid,
    cx: float,
    cy: float,
    a: float,
    b_ant: float,
    b_post: float,
    power: float,
    power_post: float,
    width_taper: np.ndarray | None = None,
) -> np.ndarray:
    """Normalised radius (< 1 inside) of an axial body cross-section over the whole grid.

    A superellipse, flatter on the back: ``y`` grows anteriorly; above ``cy`` it uses ``b_ant`` and ``power``,
    below ``b_post`` and ``power_post``, which gives the rounded belly and the flat back of a supine patient.
    ``width_taper`` (one factor per slice) widens or narrows the half-width ``a`` along z. Built from 1D and 2D
    factors so that only two operations touch the full volume.
    """
    dy = grid.ys - cy
    p = np.where(dy >= 0, power, power_post)
    b = np.where(dy >= 0, b_ant, b_post)
    x_term = (np.abs(grid.xs - cx)[:, None] / a) ** p[None, :]  # (x, y)
    y_term = (np.abs(dy) / b) ** p  # (y,)
    taper = np.ones(grid.zs.size) if width_taper is None else np.asarray(width_taper, dtype=float)
    z_factor = taper[None, :] ** (-p[:, None])  # (y, z)
    return (x_term[:, :, None] * z_factor[None, :, :] + y_term[None, :, None]).astype(np.float32)


def catmull_rom(points: np.ndarray, samples_per_segment: int = 6) -> np.ndarray:
    """A smooth curve through control points (centripetal-free uniform Catmull-Rom), endpoints included."""
    pts = np.asarray(points, dtype=float)
    if len(pts) < 3:
        t = np.linspace(0, 1, samples_per_segment * max(1, len(pts) - 1) + 1)[:, None]
        return pts[0] + t * (pts[-1] - pts[0])
    padded = np.vstack([2 * pts[0] - pts[1], pts, 2 * pts[-1] - pts[-2]])
    out = []
    t = np.linspace(0, 1, samples_per_segment, endpoint=False)[:, None]
    for i in range(1, len(padded) - 2):
        p0, p1, p2, p3 = padded[i - 1], padded[i], padded[i + 1], padded[i + 2]
        out.append(
            0.5
            * (2 * p1 + (-p0 + p2) * t + (2 * p0 - 5 * p1 + 4 * p2 - p3) * t**2 + (-p0 + 3 * p1 - 3 * p2 + p3) * t**3)
        )
    out.append(pts[-1][None, :])
    return np.vstack(out)


def resample_radii(control_radii, n_out: int) -> np.ndarray:
    """Radii at ``n_out`` evenly spaced curve samples, linearly interpolated between control points."""
    control_radii = np.asarray(control_radii, dtype=float)
    return np.interp(np.linspace(0, 1, n_out), np.linspace(0, 1, len(control_radii)), control_radii)


def tube_box(curve: np.ndarray, radii: np.ndarray, margin: float = 1.3):
    """Axis-aligned mm bounding box of a tube of varying radius around a curve."""
    r = float(np.max(radii)) * margin
    return curve.min(axis=0) - r, curve.max(axis=0) + r


def tube_distance(grid: Grid, box, curve: np.ndarray, radii: np.ndarray, scale=(1.0, 1.0, 1.0), reach: float = 1.6):
    """Distance from each voxel of a box to a polyline, normalised by the local tube radius.

    Returns ``(normalised, arc, dist_mm)``: ``normalised`` < 1 inside the tube, ``arc`` the curve parameter in [0, 1]
    of the closest point (head-to-tail position along a pancreas, say) and ``dist_mm`` the distance in mm.
    ``scale`` squashes the tube's cross-section per world axis (e.g. a flattened vein). Each segment only visits
    the voxels within ``reach`` radii of it, so a long winding bowel loop costs about its own volume; farther
    voxels keep ``inf``.
    """
    shape = tuple(sl.stop - sl.start for sl in box)
    best = np.full(shape, np.inf, dtype=np.float32)
    best_arc = np.zeros(shape, dtype=np.float32)
    best_dist = np.full(shape, np.inf, dtype=np.float32)
    seg_lengths = np.linalg.norm(np.diff(curve, axis=0), axis=1)
    cum = np.concatenate([[0.0], np.cumsum(seg_lengths)])
    total = max(cum[-1], 1e-6)
    origin = np.array([grid.xs[box[0].start], grid.ys[box[1].start], grid.zs[box[2].start]])
    spacing = grid.spacing
    for k in range(len(curve) - 1):
        a, b = curve[k], curve[k + 1]
        r = max(radii[k], radii[k + 1]) * reach / min(scale)
        lo = np.floor((np.minimum(a, b) - r - origin) / spacing).astype(int)
        hi = np.ceil((np.maximum(a, b) + r - origin) / spacing).astype(int) + 1
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, shape)
        if (hi <= lo).any():
            continue
        sub = tuple(slice(int(start), int(stop)) for start, stop in zip(lo, hi))
        x = grid.xs[box[0]][sub[0]][:, None, None]
        y = grid.ys[box[1]][sub[1]][None, :, None]
        z = grid.zs[box[2]][sub[2]][None, None, :]
        norm, t, dist = _segment_distance(x, y, z, a, b, radii[k], radii[k + 1], scale)
        closer = norm < best[sub]
        best[sub] = np.where(closer, norm, best[sub])
        best_arc[sub] = np.where(closer, (cum[k] + t * seg_lengths[k]) / total, best_arc[sub])
        best_dist[sub] = np.where(closer, dist, best_dist[sub])
    return best, best_arc, best_dist


def _segment_distance(x, y, z, a, b, ra, rb, scale):
    """Normalised distance, segment parameter and mm distance of points to one tube segment."""
    ab = b - a
    denom = float(ab @ ab) or 1e-9
    t = ((x - a[0]) * ab[0] + (y - a[1]) * ab[1] + (z - a[2]) * ab[2]) / denom
    t = np.clip(t, 0.0, 1.0)
    dx = (x - a[0] - t * ab[0]) / scale[0]
    dy = (y - a[1] - t * ab[1]) / scale[1]
    dz = (z - a[2] - t * ab[2]) / scale[2]
    dist = np.sqrt(dx * dx + dy * dy + dz * dz)
    return dist / (ra + t * (rb - ra)), t, dist


def upsample_linear(coarse: np.ndarray, out_shape: tuple[int, ...]) -> np.ndarray:
    """Separable linear interpolation of a coarse field onto a finer grid spanning the same extent.

    Written with gathers and lerps rather than a BLAS product so that the result is bit-for-bit reproducible
    whatever the thread count.
    """
    field = coarse.astype(np.float32)
    for axis, n_out in enumerate(out_shape):
        n_in = field.shape[axis]
        pos = np.linspace(0, n_in - 1, n_out, dtype=np.float64)
        i0 = np.minimum(np.floor(pos).astype(np.int64), n_in - 2)
        w = (pos - i0).astype(np.float32)
        shape = [1] * field.ndim
        shape[axis] = n_out
        w = w.reshape(shape)
        field = np.take(field, i0, axis=axis) * (1 - w) + np.take(field, i0 + 1, axis=axis) * w
    return field


def smooth_noise(rng: np.random.Generator, shape: tuple[int, int, int], spacing, correlation_mm: float) -> np.ndarray:
    """A zero-mean, unit-variance random field with the given correlation length, on the full grid.

    Drawn on a coarse grid (about ``correlation_mm / 2`` per cell), smoothed there and linearly upsampled: cheap,
    smooth, and deterministic per generator state.
    """
    spacing = np.asarray(spacing, dtype=float)
    extent = np.asarray(shape) * spacing
    cell = max(correlation_mm / 2.0, float(spacing.min()))  # never finer than the output grid
    coarse_shape = tuple(int(max(4, np.ceil(e / cell) + 3)) for e in extent)
    coarse = rng.standard_normal(coarse_shape).astype(np.float32)
    coarse = ndi.gaussian_filter(coarse, sigma=1.0, mode="wrap")
    coarse /= max(float(coarse.std()), 1e-6)
    return upsample_linear(coarse, shape)
