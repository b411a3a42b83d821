"""Sampling: seeded DDPM, DDIM and rectified-flow sampling in latent space, decoding (whole or by sliding window),
and volumes in Hounsfield units with a real geometry.

Why not MONAI's ``LatentDiffusionInferer.sample`` / ``ControlNetLatentDiffusionInferer.sample``: they take no random
generator (a sample cannot be reproduced from its seed when sampling is stochastic, as DDPM is), decode the whole
latent at once (a 512x512x128 volume does not fit in CPU memory at the model-zoo widths), return values in the
autoencoder's [0, 1] range without a geometry. What this module adds is exactly that; the schedulers, networks and
the ``SlidingWindowInferer`` doing the patch-wise decoding are MONAI's.

In an inference config the pieces plug into MONAI's ``SupervisedEvaluator``: the dataset is a list of
``{"seed": s, "name": ...}`` items (plus ``"label"``, a mask, for the ControlNet), :class:`SamplePrepareBatch`
turns each into seeded latent noise, :class:`LatentSampler` is the evaluator's inferer, and the vendored
``SaveSyntheticd`` writes the NIfTI files with their provenance.
"""

from __future__ import annotations

from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.data import MetaTensor
from monai.inferers import Inferer
from monai.networks.schedulers import DDIMScheduler, DDPMScheduler, RFlowScheduler
from torch import nn

from .latent import LatentStats, decode_from_latent, objective_of
from .precision import autocast
from .provenance import bundle_identity, sha256_file

#: Samplers and their default number of steps (DDPM: every training step; DDIM: the model zoo's 50).
SAMPLERS = {"ddpm": 1000, "ddim": 50, "rflow": 30}
#: Which training objectives each sampler can sample from.
COMPATIBLE_OBJECTIVES = {"ddpm": ("epsilon", "v_prediction", "sample"), "ddim": ("epsilon", "v_prediction", "sample")}
COMPATIBLE_OBJECTIVES["rflow"] = ("rflow",)


def make_scheduler(
    kind: str,
    num_train_timesteps: int = 1000,
    schedule: str = "scaled_linear_beta",
    beta_start: float = 0.0015,
    beta_end: float = 0.0195,
    prediction_type: str = "epsilon",
    rflow_sample_method: str = "uniform",
) -> Any:
    """A MONAI scheduler: ``ddpm`` / ``ddim`` (no clipping of the predicted latents: they are not in [-1, 1]) or
    ``rflow`` (``RFlowScheduler`` with discrete timesteps)."""
    kind = str(kind).lower()
    if kind == "ddpm":
        return DDPMScheduler(
            num_train_timesteps=num_train_timesteps, schedule=schedule, beta_start=beta_start, beta_end=beta_end,
            prediction_type=prediction_type, clip_sample=False,
        )  # fmt: skip
    if kind == "ddim":
        return DDIMScheduler(
            num_train_timesteps=num_train_timesteps, schedule=schedule, beta_start=beta_start, beta_end=beta_end,
            prediction_type=prediction_type, clip_sample=False,
        )  # fmt: skip
    if kind == "rflow":
        return RFlowScheduler(
            num_train_timesteps=num_train_timesteps, use_discrete_timesteps=True, sample_method=rflow_sample_method
        )
    raise ValueError(f"unknown scheduler {kind!r}; choose one of {list(SAMPLERS)}")


