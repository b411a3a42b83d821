"""The latent space of the LDM: autoencoder weights (current and old key names), the latent scale factor, and the
batches the diffusion model trains on.

Why this is not plain MONAI:

* ``AutoencoderKL.load_old_state_dict`` prints, mutates its input and cannot say which key style a file used; the
  BraTS adaptation needs a loader that unwraps checkpoint containers (``{"model": ...}``, ``module.`` prefixes),
  maps the MONAI Generative names (``decoder.blocks.N.conv`` of the upsampling layers is ``postconv`` now; the
  attention ``to_q``/``to_k``/``to_v``/``proj_attn`` moved under ``attn``) and reports what it did.
* MONAI's ``LatentDiffusionInferer`` takes a scale factor but nothing computes, stores or checks it. Here
  :class:`LatentStats` computes it ONCE from training data (``1 / std`` of the latents, as the model-zoo bundle),
  writes it to ``latent_stats.json`` next to the weights (with the autoencoder's SHA-256, the HU window, the image
  size and the reference geometry of the training images), and every later run reads it back. Latents are
  multiplied by it for training (:func:`encode_to_latent`) and divided by it before decoding
  (:func:`decode_from_latent`); the model-zoo sampler forgets the division.
* ``DiffusionPrepareBatch`` draws noise of the *image* shape; :class:`LatentDiffusionPrepareBatch` encodes the images
  with the frozen autoencoder first, so MONAI's stock ``SupervisedTrainer`` + ``DiffusionInferer`` train the
  diffusion model on latents (DDPM epsilon / v-prediction, or rectified flow with ``RFlowScheduler``).
"""

from __future__ import annotations

import datetime
import hashlib
import json
import logging
import os
import zlib
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from monai.engines.utils import DiffusionPrepareBatch
from monai.inferers import ControlNetDiffusionInferer, Inferer
from monai.networks.schedulers import RFlowScheduler
from torch import nn

from .checkpointing import atomic_torch_save
from .networks import LatentDecoder
from .precision import autocast
from .provenance import sha256_file

logger = logging.getLogger(__name__)

#: Old MONAI Generative attention parameter names -> current ``AutoencoderKL`` names (under ``<block>.attn``).
OLD_ATTENTION_NAMES = {"to_q": "to_q", "to_k": "to_k", "to_v": "to_v", "proj_attn": "out_proj"}
#: Containers a checkpoint file may wrap its state dict in (model-zoo CheckpointSaver, ignite, hand-made files).
STATE_DICT_CONTAINER_KEYS = ("state_dict", "model", "autoencoder", "network", "net")


# ----------------------------------------------------------------------------------------------------------------
# weights


def unwrap_state_dict(obj: Any, where: str = "checkpoint") -> dict[str, torch.Tensor]:
    """The tensor state dict inside a loaded checkpoint: plain, or under one of ``STATE_DICT_CONTAINER_KEYS``,
    with a DistributedDataParallel ``module.`` prefix removed."""
    if not isinstance(obj, Mapping):
        raise ValueError(f"{where}: expected a state dict, got {type(obj).__name__}")
    if not all(torch.is_tensor(value) for value in obj.values()):
        for key in STATE_DICT_CONTAINER_KEYS:
            if isinstance(obj.get(key), Mapping):
                return unwrap_state_dict(obj[key], where)
        raise ValueError(
            f"{where}: not a state dict of tensors and none of {list(STATE_DICT_CONTAINER_KEYS)} holds one "
            f"(top-level keys: {sorted(obj)[:8]})"
        )
    state = dict(obj)
    if state and all(key.startswith("module.") for key in state):
        state = {key[len("module.") :]: value for key, value in state.items()}
    return state


def _current_name(old_key: str, target_keys: set[str]) -> str | None:
    """The current ``AutoencoderKL`` name of an old MONAI Generative key, or None."""
    candidates = [old_key.replace(".conv.conv.", ".postconv.conv.")]  # upsampling conv, renamed in MONAI core
    parts = old_key.split(".")
    if len(parts) >= 3 and parts[-2] in OLD_ATTENTION_NAMES:  # <block>.to_q.weight -> <block>.attn.to_q.weight
        candidates.append(".".join(parts[:-2] + ["attn", OLD_ATTENTION_NAMES[parts[-2]], parts[-1]]))
    for candidate in candidates:
        if candidate != old_key and candidate in target_keys:
            return candidate
    return None


