"""Evaluation of segmentation models and of synthetic CT sets (SPEC section 4, ``evaluate``).

* :func:`evaluate_segmentation` is a thin wrapper: it runs the seg_unet3d bundle's ``configs/evaluate.json`` through
  ``monai.bundle`` on a datalist and returns the bundle's own summary (Dice, NSD, HD95 per region, lesion
  detection per size bin, patient specificity). The metrics are computed by the bundle, not here.
* :func:`evaluate_synthetic` measures a synthetic set against a real one:

  - **HU histogram distance** inside the body (:func:`tools.realism.histogram_distances`: Wasserstein in HU,
    Jensen-Shannon in bits, overlap), on values pooled over each set;
  - **median HU per label** (1 pancreas, 2 tumor) in both sets, and per organ where both sets carry organ maps;
  - **pancreas found by seg_unet3d** (when its weights are given): the bundle's ``configs/inference.json`` segments
    every synthetic scan; reported are the mean Dice of the predicted pancreas (labels 1 + 2) to the synthetic
    label (the figure to read first: does a judge trained on real CT see the pancreas where the label says it
    is?) and the fraction of scans where that Dice reaches ``min_pancreas_dice`` (:func:`pancreas_found`);
  - **3D Fréchet distance** between feature sets: global average (and standard-deviation) pooled bottleneck
    features of the seg_unet3d encoder given its weights; without them a fixed, seeded random-weight 3D conv
    network (a warning says so: such a distance only compares low-level statistics). It is *not* the 2D Inception
    FID (seed 002 found that unusable for 3D CT); numbers are only comparable under the same feature network;
  - **sample diversity**: mean pairwise absolute difference (HU) and mean pairwise SSIM between samples made from
    the same source mask (0 HU / SSIM 1 = identical samples);
  - **memorization** against the training set with the vae_ct bundle's ``scripts/memorization.py`` (loaded through
    :func:`tools.bundles.import_bundle_scripts`): nearest training image per sample, near-copies flagged.

  It writes ``metrics.json``, ``metrics.csv`` (one ``metric,value`` row per number), ``montage.png`` (synthetic and
  real axial slices through the tumor, else the pancreas, named, windowed, oriented and outlined) and
  ``histogram.png`` (the two HU histograms).
"""

from __future__ import annotations

import csv
import importlib
import io
import itertools
import json
import logging
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from tools.datasets import LABEL_SET, load_image_hu, validate_records
from tools.io import atomic_path, load_nifti, write_json

logger = logging.getLogger(__name__)

#: Grid every volume is resampled to before feature extraction (voxels).
FEATURE_GRID = (64, 64, 64)
#: Intensity window (HU) mapped to [0, 1] for the feature networks and SSIM (seg_unet3d's a_min / a_max).
FEATURE_WINDOW = (-175.0, 250.0)
#: Maximum body voxels taken per volume for the pooled histograms (a regular subsample beyond that).
MAX_VALUES_PER_VOLUME = 2_000_000
LABEL_NAMES = {1: "pancreas", 2: "tumor"}


# ----------------------------------------------------------------------------------------------------------------
# segmentation


def _datalist_file(datalist: str | os.PathLike) -> Path:
    path = Path(datalist)
    if path.is_dir():
        path = path / "dataset.json"
    if not path.is_file():
        raise FileNotFoundError(f"{datalist}: no datalist JSON (give a datalist file or a folder with dataset.json)")
    return path.resolve()


def evaluate_segmentation(
    datalist: str | os.PathLike,
    ckpt_dir: str | os.PathLike,
    out: str | os.PathLike,
    overrides: Mapping[str, Any] | None = None,
    section: str = "test",
    bundle: str | os.PathLike = "seg_unet3d",
) -> dict:
    """Run seg_unet3d's ``configs/evaluate.json`` on ``section`` of ``datalist`` with the weights in ``ckpt_dir``.

    Returns the bundle's ``summary.json`` (written with its CSVs and predictions under ``out``); ``overrides`` are
    config overrides (e.g. the network size a model was trained with).
    """
    from tools.bundles import run_config

    path = _datalist_file(datalist)
    out = Path(out).resolve()
    settings = {"dataset_dir": str(path.parent), "datalist": str(path), "ckpt_dir": str(Path(ckpt_dir).resolve()),
                "output_dir": str(out), "eval_section": section, **dict(overrides or {})}  # fmt: skip
    run_config(bundle, ["train.json", "evaluate.json"], settings, workflow_type="train")
    summary_file = out / "summary.json"
    if not summary_file.is_file():
        raise RuntimeError(f"the seg_unet3d evaluation wrote no {summary_file}")
    return json.loads(summary_file.read_text())


