"""Seeded sampling for inference: N samples per mask, each with its own documented seed, and the output datalist.

Why this is not plain MONAI: MONAI's random transforms draw from one generator per transform, so a sample's noise
would depend on the order and number of items before it; here sample ``k`` of mask ``m`` always gets
``z = randn(latent_size)`` from ``torch.Generator().manual_seed(sample_seed(seed, m, k))`` (drawn on the CPU, so a
GPU run gives the same ``z``), whatever else the run contains. MONAI also has no transform that turns one datalist
entry into N samples with names and provenance, nor a writer of the datalist of a synthetic set.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any, Mapping, Sequence

import torch
from monai.transforms import Transform

#: Seeds of different masks never collide while a run draws fewer samples per mask than this.
SEED_STRIDE = 100_000
NIFTI_SUFFIXES = (".nii.gz", ".nii")


def sample_seed(seed: int, mask_index: int, sample_index: int) -> int:
    """The seed of sample ``sample_index`` of the mask at position ``mask_index`` of the datalist:
    ``seed + 100000 * mask_index + sample_index``."""
    if not 0 <= sample_index < SEED_STRIDE:
        raise ValueError(f"sample index {sample_index} must be in [0, {SEED_STRIDE})")
    return int(seed) + SEED_STRIDE * int(mask_index) + int(sample_index)


def _stem(path: str | os.PathLike) -> str:
    name = Path(str(path)).name
    for suffix in NIFTI_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def expand_samples(
    datalist: Sequence[Mapping[str, Any] | str], num_samples: int, seed: int = 0, mask_key: str = "label"
) -> list[dict[str, Any]]:
    """One item per (mask, sample): ``{mask_key: path, "sample": k, "seed": s, "name": "<case>_s<k>",
    "provenance": {...}}``.

    ``datalist``: datalist entries with a ``mask_key`` path (an ``image`` entry is ignored; ``case`` names the
    output when present, else the mask's file name) or plain mask paths. Seeds follow :func:`sample_seed`.
    """
    if num_samples < 1:
        raise ValueError(f"num_samples must be at least 1, got {num_samples}")
    items = []
    for m, entry in enumerate(datalist):
        record = {mask_key: entry} if isinstance(entry, (str, os.PathLike)) else dict(entry)
        if mask_key not in record:
            raise KeyError(f"datalist entry {m} has no '{mask_key}' (the mask to generate from): {record}")
        mask_path = str(record[mask_key])
        case = str(record.get("case") or _stem(mask_path))
        for k in range(num_samples):
            s = sample_seed(seed, m, k)
            items.append(
                {
                    mask_key: mask_path,
                    "sample": k,
                    "seed": s,
                    "name": f"{case}_s{k:03d}",
                    "provenance": {"seed": s, "sample": k, "mask_index": m, "source_mask": mask_path},
                }
            )
    return items


class SeededNoised(Transform):
    """Put ``z = randn(*shape)`` drawn from ``torch.Generator().manual_seed(item[seed_key])`` under ``key``."""

    def __init__(self, shape: Sequence[int], key: str = "noise", seed_key: str = "seed") -> None:
        self.shape = [int(s) for s in shape]
        self.key = key
        self.seed_key = seed_key

    def __call__(self, data: Mapping[str, Any]) -> dict[str, Any]:
        d = dict(data)
        generator = torch.Generator().manual_seed(int(d[self.seed_key]))
        d[self.key] = torch.randn(self.shape, generator=generator)
        return d


def write_datalist(output_dir: str | os.PathLike, filename: str = "datalist.json", key: str = "training") -> Path:
    """Write ``output_dir/filename``: every ``<name>_image.nii.gz`` with its ``<name>_label.nii.gz`` (paths relative
    to ``output_dir``) and the provenance of the image's sidecar, under ``key``; return the path."""
    folder = Path(output_dir)
    entries = []
    for image in sorted(folder.glob("*_image.nii.gz")):
        name = image.name[: -len("_image.nii.gz")]
        label = folder / f"{name}_label.nii.gz"
        if not label.is_file():
            continue
        entry: dict[str, Any] = {"image": image.name, "label": label.name, "case": name}
        sidecar = folder / f"{name}_image.json"
        if sidecar.is_file():
            record = json.loads(sidecar.read_text())
            entry.update({k: record[k] for k in ("seed", "sample", "source_mask", "checkpoint_sha256") if k in record})
        entries.append(entry)
    content = {"description": "synthetic image/label pairs written by the vae_ct bundle", "synthetic": True}
    content[key] = entries
    path = folder / filename
    folder.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".datalist.", suffix=".json.part", dir=folder)
    with os.fdopen(fd, "w") as f:
        f.write(json.dumps(content, indent=2) + "\n")
    os.replace(tmp, path)
    return path
