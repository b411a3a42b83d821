"""Lesion-level decision rule of the tumor output: drop predicted tumor components the network is unsure of.

Why this is not plain MONAI: ``AsDiscreted`` takes the voxel-wise argmax and ``RemoveSmallObjectsd`` filters
components by size only. On pancreas CT the false-positive tumors of a 3-class network are hypodense spots of healthy
parenchyma (fat clefts) that win the argmax by a small margin, so their voxels carry a tumor probability only a
little above the other classes', while a true tumor's component is confidently tumor throughout. The rule here scores
each connected component of the argmax tumor mask by its **mean tumor probability** and removes the components
below ``min_confidence``, which is a lesion-level operating point: chosen on validation patients (the tumor
benchmark's ``--choose_postprocessing``), fixed before a test set is scored. Removal only lowers the tumor channel of
those voxels to zero, so the following argmax gives them the most probable other class (pancreas or background) and
every voxel outside a removed component keeps its label.
"""

from __future__ import annotations

from collections.abc import Hashable, Mapping
from typing import Any

import numpy as np
import torch
from monai.config import KeysCollection
from monai.transforms import MapTransform
from scipy import ndimage


def low_confidence_tumor(
    probabilities: np.ndarray, tumor_channel: int, min_confidence: float, connectivity: int = 3
) -> np.ndarray:
    """Boolean mask of the voxels of the argmax tumor components whose mean tumor probability is below
    ``min_confidence`` (``probabilities``: channel-first class probabilities)."""
    tumor = probabilities.argmax(0) == tumor_channel
    if min_confidence <= 0 or not tumor.any():
        return np.zeros(tumor.shape, dtype=bool)
    structure = ndimage.generate_binary_structure(tumor.ndim, connectivity)
    labelled, count = ndimage.label(tumor, structure=structure)
    means = ndimage.mean(probabilities[tumor_channel], labelled, np.arange(1, count + 1))
    drop = np.concatenate([[False], np.asarray(means) < min_confidence])
    return drop[labelled]


class TumorConfidenceFilterd(MapTransform):
    """Remove low-confidence tumor components from channel-first class probabilities (after softmax, before the
    argmax).

    Args:
        keys: the probability tensors (C, spatial...) to filter.
        min_confidence: components of the argmax tumor mask whose mean tumor probability is below this are removed
            (their tumor probability set to 0); 0 (default) changes nothing.
        tumor_channel: channel index of the tumor class (2 in the 3-class output).
        connectivity: 1-3, as ``scipy.ndimage.generate_binary_structure`` (3 = 26-connectivity in 3D, the metrics'
            convention).
    """

    def __init__(
        self,
        keys: KeysCollection,
        min_confidence: float = 0.0,
        tumor_channel: int = 2,
        connectivity: int = 3,
        allow_missing_keys: bool = False,
    ) -> None:
        super().__init__(keys, allow_missing_keys)
        if not 0.0 <= float(min_confidence) < 1.0:
            raise ValueError(f"min_confidence must be in [0, 1), got {min_confidence}")
        self.min_confidence = float(min_confidence)
        self.tumor_channel = int(tumor_channel)
        self.connectivity = int(connectivity)

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            probabilities = d[key]
            if self.min_confidence <= 0 or probabilities.shape[0] <= self.tumor_channel:
                continue  # disabled, or a model without the tumor class (binary)
            array = (
                probabilities.detach().cpu().numpy() if torch.is_tensor(probabilities) else np.asarray(probabilities)
            )
            drop = low_confidence_tumor(array, self.tumor_channel, self.min_confidence, self.connectivity)
            if drop.any():
                filtered = probabilities.clone() if torch.is_tensor(probabilities) else array.copy()
                mask = torch.as_tensor(drop, device=filtered.device) if torch.is_tensor(filtered) else drop
                filtered[self.tumor_channel][mask] = 0
                d[key] = filtered
        return d
