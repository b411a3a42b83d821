"""Training engines of the two stages and the iteration of the synthesis workflow.

Why this is not plain MONAI:

* Stage 1 (:class:`VQGANTrainer`). MONAI's ``GanTrainer`` feeds the generator random latents and gives its loss
  only the fakes (no reconstruction loss), and ``AdversarialTrainer`` has one discriminator, no feature matching,
  no delayed start, a hard-coded ``torch.autocast("cuda")`` and expects a single-tensor generator output. The
  DiffTumor VQGAN-3D needs: L1 reconstruction (x4) + the VQ commitment loss + optional perceptual loss, a 2D slice
  discriminator and a 3D volume discriminator (hinge or least squares) switched on after ``discriminator_start``
  iterations, and feature matching on both (x4). :class:`VQGANTrainer` is a MONAI ``Trainer`` (so handlers,
  metrics, ``StatsHandler``, checkpoint and DDP overlays work as for any MONAI trainer) with that iteration.
* Stage 2 (:class:`TumorLatentPrepareBatch`). MONAI's ``SupervisedTrainer`` + ``DiffusionInferer`` (concat mode)
  + ``DiffusionPrepareBatch`` train an epsilon-prediction model; what is missing is DiffTumor's input: the latents of
  the CT crop (target) and of the masked crop ``x * (1 - m)`` from the frozen autoencoder, min-max normalised by the
  codebook range, and the tumor mask resized to the latent grid as ``2 m - 1``. This prepare-batch supplies them.
* Synthesis workflow (:func:`synthesis_iteration`): the synthesis is the dataset transform
  (:class:`~.transforms.TumorSynthesisd`); the evaluator's iteration only passes the synthesized item on to the
  post-processing that writes it.
"""

from __future__ import annotations

import logging
import os
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
import torch.nn.functional as F
from monai.engines import Trainer
from monai.engines.utils import DiffusionPrepareBatch, IterationEvents, default_metric_cmp_fn, default_prepare_batch
from monai.inferers import Inferer, SimpleInferer
from monai.losses import PatchAdversarialLoss
from monai.transforms import Transform
from monai.utils import CommonKeys as Keys
from torch.optim.optimizer import Optimizer
from torch.utils.data import DataLoader

from .networks import codebook_range, normalize_latent
from .precision import autocast, grad_scaler

logger = logging.getLogger(__name__)


def _unwrap(module: torch.nn.Module) -> torch.nn.Module:
    return getattr(module, "module", module)


