"""How close the phantom comes to real CT: organ medians, HU histogram distances and a side-by-side figure.

The reference is the real non-contrast scan of ``../shared/data/real_ct`` (``example_ct_sm.nii.gz``, 3 mm) with
its TotalSegmentator organ labels and tissue masks. Phantom cases are made in the same phase at the same voxel
size and a similar cranio-caudal coverage, so partial volume and noise are comparable.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from tools.io import load_ct, load_label, voxel_spacing, write_json
from tools.phantom import ORGAN_LABELS, SKELETAL_MUSCLE_IDS, SUBCUTANEOUS_FAT_IDS, make_case
from tools.prep import body_mask

#: The acceptance tolerance of the issue: phantom median within this many HU of the real median.
MEDIAN_TOLERANCE_HU = 25.0
#: Histogram support and bin width for the distances (HU).
HIST_RANGE = (-1024.0, 1500.0)
HIST_BIN_HU = 10.0

#: Structure -> (real: label ids of example_seg or a tissue-mask file; phantom: organ ids).
STRUCTURES = {
    "liver": ((5,), (ORGAN_LABELS["liver"],)),
    "spleen": ((1,), (ORGAN_LABELS["spleen"],)),
    "kidneys": ((2, 3), (ORGAN_LABELS["kidney_right"], ORGAN_LABELS["kidney_left"])),
    "aorta": ((52,), (ORGAN_LABELS["aorta"],)),
    "skeletal_muscle": ("skeletal_muscle.nii.gz", SKELETAL_MUSCLE_IDS),
    "subcutaneous_fat": ("subcutaneous_fat.nii.gz", SUBCUTANEOUS_FAT_IDS),
}


def real_reference(real_dir: str | os.PathLike) -> dict:
    """Medians per structure and the body's HU values of the real scan (validated reads, named errors)."""
    real_dir = Path(real_dir)
    ct, affine = load_ct(real_dir / "example_ct_sm.nii.gz")
    seg, _ = load_label(real_dir / "example_seg.nii.gz")
    medians = {}
    for name, (real_key, _) in STRUCTURES.items():
        if isinstance(real_key, str):
            mask = load_label(real_dir / real_key)[0] > 0
        else:
            mask = np.isin(seg, real_key)
        medians[name] = float(np.median(ct[mask]))
    body = body_mask(ct, affine)
    return {"ct": ct, "affine": affine, "seg": seg, "medians": medians, "body_values": ct[body]}


def phantom_cases(n_cases: int, seed: int, phase: str = "non_contrast") -> list:
    """Phantom cases on the real scan's voxel size (3 mm) and coverage (90 mm around the pancreas)."""
    return [
        make_case((seed, i), shape=(132, 132, 30), spacing=(3.0, 3.0, 3.0), phase=phase, tumor=False, z_center_mm=5.0)
        for i in range(n_cases)
    ]


def structure_medians(ct: np.ndarray, organs: np.ndarray) -> dict[str, float]:
    """Median HU of each compared structure in a phantom case (from its organ map)."""
    return {name: float(np.median(ct[np.isin(organs, ids)])) for name, (_, ids) in STRUCTURES.items()}


