"""Segmentation and detection metrics of the pancreas / tumor evaluation, as plain functions on label arrays.

Why this is not plain MONAI: MONAI computes Dice, NSD (``compute_surface_dice``) and HD95
(``compute_hausdorff_distance``) per channel, and these functions call them; what it lacks is (1) the evaluation
regions of this task (pancreas = labels 1 and 2, the whole organ with its tumor, so that binary and tumor models
compare on the same target; tumor = label 2), (2) one documented convention for empty masks, (3) lesion-level
detection: connected components of the ground-truth tumor, their equivalent radius ``(3 V / 4 pi)^(1/3)`` in mm and
sensitivity per radius bin [0,5), [5,10), [10,15), [15,20), >=20 mm (DiffTumor / seed 001 report early-tumor
sensitivity), (4) patient-level specificity on healthy scans and (5) a CSV writer for per-case and summary tables.
``tools`` imports these functions for its studies, so they take numpy arrays and spacings, not engines.

Conventions (all distances in mm, computed with the voxel spacing of the grid the arrays live on):

- Dice / NSD / HD95 of a region: ground truth and prediction both empty -> NaN (nothing to measure); ground truth
  empty but prediction not -> Dice 0, NSD 0, HD95 NaN; ground truth present but prediction empty -> Dice 0, NSD 0,
  HD95 +inf. Summaries average a region over the cases whose ground truth contains it, over finite values, and
  report how many values were not finite.
- Components use full (26-) connectivity in 3D. Predicted tumor components smaller than ``min_tumor_mm3`` are
  removed before detection and specificity (speckle is not a detection); 0 keeps everything.
- A ground-truth lesion is detected ("hit") when any voxel of it is covered by the (filtered) predicted tumor.
- A predicted tumor component (after that filter) that touches no ground-truth tumor voxel is a false-positive
  lesion; summaries report them per scan.
- Rates (sensitivity per bin, specificity) carry a Wilson score 95 % interval (``ci_low``, ``ci_high``): with 20-40
  lesions a bin's sensitivity is only known to about +-0.15, and the tables say so.
- Patient-level: a scan is predicted positive when a predicted tumor component of at least ``min_tumor_mm3``
  remains; specificity = healthy scans predicted negative / healthy scans (NaN when there is no healthy scan);
  patient sensitivity likewise on scans with a tumor.
"""

from __future__ import annotations

import csv
import math
import os
import tempfile
import warnings
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import ndimage

#: evaluation regions: name -> label values that form it (MSD Task07: 1 pancreas, 2 tumor)
REGIONS: dict[str, tuple[int, ...]] = {"pancreas": (1, 2), "tumor": (2,)}
#: lower edges of the equivalent-radius bins in mm; the last bin is open (>= 20 mm)
RADIUS_EDGES_MM: tuple[float, ...] = (0.0, 5.0, 10.0, 15.0, 20.0)
NSD_TOLERANCE_MM = 2.0
MIN_TUMOR_MM3 = 50.0


# ----------------------------------------------------------------------------------------------------------------
# geometry helpers


def spacing_from_affine(affine: Any) -> tuple[float, ...]:
    """Voxel size in mm along each array axis: the norms of the affine's first three columns."""
    matrix = np.asarray(affine.cpu() if torch.is_tensor(affine) else affine, dtype=np.float64)
    return tuple(float(v) for v in np.linalg.norm(matrix[:3, :3], axis=0))


def _array(mask: Any) -> np.ndarray:
    """A numpy array of a tensor / MetaTensor / array, without a leading channel axis of size 1."""
    array = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    return array


def region_mask(labels: Any, values: Iterable[int]) -> np.ndarray:
    """Boolean mask of the voxels whose label is one of ``values``."""
    return np.isin(np.rint(_array(labels)).astype(np.int64), list(values))


def equivalent_radius_mm(volume_mm3: float) -> float:
    """Radius of the sphere with the same volume: ``(3 V / (4 pi))^(1/3)``."""
    return float((3.0 * float(volume_mm3) / (4.0 * math.pi)) ** (1.0 / 3.0))


