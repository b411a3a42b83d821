"""Memorization check: for every generated sample, the most similar training image, and a flag for near-copies.

Why this is not plain MONAI: MONAI has image-similarity losses and metrics (SSIM, local NCC) for pairs, but nothing
that searches a whole training set for each sample's nearest neighbour and flags near-copies. Seed 000 saw its VAE
"memorise" training images; this makes that visible per sample.

Similarity (documented in ``docs/README.md``): both volumes are clipped to a soft-tissue window (default
[-160, 240] HU, W400/L40: the window radiologists read the abdomen in, where copies of organs and texture show and
air / bone differences do not dominate), then the normalised cross-correlation (Pearson r, in [-1, 1]) is taken
over the voxels inside the sample's body (HU > -500, where the patient is; the air around it would make any two
scans alike). The nearest training image is the one with the highest NCC; its mean absolute difference in HU over
the same voxels (windowed) is reported too. A sample is a near-copy when NCC >= ``threshold`` (default 0.95):
``python benchmarks/vae_ct_quality.py`` prints the NCC of held-out real images to their nearest training image
for comparison (real images of other patients are not copies, and on the phantom they stay below that).

The module depends only on numpy, torch and nibabel (no sibling imports), so the ``tools`` package can load it by
file path, and ``configs/memorization.json`` runs it with ``python -m monai.bundle run``. Command line::

    python -m scripts.memorization --samples eval/datalist.json --training /data/dataset.json [--threshold 0.95]
"""

from __future__ import annotations

import argparse
import json
import os
from pathlib import Path
from typing import Any, Iterable, NamedTuple, Sequence

import nibabel as nib
import numpy as np
import torch
import torch.nn.functional as F

DEFAULT_WINDOW = (-160.0, 240.0)
DEFAULT_THRESHOLD = 0.95
BODY_THRESHOLD_HU = -500.0
NIFTI_SUFFIXES = (".nii.gz", ".nii")


class NearestMatch(NamedTuple):
    """The nearest training image of one sample (a NamedTuple, so the module also loads by file path)."""

    sample: str
    nearest: str
    ncc: float
    mae_hu: float
    near_copy: bool


def _name(item: Any, index: int) -> str:
    if isinstance(item, (str, os.PathLike)):
        return str(item)
    return f"array_{index}"


def load_hu(item: str | os.PathLike | np.ndarray | torch.Tensor) -> np.ndarray:
    """A 3D float32 array in HU from a NIfTI path or an array (a leading channel of size 1 is dropped)."""
    if isinstance(item, (str, os.PathLike)):
        array = np.asarray(nib.load(str(item)).dataobj, dtype=np.float32)
    elif torch.is_tensor(item):
        array = item.detach().cpu().float().numpy()
    else:
        array = np.asarray(item, dtype=np.float32)
    while array.ndim > 3 and array.shape[0] == 1:
        array = array[0]
    if array.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {array.shape}")
    return array


def _resized(array: np.ndarray, shape: Sequence[int]) -> np.ndarray:
    if tuple(array.shape) == tuple(shape):
        return array
    tensor = torch.from_numpy(np.ascontiguousarray(array))[None, None]
    return F.interpolate(tensor, size=tuple(int(s) for s in shape), mode="trilinear", align_corners=False)[0, 0].numpy()


def _standardised(rows: torch.Tensor) -> torch.Tensor:
    """Rows with zero mean and unit norm (a constant row stays zero), so a dot product is Pearson's r."""
    centred = rows - rows.mean(dim=-1, keepdim=True)
    return centred / centred.norm(dim=-1, keepdim=True).clamp_min(1e-6)


def nearest_training_images(
    samples: Sequence[str | os.PathLike | np.ndarray],
    training: Sequence[str | os.PathLike | np.ndarray],
    threshold: float = DEFAULT_THRESHOLD,
    window: Sequence[float] = DEFAULT_WINDOW,
    body_threshold_hu: float = BODY_THRESHOLD_HU,
    chunk_size: int = 64,
    sample_names: Sequence[str] | None = None,
    training_names: Sequence[str] | None = None,
) -> list[NearestMatch]:
    """For each sample, the training image with the highest windowed NCC inside the sample's body.

    Training images of another shape are resized (trilinear) to the sample's shape. Training images are read
    ``chunk_size`` at a time, so the training set never has to fit in memory at once.
    """
    if not len(samples) or not len(training):
        raise ValueError("need at least one sample and one training image")
    lo, hi = float(window[0]), float(window[1])
    sample_names = list(sample_names or [_name(s, i) for i, s in enumerate(samples)])
    training_names = list(training_names or [_name(t, i) for i, t in enumerate(training)])
    prepared = []
    for sample in samples:
        hu = load_hu(sample)
        body = hu > body_threshold_hu
        if body.sum() < 2:  # no body (an empty or failed sample): compare everything
            body = np.ones_like(body)
        values = torch.from_numpy(np.clip(hu, lo, hi)[body])
        prepared.append((hu.shape, torch.from_numpy(body.ravel()), values, _standardised(values[None])[0]))
    best_ncc = np.full(len(samples), -np.inf)
    best_index = np.zeros(len(samples), dtype=int)
    best_mae = np.full(len(samples), np.nan)
    for start in range(0, len(training), chunk_size):
        chunk = [load_hu(item) for item in training[start : start + chunk_size]]
        by_shape: dict[tuple, torch.Tensor] = {}  # the chunk windowed and flattened, once per sample shape
        for s, (shape, body, values, standard) in enumerate(prepared):
            if shape not in by_shape:
                by_shape[shape] = torch.stack(
                    [torch.from_numpy(np.clip(_resized(t, shape), lo, hi).ravel()) for t in chunk]
                )
            rows = by_shape[shape][:, body]
            ncc = _standardised(rows) @ standard
            j = int(torch.argmax(ncc))
            if float(ncc[j]) > best_ncc[s]:
                best_ncc[s] = float(ncc[j])
                best_index[s] = start + j
                best_mae[s] = float((rows[j] - values).abs().mean())
    return [
        NearestMatch(
            sample=sample_names[s],
            nearest=training_names[best_index[s]],
            ncc=round(float(best_ncc[s]), 6),
            mae_hu=round(float(best_mae[s]), 3),
            near_copy=bool(best_ncc[s] >= threshold),
        )
        for s in range(len(samples))
    ]


