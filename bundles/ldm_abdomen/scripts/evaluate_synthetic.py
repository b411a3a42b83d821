"""Evaluate generated CT against real CT, for each crop mode, in one command (seed 002's evaluation, made numeric).

For every crop mode (``full``, ``semi``, ``pancreas``...) it takes a folder of synthetic volumes written by this
bundle's inference (``*_image.nii.gz`` with provenance sidecars, plus ``*_label.nii.gz`` from the ControlNet) and the
real data set of the same crop (a folder made by ``tools data prepare``, in HU), and reports:

* HU histogram distances inside the body (voxels above -500 HU): Wasserstein distance in HU, Jensen-Shannon
  divergence (bits) and overlap of 10 HU histograms on [-1024, 1500] HU (the same definitions as the collection's
  ``tools.realism``); real values are clipped to the model's HU window first (read from the sidecars), since the
  model cannot produce values outside it;
* per-structure median HU where labels exist: every structure of the real organ maps (or the MSD labels), and in
  the synthetic scans the pancreas of the ControlNet's label and the pancreas that seg_unet3d finds;
* whether the seg_unet3d bundle (``--seg_bundle_dir`` with ``models/model.pt``; loaded through ``monai.bundle``)
  finds a pancreas in each synthetic scan (volume >= ``min_pancreas_ml``), and its Dice with the ControlNet label;
  skipped with a message when that bundle or its weights are absent; ``precision`` (default ``fp32``) is the
  precision it runs in (``scripts/precision.py``), recorded in the report;
* a montage PNG per crop mode (axial, coronal, sagittal mid slices of real and synthetic cases) and one PNG of the
  histograms.

Outputs: ``report.json``, ``report.md``, ``montage_<mode>.png``, ``histograms.png`` in ``output_dir``. Run::

    python -m monai.bundle run --config_file configs/evaluate_synthetic.json \
        --runs "{'full': {'synthetic': 'output/full', 'real': '/data/prepared/full'}}"
    python -m scripts.evaluate_synthetic --run full=output/full,/data/prepared/full --output_dir eval/synthetic
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import nibabel as nib
import numpy as np
import torch

from .latent import unwrap_state_dict
from .precision import autocast_network, describe

logger = logging.getLogger(__name__)

HIST_RANGE = (-1024.0, 1500.0)
HIST_BIN_HU = 10.0
BODY_THRESHOLD_HU = -500.0
MONTAGE_WINDOW = (-160.0, 240.0)
MSD_LABELS = {1: "pancreas", 2: "tumour"}
#: Structures always shown in report.md (report.json lists every labelled structure).
KEY_STRUCTURES = ("pancreas", "tumour", "pancreatic_tumor", "liver", "spleen", "kidney_left", "kidney_right", "aorta")


# ----------------------------------------------------------------------------------------------------------------
# histograms (same definitions as tools.realism, which a bundle cannot import)


def hu_density(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Normalised HU histogram with 10 HU bins on [-1024, 1500] (values outside are clipped into the end bins)."""
    edges = np.arange(HIST_RANGE[0], HIST_RANGE[1] + HIST_BIN_HU, HIST_BIN_HU)
    hist, _ = np.histogram(np.clip(values, *HIST_RANGE), bins=edges)
    return hist / max(hist.sum(), 1), edges


def histogram_distances(values_a: np.ndarray, values_b: np.ndarray) -> dict[str, float]:
    """``wasserstein_hu`` (earth mover's distance, HU), ``jensen_shannon`` (bits), ``intersection`` (overlap)."""
    p, _ = hu_density(values_a)
    q, _ = hu_density(values_b)
    wasserstein = float(np.sum(np.abs(np.cumsum(p) - np.cumsum(q))) * HIST_BIN_HU)
    m = 0.5 * (p + q)

    def kl(a: np.ndarray, b: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / b[nz])))

    return {
        "wasserstein_hu": wasserstein,
        "jensen_shannon": 0.5 * kl(p, m) + 0.5 * kl(q, m),
        "intersection": float(np.minimum(p, q).sum()),
    }


# ----------------------------------------------------------------------------------------------------------------
# reading the two sides


def _load(path: str | os.PathLike) -> tuple[np.ndarray, np.ndarray]:
    image = nib.load(str(path))
    return np.asarray(image.dataobj, dtype=np.float32), image.affine