def radius_bin(radius_mm: float, edges: Sequence[float] = RADIUS_EDGES_MM) -> str:
    """The bin label of a radius: ``"[0,5)"``, ..., ``">=20"`` for the default edges."""
    edges = list(edges)
    for low, high in zip(edges[:-1], edges[1:]):
        if low <= radius_mm < high:
            return f"[{low:g},{high:g})"
    if radius_mm >= edges[-1]:
        return f">={edges[-1]:g}"
    raise ValueError(f"radius {radius_mm} is below the first bin edge {edges[0]}")


def bin_labels(edges: Sequence[float] = RADIUS_EDGES_MM) -> list[str]:
    """All bin labels in order."""
    edges = list(edges)
    return [f"[{low:g},{high:g})" for low, high in zip(edges[:-1], edges[1:])] + [f">={edges[-1]:g}"]


def connected_components(mask: Any, connectivity: int = 3) -> tuple[np.ndarray, int]:
    """``(component ids, count)``; ``connectivity`` 3 = 26-neighbourhood in 3D, 1 = 6-neighbourhood."""
    array = _array(mask).astype(bool)
    structure = ndimage.generate_binary_structure(array.ndim, connectivity)
    labelled, count = ndimage.label(array, structure=structure)
    return labelled, int(count)


def remove_small_components(
    mask: Any, spacing: Sequence[float], min_volume_mm3: float, connectivity: int = 3
) -> np.ndarray:
    """The mask without its components smaller than ``min_volume_mm3`` (0 keeps all)."""
    array = _array(mask).astype(bool)
    if min_volume_mm3 <= 0 or not array.any():
        return array
    labelled, count = connected_components(array, connectivity)
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(labelled.ravel(), minlength=count + 1) * voxel_mm3
    keep = sizes >= min_volume_mm3
    keep[0] = False
    return keep[labelled]


# ----------------------------------------------------------------------------------------------------------------
# overlap and surface metrics of one region


def dice(pred: Any, gt: Any) -> float:
    """Dice of two boolean masks with the module's empty-mask convention."""
    p, g = _array(pred).astype(bool), _array(gt).astype(bool)
    if not g.any():
        return math.nan if not p.any() else 0.0
    return float(2.0 * np.logical_and(p, g).sum() / (p.sum() + g.sum()))


def _one_channel_batch(mask: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(mask, dtype=np.float32))[None, None]


# MONAI 1.5's own surface-distance code passes a deprecated argument to ``get_mask_edges``; that warning is not ours
_MONAI_EDGE_WARNING = ".*always_return_as_numpy.*"


def surface_dice(pred: Any, gt: Any, spacing: Sequence[float], tolerance_mm: float = NSD_TOLERANCE_MM) -> float:
    """Normalised surface Dice (NSD) at ``tolerance_mm`` with MONAI's ``compute_surface_dice`` (euclidean, mm)."""
    from monai.metrics import compute_surface_dice

    p, g = _array(pred).astype(bool), _array(gt).astype(bool)
    if not g.any():
        return math.nan if not p.any() else 0.0
    if not p.any():
        return 0.0
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MONAI_EDGE_WARNING)
        value = compute_surface_dice(
            _one_channel_batch(p),
            _one_channel_batch(g),
            class_thresholds=[float(tolerance_mm)],
            include_background=True,
            distance_metric="euclidean",
            spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


def hausdorff95(pred: Any, gt: Any, spacing: Sequence[float]) -> float:
    """95th-percentile symmetric Hausdorff distance in mm with MONAI's ``compute_hausdorff_distance``."""
    from monai.metrics import compute_hausdorff_distance

    p, g = _array(pred).astype(bool), _array(gt).astype(bool)
    if not g.any():
        return math.nan
    if not p.any():
        return math.inf
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=_MONAI_EDGE_WARNING)
        value = compute_hausdorff_distance(
            _one_channel_batch(p),
            _one_channel_batch(g),
            include_background=True,
            distance_metric="euclidean",
            percentile=95,
            spacing=[float(s) for s in spacing],
        )
    return float(value.reshape(-1)[0])


