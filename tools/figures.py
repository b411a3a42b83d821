"""Figures a person would rather look at than read: slices in radiological convention, overlays, histograms.

All views are shown the way a radiologist reads them whatever the file's orientation: axial with anterior up and
the patient's right on the viewer's left, coronal and sagittal with superior up, aspect ratio from the spacing.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import nibabel as nib  # noqa: E402
import numpy as np  # noqa: E402

from tools.io import atomic_path, voxel_spacing  # noqa: E402

#: Abdomen soft-tissue window (level 40, width 400), the window of every CT figure here.
ABDOMEN_WINDOW = (-160.0, 240.0)


def to_ras(array: np.ndarray, affine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Reorder/flip axes so that the array is RAS (i -> right, j -> anterior, k -> superior); returns new affine."""
    ornt = nib.orientations.io_orientation(affine)
    ras = nib.orientations.axcodes2ornt(("R", "A", "S"))
    transform = nib.orientations.ornt_transform(ornt, ras)
    out = nib.orientations.apply_orientation(array, transform)
    new_affine = affine @ nib.orientations.inv_ornt_aff(transform, array.shape)
    return np.ascontiguousarray(out), new_affine


def plane(volume_ras: np.ndarray, spacing: Sequence[float], view: str, index: int) -> tuple[np.ndarray, float]:
    """A 2D image of a RAS volume in radiological display order, and the aspect ratio for ``imshow``."""
    sx, sy, sz = spacing
    if view == "axial":
        return volume_ras[::-1, ::-1, index].T, sy / sx
    if view == "coronal":
        return volume_ras[::-1, index, ::-1].T, sz / sx
    if view == "sagittal":
        return volume_ras[index, ::-1, ::-1].T, sz / sy
    raise ValueError(f"view must be axial, coronal or sagittal, got {view!r}")


def center_of(mask_ras: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Voxel centre of a mask (e.g. the pancreas), or of the volume when the mask is empty or absent."""
    if mask_ras is not None and mask_ras.any():
        return tuple(int(v) for v in np.round(np.argwhere(mask_ras).mean(axis=0)))
    return tuple(int(n // 2) for n in shape)


def show_views(
    axes_row,
    volume: np.ndarray,
    affine: np.ndarray,
    focus: np.ndarray | None = None,
    contour: np.ndarray | None = None,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    title: str = "",
) -> None:
    """Draw axial, coronal and sagittal slices through ``focus``'s centre on three matplotlib axes."""
    vol, aff = to_ras(volume, affine)
    spacing = voxel_spacing(aff)
    foc = to_ras(focus, affine)[0] > 0 if focus is not None else None
    con = to_ras(contour, affine)[0] if contour is not None else None
    center = center_of(foc, vol.shape)
    for ax, view, idx in zip(axes_row, ("axial", "coronal", "sagittal"), (center[2], center[1], center[0])):
        img, aspect = plane(vol, spacing, view, idx)
        ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
        if con is not None:
            lab, _ = plane(con, spacing, view, idx)
            if lab.max() > 0:
                ax.contour(
                    lab,
                    levels=np.arange(0.5, lab.max() + 0.5),
                    colors=["yellow", "red", "cyan"][: int(lab.max())],
                    linewidths=0.8,
                )
        ax.set_title(f"{title} {view}".strip() if view == "axial" else view, fontsize=8)
        ax.axis("off")


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)