def default_steps(sampler: str, steps: int | None = None) -> int:
    """``steps`` or the sampler's default (DDPM 1000, DDIM 50, rectified flow 30)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"unknown sampler {sampler!r}; choose one of {list(SAMPLERS)}")
    return int(SAMPLERS[sampler] if steps in (None, 0) else steps)


def check_compatible(sampler: str, objective: str | None) -> None:
    """A DDPM-trained (noise-predicting) model cannot be sampled by rectified flow, and the other way round."""
    if objective is None:
        return
    if objective not in COMPATIBLE_OBJECTIVES[sampler]:
        raise ValueError(
            f"the diffusion model was trained with objective {objective!r}; sampler {sampler!r} needs one of "
            f"{list(COMPATIBLE_OBJECTIVES[sampler])} (train with train_scheduler 'rflow' to sample by rectified flow)"
        )


def resize_affine(affine: np.ndarray, in_shape: Sequence[int], out_shape: Sequence[int]) -> np.ndarray:
    """The affine of a grid resized from ``in_shape`` to ``out_shape`` over the same field of view (edge to edge):
    spacing times ``in / out``, origin moved by half the old and new voxel sizes."""
    affine = np.asarray(affine, dtype=np.float64)
    ratio = np.asarray(in_shape, dtype=np.float64) / np.asarray(out_shape, dtype=np.float64)
    out = affine.copy()
    out[:3, :3] = affine[:3, :3] * ratio[None, :]
    out[:3, 3] = affine[:3, :3] @ (0.5 * ratio - 0.5) + affine[:3, 3]
    return out


class SamplePrepareBatch:
    """Evaluator batches for sampling: seeded latent noise, the conditioning mask and the output geometry.

    Each item's ``seed`` gives its initial noise (``torch.Generator(device).manual_seed(seed)``), so a sample is
    reproduced from its seed on the same kind of device. Unconditional samples get the reference geometry of the
    training images (``latent_stats.reference_affine``, rescaled when ``latent_shape`` asks for a larger volume);
    mask-conditioned ones (``cond_key``) the mask's own affine, and the mask is also returned as the target, so the
    evaluator's output carries it as ``label`` (the image + label pair). Returns
    ``(noise, target, (), {"seeds", "affine"[, "cn_cond"]})``.
    """

    def __init__(
        self,
        latent_stats: LatentStats,
        latent_shape: Sequence[int] | None = None,
        cond_key: str | None = None,
        seed_key: str = "seed",
        downsample_factor: int = 4,
    ):
        self.latent_stats = latent_stats
        self.latent_shape = None if latent_shape is None else [int(s) for s in latent_shape]
        self.cond_key = cond_key
        self.seed_key = seed_key
        self.downsample_factor = int(downsample_factor)

    def _latent_shape(self, cond: torch.Tensor | None) -> list[int]:
        if cond is not None:
            channels = self.latent_shape[0] if self.latent_shape else self.latent_stats.record["latent_shape"][0]
            return [channels] + [int(s) // self.downsample_factor for s in cond.shape[2:]]
        return list(self.latent_shape or self.latent_stats.record["latent_shape"])

    def __call__(
        self, batchdata: Mapping[str, Any], device: str | torch.device | None = None, non_blocking: bool = False, **_
    ) -> tuple[torch.Tensor, Any, tuple, dict]:
        device = torch.device(device or "cpu")
        seeds = [int(s) for s in torch.as_tensor(batchdata[self.seed_key]).reshape(-1).tolist()]
        cond = None
        if self.cond_key is not None:
            cond = batchdata[self.cond_key]
        shape = self._latent_shape(cond)
        noise = torch.stack(
            [torch.randn(shape, generator=torch.Generator(device=device).manual_seed(s), device=device) for s in seeds]
        )
        kwargs: dict[str, Any] = {"seeds": seeds}
        if cond is not None:
            plain = cond.as_tensor() if isinstance(cond, MetaTensor) else torch.as_tensor(cond)
            kwargs["cn_cond"] = plain.to(device, non_blocking=non_blocking).float()
            kwargs["affine"] = torch.as_tensor(cond.affine).reshape(-1, 4, 4).to(torch.float64)
            return noise, cond, (), kwargs
        stats_shape = self.latent_stats.record["latent_shape"][1:]
        image_size = self.latent_stats.record.get("image_size") or [s * self.downsample_factor for s in stats_shape]
        out_size = [s * self.downsample_factor for s in shape[1:]]
        affine = resize_affine(self.latent_stats.reference_affine, image_size, out_size)
        kwargs["affine"] = torch.as_tensor(affine)[None].repeat(len(seeds), 1, 1)
        return noise, None, (), kwargs


class LatentSampler(Inferer):
    """``sampler(noise, diffusion_model, seeds=..., affine=..., cn_cond=...)`` -> a volume in HU with its geometry.

    Runs the reverse process of ``scheduler`` (DDPM, DDIM or rectified flow) for ``num_inference_steps`` steps from
    the given latent noise, divides the latents by the stored scale factor and decodes them (``decode_inferer``: a
    ``SlidingWindowInferer`` over latent patches for large volumes; None decodes at once), then maps the
    autoencoder's [0, 1] back to Hounsfield units through the training HU window. Stochastic steps (DDPM) draw
    their noise from a generator seeded with the batch's first seed. The diffusion model may be a plain
    ``DiffusionModelUNet`` or a :class:`~scripts.networks.ControlledDiffusionUNet` (then pass ``cn_cond``).
    ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``; see ``scripts/precision.py``) autocasts the diffusion
    model's and the decoder's forward passes; their outputs are cast to float32, so the schedulers' steps, the scale
    factor and the HU mapping stay in float32.
    """

    def __init__(
        self,
        latent_stats: LatentStats,
        scheduler: Any,
        sampler: str,
        num_inference_steps: int | None = None,
        decode_inferer: Inferer | None = None,
        eta: float = 0.0,
        check_objective: bool = True,
        precision: str = "fp32",
    ):
        super().__init__()
        self.latent_stats = latent_stats
        self.scheduler = scheduler
        self.sampler = str(sampler).lower()
        self.num_inference_steps = default_steps(self.sampler, num_inference_steps)
        self.decode_inferer = decode_inferer
        self.eta = eta
        self.check_objective = check_objective
        self.precision = precision
        if objective_of(scheduler) == "rflow" and self.sampler != "rflow":
            raise ValueError(f"sampler {self.sampler!r} with an RFlowScheduler: use sampler 'rflow'")

    def set_timesteps(self, latent_shape: Sequence[int], device: torch.device) -> None:
        if isinstance(self.scheduler, RFlowScheduler):
            numel = int(np.prod(latent_shape))
            self.scheduler.set_timesteps(self.num_inference_steps, device=device, input_img_size_numel=numel)
        else:
            self.scheduler.set_timesteps(self.num_inference_steps, device=device)

    @torch.no_grad()
    def sample_latents(
        self,
        noise: torch.Tensor,
        network: nn.Module,
        generator: torch.Generator | None = None,
        cn_cond: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """The reverse process from ``noise`` to diffusion-space latents (still multiplied by the scale factor)."""
        if self.check_objective and self.latent_stats.record is not None:
            check_compatible(self.sampler, self.latent_stats.record.get("objective"))
        self.set_timesteps(noise.shape[2:], noise.device)
        timesteps = self.scheduler.timesteps
        following = torch.cat((timesteps[1:], torch.zeros(1, dtype=timesteps.dtype, device=timesteps.device)))
        extra = {} if cn_cond is None else {"cn_cond": cn_cond}
        x = noise
        for t, t_next in zip(timesteps, following):
            t_batch = torch.full((x.shape[0],), t.item(), device=x.device, dtype=timesteps.dtype)
            with autocast(self.precision, x.device):
                model_output = network(x, t_batch, **extra)
            model_output = model_output.float()
            if isinstance(self.scheduler, RFlowScheduler):
                x, _ = self.scheduler.step(model_output, t, x, t_next)
            elif isinstance(self.scheduler, DDIMScheduler):
                x, _ = self.scheduler.step(model_output, t, x, eta=self.eta, generator=generator)
            else:
                x, _ = self.scheduler.step(model_output, t, x, generator=generator)
        return x

    def to_hu(self, image: torch.Tensor) -> torch.Tensor:
        """The autoencoder's [0, 1] (clipped) back to HU through the training window."""
        low, high = (float(v) for v in self.latent_stats.record["hu_window"])
        return low + image.clamp(0.0, 1.0) * (high - low)

    @torch.no_grad()
    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        seeds: Sequence[int] | None = None,
        affine: torch.Tensor | None = None,
        cn_cond: torch.Tensor | None = None,
    ) -> MetaTensor:
        generator = None
        if seeds:
            generator = torch.Generator(device=inputs.device).manual_seed(int(seeds[0]))
        latents = self.sample_latents(inputs, network, generator, cn_cond)
        autoencoder = self.latent_stats.autoencoder
        with autocast(self.precision, latents.device):  # the division by the scale factor is float32 under it
            image = decode_from_latent(autoencoder, latents, self.latent_stats.scale_factor, self.decode_inferer)
        image = image.as_tensor() if isinstance(image, MetaTensor) else torch.as_tensor(image)
        hu = self.to_hu(image.float()).cpu()
        if affine is None:
            affine = torch.as_tensor(self.latent_stats.reference_affine)[None].repeat(hu.shape[0], 1, 1)
        out = MetaTensor(hu, affine=torch.as_tensor(affine, dtype=torch.float64).reshape(-1, 4, 4))
        out.is_batch = True
        return out