def region_metrics(
    pred_labels: Any,
    gt_labels: Any,
    spacing: Sequence[float],
    regions: Mapping[str, Sequence[int]] = REGIONS,
    tolerance_mm: float = NSD_TOLERANCE_MM,
) -> dict[str, float]:
    """``{"<region>_dice", "<region>_nsd", "<region>_hd95", "<region>_gt_voxels", "<region>_pred_voxels"}``."""
    out: dict[str, float] = {}
    for name, values in regions.items():
        p, g = region_mask(pred_labels, values), region_mask(gt_labels, values)
        out[f"{name}_dice"] = dice(p, g)
        out[f"{name}_nsd"] = surface_dice(p, g, spacing, tolerance_mm)
        out[f"{name}_hd95"] = hausdorff95(p, g, spacing)
        out[f"{name}_gt_voxels"] = int(g.sum())
        out[f"{name}_pred_voxels"] = int(p.sum())
    return out


# ----------------------------------------------------------------------------------------------------------------
# lesion-level detection and patient-level decisions


def detect_lesions(
    pred_tumor: Any,
    gt_tumor: Any,
    spacing: Sequence[float],
    min_tumor_mm3: float = MIN_TUMOR_MM3,
    edges: Sequence[float] = RADIUS_EDGES_MM,
    connectivity: int = 3,
) -> list[dict[str, Any]]:
    """One record per ground-truth tumor component: volume (mm^3), equivalent radius (mm), bin, hit (bool)."""
    gt = _array(gt_tumor).astype(bool)
    pred = remove_small_components(pred_tumor, spacing, min_tumor_mm3, connectivity)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    labelled, count = connected_components(gt, connectivity)
    voxel_mm3 = float(np.prod(spacing))
    sizes = np.bincount(labelled.ravel(), minlength=count + 1)
    covered = np.bincount(labelled[pred].ravel(), minlength=count + 1)
    lesions = []
    for index in range(1, count + 1):
        volume = float(sizes[index] * voxel_mm3)
        radius = equivalent_radius_mm(volume)
        lesions.append(
            {
                "lesion": index,
                "voxels": int(sizes[index]),
                "volume_mm3": volume,
                "radius_mm": radius,
                "bin": radius_bin(radius, edges),
                "hit": bool(covered[index] > 0),
            }
        )
    return lesions


def false_positive_lesions(
    pred_tumor: Any,
    gt_tumor: Any,
    spacing: Sequence[float],
    min_tumor_mm3: float = MIN_TUMOR_MM3,
    connectivity: int = 3,
) -> int:
    """Predicted tumor components of at least ``min_tumor_mm3`` that touch no ground-truth tumor voxel."""
    pred = remove_small_components(pred_tumor, spacing, min_tumor_mm3, connectivity)
    gt = _array(gt_tumor).astype(bool)
    labelled, count = connected_components(pred, connectivity)
    if count == 0:
        return 0
    touching = np.unique(labelled[gt & pred])
    return int(count - np.count_nonzero(touching))


def wilson_interval(successes: int, trials: int, z: float = 1.959964) -> tuple[float, float]:
    """Wilson score interval of a proportion (95 % by default); (NaN, NaN) when there are no trials. Why not
    scipy's ``binomtest(...).proportion_ci``: it is the same formula, but refuses ``trials == 0``, which an empty
    size bin is."""
    if trials <= 0:
        return math.nan, math.nan
    p = successes / trials
    denominator = 1.0 + z * z / trials
    centre = (p + z * z / (2 * trials)) / denominator
    half = z * math.sqrt(p * (1 - p) / trials + z * z / (4 * trials * trials)) / denominator
    return max(0.0, centre - half), min(1.0, centre + half)


