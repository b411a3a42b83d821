"""DiffTumor synthesis: encode the healthy crop, sample a tumor latent, decode, blend inside a feathered mask.

Why this is not plain MONAI: MONAI has the networks, schedulers and ``DiffusionInferer`` used here, but not the
DiffTumor procedure around them (SPEC 3.4): a crop in the model's space around a tumor mask, the masked latent and
the mask on the latent grid as concatenated conditions, the codebook range normalisation, and the blend back into
the scan. The blend is where this differs from the reference on purpose: the reference replaces the whole pancreas
crop by the decoded crop (a texture cue that gives synthetic cases away); here only the voxels of a slightly dilated
tumor mask change, weighted by a Gaussian-feathered mask, and every other voxel of the scan keeps its exact value.

Geometry: the model works at ``model_spacing`` (1 mm) in RAS axes on crops of at least ``crop_size`` (96) voxels,
grown in steps of ``size_multiple`` (32 = 4x autoencoder downsampling x 8x diffusion U-Net downsampling) when a
large tumor needs more. The crop is sampled from the scan by its affine, so a scan in any orientation and spacing
works: when the scan is already RAS at the model spacing the crop is a plain slice (no interpolation); otherwise it
is resampled (trilinear), and the decoded values are resampled back (trilinear) at the scan voxels of the dilated
mask only.

Models: the autoencoder and the two diffusion models (early tumors: DDPM, T = 4; medium / large tumors: DDIM
sampling of a T = 200 model) are given as modules or as argument dicts and weight files. Dicts are built lazily, on
the first call in each process, and dropped when the object is pickled, so a DataLoader worker builds its own copy
once instead of receiving one with the dataset. Without weight files (``allow_random_weights``) the models keep
their random initialisation (seeded): the geometry and the blend are exactly those of a trained model, the texture
is noise.
"""

from __future__ import annotations

import logging
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from monai.inferers import DiffusionInferer
from monai.networks.nets import DiffusionModelUNet
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler
from scipy import ndimage

from .masks import EARLY_CLASSES, TumorMaskGenerator, voxel_spacing
from .networks import DiffTumorVQVAE, codebook_range, denormalize_latent, nearest_codes, normalize_latent
from .precision import DTYPES, AutocastNetwork, autocast, resolve_precision

logger = logging.getLogger(__name__)

#: HU window of DiffTumor / seed 001 (SPEC 2.3): clip, then scale to [0, 1] (segmentation) or [-1, 1] (autoencoder).
HU_WINDOW = (-175.0, 250.0)

#: The reference-scale networks (``configs/*.json`` ``network_def`` / ``diffusion_def`` hold the same values).
DEFAULT_AUTOENCODER_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 1,
    "out_channels": 1,
    "channels": [16, 32, 64],
    "num_res_layers": 1,
    "num_res_channels": [16, 32, 64],
    "downsample_parameters": [[1, 3, 1, 1], [2, 4, 1, 1], [2, 4, 1, 1]],
    "upsample_parameters": [[2, 4, 1, 1, 0], [2, 4, 1, 1, 0], [1, 3, 1, 1, 0]],
    "num_embeddings": 16384,
    "embedding_dim": 8,
    "commitment_cost": 0.25,
    "decay": 0.99,
    "epsilon": 1e-5,
}
DEFAULT_DIFFUSION_ARGS: dict[str, Any] = {
    "spatial_dims": 3,
    "in_channels": 17,
    "out_channels": 8,
    "channels": [24, 48, 96, 96],
    "attention_levels": [False, False, True, True],
    "num_res_blocks": 1,
    "num_head_channels": 32,
    "norm_num_groups": 8,
}


def hu_to_model(hu: np.ndarray | torch.Tensor, window: Sequence[float] = HU_WINDOW):
    """HU -> [-1, 1]: clip to the window, scale (the autoencoder's input range)."""
    low, high = window
    if torch.is_tensor(hu):
        return (hu.clamp(low, high) - low) / (high - low) * 2.0 - 1.0
    return (np.clip(hu, low, high) - low) / (high - low) * 2.0 - 1.0


