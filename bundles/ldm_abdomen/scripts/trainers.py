"""Stage 1 of the LDM: the AutoencoderKL trained with L1 + KL + patch-adversarial (+ optional perceptual) losses.

Why a trainer here: MONAI's ``GanTrainer`` feeds the generator random latent codes (a GAN from noise); an
autoencoder GAN reconstructs its input and needs the posterior (``z_mu``, ``z_sigma``) for the KL term, so one
iteration is: reconstruct, update the autoencoder with the generator loss, update the discriminator on the
detached reconstruction. Everything else (events, handlers, metrics, resuming) is MONAI's ``Trainer``.

The loss weights are the model-zoo ``brats_mri_generative_diffusion`` ones (SPEC 3.3): L1 + 1e-7 KL + 0.1
adversarial (least squares, ``PatchAdversarialLoss``) + 0.1 perceptual. The perceptual term needs a pretrained 3D
or fake-3D feature network that cannot be downloaded here; it is off (weight 0) unless a local weights file is
given (:func:`make_perceptual_loss`).
"""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
from monai.engines.trainer import Trainer
from monai.engines.utils import IterationEvents, default_prepare_batch
from monai.losses import PatchAdversarialLoss
from torch import nn

from .precision import autocast, grad_scaler


def kl_divergence(z_mu: torch.Tensor, z_sigma: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, 1)) summed over channels and voxels, averaged over the batch."""
    dims = list(range(1, z_mu.ndim))
    kl = 0.5 * torch.sum(z_mu.pow(2) + z_sigma.pow(2) - torch.log(z_sigma.pow(2) + 1e-12) - 1, dim=dims)
    return kl.mean()


def make_perceptual_loss(
    weight: float,
    weights_path: str | None,
    network_type: str = "resnet50",
    spatial_dims: int = 3,
    is_fake_3d: bool = True,
    fake_3d_ratio: float = 0.2,
    state_dict_key: str | None = None,
) -> nn.Module | None:
    """MONAI's ``PerceptualLoss`` from a LOCAL weights file, or None when ``weight`` is 0 (the default).

    Only the torchvision ``resnet50`` backbone of MONAI loads local weights without reaching the network (the
    MedicalNet and RadImageNet backbones always call ``torch.hub``), and it needs ``torchvision``. Both conditions
    are checked here, so a missing file or package fails at start-up with a message, never with a download.
    """
    if not weight:
        return None
    if network_type != "resnet50":
        raise ValueError(
            f"perceptual_network {network_type!r}: only 'resnet50' loads local weights offline in MONAI (the others "
            "download through torch.hub); set perceptual_weight 0 or use resnet50 with perceptual_weights_path"
        )
    if not weights_path or not Path(weights_path).is_file():
        raise ValueError(
            f"perceptual_weight is {weight} but perceptual_weights_path {weights_path!r} is not a file: give a local "
            "ResNet-50 state dict (nothing is downloaded) or set perceptual_weight 0"
        )
    if importlib.util.find_spec("torchvision") is None:
        raise ImportError("the perceptual loss needs torchvision (install the build matching your torch)")
    from monai.losses import PerceptualLoss

    return PerceptualLoss(
        spatial_dims=spatial_dims,
        network_type=network_type,
        is_fake_3d=is_fake_3d,
        fake_3d_ratio=fake_3d_ratio,
        pretrained=True,
        pretrained_path=weights_path,
        pretrained_state_dict_key=state_dict_key,
    )


class AutoencoderGanLoss:
    """Generator and discriminator losses of the autoencoder GAN (model-zoo weights by default)."""

    def __init__(
        self,
        kl_weight: float = 1e-7,
        adversarial_weight: float = 0.1,
        perceptual_weight: float = 0.0,
        perceptual_loss: nn.Module | None = None,
    ):
        if perceptual_weight and perceptual_loss is None:
            raise ValueError("perceptual_weight > 0 needs a perceptual_loss network")
        self.kl_weight = kl_weight
        self.adversarial_weight = adversarial_weight
        self.perceptual_weight = perceptual_weight
        self.perceptual_loss = perceptual_loss
        self.l1 = nn.L1Loss()
        self.adversarial = PatchAdversarialLoss(criterion="least_squares")

    def generator(
        self,
        reconstruction: torch.Tensor,
        images: torch.Tensor,
        z_mu: torch.Tensor,
        z_sigma: torch.Tensor,
        discriminator: nn.Module | None,
    ) -> dict[str, torch.Tensor]:
        z_mu, z_sigma = z_mu.float(), z_sigma.float()  # the losses stay float32 under autocast
        terms = {"recon_loss": self.l1(reconstruction.float(), images.float()), "kl_loss": kl_divergence(z_mu, z_sigma)}
        total = terms["recon_loss"] + self.kl_weight * terms["kl_loss"]
        if self.perceptual_weight:
            terms["perceptual_loss"] = self.perceptual_loss(reconstruction.float(), images.float()).float()
            total = total + self.perceptual_weight * terms["perceptual_loss"]
        if discriminator is not None and self.adversarial_weight:
            logits = discriminator(reconstruction.contiguous().float())[-1].float()
            terms["adv_loss"] = self.adversarial(logits, target_is_real=True, for_discriminator=False)
            total = total + self.adversarial_weight * terms["adv_loss"]
        terms["g_loss"] = total
        return terms

    def discriminator(
        self, reconstruction: torch.Tensor, images: torch.Tensor, discriminator: nn.Module
    ) -> torch.Tensor:
        fake = discriminator(reconstruction.contiguous().detach().float())[-1].float()
        real = discriminator(images.contiguous().detach().float())[-1].float()
        loss = 0.5 * (
            self.adversarial(fake, target_is_real=False, for_discriminator=True)
            + self.adversarial(real, target_is_real=True, for_discriminator=True)
        )
        return self.adversarial_weight * loss


class AutoencoderGanTrainer(Trainer):
    """One iteration: reconstruct, step the autoencoder on the generator loss, step the discriminator.

    The adversarial terms start at epoch ``adversarial_start_epoch`` (the autoencoder learns to reconstruct first;
    0 = from the start as in the model zoo). ``engine.state.output`` is a dict with ``image``, ``pred`` (the
    reconstruction), ``loss`` (= ``g_loss``, what loss handlers and the NaN stop read), ``g_loss``, ``d_loss`` and
    the separate terms. ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``; see ``scripts/precision.py``)
    autocasts the forward passes of both networks on the run's device, with gradient scalers for fp16 only; the
    network outputs are cast to float32 before the losses.
    """

    def __init__(
        self,
        device: str | torch.device,
        max_epochs: int,
        train_data_loader: Any,
        autoencoder: nn.Module,
        discriminator: nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_optimizer: torch.optim.Optimizer,
        loss: AutoencoderGanLoss,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = default_prepare_batch,
        adversarial_start_epoch: int = 0,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        train_handlers: Sequence | None = None,
        precision: str = "fp32",
        optim_set_to_none: bool = False,
    ):
        super().__init__(
            device=device,
            max_epochs=max_epochs,
            data_loader=train_data_loader,
            epoch_length=epoch_length,
            non_blocking=non_blocking,
            prepare_batch=prepare_batch,
            key_metric=key_train_metric,
            additional_metrics=additional_metrics,
            handlers=train_handlers,
            amp=False,  # MONAI's Trainer.run would build a CUDA-only GradScaler; this class handles ``precision``
            decollate=False,
        )
        self.autoencoder = autoencoder
        self.discriminator = discriminator
        self.g_optimizer = g_optimizer
        self.d_optimizer = d_optimizer
        self.loss = loss
        self.adversarial_start_epoch = int(adversarial_start_epoch)
        self.precision = precision
        self.optim_set_to_none = optim_set_to_none
        self.g_scaler = grad_scaler(precision, device)
        self.d_scaler = grad_scaler(precision, device)

    def _iteration(self, engine: "AutoencoderGanTrainer", batchdata: Any) -> dict[str, Any]:
        if batchdata is None:
            raise ValueError("must provide batch data for current iteration.")
        images = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking)[0]
        adversarial = engine.state.epoch > engine.adversarial_start_epoch
        engine.autoencoder.train()
        engine.discriminator.train()

        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with autocast(engine.precision, engine.state.device):
            reconstruction, z_mu, z_sigma = (output.float() for output in engine.autoencoder(images))
            engine.fire_event(IterationEvents.FORWARD_COMPLETED)
            terms = engine.loss.generator(
                reconstruction, images, z_mu, z_sigma, engine.discriminator if adversarial else None
            )
        engine.fire_event(IterationEvents.LOSS_COMPLETED)
        engine.g_scaler.scale(terms["g_loss"]).backward()
        engine.fire_event(IterationEvents.BACKWARD_COMPLETED)
        engine.g_scaler.step(engine.g_optimizer)
        engine.g_scaler.update()

        d_loss = torch.zeros((), device=images.device)
        if adversarial and engine.loss.adversarial_weight:
            engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with autocast(engine.precision, engine.state.device):
                d_loss = engine.loss.discriminator(reconstruction, images, engine.discriminator)
            engine.d_scaler.scale(d_loss).backward()
            engine.d_scaler.step(engine.d_optimizer)
            engine.d_scaler.update()
        engine.fire_event(IterationEvents.MODEL_COMPLETED)

        output = {name: value.detach() for name, value in terms.items()}
        output.update(
            {"image": images, "pred": reconstruction.detach(), "loss": output["g_loss"], "d_loss": d_loss.detach()}
        )
        return output