def hu_density(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised HU histogram on a fixed support (bin edges returned too)."""
    edges = np.arange(HIST_RANGE[0], HIST_RANGE[1] + HIST_BIN_HU, HIST_BIN_HU)
    hist, _ = np.histogram(np.clip(values, *HIST_RANGE), bins=edges)
    return hist / max(hist.sum(), 1), edges


def histogram_distances(values_a: np.ndarray, values_b: np.ndarray) -> dict[str, float]:
    """Distances between two HU distributions.

    ``wasserstein_hu``: earth mover's distance in HU (how far, on average, intensity mass must move; 0 when equal);
    ``jensen_shannon``: JS divergence of the 10 HU histograms in bits (0 equal, 1 disjoint);
    ``intersection``: histogram overlap (1 equal, 0 disjoint).
    """
    p, edges = hu_density(values_a)
    q, _ = hu_density(values_b)
    centers = 0.5 * (edges[:-1] + edges[1:])
    wasserstein = float(np.sum(np.abs(np.cumsum(p) - np.cumsum(q))) * HIST_BIN_HU)
    m = 0.5 * (p + q)

    def kl(a, b):
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    js = 0.5 * kl(p, m) + 0.5 * kl(q, m)
    del centers
    return {"wasserstein_hu": wasserstein, "jensen_shannon": js, "intersection": float(np.minimum(p, q).sum())}


def realism_report(real_dir: str | os.PathLike, n_cases: int = 5, seed: int = 0, phase: str = "non_contrast") -> dict:
    """Compare ``n_cases`` phantom cases with the real scan: medians, tolerance verdicts, histogram distances."""
    ref = real_reference(real_dir)
    cases = phantom_cases(n_cases, seed, phase)
    per_case = [structure_medians(c.ct, c.organs) for c in cases]
    pooled_body = np.concatenate([c.ct[c.organs > 0] for c in cases])
    rows = []
    for name in STRUCTURES:
        values = [m[name] for m in per_case]
        phantom_median = float(np.median(values))
        diff = phantom_median - ref["medians"][name]
        rows.append(
            {
                "structure": name,
                "real_median_hu": ref["medians"][name],
                "phantom_median_hu": phantom_median,
                "phantom_min_hu": float(min(values)),
                "phantom_max_hu": float(max(values)),
                "difference_hu": diff,
                "within_tolerance": bool(abs(diff) <= MEDIAN_TOLERANCE_HU),
            }
        )
    distances = histogram_distances(pooled_body, ref["body_values"])
    # Context for the distances: the real scan against itself shifted by 10 HU, and two phantom halves.
    shifted = histogram_distances(ref["body_values"] + 10.0, ref["body_values"])
    half = max(1, n_cases // 2)
    if n_cases >= 2:
        first = np.concatenate([c.ct[c.organs > 0] for c in cases[:half]])
        second = np.concatenate([c.ct[c.organs > 0] for c in cases[half:]])
        phantom_vs_phantom = histogram_distances(first, second)
    else:
        phantom_vs_phantom = None
    return {
        "reference": str(Path(real_dir) / "example_ct_sm.nii.gz"),
        "phase": phase,
        "n_cases": n_cases,
        "seed": seed,
        "tolerance_hu": MEDIAN_TOLERANCE_HU,
        "medians": rows,
        "all_within_tolerance": all(r["within_tolerance"] for r in rows),
        "histogram_distance": distances,
        "histogram_distance_real_vs_real_shifted_10hu": shifted,
        "histogram_distance_phantom_vs_phantom": phantom_vs_phantom,
        "_cases": cases,
        "_reference": ref,
    }


def format_report(report: dict) -> str:
    """A plain-text table of a :func:`realism_report`."""
    lines = [
        f"Phantom vs real CT ({report['phase']}, {report['n_cases']} phantom cases, seed {report['seed']}; "
        f"reference {report['reference']})",
        f"{'structure':<18}{'real':>8}{'phantom':>9}{'range':>16}{'diff':>8}  within {report['tolerance_hu']:.0f} HU",
    ]
    for r in report["medians"]:
        rng = f"[{r['phantom_min_hu']:.0f}, {r['phantom_max_hu']:.0f}]"
        lines.append(
            f"{r['structure']:<18}{r['real_median_hu']:>8.0f}{r['phantom_median_hu']:>9.0f}{rng:>16}"
            f"{r['difference_hu']:>+8.0f}  {'yes' if r['within_tolerance'] else 'NO'}"
        )
    d = report["histogram_distance"]
    lines.append(
        f"HU histogram inside the body, phantom vs real: Wasserstein {d['wasserstein_hu']:.1f} HU, "
        f"Jensen-Shannon {d['jensen_shannon']:.3f} bits, overlap {d['intersection']:.2f}"
    )
    s = report["histogram_distance_real_vs_real_shifted_10hu"]
    lines.append(
        f"  for scale: real vs itself +10 HU: Wasserstein {s['wasserstein_hu']:.1f} HU, JS {s['jensen_shannon']:.3f}"
    )
    pp = report["histogram_distance_phantom_vs_phantom"]
    if pp:
        lines.append(
            f"  phantom half vs phantom half: Wasserstein {pp['wasserstein_hu']:.1f} HU, JS {pp['jensen_shannon']:.3f}"
        )
    return "\n".join(lines)


def realism_figure(report: dict, out_png: str | os.PathLike) -> Path:
    """PNG: a phantom case beside the real CT (axial, coronal, sagittal through the pancreas, same window), and
    the two HU histograms inside the body."""
    import matplotlib.pyplot as plt

    from tools.figures import ABDOMEN_WINDOW, save_figure, show_views

    ref = report["_reference"]
    case = report["_cases"][0]
    fig = plt.figure(figsize=(13, 8.5))
    grid = fig.add_gridspec(3, 3, height_ratios=[1, 1, 0.8])
    top = [fig.add_subplot(grid[0, k]) for k in range(3)]
    mid = [fig.add_subplot(grid[1, k]) for k in range(3)]
    show_views(top, case.ct, case.affine, focus=case.label, title="phantom")
    show_views(mid, ref["ct"], ref["affine"], focus=(ref["seg"] == 7), title="real")
    ax = fig.add_subplot(grid[2, :])
    pooled = np.concatenate([c.ct[c.organs > 0] for c in report["_cases"]])
    for values, name in (
        (ref["body_values"], "real (example_ct_sm)"),
        (pooled, f"phantom ({len(report['_cases'])} cases)"),
    ):
        p, edges = hu_density(values)
        ax.step(edges[:-1], p, where="post", label=name)
    ax.set_xlim(-1050, 600)
    ax.set_yscale("log")
    ax.set_xlabel("HU (inside the body)")
    ax.set_ylabel("fraction of voxels per 10 HU")
    d = report["histogram_distance"]
    ax.set_title(
        f"Wasserstein {d['wasserstein_hu']:.1f} HU, Jensen-Shannon {d['jensen_shannon']:.3f} bits; "
        f"window {ABDOMEN_WINDOW[0]:.0f}..{ABDOMEN_WINDOW[1]:.0f} HU above",
        fontsize=9,
    )
    ax.legend()
    return save_figure(fig, out_png)


def run_realism(real_dir: str | os.PathLike, out_dir: str | os.PathLike, n_cases: int = 5, seed: int = 0) -> dict:
    """Measure, print, and write ``realism.json`` + ``realism.png`` under ``out_dir``."""
    report = realism_report(real_dir, n_cases=n_cases, seed=seed)
    text = format_report(report)
    print(text)
    out_dir = Path(out_dir)
    public = {k: v for k, v in report.items() if not k.startswith("_")}
    public["spacing_mm"] = voxel_spacing(report["_cases"][0].affine).tolist()
    write_json(out_dir / "realism.json", public)
    realism_figure(report, out_dir / "realism.png")
    print(f"wrote {out_dir / 'realism.json'} and {out_dir / 'realism.png'}")
    return public