def sensitivity_by_bin(
    lesions: Iterable[Mapping[str, Any]], edges: Sequence[float] = RADIUS_EDGES_MM
) -> dict[str, dict[str, float]]:
    """``bin -> {"lesions": n, "detected": k, "sensitivity": k / n (NaN when n = 0), "ci_low", "ci_high"}`` (Wilson
    95 %), plus ``"all"``."""
    table = {label: {"lesions": 0, "detected": 0} for label in bin_labels(edges) + ["all"]}
    for lesion in lesions:
        for label in (lesion["bin"], "all"):
            table[label]["lesions"] += 1
            table[label]["detected"] += int(bool(lesion["hit"]))
    for row in table.values():
        row["sensitivity"] = row["detected"] / row["lesions"] if row["lesions"] else math.nan
        row["ci_low"], row["ci_high"] = wilson_interval(row["detected"], row["lesions"])
    return table


def predicts_tumor(
    pred_tumor: Any, spacing: Sequence[float], min_tumor_mm3: float = MIN_TUMOR_MM3, connectivity: int = 3
) -> bool:
    """True when a predicted tumor component of at least ``min_tumor_mm3`` exists."""
    return bool(remove_small_components(pred_tumor, spacing, min_tumor_mm3, connectivity).any())


def patient_level(cases: Iterable[Mapping[str, Any]]) -> dict[str, float]:
    """Specificity on healthy scans and sensitivity on tumor scans from ``{"has_tumor", "predicted_tumor"}`` rows."""
    rows = list(cases)
    healthy = [row for row in rows if not row["has_tumor"]]
    diseased = [row for row in rows if row["has_tumor"]]
    true_negative = sum(not row["predicted_tumor"] for row in healthy)
    true_positive = sum(bool(row["predicted_tumor"]) for row in diseased)
    specificity_ci = wilson_interval(true_negative, len(healthy))
    sensitivity_ci = wilson_interval(true_positive, len(diseased))
    out = {
        "healthy_cases": len(healthy),
        "true_negative": true_negative,
        "specificity": true_negative / len(healthy) if healthy else math.nan,
        "specificity_ci": list(specificity_ci),
        "tumor_cases": len(diseased),
        "true_positive": true_positive,
        "patient_sensitivity": true_positive / len(diseased) if diseased else math.nan,
        "patient_sensitivity_ci": list(sensitivity_ci),
    }
    fp_rows = [row for row in rows if "false_positive_lesions" in row]
    if fp_rows:
        out["false_positive_lesions"] = sum(int(row["false_positive_lesions"]) for row in fp_rows)
        out["false_positive_lesions_per_scan"] = out["false_positive_lesions"] / len(fp_rows)
        out["false_positive_lesions_per_healthy_scan"] = (
            sum(int(row["false_positive_lesions"]) for row in healthy) / len(healthy) if healthy else math.nan
        )
    return out


# ----------------------------------------------------------------------------------------------------------------
# one case, summaries, CSV