def map_autoencoder_state(
    state: Mapping[str, torch.Tensor], target_state: Mapping[str, torch.Tensor], where: str = "checkpoint"
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Rename an AutoencoderKL state dict to the keys of ``target_state`` (current MONAI names).

    Returns the mapped state and a report ``{"key_style": "monai" | "generative", "renamed": [(old, new), ...]}``.
    Old attention blocks without an output projection get the identity there (as MONAI's ``load_old_state_dict``).
    Keys that map to nothing, or target keys left without a value, are an error naming them.
    """
    target_keys = set(target_state)
    mapped: dict[str, torch.Tensor] = {}
    renamed: list[tuple[str, str]] = []
    unknown: list[str] = []
    for key, value in state.items():
        if key in target_keys:
            mapped[key] = value
            continue
        new_key = _current_name(key, target_keys)
        if new_key is None:
            unknown.append(key)
        else:
            mapped[new_key] = value
            renamed.append((key, new_key))
    for key in sorted(target_keys - set(mapped)):
        block = key.rsplit(".attn.out_proj.", 1)[0]
        if ".attn.out_proj." in key and f"{block}.attn.to_q.weight" in mapped:
            size = target_state[key].shape[0]
            mapped[key] = torch.eye(size) if key.endswith("weight") else torch.zeros(size)
            renamed.append(("(identity)", key))
    missing = sorted(target_keys - set(mapped))
    if unknown or missing:
        raise ValueError(
            f"{where}: the weights do not fit this AutoencoderKL: {len(unknown)} unknown keys {unknown[:5]}, "
            f"{len(missing)} missing keys {missing[:5]} (is it the same architecture: channels, latent_channels, "
            "num_res_blocks, attention levels?)"
        )
    return mapped, {"key_style": "generative" if renamed else "monai", "renamed": renamed}


def load_autoencoder_weights(
    autoencoder: nn.Module, path: str | os.PathLike, map_location: Any = "cpu"
) -> dict[str, Any]:
    """Load AutoencoderKL weights saved with current or old (MONAI Generative) key names; return a report.

    The report holds ``path``, ``sha256`` of the file, ``key_style`` and the ``renamed`` key pairs.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(
            f"{path}: no autoencoder weights. Train them first (configs/train_autoencoder.json) or convert a BraTS "
            "bundle's (python -m scripts.adapt_brats)"
        )
    loaded = torch.load(path, map_location=map_location, weights_only=True)
    target = getattr(autoencoder, "module", autoencoder)
    mapped, report = map_autoencoder_state(unwrap_state_dict(loaded, str(path)), target.state_dict(), str(path))
    try:
        target.load_state_dict(mapped, strict=True)
    except RuntimeError as error:  # shapes differ
        raise ValueError(f"{path}: the weights do not fit this AutoencoderKL: {error}") from error
    return {"path": str(path), "sha256": sha256_file(path), **report}


def load_network_weights(network: nn.Module, path: str | os.PathLike, map_location: Any = "cpu") -> str | None:
    """Load a plain (or wrapped) state dict into ``network`` strictly; return the file's SHA-256."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no weights file (train the stage that writes it first)")
    state = unwrap_state_dict(torch.load(path, map_location=map_location, weights_only=True), str(path))
    getattr(network, "module", network).load_state_dict(state, strict=True)
    return sha256_file(path)


def freeze(module: nn.Module) -> nn.Module:
    """Evaluation mode and no gradients: the module's weights cannot change during training of another one."""
    module.eval()
    for parameter in module.parameters():
        parameter.requires_grad_(False)
    return module


def state_sha256(module: nn.Module | Mapping[str, torch.Tensor]) -> str:
    """SHA-256 over a state dict's keys, dtypes, shapes and values (in key order): equal iff the weights are."""
    state = module.state_dict() if isinstance(module, nn.Module) else module
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach().cpu().contiguous()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        digest.update(tensor.numpy().tobytes() if tensor.dtype != torch.bfloat16 else tensor.float().numpy().tobytes())
    return digest.hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# scaling between the autoencoder's latents and the diffusion model's


def encode_to_latent(
    autoencoder: nn.Module,
    images: torch.Tensor,
    scale_factor: float,
    sample: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """``scale_factor * z`` with ``z`` the autoencoder's latent of ``images`` (a posterior sample, or its mean)."""
    z_mu, z_sigma = getattr(autoencoder, "module", autoencoder).encode(images)
    if sample:
        if generator is None:
            eps = torch.randn_like(z_sigma)
        else:
            eps = torch.randn(z_sigma.shape, generator=generator, dtype=z_sigma.dtype).to(z_sigma.device)
        z_mu = z_mu + z_sigma * eps
    return z_mu * scale_factor


def decode_from_latent(
    autoencoder: nn.Module, latents: torch.Tensor, scale_factor: float, inferer: Inferer | None = None
) -> torch.Tensor:
    """The image of diffusion-space ``latents``: divide by ``scale_factor``, then decode (whole, or with a
    sliding-window ``inferer`` over latent patches)."""
    z = latents / scale_factor
    decoder = LatentDecoder(getattr(autoencoder, "module", autoencoder))
    return decoder(z) if inferer is None else inferer(z, decoder)


def objective_of(scheduler: Any) -> str:
    """What the diffusion model predicts with this training scheduler: ``epsilon``, ``v_prediction``, ``sample`` or
    ``rflow`` (the velocity of rectified flow)."""
    if isinstance(scheduler, RFlowScheduler):
        return "rflow"
    return str(getattr(scheduler, "prediction_type", "epsilon"))


def _is_rank_zero() -> bool:
    dist = torch.distributed
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def _atomic_write_json(path: Path, record: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.part")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    os.replace(tmp, path)


class LatentStats:
    """The frozen autoencoder and the latent statistics of the training data, computed once and kept in a JSON file.

    ``prepare()`` loads the autoencoder weights (current or old key names) and freezes the network, then reads
    ``stats_file`` or, when it does not exist and ``compute`` is true, computes it from the first ``n_samples``
    items of ``dataset`` (in order, posterior samples drawn with a fixed seed, so every DDP rank gets the same
    value) and writes it (rank 0 only). A file made for other weights, another HU window, crop mode or image size
    is an error, never silently reused. Fields: ``scale_factor`` (``1 / std`` of the latents), ``latent_std``,
    ``latent_mean``, ``latent_shape``, ``n_images``, ``autoencoder_sha256``, ``hu_window``, ``image_size``,
    ``crop_mode``, ``reference_affine`` (element-wise median of the training images' affines after
    preprocessing: the geometry given to unconditional samples), ``spacing_mm`` and ``objective`` (what the
    diffusion model trained in this folder predicts).
    """

    def __init__(
        self,
        stats_file: str | os.PathLike,
        autoencoder: nn.Module,
        autoencoder_path: str | os.PathLike,
        dataset: Sequence[Mapping[str, Any]] | None = None,
        n_samples: int = 8,
        hu_window: Sequence[float] = (-1000.0, 1000.0),
        image_size: Sequence[int] | None = None,
        crop_mode: str | None = None,
        objective: str | None = None,
        compute: bool = True,
        device: str | torch.device = "cpu",
        image_key: str = "image",
        seed: int = 0,
    ):
        self.stats_file = Path(stats_file)
        self.autoencoder = autoencoder
        self.autoencoder_path = Path(autoencoder_path)
        self.dataset = dataset
        self.n_samples = int(n_samples)
        self.hu_window = [float(v) for v in hu_window]
        self.image_size = None if image_size is None else [int(s) for s in image_size]
        self.crop_mode = crop_mode
        self.objective = objective
        self.compute_allowed = compute
        self.device = torch.device(device)
        self.image_key = image_key
        self.seed = seed
        self.record: dict[str, Any] | None = None
        self.autoencoder_report: dict[str, Any] | None = None

    # -- the value everybody needs
    @property
    def scale_factor(self) -> float:
        if self.record is None:
            raise RuntimeError("LatentStats.prepare() has not run: the scale factor is not known yet")
        return float(self.record["scale_factor"])

    @property
    def reference_affine(self) -> np.ndarray:
        if self.record is None:
            raise RuntimeError("LatentStats.prepare() has not run")
        return np.asarray(self.record["reference_affine"], dtype=np.float64)

    # -- loading / computing
    def prepare(self) -> "LatentStats":
        """Load and freeze the autoencoder, then read (or compute once and write) the statistics."""
        self.autoencoder_report = load_autoencoder_weights(self.autoencoder, self.autoencoder_path, self.device)
        freeze(self.autoencoder)
        sha = self.autoencoder_report["sha256"]
        if self.stats_file.is_file():
            record = json.loads(self.stats_file.read_text())
            self._check(record, sha)
            if self.objective and record.get("objective") != self.objective:
                record["objective"] = self.objective  # the diffusion model of this folder is trained anew
                if _is_rank_zero():
                    _atomic_write_json(self.stats_file, record)
            logger.info("latent scale factor %.6g read from %s", record["scale_factor"], self.stats_file)
        elif not self.compute_allowed:
            raise FileNotFoundError(
                f"{self.stats_file}: no latent statistics. They are written once by the diffusion training "
                "(configs/train.json) next to its weights"
            )
        else:
            record = self.compute(sha)
            if _is_rank_zero():
                _atomic_write_json(self.stats_file, record)
            logger.info("latent scale factor %.6g computed and written to %s", record["scale_factor"], self.stats_file)
        self.record = record
        return self

    def _check(self, record: Mapping[str, Any], sha: str | None) -> None:
        problems = []
        if record.get("autoencoder_sha256") != sha:
            problems.append(f"autoencoder {record.get('autoencoder_sha256')} != {sha} ({self.autoencoder_path})")
        if [float(v) for v in record.get("hu_window", [])] != self.hu_window:
            problems.append(f"hu_window {record.get('hu_window')} != {self.hu_window}")
        if self.image_size is not None and record.get("image_size") != self.image_size:
            problems.append(f"image_size {record.get('image_size')} != {self.image_size}")
        if self.crop_mode is not None and record.get("crop_mode") not in (None, self.crop_mode):
            problems.append(f"crop_mode {record.get('crop_mode')} != {self.crop_mode}")
        if problems:
            raise ValueError(
                f"{self.stats_file} was computed for other settings: {'; '.join(problems)}. Delete it (and the "
                "diffusion weights trained with it) to compute it again, or use another ckpt_dir"
            )

    @torch.no_grad()
    def compute(self, autoencoder_sha256: str | None = None) -> dict[str, Any]:
        """Statistics of the latents of the first ``n_samples`` dataset items (``1 / std`` is the scale factor)."""
        if not self.dataset:
            raise ValueError("LatentStats.compute needs a dataset with at least one item")
        generator = torch.Generator().manual_seed(self.seed)
        total, total_sq, count = 0.0, 0.0, 0
        affines, shape = [], None
        for index in range(min(self.n_samples, len(self.dataset))):
            item = self.dataset[index]
            image = item[self.image_key]
            affines.append(np.asarray(getattr(image, "affine", torch.eye(4)), dtype=np.float64))
            batch = torch.as_tensor(image)[None].to(self.device, dtype=torch.float32)
            latent = encode_to_latent(self.autoencoder, batch, 1.0, sample=True, generator=generator).double()
            total += float(latent.sum())
            total_sq += float((latent**2).sum())
            count += latent.numel()
            shape = list(latent.shape[1:])
        mean = total / count
        std = float(np.sqrt(max(total_sq / count - mean**2, 0.0)))
        if not np.isfinite(std) or std <= 0:
            raise ValueError(f"latent standard deviation is {std}: cannot scale the latents")
        affine = np.median(np.stack(affines), axis=0)
        return {
            "scale_factor": 1.0 / std,
            "latent_std": std,
            "latent_mean": mean,
            "latent_shape": shape,
            "n_images": len(affines),
            "autoencoder_sha256": autoencoder_sha256,
            "autoencoder_path": str(self.autoencoder_path),
            "hu_window": self.hu_window,
            "image_size": self.image_size,
            "crop_mode": self.crop_mode,
            "objective": self.objective,
            "reference_affine": affine.tolist(),
            "spacing_mm": np.linalg.norm(affine[:3, :3], axis=0).tolist(),
            "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        }


# ----------------------------------------------------------------------------------------------------------------
# training batches and the ControlNet training forward pass


class LatentDiffusionPrepareBatch(DiffusionPrepareBatch):
    """Batches for training a diffusion model on the latents of a frozen autoencoder.

    ``images -> latents = scale_factor * z`` (no gradient), then noise, timesteps and the target of the scheduler's
    objective: the noise (``epsilon``), the velocity (``v_prediction``), the latents (``sample``), or
    ``latents - noise`` (rectified flow). Returns ``(latents, target, (), {"noise", "timesteps"[, "cn_cond"]})``
    for ``SupervisedTrainer`` / ``SupervisedEvaluator`` with ``DiffusionInferer`` (or the ControlNet inferer below).

    Args:
        latent_stats: a prepared :class:`LatentStats` (frozen autoencoder + scale factor).
        scheduler: the training scheduler (DDPM or RFlow).
        image_key: the image in the batch dictionary.
        cn_cond_key: a conditioning image for a ControlNet (the pancreas mask), passed as ``cn_cond``.
        seed: draw posterior samples, noise and timesteps from a generator seeded by ``seed`` and the case's file
            name, so a validation loss compares like with like across epochs (None: the global RNG, for training).
        cache_posteriors: keep each case's posterior (``z_mu``, ``z_sigma``) after its first encoding, keyed by its
            file name, and draw a new latent from it at every visit: exactly what encoding again gives (the
            autoencoder is frozen and the preprocessing has no random step), without running the encoder every
            epoch. Turn it off when the preprocessing is random or the images have no file name.
    """

    def __init__(
        self,
        latent_stats: LatentStats,
        scheduler: Any,
        image_key: str = "image",
        cn_cond_key: str | None = None,
        seed: int | None = None,
        cache_posteriors: bool = False,
    ):
        super().__init__(num_train_timesteps=int(scheduler.num_train_timesteps))
        self.latent_stats = latent_stats
        self.scheduler = scheduler
        self.image_key = image_key
        self.cn_cond_key = cn_cond_key
        self.seed = seed
        self.cache_posteriors = cache_posteriors
        self._posteriors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def _names(self, batchdata: Mapping[str, Any]) -> list[str] | None:
        meta = getattr(batchdata[self.image_key], "meta", {}) or {}
        names = meta.get("filename_or_obj")
        if isinstance(names, str):
            names = [names]
        return [str(n) for n in names] if names and all(names) else None

    def _posterior(self, images: torch.Tensor, batchdata: Mapping[str, Any]) -> tuple[torch.Tensor, torch.Tensor]:
        autoencoder = getattr(self.latent_stats.autoencoder, "module", self.latent_stats.autoencoder)
        names = self._names(batchdata) if self.cache_posteriors else None
        if names is None or len(names) != images.shape[0]:
            return autoencoder.encode(images)
        missing = [i for i, name in enumerate(names) if name not in self._posteriors]
        if missing:
            z_mu, z_sigma = autoencoder.encode(images[missing])
            for row, index in enumerate(missing):
                self._posteriors[names[index]] = (z_mu[row].detach(), z_sigma[row].detach())
        z_mu = torch.stack([self._posteriors[name][0] for name in names])
        z_sigma = torch.stack([self._posteriors[name][1] for name in names])
        return z_mu, z_sigma

    def _generator(self, batchdata: Mapping[str, Any]) -> torch.Generator | None:
        if self.seed is None:
            return None
        meta = getattr(batchdata[self.image_key], "meta", {}) or {}
        names = meta.get("filename_or_obj", "")
        text = "|".join(names) if isinstance(names, (list, tuple)) else str(names)
        return torch.Generator().manual_seed((int(self.seed) + zlib.crc32(text.encode())) % (2**63))

    def _timesteps(self, latents: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
        batch = latents.shape[0]
        if isinstance(self.scheduler, RFlowScheduler):
            if generator is None:
                return self.scheduler.sample_timesteps(latents)
            t = torch.rand((batch,), generator=generator) * self.num_train_timesteps
            return (t.long() if self.scheduler.use_discrete_timesteps else t).to(latents.device)
        if generator is None:
            return torch.randint(0, self.num_train_timesteps, (batch,), device=latents.device).long()
        return torch.randint(0, self.num_train_timesteps, (batch,), generator=generator).long().to(latents.device)

    def _target(self, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        objective = objective_of(self.scheduler)
        if objective == "rflow":
            return latents - noise
        if objective == "v_prediction":
            return self.scheduler.get_velocity(latents, noise, timesteps)
        if objective == "sample":
            return latents
        return noise

    def __call__(
        self,
        batchdata: Mapping[str, Any],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking, **kwargs)
        generator = self._generator(batchdata)
        with torch.no_grad():
            z_mu, z_sigma = self._posterior(images, batchdata)
            if generator is None:
                eps = torch.randn_like(z_sigma)
            else:
                eps = torch.randn(z_sigma.shape, generator=generator, dtype=z_sigma.dtype).to(z_sigma.device)
            latents = ((z_mu + z_sigma * eps) * self.latent_stats.scale_factor).detach()
        if generator is None:
            noise = torch.randn_like(latents)
        else:
            noise = torch.randn(latents.shape, generator=generator, dtype=latents.dtype).to(latents.device)
        timesteps = self._timesteps(latents, generator)
        target = self._target(latents, noise, timesteps)
        infer_kwargs: dict[str, Any] = {"noise": noise, "timesteps": timesteps}
        if self.cn_cond_key is not None:
            cond = torch.as_tensor(batchdata[self.cn_cond_key])
            infer_kwargs["cn_cond"] = cond.to(device, non_blocking=non_blocking, **kwargs).float()
        return latents, target, (), infer_kwargs


class ControlNetTrainingInferer(Inferer):
    """``trainer.inferer(latents, controlnet, noise=, timesteps=, cn_cond=)`` -> the frozen UNet's prediction with
    the ControlNet's residuals (MONAI's ``ControlNetDiffusionInferer`` wants the UNet as an argument; a trainer
    passes only the network it trains)."""

    def __init__(self, scheduler: Any, diffusion_model: nn.Module):
        super().__init__()
        self.inferer = ControlNetDiffusionInferer(scheduler)
        self.diffusion_model = diffusion_model

    def __call__(  # type: ignore[override]
        self,
        inputs: torch.Tensor,
        network: nn.Module,
        noise: torch.Tensor,
        timesteps: torch.Tensor,
        cn_cond: torch.Tensor,
    ) -> torch.Tensor:
        return self.inferer(inputs, self.diffusion_model, network, noise, timesteps, cn_cond)


def save_weights(module: nn.Module, path: str | os.PathLike) -> Path:
    """The plain state dict of ``module`` (unwrapped from DDP), written atomically."""
    return atomic_torch_save(getattr(module, "module", module).state_dict(), path)


class ReconstructionInferer(Inferer):
    """``inferer(images, autoencoder)`` -> ``autoencoder.reconstruct(images)`` (decoded posterior mean), for
    validating the autoencoder with MONAI's evaluator (``AutoencoderKL.forward`` returns a tuple), under autocast of
    ``precision`` (``scripts/precision.py``) on the inputs' device; the reconstruction is returned in float32."""

    def __init__(self, precision: str = "fp32"):
        super().__init__()
        self.precision = precision

    def __call__(self, inputs: torch.Tensor, network: nn.Module, *args: Any, **kwargs: Any) -> torch.Tensor:
        with autocast(self.precision, inputs.device):
            reconstruction = getattr(network, "module", network).reconstruct(inputs)
        return reconstruction.float()
