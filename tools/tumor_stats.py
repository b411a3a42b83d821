"""Tumor-size statistics of a labelled data set: per-tumor volume and equivalent radius, quartile size classes.

Seed 001 (SynTumorAnalyzer) sorted the MSD pancreas tumors by volume, took the quartiles and defined four size
classes (tiny, small, medium, large) with a representative radius each, replacing DiffTumor's fixed radii. This
module computes the same from any data set's own labels so the tumor generator can take "ranges computed from a
data set's own tumors":

* a tumor is a connected component of the tumor label (value 2 in MSD) in one case, 26-connectivity by default;
* its volume is the voxel count times the voxel volume ``|det(affine[:3, :3])|`` (mm^3), its equivalent radius
  ``r = (3 V / (4 pi))^(1/3)`` mm (the radius of a sphere of the same volume);
* the quartiles Q1, Q2, Q3 of ``r`` over all tumors (numpy's default linear interpolation between order
  statistics, i.e. "type 7") cut the classes tiny ``[min, Q1]``, small ``(Q1, Q2]``, medium ``(Q2, Q3]``, large
  ``(Q3, max]``; a tumor exactly on a boundary belongs to the smaller class. Each class's representative radius
  is the median radius of its tumors.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
from scipy import ndimage

from tools.errors import InputError
from tools.io import load_label, write_json
from tools.splits import load_records

#: The four classes of seed 001, smallest first.
SIZE_CLASSES = ("tiny", "small", "medium", "large")
#: MSD Task07's tumor label value.
TUMOR_VALUE = 2


def equivalent_radius(volume_mm3: float | np.ndarray) -> float | np.ndarray:
    """Radius (mm) of the sphere whose volume is ``volume_mm3``: ``(3 V / (4 pi))^(1/3)``."""
    return np.cbrt(3.0 * np.asarray(volume_mm3, dtype=np.float64) / (4.0 * math.pi))


def voxel_volume_mm3(affine: np.ndarray) -> float:
    """Volume of one voxel in mm^3 (absolute determinant of the affine's 3x3 part: handles any orientation)."""
    return float(abs(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3])))


def _structure(connectivity: int) -> np.ndarray:
    ranks = {6: 1, 18: 2, 26: 3}
    if connectivity not in ranks:
        raise InputError(None, f"connectivity must be 6, 18 or 26, got {connectivity}")
    return ndimage.generate_binary_structure(3, ranks[connectivity])


def tumor_components(
    label: np.ndarray,
    affine: np.ndarray,
    tumor_value: int | Sequence[int] = TUMOR_VALUE,
    connectivity: int = 26,
    min_voxels: int = 1,
) -> list[dict[str, Any]]:
    """Connected tumors of one label map: voxel count, volume (mm^3), equivalent radius (mm), centroid (world mm).

    ``tumor_value``: label value(s) that are tumor; components smaller than ``min_voxels`` are left out (1 keeps
    everything, as seed 001 did). Sorted by decreasing volume.
    """
    label = np.asarray(label)
    if label.ndim != 3:
        raise InputError(None, f"expected a 3D label map, got shape {label.shape}")
    values = [tumor_value] if np.isscalar(tumor_value) else list(tumor_value)
    components, n = ndimage.label(np.isin(label, values), structure=_structure(connectivity))
    if n == 0:
        return []
    index = np.arange(1, n + 1)
    counts = np.bincount(components.ravel(), minlength=n + 1)[1:]
    centroids = np.asarray(ndimage.center_of_mass(components > 0, components, index), dtype=np.float64)
    affine = np.asarray(affine, dtype=np.float64)
    world = centroids @ affine[:3, :3].T + affine[:3, 3]
    unit = voxel_volume_mm3(affine)
    tumors = []
    for count, centre in zip(counts, world):
        if count < min_voxels:
            continue
        volume = float(count) * unit
        tumors.append(
            {
                "voxels": int(count),
                "volume_mm3": volume,
                "radius_mm": float(equivalent_radius(volume)),
                "centroid_mm": [float(c) for c in centre],
            }
        )
    tumors.sort(key=lambda t: -t["volume_mm3"])
    return tumors