def model_to_hu(x: np.ndarray | torch.Tensor, window: Sequence[float] = HU_WINDOW):
    """[-1, 1] -> HU (values outside [-1, 1] are clipped first)."""
    low, high = window
    if torch.is_tensor(x):
        return (x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (high - low) + low
    return (np.clip(x, -1.0, 1.0) + 1.0) / 2.0 * (high - low) + low


def ellipsoid_structure(radius_vox: Sequence[float]) -> np.ndarray:
    """A boolean ellipsoidal structuring element with the given per-axis radii in voxels (at least one voxel)."""
    radii = np.maximum(np.asarray(radius_vox, dtype=np.float64), 1.0)
    half = np.ceil(radii).astype(int)
    grids = np.ogrid[tuple(slice(-h, h + 1) for h in half)]
    return sum((g / r) ** 2 for g, r in zip(grids, radii)) <= 1.0 + 1e-9


def bounding_box(mask: np.ndarray, margin: Sequence[int] | int = 0) -> tuple[slice, ...]:
    """Slices of the bounding box of ``mask`` grown by ``margin`` voxels per axis, clipped to the array."""
    coords = np.argwhere(mask)
    margin = np.broadcast_to(np.asarray(margin, dtype=int), (mask.ndim,))
    low = np.maximum(coords.min(0) - margin, 0)
    high = np.minimum(coords.max(0) + margin + 1, mask.shape)
    return tuple(slice(int(a), int(b)) for a, b in zip(low, high))


def dilate_mm(mask: np.ndarray, affine: np.ndarray | None, radius_mm: float) -> np.ndarray:
    """``mask`` dilated by an ellipsoid of ``radius_mm`` converted per axis by the voxel spacing (>= 1 voxel)."""
    spacing = voxel_spacing(affine)
    radius_vox = np.maximum(radius_mm / spacing, 1.0)
    box = bounding_box(mask, np.ceil(radius_vox).astype(int) + 1)
    out = np.zeros_like(mask, dtype=bool)
    out[box] = ndimage.binary_dilation(mask[box], structure=ellipsoid_structure(radius_vox))
    return out


def feather_weights(mask: np.ndarray, affine: np.ndarray | None, sigma_mm: float, region: np.ndarray) -> np.ndarray:
    """Blend weights: the tumor mask blurred by a Gaussian of ``sigma_mm`` (per-axis voxels), zero outside ``region``.

    ``sigma_mm = 0`` gives the hard mask. The weights are ~1 deep inside the tumor, ~0.5 on its border and decay
    outside it; ``region`` (the dilated mask) cuts them off, so nothing outside it can change.
    """
    weights = np.zeros(mask.shape, dtype=np.float32)
    box = bounding_box(region, 1)
    if sigma_mm > 0:
        sigma_vox = sigma_mm / voxel_spacing(affine)
        weights[box] = ndimage.gaussian_filter(mask[box].astype(np.float32), sigma=sigma_vox, mode="constant")
    else:
        weights[box] = mask[box]
    weights[~region] = 0.0
    return weights


@dataclass
class SynthesisResult:
    """What a synthesis family did to one scan.

    ``tumor_mask``: voxels labelled tumor; ``region``: voxels whose value changed (a subset of the dilated mask);
    ``values``: their new HU values (``region.sum()`` floats, in ``np.argwhere`` order); ``info``: parameters.
    """

    tumor_mask: np.ndarray
    region: np.ndarray
    values: np.ndarray
    tumor_class: str
    info: dict[str, Any] = field(default_factory=dict)


# ----------------------------------------------------------------------------------------------------------------
# crops in the model's space


@dataclass
class ModelCrop:
    """A crop of ``size`` voxels at ``spacing`` mm along the world RAS axes; ``to_scan`` maps its voxel indices to
    the scan's (4 x 4, homogeneous); ``offset`` is set when the crop is a plain slice of the scan (aligned)."""

    size: tuple[int, int, int]
    spacing: np.ndarray
    to_scan: np.ndarray
    offset: np.ndarray | None


def plan_crop(
    region: np.ndarray,
    affine: np.ndarray,
    spacing: Sequence[float],
    crop_size: int,
    size_multiple: int,
    context_mm: float = 8.0,
) -> ModelCrop:
    """The model-space crop around ``region`` (scan grid): centred on its bounding box, at least ``crop_size``
    voxels, grown by ``size_multiple`` steps until the region plus ``context_mm`` fits."""
    affine = np.asarray(affine, dtype=np.float64)
    spacing = np.asarray(spacing, dtype=np.float64)
    coords = np.argwhere(region)
    corners = np.array([[coords[:, a].min() if bit == 0 else coords[:, a].max() for a, bit in enumerate(b)]
                        for b in np.ndindex(2, 2, 2)], dtype=np.float64)  # fmt: skip
    world = corners @ affine[:3, :3].T + affine[:3, 3]
    extent = (world.max(0) - world.min(0)) / spacing + 1 + 2 * context_mm / spacing
    size = tuple(int(max(crop_size, math.ceil(e / size_multiple) * size_multiple)) for e in extent)
    centre_index = np.round((coords.min(0) + coords.max(0)) / 2.0)
    centre_world = affine[:3, :3] @ centre_index + affine[:3, 3]
    crop_affine = np.eye(4)
    crop_affine[:3, :3] = np.diag(spacing)
    crop_affine[:3, 3] = centre_world - spacing * (np.array(size) // 2)
    to_scan = np.linalg.inv(affine) @ crop_affine
    aligned = np.allclose(to_scan[:3, :3], np.eye(3), atol=1e-4) and np.allclose(
        to_scan[:3, 3], np.round(to_scan[:3, 3]), atol=1e-3
    )
    offset = np.round(to_scan[:3, 3]).astype(int) if aligned else None
    return ModelCrop(size=size, spacing=spacing, to_scan=to_scan, offset=offset)


def _padded_slice(array: np.ndarray, start: np.ndarray, size: Sequence[int], mode: str) -> np.ndarray:
    """``array[start:start+size]`` with the parts outside the array padded (``edge`` or zeros)."""
    stop = start + np.asarray(size)
    low = np.maximum(start, 0)
    high = np.minimum(stop, array.shape)
    inner = array[tuple(slice(int(a), int(b)) for a, b in zip(low, np.maximum(high, low)))]
    pad = [(int(a - s), int(e - b)) for s, e, a, b in zip(start, stop, low, np.maximum(high, low))]
    if not any(p for pair in pad for p in pair):
        return inner
    if mode == "edge" and inner.size:
        return np.pad(inner, pad, mode="edge")
    return np.pad(inner, pad, mode="constant")


def sample_crop(volume: np.ndarray, crop: ModelCrop, order: int) -> np.ndarray:
    """The crop's voxels from a scan-grid volume: a slice when aligned, else ``map_coordinates`` (order 1 / 0)."""
    if crop.offset is not None:
        return _padded_slice(volume, crop.offset, crop.size, "edge" if order > 0 else "constant")
    grid = np.indices(crop.size, dtype=np.float64).reshape(3, -1)
    scan = crop.to_scan[:3, :3] @ grid + crop.to_scan[:3, 3:4]
    values = ndimage.map_coordinates(
        volume.astype(np.float32), scan, order=order, mode="nearest" if order else "constant"
    )
    return values.reshape(crop.size)


def scan_to_crop_coords(crop: ModelCrop, voxels: np.ndarray) -> np.ndarray:
    """Crop coordinates (N x 3, float) of scan voxel indices (N x 3)."""
    inverse = np.linalg.inv(crop.to_scan)
    return voxels @ inverse[:3, :3].T + inverse[:3, 3]


# ----------------------------------------------------------------------------------------------------------------
# models


def _build(spec: Any, default_args: Mapping[str, Any], cls: type) -> torch.nn.Module:
    if isinstance(spec, torch.nn.Module):
        return spec
    args = dict(default_args)
    args.update(dict(spec or {}))
    return cls(**args)


def load_weights(module: torch.nn.Module, path: str | os.PathLike, device: torch.device) -> None:
    """Load a state dict (a bare one, or one under the key ``model``) with ``weights_only=True``."""
    state = torch.load(path, map_location=device, weights_only=True)
    if isinstance(state, Mapping) and "model" in state and isinstance(state["model"], Mapping):
        state = state["model"]
    module.load_state_dict(state)


class DiffTumorSynthesis:
    """The DiffTumor family: tumor mask (:class:`~.masks.TumorMaskGenerator`) -> latent diffusion -> feathered blend.

    Args:
        autoencoder / diffusion_early / diffusion_late: modules, or argument dicts of ``DiffTumorVQVAE`` /
            ``DiffusionModelUNet`` (built lazily once per process; ``None`` = the reference-scale defaults).
        autoencoder_path / diffusion_early_path / diffusion_late_path: weight files (``weights_only`` state dicts).
        allow_random_weights: run with randomly initialised models where a path is missing (a warning is logged and
            ``info["weights"]`` says ``"random"``); otherwise a missing file is an error.
        early_inferer / late_inferer: ``DiffusionInferer`` with a DDPM (T = 4) / DDIM (T = 200) scheduler
            (defaults: cosine schedules, epsilon prediction); ``late_inference_steps`` DDIM steps (50).
        mask_generator: tumor masks (``TumorMaskGenerator`` or its keyword arguments).
        crop_size / model_spacing / size_multiple / latent_factor: the model-space crop (96, 1 mm, 32, 4).
        feather_sigma_mm: range of the blend's Gaussian sigma (drawn per tumor); dilate_mm: the blend region.
        decode_margin: latent voxels of context around the blend region when decoding a window of the latent (the
            decoder only runs where its output is used); ``None`` decodes the whole crop.
        channels_last: run the autoencoder channels-last (faster 3D convolutions on CPU; same values).
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (``scripts/precision.py``): autocast of the encoder, the
            diffusion model and the decoder; the latent normalisation, the schedulers' steps, the codebook lookup
            and the blend stay float32.
        device: where the models run.
    """

    name = "difftumor"

    def __init__(
        self,
        autoencoder: torch.nn.Module | Mapping[str, Any] | None = None,
        diffusion_early: torch.nn.Module | Mapping[str, Any] | None = None,
        diffusion_late: torch.nn.Module | Mapping[str, Any] | None = None,
        autoencoder_path: str | os.PathLike | None = None,
        diffusion_early_path: str | os.PathLike | None = None,
        diffusion_late_path: str | os.PathLike | None = None,
        allow_random_weights: bool = False,
        early_inferer: DiffusionInferer | None = None,
        late_inferer: DiffusionInferer | None = None,
        late_inference_steps: int = 50,
        mask_generator: TumorMaskGenerator | Mapping[str, Any] | None = None,
        hu_window: Sequence[float] = HU_WINDOW,
        crop_size: int = 96,
        model_spacing: Sequence[float] = (1.0, 1.0, 1.0),
        size_multiple: int = 32,
        latent_factor: int = 4,
        feather_sigma_mm: Sequence[float] = (0.5, 2.0),
        dilate_mm: float = 3.0,
        decode_margin: int | None = 4,
        channels_last: bool = True,
        init_seed: int = 0,
        precision: str = "fp32",
        device: str | torch.device = "cpu",
    ):
        self.specs = {"autoencoder": autoencoder, "diffusion_early": diffusion_early, "diffusion_late": diffusion_late}
        self.paths = {
            "autoencoder": autoencoder_path,
            "diffusion_early": diffusion_early_path,
            "diffusion_late": diffusion_late_path,
        }
        self.allow_random_weights = allow_random_weights
        self.early_inferer = early_inferer or DiffusionInferer(
            DDPMScheduler(num_train_timesteps=4, schedule="cosine", prediction_type="epsilon", clip_sample=True)
        )
        self.late_inferer = late_inferer or DiffusionInferer(
            DDIMScheduler(num_train_timesteps=200, schedule="cosine", prediction_type="epsilon", clip_sample=True)
        )
        self.late_inference_steps = int(late_inference_steps)
        if isinstance(mask_generator, TumorMaskGenerator):
            self.mask_generator = mask_generator
        else:
            self.mask_generator = TumorMaskGenerator(**dict(mask_generator or {}))
        self.hu_window = tuple(float(v) for v in hu_window)
        self.crop_size = int(crop_size)
        self.model_spacing = np.asarray(model_spacing, dtype=np.float64)
        self.size_multiple = int(size_multiple)
        self.latent_factor = int(latent_factor)
        self.feather_sigma_mm = tuple(float(v) for v in feather_sigma_mm)
        self.dilate_mm = float(dilate_mm)
        self.decode_margin = decode_margin
        self.memory_format = torch.channels_last_3d if channels_last else torch.contiguous_format
        self.init_seed = int(init_seed)
        self.device = torch.device(device)
        self.precision = precision
        self._models: dict[str, torch.nn.Module] | None = None
        self._weights: dict[str, str] = {}
        self.last_timings: dict[str, float] = {}

    # pickling (DataLoader workers): lazily built models stay behind, modules given by the caller travel
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        if state.get("_models") is not None and not all(
            isinstance(spec, torch.nn.Module) for spec in self.specs.values() if spec is not None
        ):
            state["_models"] = None
        return state

    def models(self) -> dict[str, torch.nn.Module]:
        """The three models, built and loaded on first use in this process."""
        if self._models is not None:
            return self._models
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.init_seed)  # random weights (no file) are the same in every process
            models = {
                "autoencoder": _build(self.specs["autoencoder"], DEFAULT_AUTOENCODER_ARGS, DiffTumorVQVAE),
                "diffusion_early": _build(self.specs["diffusion_early"], DEFAULT_DIFFUSION_ARGS, DiffusionModelUNet),
                "diffusion_late": _build(self.specs["diffusion_late"], DEFAULT_DIFFUSION_ARGS, DiffusionModelUNet),
            }
        for name, module in models.items():
            path = self.paths[name]
            if path is not None and os.path.isfile(path):
                load_weights(module, path, self.device)
                self._weights[name] = str(path)
            elif self.allow_random_weights:
                logger.warning(
                    "difftumor: no weights for the %s (%s): it runs with RANDOM weights, the synthetic tumors are "
                    "noise with the right geometry. Train the bundle first (docs/README.md).", name, path
                )  # fmt: skip
                self._weights[name] = "random"
            else:
                raise FileNotFoundError(f"difftumor: weights of the {name} not found: {path}")
            module.to(self.device).eval()
            if name == "autoencoder":  # its 3D convolutions run faster channels-last (the U-Net's attention not)
                module.to(memory_format=self.memory_format)
            for parameter in module.parameters():
                parameter.requires_grad_(False)
        self.late_inferer.scheduler.set_timesteps(self.late_inference_steps)
        self._models = models
        return models

    def decode_windows(
        self, region: np.ndarray, voxels: np.ndarray, coords: np.ndarray, latent_shape: np.ndarray
    ) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        """``(low, high, members)`` latent boxes to decode: one per connected part of the blend region (plus
        ``decode_margin`` latent voxels), overlapping boxes merged, or a single box around all when that is smaller;
        ``members`` index ``voxels``. ``decode_margin=None``: the whole latent."""
        everything = np.arange(len(voxels))
        if self.decode_margin is None:
            return [(np.zeros(3, dtype=int), latent_shape, everything)]

        def box(members: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            low = np.floor(coords[members].min(0) / self.latent_factor).astype(int) - self.decode_margin
            high = np.ceil(coords[members].max(0) / self.latent_factor).astype(int) + 1 + self.decode_margin
            return np.maximum(low, 0), np.minimum(high, latent_shape)

        parts, count = ndimage.label(region, structure=np.ones((3, 3, 3)))
        part_of = parts[tuple(voxels.T)]
        boxes = [(*box(m), m) for m in (np.flatnonzero(part_of == i) for i in range(1, count + 1)) if len(m)]
        merged = True
        while merged and len(boxes) > 1:  # merge overlapping boxes until none overlap
            merged = False
            for i in range(len(boxes)):
                for j in range(i + 1, len(boxes)):
                    (low_a, high_a, a), (low_b, high_b, b) = boxes[i], boxes[j]
                    if np.all(np.maximum(low_a, low_b) < np.minimum(high_a, high_b)):
                        members = np.concatenate([a, b])
                        boxes[i] = (*box(members), members)
                        del boxes[j]
                        merged = True
                        break
                if merged:
                    break
        low, high = box(everything)
        if sum(np.prod(h - lo) for lo, h, _ in boxes) >= np.prod(high - low):
            return [(low, high, everything)]
        return boxes

    # ------------------------------------------------------------------------------------------------------------
    def __call__(
        self,
        hu: np.ndarray,
        organ: np.ndarray,
        affine: np.ndarray | None,
        rng: np.random.RandomState,
        tumor_type: str = "mixed",
    ) -> SynthesisResult:
        """Draw a tumor mask in ``organ`` and synthesize it into ``hu`` (3D HU array on the grid of ``affine``)."""
        affine = np.eye(4) if affine is None else np.asarray(affine, dtype=np.float64)
        draw = self.mask_generator(organ, rng, tumor_type, affine)
        sigma = float(rng.uniform(*self.feather_sigma_mm))
        seed = int(rng.randint(0, 2**31 - 1))
        region, values, info = self.synthesize(hu, draw.mask, affine, draw.tumor_class, sigma, seed)
        info.update({"tumors": draw.tumors, "feather_sigma_mm": sigma, "sampling_seed": seed})
        return SynthesisResult(draw.mask, region, values, draw.tumor_class, info)

    @torch.inference_mode()
    def synthesize(
        self,
        hu: np.ndarray,
        tumor_mask: np.ndarray,
        affine: np.ndarray,
        tumor_class: str,
        feather_sigma_mm: float,
        seed: int,
    ) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
        """Blend a sampled tumor into ``hu`` inside ``tumor_mask``: returns (region, new HU values, info)."""
        models = self.models()
        clock = time.perf_counter()
        timings: dict[str, float] = {}

        def lap(name: str) -> None:
            nonlocal clock
            now = time.perf_counter()
            timings[name] = timings.get(name, 0.0) + now - clock
            clock = now

        early = tumor_class in EARLY_CLASSES
        region = dilate_mm(tumor_mask, affine, self.dilate_mm)
        crop = plan_crop(region, affine, self.model_spacing, self.crop_size, self.size_multiple)

        image = torch.from_numpy(hu_to_model(sample_crop(hu, crop, order=1), self.hu_window).astype(np.float32))
        mask = torch.from_numpy((sample_crop(tumor_mask.astype(np.float32), crop, order=0) > 0.5).astype(np.float32))
        image, mask = image[None, None].to(self.device), mask[None, None].to(self.device)
        lap("crop")

        autoencoder = models["autoencoder"]
        value_range = codebook_range(autoencoder)
        masked = (image * (1.0 - mask)).contiguous(memory_format=self.memory_format)
        with autocast(self.precision, self.device):
            encoded = autoencoder.encode(masked)
        masked_latent = normalize_latent(encoded.float().contiguous(), value_range)
        latent_mask = F.interpolate(mask * 2.0 - 1.0, size=masked_latent.shape[2:], mode="nearest")
        condition = torch.cat([masked_latent, latent_mask], dim=1)
        lap("encode")

        inferer = self.early_inferer if early else self.late_inferer
        model = models["diffusion_early" if early else "diffusion_late"]
        resolved = resolve_precision(self.precision, self.device)
        if resolved != "fp32":  # autocast around the network only: the scheduler's steps see float32 outputs
            model = AutocastNetwork(model, self.device.type, DTYPES[resolved])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            noise = torch.randn(masked_latent.shape, device=self.device)
            latent = inferer.sample(
                input_noise=noise, diffusion_model=model, conditioning=condition, mode="concat", verbose=False
            )
        lap("diffusion")

        # decode only the latent windows the blend region needs (plus context), then read the region's voxels
        voxels = np.argwhere(region)
        coords = scan_to_crop_coords(crop, voxels.astype(np.float64))
        synthetic = np.empty(len(voxels), dtype=np.float32)
        windows = self.decode_windows(region, voxels, coords, np.array(latent.shape[2:]))
        for low, high, members in windows:
            window = latent[(slice(None), slice(None), *(slice(int(a), int(b)) for a, b in zip(low, high)))]
            quantized = nearest_codes(autoencoder, denormalize_latent(window, value_range))
            with autocast(self.precision, self.device):
                decoded = autoencoder.decode(quantized.contiguous(memory_format=self.memory_format))
            decoded = decoded[0, 0].float().cpu().contiguous().numpy()
            local = coords[members] - low * self.latent_factor
            if crop.offset is not None:  # aligned: crop voxels are scan voxels
                index = np.clip(np.round(local).astype(int), 0, np.array(decoded.shape) - 1)
                synthetic[members] = decoded[tuple(index.T)]
            else:
                synthetic[members] = ndimage.map_coordinates(decoded, local.T, order=1, mode="nearest")
        synthetic_hu = model_to_hu(synthetic, self.hu_window)
        lap("decode")

        weights = feather_weights(tumor_mask, affine, feather_sigma_mm, region)[tuple(voxels.T)]
        original = hu[tuple(voxels.T)].astype(np.float64)
        values = original + weights * (synthetic_hu - original)
        changed = weights > 0  # a zero weight keeps the voxel: leave it out of the region (no float round trip)
        region = np.zeros_like(region)
        region[tuple(voxels[changed].T)] = True
        values = values[changed]
        lap("blend")
        self.last_timings = timings
        info = {
            "family": self.name,
            "sampler": "DDPM T=4" if early else f"DDIM {self.late_inference_steps} steps",
            "crop_size": list(crop.size),
            "decoded_latent_voxels": int(sum(np.prod(high - low) for low, high, _ in windows)),
            "weights": dict(self._weights),
            "precision": resolved,
        }
        return region, values.astype(np.float32), info