def synthetic_cases(folder: str | os.PathLike) -> list[dict[str, Any]]:
    """``*_image.nii.gz`` of a sampling output folder, with their ``*_label.nii.gz`` and sidecar when present."""
    folder = Path(folder)
    cases = []
    for image in sorted(folder.glob("*_image.nii.gz")):
        stem = image.name[: -len("_image.nii.gz")]
        label = folder / f"{stem}_label.nii.gz"
        sidecar = folder / f"{stem}_image.json"
        cases.append(
            {
                "case": stem,
                "image": str(image),
                "label": str(label) if label.is_file() else None,
                "provenance": json.loads(sidecar.read_text()) if sidecar.is_file() else {},
            }
        )
    if not cases:
        raise FileNotFoundError(f"{folder}: no *_image.nii.gz (run the bundle's inference into it first)")
    return cases


def real_cases(folder: str | os.PathLike, sections: Sequence[str] = ("test", "validation", "training"), limit=8):
    """Entries of an MSD-layout folder (``dataset.json``) with absolute ``image`` / ``label`` / ``organs`` paths,
    and ``organ_labels`` (id -> name) from the datalist, or the MSD labels."""
    folder = Path(folder)
    datalist = json.loads((folder / "dataset.json").read_text())
    entries = []
    for section in sections:
        for entry in datalist.get(section) or []:
            entry = {"image": entry} if isinstance(entry, str) else dict(entry)
            for key in ("image", "label", "organs"):
                if entry.get(key):
                    entry[key] = str((folder / entry[key]).resolve())
            entries.append(entry)
    if not entries:
        raise ValueError(f"{folder}/dataset.json lists no cases")
    organ_labels = {int(k): v for k, v in (datalist.get("organ_labels") or {}).items()}
    return entries[: int(limit)], organ_labels


def structure_medians(ct: np.ndarray, labels: np.ndarray, names: Mapping[int, str]) -> dict[str, float]:
    """Median HU of every labelled structure present."""
    out = {}
    for value, name in names.items():
        mask = labels == value
        if mask.any():
            out[name] = float(np.median(ct[mask]))
    return out


# ----------------------------------------------------------------------------------------------------------------
# seg_unet3d through monai.bundle


@contextlib.contextmanager
def _other_bundle_scripts(root: Path) -> Iterator[None]:
    """Let ``import scripts`` resolve to another bundle's package while its config is parsed, then restore ours."""
    saved = {k: v for k, v in sys.modules.items() if k == "scripts" or k.startswith("scripts.")}
    for key in saved:
        del sys.modules[key]
    sys.path.insert(0, str(root))
    try:
        yield
    finally:
        sys.path.remove(str(root))
        for key in [k for k in sys.modules if k == "scripts" or k.startswith("scripts.")]:
            del sys.modules[key]
        sys.modules.update(saved)


class PancreasFinder:
    """The seg_unet3d bundle's inference (preprocessing, inferer, network, ``models/model.pt``) run on a volume.

    ``__call__(path)`` returns the predicted pancreas mask (output channels whose ``channel_def`` name mentions the
    pancreas or a tumour) on the preprocessed grid, and that grid's voxel volume in ml. The network runs in
    ``precision`` (``scripts/precision.py``; its outputs are float32).
    """

    def __init__(self, bundle_dir: str | os.PathLike, device: str | torch.device = "cpu", precision: str = "fp32"):
        from monai.bundle import ConfigParser

        self.root = Path(bundle_dir).resolve()
        self.device = torch.device(device)
        meta = json.loads((self.root / "configs" / "metadata.json").read_text())
        channel_def = meta["network_data_format"]["outputs"]["pred"].get("channel_def", {})
        self.channels = [
            int(k) for k, v in channel_def.items() if "pancrea" in str(v).lower() or "tumo" in str(v).lower()
        ]
        if not self.channels:
            raise ValueError(f"{self.root}: no output channel of channel_def {channel_def} names the pancreas")
        with _other_bundle_scripts(self.root):
            parser = ConfigParser()
            parser.read_config(str(self.root / "configs" / "inference.json"))
            parser.read_meta(str(self.root / "configs" / "metadata.json"))
            parser["bundle_root"] = str(self.root)
            parser["device"] = f"$torch.device('{self.device}')"
            self.network = parser.get_parsed_content("network_def").to(self.device).eval()
            self.preprocessing = parser.get_parsed_content("preprocessing")
            self.inferer = parser.get_parsed_content("inferer")
        state = torch.load(self.root / "models" / "model.pt", map_location=self.device, weights_only=True)
        self.network.load_state_dict(unwrap_state_dict(state, str(self.root / "models" / "model.pt")))
        self.network = autocast_network(self.network, precision, self.device)

    @torch.no_grad()
    def __call__(self, image_path: str | os.PathLike) -> tuple[np.ndarray, float]:
        """The predicted pancreas mask on the grid of ``image_path`` (the bundle's preprocessing inverted: spacing,
        orientation, crops) and the voxel volume of that grid in ml."""
        from monai.data import MetaTensor
        from monai.transforms import Invertd

        item = self.preprocessing({"image": str(image_path)})
        image = item["image"]
        logits = self.inferer(torch.as_tensor(image)[None].to(self.device), self.network)
        classes = torch.argmax(torch.as_tensor(logits), dim=1, keepdim=True)[0].float().cpu()
        reference = nib.load(str(image_path))
        pancreas = torch.as_tensor(np.isin(classes.numpy(), self.channels).astype(np.float32))
        try:
            item["pred"] = MetaTensor(
                pancreas, meta=dict(image.meta), applied_operations=list(image.applied_operations)
            )
            inverter = Invertd(keys="pred", transform=self.preprocessing, orig_keys="image", nearest_interp=True)
            mask = np.asarray(torch.as_tensor(inverter(item)["pred"])[0]) > 0.5
        except Exception as error:  # a preprocessing that cannot be inverted: nearest-neighbour resize instead
            logger.warning("cannot invert the seg bundle's preprocessing (%s); resizing its prediction", error)
            mask = pancreas[0].numpy() > 0.5
        mask = _resize_nearest(mask, reference.shape[:3])
        voxel_ml = float(np.prod(reference.header.get_zooms()[:3])) / 1000.0
        return mask, voxel_ml


