"""Dictionary transforms: online tumor synthesis for segmentation training, and the organ map -> label step.

Why this is not plain MONAI: MONAI has no tumor synthesis transform. :class:`TumorSynthesisd` is the one online
augmentation of the collection (SPEC 3.4): a MONAI ``RandomizableTransform`` + ``MapTransform`` that, with
probability ``prob`` and for healthy cases only (no tumor voxel in the label), paints tumors into the image and
writes them into the label, with one of three families: ``"difftumor"`` (:class:`~.synthesis.DiffTumorSynthesis`),
``"handcrafted"`` (:class:`~.baselines.HandcraftedSynthesis`) or ``"cellular"``
(:class:`~.baselines.CellularAutomatonSynthesis`), all behind the same arguments so they compare on the same data.

It plugs into seg_unet3d's ``online_augmentation`` slot: one dictionary transform applied after loading,
orientation, spacing and the HU window scaling to [0, 1] (window [-175, 250]) and before the random crops, on
``image`` (``1 x X x Y x Z`` float in [0, 1], a ``MetaTensor`` with its affine) and ``label`` (0 / 1 pancreas /
2 tumor). ``image_scale="unit"`` maps [0, 1] to HU by the window (exact inside it), the family works in HU, and the
changed voxels go back to [0, 1]; every other voxel keeps its value bit for bit. ``image_scale="hu"`` takes and
gives HU (the bundle's own inference).

Randomness: ``set_random_state(seed)`` (MONAI's DataLoader does it per worker) fixes the draws; each application
draws one integer seed from ``self.R`` and the family uses only a ``RandomState`` / torch generator made from it, so
the same seed gives the same tumor. DiffTumor's models are built lazily once per process (see
:class:`~.synthesis.DiffTumorSynthesis`), never pickled with the dataset.
"""

from __future__ import annotations

import logging
from typing import Any, Hashable, Mapping, Sequence

import numpy as np
import torch
from monai.config import KeysCollection
from monai.data import MetaTensor
from monai.transforms import MapTransform, RandomizableTransform

from .baselines import CellularAutomatonSynthesis, HandcraftedSynthesis
from .masks import DEFAULT_MIXED_WEIGHTS, choose_class
from .synthesis import HU_WINDOW, DiffTumorSynthesis

logger = logging.getLogger(__name__)

FAMILIES = {
    "difftumor": DiffTumorSynthesis,
    "handcrafted": HandcraftedSynthesis,
    "cellular": CellularAutomatonSynthesis,
}


def make_family(family: Any, family_args: Mapping[str, Any] | None = None) -> Any:
    """A synthesis family from its name (+ keyword arguments) or the object itself."""
    if isinstance(family, str):
        if family not in FAMILIES:
            raise ValueError(f"unknown synthesis family {family!r}; expected one of {sorted(FAMILIES)}")
        return FAMILIES[family](**dict(family_args or {}))
    if family_args:
        raise ValueError("family_args are only for a family given by name")
    return family


def _array(value: Any) -> np.ndarray:
    data = value.detach().cpu().numpy() if torch.is_tensor(value) else np.asarray(value)
    if data.ndim == 4:
        if data.shape[0] != 1:
            raise ValueError(f"expected one channel, got shape {data.shape}")
        data = data[0]
    if data.ndim != 3:
        raise ValueError(f"expected a 3D volume (optionally channel-first), got shape {data.shape}")
    return data


def _affine(value: Any) -> np.ndarray | None:
    affine = getattr(value, "affine", None)
    if affine is None:
        return None
    affine = affine.detach().cpu().numpy() if torch.is_tensor(affine) else np.asarray(affine)
    return affine[0] if affine.ndim == 3 else affine


def _write(value: Any, region: np.ndarray, new_values: np.ndarray) -> Any:
    """A copy of ``value`` (tensor or array, channel-first or not) with ``region`` set to ``new_values``."""
    if torch.is_tensor(value):
        out = value.clone()
        view = out[0] if out.ndim == 4 else out
        index = torch.from_numpy(np.argwhere(region).T.copy()).to(view.device)
        view[tuple(index)] = torch.as_tensor(new_values, dtype=view.dtype, device=view.device)
        return out
    out = np.array(value, copy=True)
    view = out[0] if out.ndim == 4 else out
    view[region] = new_values.astype(view.dtype)
    return out