def evaluate_case(
    pred_labels: Any,
    gt_labels: Any,
    spacing: Sequence[float],
    tumor: bool = True,
    tolerance_mm: float = NSD_TOLERANCE_MM,
    min_tumor_mm3: float = MIN_TUMOR_MM3,
    edges: Sequence[float] = RADIUS_EDGES_MM,
) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Per-case metrics and the case's lesions, on one grid (``pred_labels`` and ``gt_labels`` as label maps).

    ``tumor=False`` (a binary pancreas model) evaluates the pancreas region only and no detection.
    """
    pred, gt = _array(pred_labels), _array(gt_labels)
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} differs from ground truth shape {gt.shape}")
    regions = REGIONS if tumor else {"pancreas": REGIONS["pancreas"]}
    row: dict[str, Any] = {"spacing": "x".join(f"{s:.4g}" for s in spacing)}
    row.update(region_metrics(pred, gt, spacing, regions, tolerance_mm))
    lesions: list[dict[str, Any]] = []
    if tumor:
        gt_tumor, pred_tumor = region_mask(gt, REGIONS["tumor"]), region_mask(pred, REGIONS["tumor"])
        lesions = detect_lesions(pred_tumor, gt_tumor, spacing, min_tumor_mm3, edges)
        row["has_tumor"] = bool(gt_tumor.any())
        row["predicted_tumor"] = predicts_tumor(pred_tumor, spacing, min_tumor_mm3)
        row["gt_lesions"] = len(lesions)
        row["detected_lesions"] = sum(lesion["hit"] for lesion in lesions)
        row["false_positive_lesions"] = false_positive_lesions(pred_tumor, gt_tumor, spacing, min_tumor_mm3)
    return row, lesions


def describe(values: Iterable[float]) -> dict[str, float]:
    """``n`` (values given), ``mean``/``std``/``median`` of the finite ones, ``n_nonfinite``."""
    array = np.asarray([float(v) for v in values], dtype=np.float64)
    finite = array[np.isfinite(array)]
    return {
        "n": int(array.size),
        "mean": float(finite.mean()) if finite.size else math.nan,
        "std": float(finite.std()) if finite.size else math.nan,
        "median": float(np.median(finite)) if finite.size else math.nan,
        "n_nonfinite": int(array.size - finite.size),
    }


def summarize(
    case_rows: Sequence[Mapping[str, Any]],
    lesions: Iterable[Mapping[str, Any]] = (),
    regions: Sequence[str] = tuple(REGIONS),
    edges: Sequence[float] = RADIUS_EDGES_MM,
) -> dict[str, Any]:
    """``{"regions": rows of metric stats, "detection": rows per bin, "patient": patient-level numbers}``.

    A region's statistics use the cases whose ground truth contains it (``<region>_gt_voxels > 0``).
    """
    stats = []
    for region in regions:
        present = [row for row in case_rows if row.get(f"{region}_gt_voxels", 0) > 0]
        for metric in ("dice", "nsd", "hd95"):
            key = f"{region}_{metric}"
            if present and key in present[0]:
                stats.append({"region": region, "metric": metric, **describe(row[key] for row in present)})
    detection = [{"bin": label, **row} for label, row in sensitivity_by_bin(lesions, edges).items()]
    with_tumor_fields = [row for row in case_rows if "predicted_tumor" in row]
    patient = patient_level(with_tumor_fields) if with_tumor_fields else {}
    return {"regions": stats, "detection": detection, "patient": patient}


def _csv_value(value: Any) -> Any:
    if isinstance(value, float):
        return "nan" if math.isnan(value) else ("inf" if math.isinf(value) else f"{value:.6g}")
    return value


def write_csv(path: str | os.PathLike, rows: Sequence[Mapping[str, Any]], columns: Sequence[str] | None = None) -> Path:
    """Write rows (dicts) as CSV atomically; columns default to the keys in first-seen order."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if columns is None:
        columns = list(dict.fromkeys(key for row in rows for key in row))
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".part", dir=path.parent)
    try:
        with os.fdopen(fd, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns), extrasaction="ignore")
            writer.writeheader()
            for row in rows:
                writer.writerow({key: _csv_value(row.get(key, "")) for key in columns})
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise
    return path


# ----------------------------------------------------------------------------------------------------------------
# validation metrics during training


class RegionOutputTransform:
    """``output_transform`` for MONAI metric handlers: one-hot ``pred``/``label`` -> one region channel.

    The region is the union of the given one-hot channels (``[1, 2]``: the pancreas with its tumor; ``[2]``: the
    tumor), so ``MeanDice`` reports the same regions as the evaluation.
    """

    def __init__(self, channels: Sequence[int], pred_key: str = "pred", label_key: str = "label"):
        self.channels = [int(c) for c in channels]
        self.pred_key = pred_key
        self.label_key = label_key

    def _region(self, onehot: torch.Tensor) -> torch.Tensor:
        # a channel the model does not have (the tumor of a binary model) contributes nothing: empty region, NaN Dice
        channels = [c for c in self.channels if c < onehot.shape[0]]
        if not channels:
            return torch.zeros_like(onehot[:1])
        index = torch.tensor(channels, device=onehot.device)
        return (onehot.index_select(0, index).sum(dim=0, keepdim=True) > 0).to(onehot.dtype)

    def __call__(self, output: Any) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
        items = output if isinstance(output, (list, tuple)) else [output]
        preds = [self._region(item[self.pred_key]) for item in items]
        labels = [self._region(item[self.label_key]) for item in items]
        return preds, labels