def sampling_provenance(
    bundle_root: str,
    diffusion_ckpt: str,
    autoencoder_ckpt: str,
    sampler: str,
    num_inference_steps: int | None,
    controlnet_ckpt: str | None = None,
    **extra: Any,
) -> dict[str, Any]:
    """What every synthetic file's sidecar records: bundle, version, checkpoints and their SHA-256, the sampler."""
    record = {
        **bundle_identity(bundle_root),
        "checkpoint": str(diffusion_ckpt),
        "checkpoint_sha256": sha256_file(diffusion_ckpt),
        "autoencoder_checkpoint": str(autoencoder_ckpt),
        "autoencoder_sha256": sha256_file(autoencoder_ckpt),
        "sampler": sampler,
        "num_inference_steps": default_steps(sampler, num_inference_steps),
    }
    if controlnet_ckpt:
        record.update(controlnet_checkpoint=str(controlnet_ckpt), controlnet_sha256=sha256_file(controlnet_ckpt))
    record.update(extra)
    return record


def seed_items(first_seed: int, num_samples: int, prefix: str = "sample") -> list[dict[str, Any]]:
    """``[{"seed": s, "name": "<prefix>_<s>", "provenance": {"seed": s}}, ...]``: the dataset of unconditional
    sampling."""
    seeds = range(int(first_seed), int(first_seed) + int(num_samples))
    return [{"seed": s, "name": f"{prefix}_{s:05d}", "provenance": {"seed": s}} for s in seeds]


def mask_items(
    masks: Sequence[Mapping[str, Any] | str], first_seed: int, samples_per_mask: int = 1, label_key: str = "label"
) -> list[dict[str, Any]]:
    """One item per (mask, seed): ``{"label": path, "seed", "name": "<case>_s<seed>", "provenance"}``."""
    items = []
    seed = int(first_seed)
    for mask in masks:
        path = mask[label_key] if isinstance(mask, Mapping) else mask
        case = str(path).replace("\\", "/").rsplit("/", 1)[-1].split(".nii")[0]
        for _ in range(int(samples_per_mask)):
            items.append({label_key: path, "seed": seed, "name": f"{case}_s{seed:05d}", "provenance": {"seed": seed}})
            seed += 1
    return items
