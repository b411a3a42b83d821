"""``make demo``: the main job at demo scale on a CPU machine.

Today it makes the phantom data set and its figures (a montage of every case, and the phantom beside the real CT
with the realism figures when ``../shared`` is present). Each step reuses what an earlier run already made.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tools.figures import save_figure, show_views
from tools.io import load_label, load_nifti

DEFAULT_SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def phantom_montage(dataset_dir: str | os.PathLike, out_png: str | os.PathLike, max_cases: int = 12) -> Path:
    """PNG with one row per case: axial, coronal and sagittal through the pancreas, pancreas (yellow) and tumor
    (red) outlined, soft-tissue window."""
    import matplotlib.pyplot as plt

    dataset_dir = Path(dataset_dir)
    meta = json.loads((dataset_dir / "dataset.json").read_text())
    entries = (meta["training"] + meta["test"])[:max_cases]
    fig, axes = plt.subplots(len(entries), 3, figsize=(10, 2.7 * len(entries)), squeeze=False, layout="constrained")
    for row, entry in zip(axes, entries):
        ct, affine = load_nifti(dataset_dir / entry["image"])
        label, _ = load_label(dataset_dir / entry["label"])
        tumor = "tumor" if entry["has_tumor"] else "healthy"
        name = Path(entry["image"]).name.replace(".nii.gz", "")
        phase = {"portal_venous": "PV", "non_contrast": "NC"}.get(entry["phase"], entry["phase"])
        show_views(row, ct, affine, focus=label, contour=label, title=f"{name} {phase} {tumor}")
    fig.suptitle("SYNTHETIC phantom cases (not patient data); window W400 L40", fontsize=11)
    return save_figure(fig, out_png, dpi=80)


def run_demo(
    out: str | os.PathLike = "runs/demo", n_cases: int = 12, seed: int = 0, shared_dir: str | os.PathLike | None = None
) -> dict:
    """Run the demo chain into ``out`` and return a summary of what was made."""
    from tools.phantom import make_dataset

    out = Path(out)
    shared = Path(shared_dir) if shared_dir else DEFAULT_SHARED
    summary: dict = {}
    t0 = time.time()
    print(f"[1/3] phantom data set: {n_cases} patients, seed {seed} -> {out / 'data' / 'phantom'}")
    dataset_json = make_dataset(
        out / "data" / "phantom", n_cases=n_cases, seed=seed, tumor_fraction=0.5, test_fraction=0.25
    )
    meta = json.loads(dataset_json.read_text())
    summary["dataset"] = str(dataset_json)
    summary["n_training"], summary["n_test"] = meta["numTraining"], meta["numTest"]
    print(f"[2/3] montage of the cases -> {out / 'phantom_montage.png'}")
    summary["montage"] = str(phantom_montage(out / "data" / "phantom", out / "phantom_montage.png"))
    real_dir = shared / "data" / "real_ct"
    if real_dir.is_dir():
        from tools.realism import run_realism

        print(f"[3/3] realism against {real_dir}")
        realism = run_realism(real_dir, out, n_cases=5, seed=seed)
        summary["realism_all_within_tolerance"] = realism["all_within_tolerance"]
        summary["realism_png"] = str(out / "realism.png")
    else:
        print(f"[3/3] realism skipped: {real_dir} is absent (it needs the real CT samples of ../shared)")
    summary["seconds"] = round(time.time() - t0, 1)
    print(f"demo done in {summary['seconds']} s; outputs under {out}")
    return summary