def summary_rows(summary: Mapping[str, Any]) -> list[tuple[str, Any]]:
    """Flat ``(name, value)`` rows of a seg_unet3d summary for printing."""
    rows = []
    for row in summary.get("regions", []):
        name = f"{row.get('region')}_{row.get('metric')}"
        rows.append((name, row.get("mean", row.get("value"))))
    for key, value in summary.items():
        if isinstance(value, (int, float, str)) and key != "regions":
            rows.append((key, value))
    return rows


# ----------------------------------------------------------------------------------------------------------------
# reading sets


def _records(source: str | os.PathLike | Sequence[Mapping[str, Any]] | Mapping[str, Any]) -> list[dict]:
    from tools.splits import load_records

    if isinstance(source, (str, os.PathLike)):
        folder = Path(source)
        if folder.is_dir() and not (folder / "dataset.json").is_file() and (folder / "datalist.json").is_file():
            source = folder / "datalist.json"  # a folder written by `synthesize`
    return [dict(r) for r in load_records(source).records(None)]


def _load(path: str) -> tuple[np.ndarray, np.ndarray]:
    return load_nifti(path, dtype=np.float32)


def _body_values(ct: np.ndarray, affine: np.ndarray) -> np.ndarray:
    from tools.prep import body_mask

    body = body_mask(ct, affine)
    values = ct[body] if body.any() else ct.ravel()
    step = max(1, values.size // MAX_VALUES_PER_VOLUME)
    return values[::step]


def _resize(volume: np.ndarray, shape: Sequence[int]):
    import torch
    import torch.nn.functional as F

    tensor = torch.as_tensor(np.ascontiguousarray(volume), dtype=torch.float32)[None, None]
    return F.interpolate(tensor, size=tuple(shape), mode="trilinear", align_corners=False)


def _window(volume: np.ndarray, window: Sequence[float] = FEATURE_WINDOW) -> np.ndarray:
    lo, hi = window
    return np.clip((volume - lo) / (hi - lo), 0.0, 1.0).astype(np.float32)


# ----------------------------------------------------------------------------------------------------------------
# features and the Fréchet distance


class RandomFeatureNet:
    """A fixed 3D conv feature extractor with seeded random weights (the fallback when no trained network is given):
    four stride-2 3x3x3 convolutions (1 -> 8 -> 16 -> 32 -> 64 channels) with leaky ReLU; features are the global
    mean and standard deviation of the last map (128 numbers)."""

    def __init__(self, seed: int = 0):
        import torch
        from torch import nn

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            layers = []
            for cin, cout in ((1, 8), (8, 16), (16, 32), (32, 64)):
                layers += [nn.Conv3d(cin, cout, 3, stride=2, padding=1), nn.LeakyReLU(0.2)]
            self.net = nn.Sequential(*layers).eval()

    def __call__(self, x):
        import torch

        with torch.no_grad():
            fmap = self.net(x)
        return torch.cat([fmap.mean(dim=(2, 3, 4)), fmap.std(dim=(2, 3, 4))], dim=1)


class SegBottleneckFeatures:
    """Pooled bottleneck features of a trained seg_unet3d (MONAI ``UNet``): a forward hook on the bottom layer, then
    the global mean and standard deviation of its feature map per channel."""

    def __init__(self, network):
        from monai.networks.layers.simplelayers import SkipConnection
        from torch import nn

        self.network = network.eval()
        layer = getattr(network, "model", None)
        if layer is None or not isinstance(layer[1], SkipConnection):
            raise TypeError(f"{type(network).__name__}: not a MONAI UNet (no bottleneck found)")
        while isinstance(layer[1].submodule, nn.Sequential) and isinstance(layer[1].submodule[1], SkipConnection):
            layer = layer[1].submodule  # down, SkipConnection(next level), up
        self.bottom = layer[1].submodule  # the bottom layer (bottleneck) inside the innermost skip connection
        self._fmap = None
        self.bottom.register_forward_hook(lambda _m, _i, output: setattr(self, "_fmap", output))

    def __call__(self, x):
        import torch

        with torch.no_grad():
            self.network(x)
        fmap = self._fmap
        return torch.cat([fmap.mean(dim=(2, 3, 4)), fmap.std(dim=(2, 3, 4))], dim=1)


def _weights_file(ckpt: str | os.PathLike) -> Path:
    path = Path(ckpt)
    return path / "model.pt" if path.is_dir() else path


def load_seg_network(seg_bundle: str | os.PathLike, seg_ckpt: str | os.PathLike, overrides: Mapping | None = None):
    """The seg_unet3d network of its ``configs/inference.json`` (with ``overrides``) with the weights of
    ``seg_ckpt`` (a ``model.pt`` or its folder), on the CPU, in eval mode."""
    import torch
    from monai.bundle import ConfigParser

    from tools.bundles import bundle_dir, bundle_on_path

    root = bundle_dir(seg_bundle)
    parser = ConfigParser()
    parser.read_config(str(root / "configs" / "inference.json"))
    for key, value in (overrides or {}).items():
        parser[key] = value
    with bundle_on_path(root):
        network = parser.get_parsed_content("network_def")
    state = torch.load(_weights_file(seg_ckpt), map_location="cpu", weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    state = {k[len("module.") :] if k.startswith("module.") else k: v for k, v in state.items()}
    network.load_state_dict(state, strict=True)
    return network.eval()


def feature_extractor(seg_bundle=None, seg_ckpt=None, seg_overrides=None) -> tuple[Any, str]:
    """(extractor, description): seg_unet3d bottleneck features given its weights, else the random network (warned)."""
    if seg_ckpt is not None:
        try:
            network = load_seg_network(seg_bundle or "seg_unet3d", seg_ckpt, seg_overrides)
            return SegBottleneckFeatures(network), f"seg_unet3d bottleneck features ({_weights_file(seg_ckpt)})"
        except TypeError as error:
            warnings.warn(f"{error}; using the random-weight feature network instead")
    warnings.warn(
        "3D feature distance: no trained seg_unet3d weights given, using a FIXED RANDOM-WEIGHT 3D conv feature "
        "network; the Fréchet distance then compares low-level image statistics only (give --seg_ckpt)",
        stacklevel=2,
    )
    return RandomFeatureNet(), "random-weight 3D conv features (no trained network given)"


def extract_features(volumes_hu: Sequence[np.ndarray], extractor, grid: Sequence[int] = FEATURE_GRID) -> np.ndarray:
    """One feature row per volume: windowed to [0, 1], resampled to ``grid``, passed through ``extractor``."""
    import torch

    rows = []
    for volume in volumes_hu:
        x = _resize(_window(volume), grid)
        rows.append(extractor(x).reshape(-1).to(torch.float64).numpy())
    return np.stack(rows)


def _psd_sqrt(matrix: np.ndarray) -> np.ndarray:
    """Square root of a symmetric positive semi-definite matrix (negative round-off eigenvalues set to 0)."""
    values, vectors = np.linalg.eigh(0.5 * (matrix + matrix.T))
    return (vectors * np.sqrt(np.clip(values, 0.0, None))) @ vectors.T


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets:
    ``|mu_a - mu_b|^2 + tr(S_a + S_b - 2 (S_a S_b)^(1/2))`` (0 for equal sets, symmetric).

    The trace of ``(S_a S_b)^(1/2)`` is computed as that of ``(S_a^(1/2) S_b S_a^(1/2))^(1/2)`` (same eigenvalues,
    but a symmetric matrix: stable when the covariances are singular, as they are with fewer cases than features).
    """
    a = np.asarray(features_a, dtype=np.float64)
    b = np.asarray(features_b, dtype=np.float64)
    if a.ndim != 2 or b.ndim != 2 or a.shape[1] != b.shape[1]:
        raise ValueError(f"feature sets must be (n, d) with the same d, got {a.shape} and {b.shape}")
    mu_a, mu_b = a.mean(axis=0), b.mean(axis=0)
    cov_a = np.atleast_2d(np.cov(a, rowvar=False)) if len(a) > 1 else np.zeros((a.shape[1],) * 2)
    cov_b = np.atleast_2d(np.cov(b, rowvar=False)) if len(b) > 1 else np.zeros((b.shape[1],) * 2)
    root_a = _psd_sqrt(cov_a)
    inner = root_a @ cov_b @ root_a
    trace_sqrt = float(np.sqrt(np.clip(np.linalg.eigvalsh(0.5 * (inner + inner.T)), 0.0, None)).sum())
    value = float(np.sum((mu_a - mu_b) ** 2) + np.trace(cov_a) + np.trace(cov_b) - 2.0 * trace_sqrt)
    return max(value, 0.0)


# ----------------------------------------------------------------------------------------------------------------
# diversity


def _ssim(a: np.ndarray, b: np.ndarray) -> float:
    import torch
    from monai.metrics import SSIMMetric

    win = int(min(7, *[s if s % 2 else s - 1 for s in a.shape]))
    metric = SSIMMetric(spatial_dims=3, data_range=1.0, win_size=max(win, 1))
    x = torch.as_tensor(_window(a))[None, None]
    y = torch.as_tensor(_window(b))[None, None]
    return float(metric(x, y).mean())


def sample_diversity(groups: Mapping[str, Sequence[np.ndarray]]) -> dict[str, Any]:
    """Mean pairwise absolute difference (HU) and SSIM between samples of the same source, over all such pairs.

    ``groups``: source -> volumes made from it. Groups of one sample have no pair; with no pair at all the values
    are None.
    """
    diffs, ssims = [], []
    for volumes in groups.values():
        for a, b in itertools.combinations(volumes, 2):
            if a.shape != b.shape:
                continue
            diffs.append(float(np.abs(a - b).mean()))
            ssims.append(_ssim(a, b))
    return {
        "diversity_pairs": len(diffs),
        "diversity_mean_abs_diff_hu": float(np.mean(diffs)) if diffs else None,
        "diversity_mean_ssim": float(np.mean(ssims)) if ssims else None,
    }


# ----------------------------------------------------------------------------------------------------------------
# the synthetic-set evaluation


def _group_key(record: Mapping[str, Any]) -> str:
    for key in ("source_index", "source_label", "source_image", "source_patient"):
        if record.get(key) is not None:
            return f"{key}={record[key]}"
    return f"image={record.get('image')}"


def _label_medians(cases: Sequence[tuple[np.ndarray, np.ndarray | None]]) -> dict[str, float | None]:
    out = {}
    for value, name in LABEL_NAMES.items():
        pooled = [ct[label == value] for ct, label in cases if label is not None and label.shape == ct.shape]
        pooled = [p for p in pooled if p.size]
        out[name] = float(np.median(np.concatenate(pooled))) if pooled else None
    return out


def _organ_medians(records: Sequence[Mapping], cts: Sequence[np.ndarray]) -> dict[int, float]:
    pooled: dict[int, list[np.ndarray]] = {}
    for record, ct in zip(records, cts):
        if not record.get("organs"):
            return {}
        organs, _ = load_nifti(record["organs"])
        if organs.shape != ct.shape:
            return {}
        for organ_id in np.unique(organs):
            if organ_id > 0:
                pooled.setdefault(int(organ_id), []).append(ct[organs == organ_id])
    return {k: float(np.median(np.concatenate(v))) for k, v in pooled.items()}


def pancreas_found(
    predictions: Sequence[np.ndarray], labels: Sequence[np.ndarray | None], min_dice: float = 0.5
) -> dict[str, Any]:
    """Did the judge find the pancreas where the synthetic label puts it?

    Per scan, the Dice between the predicted pancreas (labels 1 + 2) and the synthetic label's (labels 1 + 2); a
    scan counts as "found" when that Dice reaches ``min_dice``. A volume threshold alone would call pure noise
    "found" whenever the judge paints a few millilitres of false pancreas anywhere; the overlap with the label
    does not. Scans without a label (or on another grid) are left out of both figures.
    """
    dices = []
    for pred, label in zip(predictions, labels):
        if label is None or label.shape != pred.shape:
            continue
        predicted, truth = pred > 0, label > 0
        denominator = int(predicted.sum() + truth.sum())
        dices.append(float(2.0 * (predicted & truth).sum() / denominator) if denominator else 1.0)
    return {
        "pancreas_dice_to_synthetic_label": float(np.mean(dices)) if dices else None,
        "pancreas_found_fraction": float(np.mean([d >= min_dice for d in dices])) if dices else None,
        "pancreas_found_min_dice": float(min_dice),
        "pancreas_n_judged": len(dices),
    }


def predict_pancreas(records: Sequence[Mapping], out: Path, seg_bundle, seg_ckpt, seg_overrides) -> list[np.ndarray]:
    """seg_unet3d's ``configs/inference.json`` on every record's image; the predicted label maps, in order (written
    under ``out/seg_predictions``)."""
    from tools.bundles import run_config

    pred_dir = out / "seg_predictions"
    settings = {"datalist": [r["image"] for r in records], "output_dir": str(pred_dir),
                "ckpt_path": str(_weights_file(seg_ckpt)), **dict(seg_overrides or {})}  # fmt: skip
    run_config(seg_bundle or "seg_unet3d", ["inference.json"], settings, workflow_type="infer")
    return [load_nifti(pred_dir / f"{Path(r['image']).name.split('.nii')[0]}_seg.nii.gz")[0] for r in records]


def _case_name(record: Mapping[str, Any]) -> str:
    return str(record.get("case") or Path(record["image"]).name.split(".nii")[0])


def _montage(groups: Sequence[tuple[str, Sequence[Mapping], Sequence[tuple]]], path: Path, n: int = 4) -> None:
    """One row per group (name, records, cases), up to ``n`` cases each, cases with a tumor first: the axial slice
    through the tumor's largest cross-section (the pancreas's without a tumor) with the case's name, the window,
    the patient's directions and the pancreas / tumor outlines."""
    import matplotlib.pyplot as plt

    from tools.figures import (
        ABDOMEN_WINDOW,
        TUMOR,
        focus_slices,
        outline_legend,
        save_figure,
        show_slice,
        to_ras,
        window_name,
    )
    from tools.io import voxel_spacing

    def has_tumor(case: tuple) -> bool:
        ct, _, label = case
        return label is not None and label.shape == ct.shape and bool((label == TUMOR).any())

    # the tumors (inserted or real) are what a reader checks first; sorted() keeps the set's order otherwise
    chosen = [(group, sorted(zip(records, cases), key=lambda rc: not has_tumor(rc[1]))[:n])
              for group, records, cases in groups]  # fmt: skip
    panels = []
    for group, cases in chosen:
        row = []
        for record, (ct, affine, label) in cases:
            vol, aff = to_ras(ct, affine)
            lab = to_ras(label, affine)[0] if label is not None and label.shape == ct.shape else None
            row.append((group, record, vol, voxel_spacing(aff), lab))
        panels.append(row)
    # panel height from the displayed shape (anterior-posterior extent over left-right extent) of the tallest case
    ratio = max([p[2].shape[1] * p[3][1] / (p[2].shape[0] * p[3][0]) for row in panels for p in row] or [1.0])
    cols = max(1, max(len(row) for row in panels))
    width = 2.9
    fig, axes = plt.subplots(len(panels), cols, figsize=(width * cols, len(panels) * (width * ratio + 0.5) + 0.9),
                             squeeze=False, layout="constrained")  # fmt: skip
    for ax_row, row in zip(axes, panels):
        for ax, panel in itertools.zip_longest(ax_row, row):
            if panel is None:
                ax.axis("off")
                continue
            group, record, vol, spacing, lab = panel
            k = focus_slices(lab, vol.shape)[2]
            tumor = ", tumor" if lab is not None and (lab == TUMOR).any() else ""
            title = f"{group}: {_case_name(record)}\naxial {k + 1}/{vol.shape[2]}{tumor}, {window_name()}"
            show_slice(ax, vol, spacing, "axial", k, lab, ABDOMEN_WINDOW, title, fontsize=7)
    fig.suptitle(
        "Rows: " + ", ".join(g for g, _ in chosen) + f". Axial slices, window {window_name()}, through the tumor's "
        "largest cross-section (the pancreas's when the case has no tumor)",
        fontsize=8,
    )
    outline_legend(fig, loc="outside lower center", ncol=2)
    save_figure(fig, path)


def _histogram_figure(syn_values: np.ndarray, real_values: np.ndarray, distances: Mapping, path: Path) -> None:
    import matplotlib.pyplot as plt

    from tools.figures import save_figure
    from tools.realism import hu_density

    fig, ax = plt.subplots(figsize=(8, 3.5))
    for values, name in ((real_values, "real"), (syn_values, "synthetic")):
        p, edges = hu_density(values)
        ax.step(edges[:-1], p, where="post", label=name)
    ax.set_yscale("log")
    ax.set_xlim(-1050, 1500)
    ax.set_xlabel("HU (inside the body)")
    ax.set_ylabel("fraction of voxels per 10 HU")
    title = f"Wasserstein {distances['wasserstein_hu']:.1f} HU, Jensen-Shannon {distances['jensen_shannon']:.3f} bits"
    ax.set_title(f"{title}, overlap {distances['intersection']:.2f}", fontsize=9)
    ax.legend()
    save_figure(fig, path)


def _write_csv(path: Path, metrics: Mapping[str, Any]) -> None:
    buffer = io.StringIO()
    writer = csv.writer(buffer, lineterminator="\n")
    writer.writerow(["metric", "value"])
    for key, value in metrics.items():
        if not isinstance(value, (dict, list)):
            writer.writerow([key, "" if value is None else value])
    with atomic_path(path) as tmp:
        tmp.write_text(buffer.getvalue())


def evaluate_synthetic(
    synthetic: str | os.PathLike | Sequence[Mapping[str, Any]],
    real: str | os.PathLike | Sequence[Mapping[str, Any]],
    out: str | os.PathLike,
    seg_bundle: str | os.PathLike | None = None,
    seg_ckpt: str | os.PathLike | None = None,
    training: str | os.PathLike | Sequence[Mapping[str, Any]] | None = None,
    *,
    seg_overrides: Mapping[str, Any] | None = None,
    min_pancreas_dice: float = 0.5,
    memorization_threshold: float | None = None,
    figures: bool = True,
) -> dict:
    """Measure a synthetic set against a real one (see the module docstring) and write the files under ``out``.

    Args:
        synthetic / real: datalist JSON, MSD / data folder or records (every section is used).
        out: output folder (metrics.json, metrics.csv, montage.png, histogram.png, seg_predictions/).
        seg_bundle / seg_ckpt: the seg_unet3d bundle (default ``seg_unet3d``) and its weights (``model.pt`` or its
            folder): enables the pancreas check and the trained feature network.
        training: the training set of the generator: enables the memorization check.
        seg_overrides: config overrides the seg weights need (network size of a small model, ``pixdim``...).
        min_pancreas_dice: Dice between seg_unet3d's pancreas and the synthetic label from which a scan counts as
            "pancreas found" (:func:`pancreas_found`).
        memorization_threshold: NCC from which a sample is a near-copy (default vae_ct's 0.95).
        figures: write the PNGs.

    Returns a flat dict of the numbers (``hist_*``, ``median_hu_*``, ``pancreas_*``, ``frechet_distance``,
    ``diversity_*``, ``memorization_*``, counts, and the feature network's description).
    """
    out = Path(out).resolve()
    syn_records, real_records = _records(synthetic), _records(real)
    training_records = _records(training) if training is not None else []
    if not syn_records or not real_records:
        raise ValueError("both the synthetic and the real set need at least one case")
    # every file is checked before anything is written; a synthetic image need not look like CT (a poor generator's
    # output is what is measured), the real and training ones must
    validate_records(syn_records, check_ct=False, allowed_labels=LABEL_SET)
    validate_records(real_records, allowed_labels=LABEL_SET)
    validate_records(training_records, allowed_labels=LABEL_SET)
    out.mkdir(parents=True, exist_ok=True)

    def read(records):
        cases = []
        for r in records:
            ct, affine = load_image_hu(r)  # a set written in a HU window is compared in HU like the others
            label = _load(r["label"])[0].astype(np.int16) if r.get("label") else None
            cases.append((ct, affine, label))
        return cases

    syn_cases, real_cases = read(syn_records), read(real_records)
    syn_values = np.concatenate([_body_values(ct, a) for ct, a, _ in syn_cases])
    real_values = np.concatenate([_body_values(ct, a) for ct, a, _ in real_cases])
    from tools.realism import histogram_distances

    distances = histogram_distances(syn_values, real_values)
    metrics: dict[str, Any] = {"n_synthetic": len(syn_cases), "n_real": len(real_cases)}
    metrics.update({f"hist_{k}": v for k, v in distances.items()})
    syn_medians = _label_medians([(ct, lab) for ct, _, lab in syn_cases])
    real_medians = _label_medians([(ct, lab) for ct, _, lab in real_cases])
    for name in LABEL_NAMES.values():
        metrics[f"median_hu_{name}_synthetic"] = syn_medians[name]
        metrics[f"median_hu_{name}_real"] = real_medians[name]
    syn_organs = _organ_medians(syn_records, [c[0] for c in syn_cases])
    real_organs = _organ_medians(real_records, [c[0] for c in real_cases])
    for organ_id in sorted(set(syn_organs) & set(real_organs)):
        metrics[f"median_hu_organ{organ_id}_synthetic"] = syn_organs[organ_id]
        metrics[f"median_hu_organ{organ_id}_real"] = real_organs[organ_id]

    if seg_ckpt is not None:
        predictions = predict_pancreas(syn_records, out, seg_bundle, seg_ckpt, seg_overrides)
        metrics.update(pancreas_found(predictions, [c[2] for c in syn_cases], min_pancreas_dice))
    else:
        metrics.update({"pancreas_dice_to_synthetic_label": None, "pancreas_found_fraction": None})

    extractor, description = feature_extractor(seg_bundle, seg_ckpt, seg_overrides)
    syn_features = extract_features([c[0] for c in syn_cases], extractor)
    real_features = extract_features([c[0] for c in real_cases], extractor)
    metrics["frechet_distance"] = frechet_distance(syn_features, real_features)
    metrics["feature_network"] = description

    groups: dict[str, list[np.ndarray]] = {}
    for record, (ct, _, _) in zip(syn_records, syn_cases):
        groups.setdefault(_group_key(record), []).append(ct)
    metrics.update(sample_diversity(groups))

    if training is not None:
        from tools.bundles import import_bundle_scripts

        package = import_bundle_scripts("vae_ct")
        memorization = importlib.import_module(f"{package.__name__}.memorization")
        threshold = memorization.DEFAULT_THRESHOLD if memorization_threshold is None else memorization_threshold
        report = memorization.check_memorization(
            [r["image"] for r in syn_records], [r["image"] for r in training_records], threshold=threshold,
            verbose=False, report_file=out / "memorization.json",
        )  # fmt: skip
        metrics["memorization_n_near_copies"] = report["n_near_copies"]
        metrics["memorization_fraction_near_copies"] = report["n_near_copies"] / max(report["n_samples"], 1)
        metrics["memorization_max_ncc"] = report["max_ncc"]
        metrics["memorization_threshold"] = report["threshold"]
    else:
        metrics.update({"memorization_n_near_copies": None, "memorization_max_ncc": None})

    write_json(out / "metrics.json", metrics)
    _write_csv(out / "metrics.csv", metrics)
    if figures:
        _montage([("synthetic", syn_records, syn_cases), ("real", real_records, real_cases)], out / "montage.png")
        _histogram_figure(syn_values, real_values, distances, out / "histogram.png")
    return metrics
