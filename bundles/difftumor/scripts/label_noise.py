"""Label noise of seed 001 (section 2.4, Tables 2-3): elastic deformation of tumor labels at four levels.

Why this is not plain MONAI: ``Rand3DElasticd`` deforms image and label together with one smooth field over the
whole volume; seed 001 deforms the *tumor label alone* (the image stays), each tumor with its own control-point
grid, "x, y and z independently" (one 2D displacement field per axis pair). Here every connected tumor of the label
gets a grid of 3 x 3 control points per axis pair over a box of twice its extent (at least 16 mm), displacements
``N(0, sigma^2)`` per axis (mm, converted by the voxel spacing), cubic-spline interpolation and nearest-neighbour
resampling, pairs (0, 1), (1, 2), (0, 2) in turn (the same deformation as the tumor mask generator). Voxels that
leave the tumor become pancreas if they were inside the annotated pancreas + tumor, background otherwise; voxels
that join it become tumor.

Levels (the paper gives no numbers): ``low`` 1 mm, ``moderate`` 2 mm, ``high`` 3 mm, ``extreme`` 4 mm. The label
Dice each level produces is measured with ``python -m scripts.label_noise <dataset_dir>`` (from the bundle folder;
the numbers and the command are in ``docs/README.md``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform, RandomizableTransform
from scipy import ndimage

from .masks import AXIS_PAIRS, CONTROL_POINTS, voxel_spacing

NOISE_LEVELS_MM = {"low": 1.0, "moderate": 2.0, "high": 3.0, "extreme": 4.0}


def _sigma_mm(level: str | float) -> float:
    if isinstance(level, str):
        if level not in NOISE_LEVELS_MM:
            raise ValueError(f"noise level must be one of {list(NOISE_LEVELS_MM)} or a sigma in mm, got {level!r}")
        return NOISE_LEVELS_MM[level]
    return float(level)


def deform_mask(
    mask: np.ndarray,
    sigma_mm: float,
    rng: np.random.RandomState,
    affine: np.ndarray | None = None,
    min_box_mm: float = 16.0,
) -> np.ndarray:
    """One binary object elastically deformed (see the module docstring); same shape as ``mask``."""
    mask = np.asarray(mask, dtype=bool)
    if not mask.any() or sigma_mm <= 0:
        return mask.copy()
    spacing = voxel_spacing(affine)
    coords = np.argwhere(mask)
    low, high = coords.min(0), coords.max(0) + 1
    extent = np.maximum(high - low, np.ceil(min_box_mm / spacing / 2).astype(int))
    box_low, box_high = low - extent // 2 - 1, high + extent // 2 + 1  # twice the extent, centred on the object
    sizes = box_high - box_low
    sigma_vox = sigma_mm / spacing
    grids = [rng.normal(0.0, 1.0, size=(2, CONTROL_POINTS, CONTROL_POINTS)) for _ in AXIS_PAIRS]
    reach = np.ceil(4 * sigma_vox).astype(int) + 1
    out_low = np.maximum(low - reach, 0)
    out_high = np.minimum(high + reach, mask.shape)
    voxels = np.indices(out_high - out_low).reshape(3, -1).T + out_low
    p = (voxels - box_low).astype(np.float64)
    keep = np.arange(len(voxels))
    for (a, b), grid in reversed(list(zip(AXIS_PAIRS, grids))):
        scale = (CONTROL_POINTS - 1) / np.maximum(sizes[[a, b]] - 1, 1)
        at = [p[:, a] * scale[0], p[:, b] * scale[1]]
        da = ndimage.map_coordinates(grid[0] * sigma_vox[a], at, order=3, mode="nearest")
        db = ndimage.map_coordinates(grid[1] * sigma_vox[b], at, order=3, mode="nearest")
        p = p.copy()
        p[:, a] = np.round(p[:, a] + da)
        p[:, b] = np.round(p[:, b] + db)
    source = p.astype(int) + box_low
    valid = np.all((source >= 0) & (source < mask.shape), axis=1)
    result = np.zeros_like(mask)
    hit = np.zeros(len(voxels), dtype=bool)
    hit[valid] = mask[tuple(source[valid].T)]
    result[tuple(voxels[keep[hit]].T)] = True
    return result


def noisy_tumor_label(
    label: np.ndarray,
    level: str | float,
    rng: np.random.RandomState,
    affine: np.ndarray | None = None,
    tumor_value: int = 2,
    organ_value: int = 1,
) -> np.ndarray:
    """The label with each connected tumor deformed independently (see the module docstring)."""
    label = np.asarray(label)
    sigma = _sigma_mm(level)
    tumors, count = ndimage.label(label == tumor_value, structure=np.ones((3, 3, 3)))
    organ = (label == organ_value) | (label == tumor_value)
    noisy = np.zeros(label.shape, dtype=bool)
    for index in range(1, count + 1):
        noisy |= deform_mask(tumors == index, sigma, rng, affine)
    out = label.copy()
    out[(label == tumor_value) & organ] = organ_value
    out[noisy] = tumor_value
    return out


def dice(a: np.ndarray, b: np.ndarray) -> float:
    """Dice of two boolean masks (1.0 when both are empty)."""
    a, b = np.asarray(a, bool), np.asarray(b, bool)
    total = a.sum() + b.sum()
    return 1.0 if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


class NoisyTumorLabeld(RandomizableTransform, MapTransform):
    """Random label noise on the tumor label (``level``: ``low`` / ``moderate`` / ``high`` / ``extreme`` or a sigma
    in mm), applied with probability ``prob``; the image is not touched. Seeded through ``set_random_state``."""

    def __init__(
        self,
        keys: KeysCollection = "label",
        level: str | float = "moderate",
        prob: float = 1.0,
        tumor_value: int = 2,
        organ_value: int = 1,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        self.sigma_mm = _sigma_mm(level)
        self.tumor_value = tumor_value
        self.organ_value = organ_value
        self._seed = 0

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._seed = int(self.R.randint(0, 2**31 - 1))

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        self.randomize()
        if not self._do_transform:
            return d
        for key in self.key_iterator(d):
            value = d[key]
            array = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
            affine = getattr(value, "affine", None)
            affine = None if affine is None else np.asarray(affine.cpu() if torch.is_tensor(affine) else affine)
            rng = np.random.RandomState(self._seed)
            squeeze = array.ndim == 4
            noisy = noisy_tumor_label(array[0] if squeeze else array, self.sigma_mm, rng, affine,
                                      self.tumor_value, self.organ_value)  # fmt: skip
            noisy = noisy[None] if squeeze else noisy
            if torch.is_tensor(value):
                out = value.clone()
                out[...] = torch.as_tensor(noisy, dtype=value.dtype)
                d[key] = out
            else:
                d[key] = noisy.astype(array.dtype)
        return d


def measure(
    label_files: Sequence[str | Path], levels: Sequence[str] = tuple(NOISE_LEVELS_MM), seed: int = 0, repeats: int = 3
) -> dict[str, Any]:
    """Tumor Dice between the original and the noisy label of every file, per level: mean, sd, min, max, n."""
    import nibabel as nib

    rng = np.random.RandomState(seed)
    results: dict[str, list[float]] = {level: [] for level in levels}
    n_files = 0
    for path in label_files:
        image = nib.load(str(path))
        label = np.asarray(image.dataobj)
        if not np.any(label == 2):
            continue
        n_files += 1
        for level in levels:
            for _ in range(repeats):
                noisy = noisy_tumor_label(label, level, rng, image.affine)
                results[level].append(dice(label == 2, noisy == 2))
    table = {
        level: {
            "sigma_mm": NOISE_LEVELS_MM[level],
            "dice_mean": float(np.mean(v)) if v else None,
            "dice_sd": float(np.std(v)) if v else None,
            "dice_min": float(np.min(v)) if v else None,
            "dice_max": float(np.max(v)) if v else None,
            "n": len(v),
        }
        for level, v in results.items()
    }
    return {"n_labels_with_tumor": n_files, "repeats": repeats, "seed": seed, "levels": table}


def main(argv: Sequence[str] | None = None) -> int:
    """``python -m scripts.label_noise <dataset_dir|datalist.json> [--seed 0] [--repeats 3] [--section training]``."""
    parser = argparse.ArgumentParser(description="Tumor Dice of the label-noise levels on a data set's labels")
    parser.add_argument("dataset", help="MSD folder (dataset.json) or a MONAI datalist JSON")
    parser.add_argument("--section", default="training")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=None, help="also write the table as JSON")
    args = parser.parse_args(argv)
    from monai.data import load_decathlon_datalist

    source = Path(args.dataset)
    datalist = source / "dataset.json" if source.is_dir() else source
    records = load_decathlon_datalist(str(datalist), True, args.section, base_dir=str(datalist.parent))
    result = measure([r["label"] for r in records if r.get("label")], seed=args.seed, repeats=args.repeats)
    print(f"label noise on {result['n_labels_with_tumor']} tumor labels, {args.repeats} draws each, seed {args.seed}")
    print("| level | sigma (mm) | tumor Dice mean +- sd | min | max |")
    print("| --- | --- | --- | --- | --- |")
    for level, row in result["levels"].items():
        if row["n"]:
            print(f"| {level} | {row['sigma_mm']:g} | {row['dice_mean']:.3f} +- {row['dice_sd']:.3f} | "
                  f"{row['dice_min']:.3f} | {row['dice_max']:.3f} |")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
