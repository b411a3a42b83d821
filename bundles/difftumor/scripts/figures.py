"""Before / after figure of a synthesis: axial, coronal and sagittal slices through the largest synthetic tumor.

Why this is not plain MONAI: MONAI's plotting helpers make image grids for TensorBoard, not a before / after
comparison with the tumor outlined. ``python -m scripts.figures <original> <synthetic_ct> <synthetic_label> <png>``
(from the bundle folder) writes the PNG; window W400 L40, radiological orientation for RAS volumes.
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Sequence

import numpy as np


def _views(volume: np.ndarray, centre: Sequence[int], half: Sequence[int] | None = None) -> list[np.ndarray]:
    """Axial, coronal, sagittal slices through ``centre`` (optionally ``centre +- half`` voxels per axis), RAS arrays
    in radiological display: axial (patient right on the left, anterior up), coronal (right on the left, superior
    up), sagittal (anterior on the left, superior up)."""
    if half is not None:
        box = tuple(slice(max(int(c) - int(h), 0), int(c) + int(h) + 1) for c, h in zip(centre, half))
        centre = [int(c) - b.start for c, b in zip(centre, box)]
        volume = volume[box]
    x, y, z = centre
    return [volume[:, :, z].T[::-1, ::-1], volume[:, y, :].T[::-1, ::-1], volume[x, :, :].T[::-1, ::-1]]


def before_after_png(
    before: np.ndarray,
    after: np.ndarray,
    label: np.ndarray,
    path: str | Path,
    spacing: Sequence[float] = (1.0, 1.0, 1.0),
    window: Sequence[float] = (-160.0, 240.0),
    title: str = "",
    field_of_view_mm: float | None = 100.0,
) -> Path:
    """Write a 2 x 3 PNG (before / after, three planes through the tumor's largest component, a
    ``field_of_view_mm`` box around it; ``None`` = whole slices) and return its path."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from scipy import ndimage

    tumor = np.asarray(label) == 2
    if tumor.any():
        components, count = ndimage.label(tumor)
        largest = np.argmax(np.bincount(components.ravel())[1:]) + 1
        centre = np.round(np.argwhere(components == largest).mean(0)).astype(int)
    else:
        centre = np.array(before.shape) // 2
    sx, sy, sz = (float(s) for s in spacing)
    aspects = [sy / sx, sz / sx, sz / sy]
    half = None if field_of_view_mm is None else [int(np.ceil(field_of_view_mm / 2 / s)) for s in (sx, sy, sz)]
    figure, axes = plt.subplots(2, 3, figsize=(12, 8))
    for row, (name, volume) in enumerate((("before", before), ("after", after))):
        views = zip(_views(np.asarray(volume, float), centre, half), _views(tumor, centre, half))
        for col, (view, outline) in enumerate(views):
            axis = axes[row, col]
            axis.imshow(view, cmap="gray", vmin=window[0], vmax=window[1], aspect=aspects[col], interpolation="nearest")
            if row == 1 and outline.any():
                axis.contour(outline.astype(float), levels=[0.5], colors="red", linewidths=0.8)
            axis.set_title(f"{name}: {('axial', 'coronal', 'sagittal')[col]}")
            axis.axis("off")
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=80)
    plt.close(figure)
    return path


def main(argv: Sequence[str] | None = None) -> int:
    import nibabel as nib

    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 4:
        print("usage: python -m scripts.figures <original_ct> <synthetic_ct> <synthetic_label> <out.png>")
        return 2
    original, synthetic, label = (nib.load(p) for p in args[:3])
    before_after_png(
        np.asarray(original.dataobj),
        np.asarray(synthetic.dataobj),
        np.asarray(label.dataobj),
        args[3],
        spacing=original.header.get_zooms()[:3],
        title=f"{Path(args[1]).name}: {str(synthetic.header['descrip'].astype(str))}",
    )
    print(args[3])
    return 0


if __name__ == "__main__":
    sys.exit(main())