def load_pancreas_finder(
    seg_bundle_dir: str | os.PathLike | None, precision: str = "fp32"
) -> tuple[PancreasFinder | None, str]:
    """The finder, or None and the reason it is skipped (no bundle, no weights)."""
    if not seg_bundle_dir:
        return None, "no seg_bundle_dir given"
    root = Path(seg_bundle_dir)
    if not (root / "configs" / "inference.json").is_file():
        return None, f"{root}: no seg_unet3d bundle (configs/inference.json absent)"
    if not (root / "models" / "model.pt").is_file():
        return None, f"{root}: the seg_unet3d bundle has no trained weights (models/model.pt); train it first"
    return PancreasFinder(root, precision=precision), f"seg_unet3d from {root}"


def dice(a: np.ndarray, b: np.ndarray) -> float | None:
    total = a.sum() + b.sum()
    return None if total == 0 else float(2.0 * np.logical_and(a, b).sum() / total)


def _resize_nearest(mask: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if tuple(mask.shape) == tuple(shape):
        return mask
    tensor = torch.as_tensor(mask.astype(np.float32))[None, None]
    return torch.nn.functional.interpolate(tensor, size=tuple(shape), mode="nearest-exact")[0, 0].numpy() > 0.5


# ----------------------------------------------------------------------------------------------------------------
# figures


def _mid_slices(volume: np.ndarray) -> list[np.ndarray]:
    """Mid slices of a RAS volume in radiological display: patient's right on the viewer's left, anterior and
    superior up (sagittal: anterior on the left)."""
    x, y, z = (s // 2 for s in volume.shape)
    return [volume[::-1, :, z].T[::-1], volume[::-1, y, :].T[::-1], volume[x, ::-1, :].T[::-1]]


def montage(rows: Sequence[tuple[str, np.ndarray]], out_png: str | os.PathLike, title: str) -> Path:
    """Axial / coronal / sagittal mid slices, one row per volume, soft-tissue window (W400 L40)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(rows), 3, figsize=(9, 3 * len(rows)), squeeze=False)
    for row, (name, volume) in enumerate(rows):
        for col, (view, image) in enumerate(zip(("axial", "coronal", "sagittal"), _mid_slices(volume))):
            ax = axes[row][col]
            ax.imshow(image, cmap="gray", vmin=MONTAGE_WINDOW[0], vmax=MONTAGE_WINDOW[1], aspect="auto")
            ax.set_axis_off()
            ax.set_title(f"{name} {view}", fontsize=8)
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


def histogram_figure(curves: Mapping[str, tuple[np.ndarray, np.ndarray]], out_png: str | os.PathLike) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 3.5), squeeze=False)
    centres = hu_density(np.zeros(1))[1]
    centres = 0.5 * (centres[:-1] + centres[1:])
    for ax, (mode, (real, synthetic)) in zip(axes[0], curves.items()):
        ax.plot(centres, real, label="real")
        ax.plot(centres, synthetic, label="synthetic")
        ax.set_title(f"{mode}: HU inside the body")
        ax.set_xlabel("HU")
        ax.legend()
    fig.tight_layout()
    out_png = Path(out_png)
    fig.savefig(out_png, dpi=80)
    plt.close(fig)
    return out_png


# ----------------------------------------------------------------------------------------------------------------
# the evaluation


def evaluate_mode(
    mode: str,
    synthetic_dir: str | os.PathLike,
    real_dir: str | os.PathLike,
    output_dir: Path,
    finder: PancreasFinder | None,
    max_real: int = 8,
    min_pancreas_ml: float = 1.0,
) -> tuple[dict[str, Any], tuple[np.ndarray, np.ndarray]]:
    synthetic = synthetic_cases(synthetic_dir)
    real, organ_labels = real_cases(real_dir, limit=max_real)
    windows = {tuple(case["provenance"]["hu_window"]) for case in synthetic if case["provenance"].get("hu_window")}
    window = list(windows.pop()) if len(windows) == 1 else None

    real_values, real_medians, real_rows, real_found, real_dice = [], {}, [], [], []
    for entry in real:
        ct, _ = _load(entry["image"])
        if window:
            ct = np.clip(ct, *window)
        real_values.append(ct[ct > BODY_THRESHOLD_HU])
        if entry.get("organs"):
            labels, names = _load(entry["organs"])[0].astype(np.int32), organ_labels
        elif entry.get("label"):
            labels, names = _load(entry["label"])[0].astype(np.int32), MSD_LABELS
        else:
            labels, names = None, {}
        if labels is not None:
            for name, value in structure_medians(ct, labels, names).items():
                real_medians.setdefault(name, []).append(value)
            if entry.get("label"):
                pancreas = _load(entry["label"])[0] > 0
                if pancreas.any():
                    real_medians.setdefault("pancreas (label)", []).append(float(np.median(ct[pancreas])))
        if finder is not None:
            mask, voxel_ml = finder(entry["image"])
            real_found.append(bool(mask.sum() * voxel_ml >= min_pancreas_ml))
            resized = _resize_nearest(mask, ct.shape)
            if resized.any():
                real_medians.setdefault("pancreas (seg_unet3d)", []).append(float(np.median(ct[resized])))
            if entry.get("label"):
                score = dice(resized, _load(entry["label"])[0] > 0)
                if score is not None:
                    real_dice.append(score)
        if len(real_rows) < 1:
            real_rows.append((f"real {Path(entry['image']).name.split('.')[0]}", ct))

    synthetic_values, synthetic_medians, per_case, rows = [], {}, [], []
    for case in synthetic:
        ct, _ = _load(case["image"])
        synthetic_values.append(ct[ct > BODY_THRESHOLD_HU])
        record: dict[str, Any] = {"case": case["case"], "seed": case["provenance"].get("seed")}
        label = _load(case["label"])[0] > 0 if case["label"] else None
        if label is not None and label.any():
            synthetic_medians.setdefault("pancreas (label)", []).append(float(np.median(ct[label])))
        if finder is not None:
            mask, voxel_ml = finder(case["image"])
            volume_ml = float(mask.sum() * voxel_ml)
            record.update(pancreas_found=bool(volume_ml >= min_pancreas_ml), pancreas_ml=round(volume_ml, 3))
            if label is not None:
                record["dice_with_label"] = dice(_resize_nearest(mask, label.shape), label)
            if mask.any():
                resized = _resize_nearest(mask, ct.shape)
                if resized.any():
                    synthetic_medians.setdefault("pancreas (seg_unet3d)", []).append(float(np.median(ct[resized])))
        per_case.append(record)
        if len(rows) < 4:
            rows.append((f"synthetic {case['case']}", ct))

    real_all = np.concatenate(real_values) if real_values else np.zeros(0)
    synthetic_all = np.concatenate(synthetic_values) if synthetic_values else np.zeros(0)
    distances = histogram_distances(synthetic_all, real_all)
    medians = {}
    for name in sorted(set(real_medians) | set(synthetic_medians)):
        medians[name] = {
            "real": None if name not in real_medians else float(np.median(real_medians[name])),
            "synthetic": None if name not in synthetic_medians else float(np.median(synthetic_medians[name])),
            "n_real": len(real_medians.get(name, [])),
            "n_synthetic": len(synthetic_medians.get(name, [])),
        }
    png = montage(real_rows + rows, output_dir / f"montage_{mode}.png", f"ldm_abdomen, crop mode {mode}")
    found = [case["pancreas_found"] for case in per_case if "pancreas_found" in case]
    report = {
        "mode": mode,
        "synthetic_dir": str(synthetic_dir),
        "real_dir": str(real_dir),
        "n_synthetic": len(synthetic),
        "n_real": len(real),
        "hu_window": window,
        "histogram_distance": distances,
        "medians_hu": medians,
        "pancreas_found": None if not found else {"found": int(sum(found)), "of": len(found)},
        "pancreas_found_real": None if not real_found else {"found": int(sum(real_found)), "of": len(real_found)},
        "seg_dice_real": None if not real_dice else float(np.mean(real_dice)),
        "cases": per_case,
        "montage": str(png),
    }
    return report, (hu_density(real_all)[0], hu_density(synthetic_all)[0])


def evaluate_runs(
    runs: Mapping[str, Mapping[str, str]],
    output_dir: str | os.PathLike,
    seg_bundle_dir: str | os.PathLike | None = None,
    max_real: int = 8,
    min_pancreas_ml: float = 1.0,
    precision: str = "fp32",
) -> dict[str, Any]:
    """Evaluate ``{mode: {"synthetic": folder, "real": folder}}``; write and return the report (``precision``: what
    seg_unet3d runs in)."""
    if not runs:
        raise ValueError("no runs given: pass {crop mode: {'synthetic': folder, 'real': folder}}")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    finder, seg_note = load_pancreas_finder(seg_bundle_dir, precision)
    if finder is None:
        logger.warning("pancreas detection skipped: %s", seg_note)
    modes, curves = {}, {}
    for mode, paths in runs.items():
        modes[mode], curves[mode] = evaluate_mode(
            mode, paths["synthetic"], paths["real"], output_dir, finder, max_real, min_pancreas_ml
        )
    report = {
        "seg_unet3d": seg_note if finder is not None else f"skipped: {seg_note}",
        "precision": describe(precision, "cpu"),
        "body_threshold_hu": BODY_THRESHOLD_HU,
        "modes": modes,
        "histograms": str(histogram_figure(curves, output_dir / "histograms.png")),
    }
    (output_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    (output_dir / "report.md").write_text(format_report(report))
    return report


def format_report(report: Mapping[str, Any]) -> str:
    lines = ["# Synthetic CT evaluation (ldm_abdomen)", "", f"Pancreas detection: {report['seg_unet3d']}", ""]
    lines += [
        "| crop mode | synthetic | real | Wasserstein (HU) | JS (bits) | overlap | pancreas found: synthetic | real |"
    ]
    lines += ["| --- | --- | --- | --- | --- | --- | --- | --- |"]

    def fraction(found):
        return "skipped" if found is None else f"{found['found']}/{found['of']}"

    for mode, result in report["modes"].items():
        d = result["histogram_distance"]
        lines.append(
            f"| {mode} | {result['n_synthetic']} | {result['n_real']} | {d['wasserstein_hu']:.1f} | "
            f"{d['jensen_shannon']:.3f} | {d['intersection']:.2f} | {fraction(result['pancreas_found'])} | "
            f"{fraction(result['pancreas_found_real'])} |"
        )
    for mode, result in report["modes"].items():
        lines += ["", f"## {mode}: median HU", "", "| structure | real | synthetic |", "| --- | --- | --- |"]
        for name, row in result["medians_hu"].items():
            if row["synthetic"] is None and name not in KEY_STRUCTURES:
                continue  # report.json has every structure
            real = "n/a" if row["real"] is None else f"{row['real']:.0f} (n={row['n_real']})"
            synthetic = "n/a" if row["synthetic"] is None else f"{row['synthetic']:.0f} (n={row['n_synthetic']})"
            lines.append(f"| {name} | {real} | {synthetic} |")
        lines += ["", f"![montage {mode}]({Path(result['montage']).name})"]
    lines += ["", f"![histograms]({Path(report['histograms']).name})", ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m scripts.evaluate_synthetic", description=__doc__.split("\n\n")[0])
    parser.add_argument("--run", action="append", required=True, help="MODE=SYNTHETIC_DIR,REAL_DIR (repeat per mode)")
    parser.add_argument("--output_dir", default="eval/synthetic")
    parser.add_argument("--seg_bundle_dir", default=str(Path(__file__).resolve().parents[2] / "seg_unet3d"))
    parser.add_argument("--max_real", type=int, default=8)
    parser.add_argument("--min_pancreas_ml", type=float, default=1.0)
    parser.add_argument("--precision", default="fp32", help="seg_unet3d's precision: fp32, bf16 or auto")
    args = parser.parse_args(argv)
    runs = {}
    for spec in args.run:
        mode, _, paths = spec.partition("=")
        synthetic, _, real = paths.partition(",")
        runs[mode] = {"synthetic": synthetic, "real": real}
    report = evaluate_runs(
        runs, args.output_dir, args.seg_bundle_dir, args.max_real, args.min_pancreas_ml, args.precision
    )
    print(format_report(report))
    return report


if __name__ == "__main__":
    main()