def _datalist_images(source: str | os.PathLike, key: str | None, image_key: str = "image") -> list[str]:
    """Image paths of a datalist JSON (section ``key``; None: every list section) or ``*.nii*`` of a folder."""
    path = Path(source)
    if path.is_dir():
        if (path / "dataset.json").is_file():
            path = path / "dataset.json"
        else:
            return sorted(str(p) for p in path.iterdir() if p.name.endswith(NIFTI_SUFFIXES))
    content = json.loads(path.read_text())
    sections = [key] if key else [k for k, v in content.items() if isinstance(v, list)]
    images = []
    for section in sections:
        for entry in content.get(section, []):
            value = entry.get(image_key) if isinstance(entry, dict) else entry
            if value:
                images.append(str(value) if os.path.isabs(str(value)) else str(path.parent / str(value)))
    return images


def check_memorization(
    samples: str | os.PathLike | Sequence[Any],
    training: str | os.PathLike | Sequence[Any],
    threshold: float = DEFAULT_THRESHOLD,
    window: Sequence[float] = DEFAULT_WINDOW,
    samples_key: str | None = None,
    training_key: str | None = "training",
    report_file: str | os.PathLike | None = None,
    verbose: bool = True,
) -> dict[str, Any]:
    """Find each sample's nearest training image, print one line per sample, and return (and optionally write) the
    report ``{"threshold", "window", "similarity", "results": [...], "n_near_copies", "max_ncc"}``.

    ``samples`` / ``training``: a datalist JSON (``samples_key`` / ``training_key`` section; the inference writes
    ``datalist.json`` with a ``training`` section), an MSD folder with ``dataset.json``, a folder of NIfTI files,
    or a list of paths / arrays.
    """
    sample_items = _datalist_images(samples, samples_key) if isinstance(samples, (str, os.PathLike)) else list(samples)
    training_items = (
        _datalist_images(training, training_key) if isinstance(training, (str, os.PathLike)) else list(training)
    )
    matches = nearest_training_images(sample_items, training_items, threshold=threshold, window=window)
    report = {
        "similarity": f"normalised cross-correlation inside the sample's body (HU > {BODY_THRESHOLD_HU:g}) after "
        f"clipping both to [{window[0]:g}, {window[1]:g}] HU",
        "threshold": float(threshold),
        "window": [float(w) for w in window],
        "n_samples": len(matches),
        "n_training": len(training_items),
        "n_near_copies": sum(m.near_copy for m in matches),
        "max_ncc": max(m.ncc for m in matches),
        "results": [m._asdict() for m in matches],
    }
    if verbose:
        for m in matches:
            flag = "NEAR-COPY" if m.near_copy else "ok"
            print(f"{flag:9}  ncc={m.ncc:.4f}  mae={m.mae_hu:7.1f} HU  {m.sample}  nearest: {m.nearest}")
        print(
            f"{report['n_near_copies']} of {report['n_samples']} samples are near-copies (NCC >= {threshold:g}) of "
            f"one of {report['n_training']} training images; highest NCC {report['max_ncc']:.4f}"
        )
    if report_file is not None:
        Path(report_file).parent.mkdir(parents=True, exist_ok=True)
        Path(report_file).write_text(json.dumps(report, indent=2) + "\n")
    return report


def main(argv: Iterable[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--samples", required=True, help="datalist JSON of the generated pairs, or a folder")
    parser.add_argument("--training", required=True, help="training datalist JSON / MSD folder / NIfTI folder")
    parser.add_argument("--samples_key", default=None, help="datalist section of the samples (default: all)")
    parser.add_argument("--training_key", default="training", help="datalist section of the training images")
    parser.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    parser.add_argument("--window", type=float, nargs=2, default=DEFAULT_WINDOW)
    parser.add_argument("--report_file", default=None)
    args = parser.parse_args(list(argv) if argv is not None else None)
    report = check_memorization(
        args.samples, args.training, args.threshold, args.window, args.samples_key, args.training_key,
        args.report_file,
    )  # fmt: skip
    return 0 if report["n_near_copies"] == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
