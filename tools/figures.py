"""Figures a person would rather look at than read: slices in radiological convention, overlays, histograms.

All views are shown the way a radiologist reads them whatever the file's orientation: axial with anterior up and
the patient's right on the viewer's left, coronal and sagittal with superior up, aspect ratio from the spacing, the
patient's directions written on the image edges (:func:`mark_orientation`), the window named as ``W400 L40``, and
the pancreas (yellow) and tumor (red) outlined (:func:`outline_labels`). Views go through the tumor's largest
cross-section, or the pancreas's when there is no tumor (:func:`focus_slices`).
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
#: Label values of the pancreas and tumor labels, and the colours their outlines are drawn in.
PANCREAS, TUMOR = 1, 2
OUTLINE_COLORS = {PANCREAS: "yellow", TUMOR: "red"}
#: The patient's directions on the (left, right, top, bottom) edges of each view of :func:`plane`.
EDGE_LETTERS = {"axial": ("R", "L", "A", "P"), "coronal": ("R", "L", "S", "I"), "sagittal": ("A", "P", "S", "I")}


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


def focus_slices(label_ras: np.ndarray | None, shape: Sequence[int]) -> tuple[int, int, int]:
    """Slice indices (sagittal i, coronal j, axial k) of a RAS label map that show the most of what matters: the
    tumor's largest cross-section (label 2) in each direction when there is a tumor, else the pancreas's (label > 0;
    a boolean mask counts as pancreas); the volume's centre when the label is empty or absent."""
    if label_ras is None:
        return center_of(None, shape)
    label_ras = np.asarray(label_ras)
    target = label_ras == TUMOR if (label_ras == TUMOR).any() else label_ras > 0
    if not target.any():
        return center_of(None, shape)
    axes = range(3)
    return tuple(int(np.argmax(target.sum(axis=tuple(a for a in axes if a != axis)))) for axis in axes)


def window_name(window: Sequence[float] = ABDOMEN_WINDOW) -> str:
    """A display window as radiologists write it, width and level: (-160, 240) -> ``W400 L40``."""
    lo, hi = window
    return f"W{hi - lo:.0f} L{(hi + lo) / 2:.0f}"


def mark_orientation(ax, view: str, fontsize: float = 8) -> None:
    """The patient's directions on the four edges of a view drawn by :func:`plane` (radiological convention: the
    patient's right on the viewer's left in axial and coronal views, anterior on the left in sagittal ones)."""
    from matplotlib import patheffects

    outline = [patheffects.withStroke(linewidth=2, foreground="black")]
    left, right, top, bottom = EDGE_LETTERS[view]
    for (x, y, ha, va), letter in zip(
        ((0.02, 0.5, "left", "center"), (0.98, 0.5, "right", "center"), (0.5, 0.98, "center", "top"),
         (0.5, 0.02, "center", "bottom")),
        (left, right, top, bottom),
    ):  # fmt: skip
        ax.text(x, y, letter, transform=ax.transAxes, ha=ha, va=va, color="white", fontsize=fontsize,
                fontweight="bold", path_effects=outline)  # fmt: skip


def outline_labels(ax, label_2d: np.ndarray, linewidth: float = 0.9) -> None:
    """Outline the pancreas (labels 1 + 2, i.e. the whole gland with its tumor) and the tumor (label 2) of a 2D
    label slice in their colours (:data:`OUTLINE_COLORS`)."""
    for value, mask in ((PANCREAS, label_2d >= PANCREAS), (TUMOR, label_2d == TUMOR)):
        if mask.any():
            ax.contour(mask.astype(np.float32), levels=[0.5], colors=[OUTLINE_COLORS[value]], linewidths=linewidth)


def outline_legend(fig, **kwargs) -> None:
    """A figure legend naming the outline colours of :func:`outline_labels`."""
    from matplotlib.lines import Line2D

    handles = [Line2D([], [], color=OUTLINE_COLORS[v], label=n) for v, n in ((PANCREAS, "pancreas"), (TUMOR, "tumor"))]
    fig.legend(handles=handles, title="outlines", fontsize=8, title_fontsize=8, **kwargs)


def show_slice(
    ax,
    volume_ras: np.ndarray,
    spacing: Sequence[float],
    view: str,
    index: int,
    contour_ras: np.ndarray | None = None,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    title: str = "",
    fontsize: float = 8,
) -> None:
    """One view of a RAS volume: the slice in ``window``, orientation letters on its edges, the label outlines of
    ``contour_ras`` (same grid) and ``title`` above it."""
    img, aspect = plane(volume_ras, spacing, view, index)
    ax.imshow(img, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspect, interpolation="bilinear")
    if contour_ras is not None:
        outline_labels(ax, plane(np.asarray(contour_ras), spacing, view, index)[0])
    mark_orientation(ax, view, fontsize=fontsize)
    ax.set_title(title, fontsize=fontsize)
    ax.set_xticks([])
    ax.set_yticks([])


def show_views(
    axes_row,
    volume: np.ndarray,
    affine: np.ndarray,
    focus: np.ndarray | None = None,
    contour: np.ndarray | None = None,
    window: tuple[float, float] = ABDOMEN_WINDOW,
    title: str = "",
) -> None:
    """Draw axial, coronal and sagittal slices on three matplotlib axes, each through the tumor's largest
    cross-section of the label map ``focus`` (the pancreas's when there is no tumor; :func:`focus_slices`), with
    orientation letters, the window, and the outlines of the label map ``contour`` when given."""
    vol, aff = to_ras(volume, affine)
    spacing = voxel_spacing(aff)
    foc = to_ras(np.asarray(focus), affine)[0] if focus is not None else None
    con = to_ras(np.asarray(contour), affine)[0] if contour is not None else None
    i, j, k = focus_slices(foc, vol.shape)
    for ax, view, idx, size in zip(axes_row, ("axial", "coronal", "sagittal"), (k, j, i), vol.shape[::-1]):
        name = f"{view} {idx + 1}/{size}, {window_name(window)}"
        show_slice(ax, vol, spacing, view, idx, con, window, f"{title}\n{name}" if title and view == "axial" else name)


def save_figure(fig, path: str | os.PathLike, dpi: int = 110) -> Path:
    """Save a matplotlib figure as PNG atomically and close it."""
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=dpi, bbox_inches="tight", format="png")
    plt.close(fig)
    return Path(path)