class TumorSynthesisd(RandomizableTransform, MapTransform):
    """Add synthetic tumors to healthy cases (see the module docstring).

    Args:
        keys: ``(image_key, label_key)``.
        family: ``"difftumor"``, ``"handcrafted"``, ``"cellular"`` or a family object; ``family_args`` its keyword
            arguments when given by name (e.g. ``autoencoder_path``, ``diffusion_early_path``, ...).
        prob: probability of synthesis for a healthy case (0.5, DiffTumor's online rate).
        tumor_probs: class probabilities (default DiffTumor's: tiny 0.4, small 0.4, medium 0.1, large 0.1, i.e. early
            0.8 split 0.5 / 0.5); a class name or ``"mixed"`` / ``"early"`` is also accepted.
        organ_value / tumor_value: label values of the organ and of the tumor.
        healthy_only: skip cases whose label already has a tumor.
        image_scale: ``"unit"`` (image is the HU window scaled to [0, 1]) or ``"hu"``.
        hu_window: the window of ``"unit"``.
        info_key: where to store what was done (class, seed, family parameters), e.g. ``"provenance"`` for
            ``SaveSyntheticd``; ``None`` adds no key (keeps batches collatable).
    """

    backend = [np.ndarray.__name__, torch.Tensor.__name__]

    def __init__(
        self,
        keys: KeysCollection = ("image", "label"),
        family: Any = "difftumor",
        family_args: Mapping[str, Any] | None = None,
        prob: float = 0.5,
        tumor_probs: Mapping[str, float] | str | None = None,
        organ_value: int = 1,
        tumor_value: int = 2,
        healthy_only: bool = True,
        image_scale: str = "unit",
        hu_window: Sequence[float] = HU_WINDOW,
        info_key: str | None = None,
        allow_missing_keys: bool = False,
    ):
        MapTransform.__init__(self, keys, allow_missing_keys)
        RandomizableTransform.__init__(self, prob)
        if len(self.keys) != 2:
            raise ValueError(f"keys must be (image_key, label_key), got {self.keys}")
        if image_scale not in ("unit", "hu"):
            raise ValueError(f"image_scale must be 'unit' or 'hu', got {image_scale!r}")
        self.family = make_family(family, family_args)
        if isinstance(tumor_probs, str):
            self.tumor_type, self.tumor_weights = tumor_probs, None
        else:
            self.tumor_type, self.tumor_weights = "mixed", dict(tumor_probs or DEFAULT_MIXED_WEIGHTS)
        self.organ_value = organ_value
        self.tumor_value = tumor_value
        self.healthy_only = healthy_only
        self.image_scale = image_scale
        self.hu_window = (float(hu_window[0]), float(hu_window[1]))
        self.info_key = info_key
        self._seed: int | None = None

    def randomize(self, data: Any = None) -> None:
        super().randomize(None)
        self._seed = int(self.R.randint(0, 2**31 - 1)) if self._do_transform else None

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image_key, label_key = self.keys
        self.randomize()
        if not self._do_transform:
            return d
        label = _array(d[label_key])
        if self.healthy_only and np.any(label == self.tumor_value):
            return d
        organ = label == self.organ_value
        if not organ.any():
            logger.warning("TumorSynthesisd: no organ voxel (label %s) in this case: left unchanged", self.organ_value)
            return d
        image = _array(d[image_key]).astype(np.float32)
        low, high = self.hu_window
        hu = image * (high - low) + low if self.image_scale == "unit" else image
        rng = np.random.RandomState(self._seed)
        tumor_class = choose_class(rng, self.tumor_type, self.tumor_weights)
        result = self.family(hu, organ, _affine(d[image_key]), rng, tumor_class)
        values = result.values
        if self.image_scale == "unit":
            values = np.clip((values - low) / (high - low), 0.0, 1.0)
        d[image_key] = _write(d[image_key], result.region, values)
        tumor_region = result.tumor_mask & organ
        d[label_key] = _write(d[label_key], tumor_region, np.full(int(tumor_region.sum()), self.tumor_value))
        if self.info_key:
            d[self.info_key] = {
                **dict(d.get(self.info_key) or {}),
                "seed": self._seed,
                "tumor_class": result.tumor_class,
                "tumor_voxels": int(tumor_region.sum()),
                **{k: v for k, v in result.info.items() if k != "tumors"},
                "tumors": result.info.get("tumors", []),
            }
        return d


class OrganToLabeld(MapTransform):
    """``label`` (0 / ``organ_value``) from an organ map whose organ has the id ``organ_label`` (e.g. 7 = pancreas of
    a TotalSegmentator map, 1 = pancreas of an MSD label). Tumor voxels of an MSD label (``tumor_label``) stay
    tumor, so a case with a real tumor is recognised as not healthy. With ``reference_key`` the organ map must be on
    the grid of that image (same shape and affine, else ``ValueError``) and the label takes the image's metadata, so
    outputs are named after the scan."""

    def __init__(
        self,
        keys: KeysCollection = "organ",
        label_key: str = "label",
        organ_label: int | Sequence[int] = 1,
        organ_value: int = 1,
        tumor_label: int | None = None,
        tumor_value: int = 2,
        reference_key: str | None = "image",
        allow_missing_keys: bool = False,
    ):
        super().__init__(keys, allow_missing_keys)
        self.label_key = label_key
        self.organ_label = [organ_label] if np.isscalar(organ_label) else list(organ_label)
        self.organ_value = organ_value
        self.tumor_label = tumor_label
        self.tumor_value = tumor_value
        self.reference_key = reference_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        for key in self.key_iterator(d):
            organ = d[key]
            values = organ if torch.is_tensor(organ) else torch.as_tensor(np.asarray(organ))
            label = torch.zeros_like(values, dtype=torch.uint8)
            label[torch.isin(values, torch.as_tensor(self.organ_label, dtype=values.dtype))] = self.organ_value
            if self.tumor_label is not None:
                label[values == self.tumor_label] = self.tumor_value
            reference = d.get(self.reference_key) if self.reference_key else None
            if reference is not None:
                ref_affine, organ_affine = _affine(reference), _affine(organ)
                same_affine = (
                    ref_affine is None or organ_affine is None or np.allclose(ref_affine, organ_affine, atol=1e-3)
                )
                if tuple(reference.shape[-3:]) != tuple(values.shape[-3:]) or not same_affine:
                    raise ValueError(
                        f"organ map '{key}' and image '{self.reference_key}' are on different grids (shapes "
                        f"{tuple(values.shape)} / {tuple(reference.shape)}); resample the organ map to the image first"
                    )
                if isinstance(reference, MetaTensor):
                    label = MetaTensor(label, affine=reference.affine, meta=dict(reference.meta))
            elif isinstance(organ, MetaTensor):
                label = MetaTensor(label, affine=organ.affine, meta=dict(organ.meta))
            d[self.label_key] = label
        return d