def random_axial_slices(volume: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """One slice per batch element along the last spatial axis: ``B x C x H x W x D`` -> ``B x C x H x W``."""
    return volume[torch.arange(volume.shape[0], device=volume.device), :, :, :, index]


def feature_matching(fake: Sequence[torch.Tensor], real: Sequence[torch.Tensor]) -> torch.Tensor:
    """L1 between the discriminator's intermediate features of fakes and (detached) reals, summed over layers and
    scaled by ``4 / number of layers`` (the reference's ``4 / (n_layers + 1)`` for its 3-layer discriminators)."""
    layers = list(zip(fake[:-1], real[:-1]))
    if not layers:
        return fake[-1].new_zeros(())
    return sum(F.l1_loss(f, r.detach()) for f, r in layers) * (4.0 / len(layers))


class VQGANTrainer(Trainer):
    """Stage 1: the VQ autoencoder with a 2D slice and a 3D volume patch discriminator (see the module docstring).

    The generator loss per iteration is ``l1_weight * |x - x^| + commitment + perceptual_weight * perceptual`` and,
    from iteration ``discriminator_start`` on, ``+ adversarial_weight * (G_3d + G_2d) + feature_matching_weight *
    (FM_3d + FM_2d)``; each discriminator then takes one step on ``0.5 * (loss(real) + loss(fake))``. The 2D
    discriminator sees one random axial slice per crop (the same slice of the real and the fake).

    Args (beyond MONAI ``Trainer``'s):
        network: the autoencoder; called as ``inferer(x, network, return_quantization_loss=True)``.
        optimizer / d_optimizer: of the autoencoder / of both discriminators.
        discriminator_2d / discriminator_3d: ``PatchDiscriminator`` s (``spatial_dims`` 2 / 3).
        adversarial_loss: ``PatchAdversarialLoss`` (hinge by default, ``least_squares`` works too).
        perceptual_loss: optional callable ``(fake, real) -> loss`` (``SlicePerceptualLoss``), off by default.
        gradient_clip: max gradient norm of the autoencoder step (the reference's 1.0), ``None`` = no clipping.
        precision: ``fp32``, ``bf16``, ``fp16`` or ``auto`` (``scripts/precision.py``): autocast of the forward
            passes on the run's device, gradient scalers for fp16 only; network outputs are cast to float32 before
            the losses, and the codebook lookup runs in float32 (:class:`~.networks.DiffTumorVQVAE`).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Iterable | DataLoader,
        network: torch.nn.Module,
        optimizer: Optimizer,
        discriminator_2d: torch.nn.Module,
        discriminator_3d: torch.nn.Module,
        d_optimizer: Optimizer,
        adversarial_loss: Callable | None = None,
        l1_weight: float = 4.0,
        adversarial_weight: float = 1.0,
        feature_matching_weight: float = 4.0,
        perceptual_loss: Callable | None = None,
        perceptual_weight: float = 0.0,
        discriminator_start: int = 10000,
        gradient_clip: float | None = 1.0,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        iteration_update: Callable | None = None,
        inferer: Inferer | None = None,
        postprocessing: Transform | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        precision: str = "fp32",
        decollate: bool = False,
        to_kwargs: dict | None = None,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            iteration_update=iteration_update,
            postprocessing=postprocessing,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            metric_cmp_fn=metric_cmp_fn,
            handlers=train_handlers,
            amp=False,  # MONAI's amp is CUDA fp16 only; this trainer autocasts itself (``precision``)
            decollate=decollate,
            to_kwargs=to_kwargs,
        )
        self.network = network
        self.optimizer = optimizer
        self.discriminator_2d = discriminator_2d
        self.discriminator_3d = discriminator_3d
        self.d_optimizer = d_optimizer
        self.adversarial_loss = adversarial_loss or PatchAdversarialLoss(criterion="hinge")
        self.l1_weight = float(l1_weight)
        self.adversarial_weight = float(adversarial_weight)
        self.feature_matching_weight = float(feature_matching_weight)
        self.perceptual_loss = perceptual_loss
        self.perceptual_weight = float(perceptual_weight)
        self.discriminator_start = int(discriminator_start)
        self.gradient_clip = gradient_clip
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.precision = precision
        self.g_scaler = grad_scaler(precision, device)
        self.d_scaler = grad_scaler(precision, device)

    def adversarial_active(self, iteration: int) -> bool:
        """Whether the discriminators take part at this (1-based) iteration: from ``discriminator_start`` on."""
        return iteration - 1 >= self.discriminator_start

    def _autocast(self):
        return autocast(self.precision, self.state.device)

    def _iteration(self, engine: "VQGANTrainer", batchdata: dict[str, torch.Tensor]) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("Must provide batch data for current iteration.")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        images = batch[0]
        active = engine.adversarial_active(engine.state.iteration)
        output: dict[str, Any] = {Keys.IMAGE: images, Keys.LABEL: images}
        engine.state.output = output

        # ---- autoencoder (generator) step
        engine.network.train()
        engine.optimizer.zero_grad(set_to_none=True)
        with engine._autocast():
            recon, quantization_loss = engine.inferer(images, engine.network, return_quantization_loss=True)
            recon, quantization_loss = recon.float(), quantization_loss.float()
            output[Keys.PRED] = recon
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            recon_loss = F.l1_loss(recon.float(), images.float()) * engine.l1_weight
            loss = recon_loss + quantization_loss
            perceptual = recon_loss.new_zeros(())
            if engine.perceptual_loss is not None and engine.perceptual_weight > 0:
                perceptual = engine.perceptual_loss(recon.float(), images.float()).float() * engine.perceptual_weight
                loss = loss + perceptual
            generator_loss = recon_loss.new_zeros(())
            matching = recon_loss.new_zeros(())
            if active:
                index = torch.randint(0, images.shape[-1], (images.shape[0],), device=images.device)
                real_slices, fake_slices = random_axial_slices(images, index), random_axial_slices(recon, index)
                fake_3d = [f.float() for f in engine.discriminator_3d(recon.float().contiguous())]
                fake_2d = [f.float() for f in engine.discriminator_2d(fake_slices.float().contiguous())]
                generator_loss = engine.adversarial_weight * (
                    engine.adversarial_loss(fake_3d[-1], target_is_real=True, for_discriminator=False)
                    + engine.adversarial_loss(fake_2d[-1], target_is_real=True, for_discriminator=False)
                )
                with torch.no_grad():
                    real_3d = [f.float() for f in engine.discriminator_3d(images.float().contiguous())]
                    real_2d = [f.float() for f in engine.discriminator_2d(real_slices.float().contiguous())]
                matching = engine.feature_matching_weight * (
                    feature_matching(fake_3d, real_3d) + feature_matching(fake_2d, real_2d)
                )
                loss = loss + generator_loss + matching
        output[Keys.LOSS] = loss
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.g_scaler.scale(loss).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        if engine.gradient_clip:
            engine.g_scaler.unscale_(engine.optimizer)
            torch.nn.utils.clip_grad_norm_(engine.network.parameters(), engine.gradient_clip)
        engine.g_scaler.step(engine.optimizer)
        engine.g_scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        # ---- discriminator step (real and fake pass separately: BatchNorm statistics and DDP stay per pass)
        discriminator_loss = recon_loss.new_zeros(())
        if active:
            engine.discriminator_2d.train()
            engine.discriminator_3d.train()
            engine.d_optimizer.zero_grad(set_to_none=True)
            for target_is_real, volume, slices in (
                (True, images, real_slices),
                (False, recon.detach(), fake_slices.detach()),
            ):
                with engine._autocast():
                    part = 0.5 * engine.adversarial_weight * (
                        engine.adversarial_loss(engine.discriminator_3d(volume.float().contiguous())[-1].float(),
                                                target_is_real=target_is_real, for_discriminator=True)
                        + engine.adversarial_loss(engine.discriminator_2d(slices.float().contiguous())[-1].float(),
                                                  target_is_real=target_is_real, for_discriminator=True)
                    )  # fmt: skip
                engine.d_scaler.scale(part).backward()
                discriminator_loss = discriminator_loss + part.detach()
            engine.d_scaler.step(engine.d_optimizer)
            engine.d_scaler.update()

        output.update(
            {
                "recon_loss": recon_loss.detach(),
                "quantization_loss": quantization_loss.detach(),
                "perceptual_loss": perceptual.detach(),
                "generator_loss": generator_loss.detach(),
                "feature_matching_loss": matching.detach(),
                "discriminator_loss": discriminator_loss.detach(),
            }
        )
        return output


def frozen_autoencoder(
    autoencoder: torch.nn.Module,
    path: str | os.PathLike | None,
    device: torch.device | str,
    allow_random_weights: bool = False,
) -> torch.nn.Module:
    """The stage-1 autoencoder with its trained weights (``weights_only``), in eval mode, without gradients.

    A missing file is an error unless ``allow_random_weights`` (tests, and a dry run of the diffusion stage).
    """
    if path is not None and os.path.isfile(path):
        autoencoder.load_state_dict(torch.load(path, map_location=device, weights_only=True))
    elif allow_random_weights:
        logger.warning("difftumor: no autoencoder weights at %s: the diffusion stage uses a RANDOM autoencoder", path)
    else:
        raise FileNotFoundError(f"difftumor: train the autoencoder first (configs/train.json); {path} not found")
    autoencoder = autoencoder.to(device).eval()
    for parameter in autoencoder.parameters():
        parameter.requires_grad_(False)
    return autoencoder


class TumorLatentPrepareBatch(DiffusionPrepareBatch):
    """DiffTumor's diffusion inputs from a batch of CT crops in [-1, 1] and their labels (see the module docstring).

    Returns ``(z0, noise, (), {"noise", "timesteps", "condition", "mode": "concat"})`` for ``SupervisedTrainer`` /
    ``SupervisedEvaluator`` with a ``DiffusionInferer``: ``z0`` the normalised latent of the crop, ``condition`` the
    normalised latent of ``x * (1 - m)`` and ``2 m - 1`` on the latent grid (``m`` = label == ``tumor_value``).
    """

    def __init__(
        self,
        autoencoder: torch.nn.Module,
        num_train_timesteps: int,
        image_key: str = "image",
        label_key: str = "label",
        tumor_value: int = 2,
    ):
        super().__init__(num_train_timesteps=num_train_timesteps)
        self.autoencoder = autoencoder
        self.image_key = image_key
        self.label_key = label_key
        self.tumor_value = tumor_value

    @torch.no_grad()
    def latents(self, images: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(z0, condition)`` for crops ``images`` and tumor masks ``mask`` (both ``B x 1 x H x W x D``)."""
        autoencoder = _unwrap(self.autoencoder)
        value_range = codebook_range(autoencoder)
        z0 = normalize_latent(autoencoder.encode(images), value_range)
        masked = normalize_latent(autoencoder.encode(images * (1.0 - mask)), value_range)
        latent_mask = F.interpolate(mask * 2.0 - 1.0, size=z0.shape[2:], mode="nearest")
        return z0, torch.cat([masked, latent_mask], dim=1)

    def __call__(
        self,
        batchdata: Mapping[str, torch.Tensor],
        device: str | torch.device | None = None,
        non_blocking: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor, torch.Tensor, tuple, dict]:
        images = torch.as_tensor(batchdata[self.image_key]).to(device, non_blocking=non_blocking).float()
        labels = torch.as_tensor(batchdata[self.label_key]).to(device, non_blocking=non_blocking)
        mask = (labels == self.tumor_value).float()
        z0, condition = self.latents(images, mask)
        noise = self.get_noise(z0)
        timesteps = self.get_timesteps(z0)
        return z0, noise, (), {"noise": noise, "timesteps": timesteps, "condition": condition, "mode": "concat"}


def synthesis_iteration(engine: Any, batchdata: Mapping[str, Any], info_key: str = "provenance") -> dict[str, Any]:
    """The synthesis workflow's iteration: the item was synthesized by the dataset transform; hand it to the
    post-processing (which MONAI runs on ``MODEL_COMPLETED``) that writes it. An item the transform left alone (a
    tumor already in its label, or no organ voxel: no ``seed`` under ``info_key``) is not written."""
    engine.state.output = dict(batchdata)
    if (batchdata.get(info_key) or {}).get("seed") is None:
        source = getattr(batchdata.get("image"), "meta", {}).get("filename_or_obj", "an item")
        logger.warning("difftumor: %s was not synthesized (tumor already labelled, or no organ): not written", source)
        return engine.state.output
    engine.fire_event(IterationEvents.MODEL_COMPLETED)
    return engine.state.output