def size_classes(radii_mm: Sequence[float]) -> dict[str, Any]:
    """Quartiles of the radii and the four size classes with count, range and representative (median) radius.

    Returns ``{"n_tumors", "quartiles_mm": {"q1", "q2", "q3"}, "min_mm", "max_mm", "classes": {name: {"lower_mm",
    "upper_mm", "count", "representative_radius_mm", "observed_min_mm", "observed_max_mm"}}}``; with no tumors the
    numbers are None and the counts 0.
    """
    radii = np.sort(np.asarray(list(radii_mm), dtype=np.float64))
    if radii.size == 0:
        empty = {"lower_mm": None, "upper_mm": None, "count": 0, "representative_radius_mm": None}
        empty.update({"observed_min_mm": None, "observed_max_mm": None})
        return {
            "n_tumors": 0,
            "quartiles_mm": {"q1": None, "q2": None, "q3": None},
            "min_mm": None,
            "max_mm": None,
            "classes": {name: dict(empty) for name in SIZE_CLASSES},
        }
    q1, q2, q3 = (float(q) for q in np.percentile(radii, [25, 50, 75]))
    edges = [float(radii[0]), q1, q2, q3, float(radii[-1])]
    # class index: 0 for r <= q1, 1 for q1 < r <= q2, ... (a tumor on a boundary belongs to the smaller class)
    which = np.searchsorted(np.array([q1, q2, q3]), radii, side="left")
    classes = {}
    for index, name in enumerate(SIZE_CLASSES):
        members = radii[which == index]
        classes[name] = {
            "lower_mm": edges[index],
            "upper_mm": edges[index + 1],
            "count": int(members.size),
            "representative_radius_mm": float(np.median(members)) if members.size else None,
            "observed_min_mm": float(members.min()) if members.size else None,
            "observed_max_mm": float(members.max()) if members.size else None,
        }
    return {
        "n_tumors": int(radii.size),
        "quartiles_mm": {"q1": q1, "q2": q2, "q3": q3},
        "min_mm": edges[0],
        "max_mm": edges[-1],
        "classes": classes,
    }


def classify_radius(radius_mm: float, stats: Mapping[str, Any]) -> str:
    """The size class of a radius under the quartiles of ``stats`` (output of :func:`size_classes`)."""
    quartiles = stats["quartiles_mm"]
    if quartiles["q1"] is None:
        raise InputError(None, "these statistics have no tumors, so no size classes")
    bounds = [quartiles["q1"], quartiles["q2"], quartiles["q3"]]
    return SIZE_CLASSES[int(np.searchsorted(np.asarray(bounds), float(radius_mm), side="left"))]


def radius_ranges(stats: Mapping[str, Any]) -> dict[str, tuple[float, float]]:
    """``{class: (lower_mm, upper_mm)}`` of :func:`size_classes` output: the ranges a tumor generator samples."""
    return {
        name: (float(c["lower_mm"]), float(c["upper_mm"]))
        for name, c in stats["classes"].items()
        if c["lower_mm"] is not None
    }


def dataset_tumor_stats(
    src: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    section: str | None = "training",
    tumor_value: int | Sequence[int] = TUMOR_VALUE,
    connectivity: int = 26,
    min_voxels: int = 1,
    base_dir: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """Tumor-size statistics of a data set: every tumor of every labelled case, then :func:`size_classes`.

    ``src``: MSD folder, datalist JSON, dict or list of records (see :func:`tools.splits.load_records`);
    ``section``: which list to read (None: every list). Cases without a label are skipped and counted.
    Returns a JSON-ready dict: the :func:`size_classes` fields plus ``n_cases``, ``n_cases_with_tumor``,
    ``n_cases_without_label``, ``settings`` and ``tumors`` (one entry per tumor with its case).
    """
    loaded = load_records(src, base_dir=base_dir)
    records = loaded.records(section)
    tumors: list[dict[str, Any]] = []
    n_with_tumor = n_without_label = 0
    for record in records:
        label_path = record.get("label")
        if not label_path:
            n_without_label += 1
            continue
        label, affine = load_label(label_path)
        try:
            found = tumor_components(label, affine, tumor_value, connectivity, min_voxels)
        except InputError as err:
            raise InputError(label_path, err.problem) from None
        n_with_tumor += bool(found)
        case = str(record.get("case") or Path(label_path).name.split(".")[0])
        for number, tumor in enumerate(found):
            tumors.append({"case": case, "label": str(label_path), "index": number, **tumor})
    stats = size_classes([t["radius_mm"] for t in tumors])
    return {
        **stats,
        "n_cases": len(records) - n_without_label,
        "n_cases_with_tumor": n_with_tumor,
        "n_cases_without_label": n_without_label,
        "settings": {
            "tumor_value": tumor_value if np.isscalar(tumor_value) else list(tumor_value),
            "connectivity": connectivity,
            "min_voxels": min_voxels,
            "quartile_method": "numpy.percentile linear (type 7)",
            "radius": "equivalent sphere radius (3V/4pi)^(1/3), mm",
            "source": None if loaded.source is None else str(loaded.source),
            "section": section,
        },
        "tumors": tumors,
    }


def write_tumor_stats(
    src: str | os.PathLike | Mapping[str, Any] | Sequence[Mapping[str, Any]],
    out_json: str | os.PathLike,
    **kwargs: Any,
) -> dict[str, Any]:
    """:func:`dataset_tumor_stats` written atomically to ``out_json`` (never over the source datalist)."""
    stats = dataset_tumor_stats(src, **kwargs)
    inputs = tuple(p for p in (src,) if isinstance(p, (str, os.PathLike)) and Path(p).is_file())
    write_json(out_json, stats, inputs=inputs)
    return stats
