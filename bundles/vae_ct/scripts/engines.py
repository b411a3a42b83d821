"""Batch preparation for the mask-conditioned networks and the adversarial trainer of the VAE-GAN and GAN configs.

Why this is not plain MONAI:

* ``prepare_batch``: MONAI's ``default_prepare_batch`` returns ``(image, label)`` and a network called with the
  image alone; the conditional VAE needs ``network(image, mask)`` with the image as the target, and a generator
  ``network(mask, noise=...)``. MONAI's ``PrepareBatchExtraInput`` can add the mask as an argument but keeps the
  label (the mask) as the target. The two small callables below return the 4-tuple ``(inputs, targets, args,
  kwargs)`` that MONAI's ``SupervisedTrainer`` / ``SupervisedEvaluator`` accept.
* :class:`ConditionalAdversarialTrainer`: MONAI's ``GanTrainer`` is unconditional (its generator sees only random
  latents, never the batch, so it cannot be given the mask, and it has no reconstruction term), and its
  ``AdversarialTrainer`` passes the generator's extra arguments to the discriminator, expects the generator to
  return one tensor (a VAE returns ``(recon, mu, logvar)``), has no KL term, no gradient clipping, no adversarial
  warm-up, and autocasts with a hard-coded ``"cuda"`` (no bf16 on a CPU). This trainer is a MONAI ``Trainer``
  (same handlers, metrics, events, ``state_dict`` for resuming) whose iteration does one conditional GAN step; it
  serves the VAE-GAN (``mode="vae"``) and the GAN (``mode="gan"``).
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch
from monai.engines import Trainer
from monai.engines.utils import default_metric_cmp_fn
from monai.inferers import Inferer, SimpleInferer

from .precision import autocast, grad_scaler


def _to(value: Any, device: Any, non_blocking: bool, **kwargs: Any) -> Any:
    return value.to(device=device, non_blocking=non_blocking, **kwargs) if torch.is_tensor(value) else value


class PrepareCVAEBatch:
    """``(image, image, (mask,), {})``: the conditional VAE runs ``network(image, mask)``; its target is the image.

    ``image_key`` / ``mask_key`` name the CT and the label map in the batch (MONAI's ``image`` / ``label``).
    """

    def __init__(self, image_key: str = "image", mask_key: str = "label") -> None:
        self.image_key = image_key
        self.mask_key = mask_key

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        image = _to(batchdata[self.image_key], device, non_blocking, **kwargs)
        mask = _to(batchdata[self.mask_key], device, non_blocking, **kwargs)
        return image, image, (mask,), {}


class PrepareGenerationBatch:
    """``(mask, target, (), {"noise": noise or None})``: a generator runs ``network(mask, noise=noise)``.

    The target is the real image when the batch has one (validation of a GAN: the prior-mean sample against the real
    image), else the mask itself (inference: MONAI evaluators put the target under ``label`` in their output, and
    ``Invertd`` of the generated image needs the mask's transform history there). Without ``noise_key`` in the batch
    the network gets ``noise=None`` (its prior mean, a deterministic image).
    """

    def __init__(self, mask_key: str = "label", image_key: str | None = "image", noise_key: str | None = "noise"):
        self.mask_key = mask_key
        self.image_key = image_key
        self.noise_key = noise_key

    def __call__(self, batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
        mask = _to(batchdata[self.mask_key], device, non_blocking, **kwargs)
        target = mask
        if self.image_key is not None and torch.is_tensor(batchdata.get(self.image_key)):
            target = _to(batchdata[self.image_key], device, non_blocking, **kwargs)
        noise = None
        if self.noise_key is not None and torch.is_tensor(batchdata.get(self.noise_key)):
            noise = _to(batchdata[self.noise_key], device, non_blocking, **kwargs)
        return mask, target, (), {"noise": noise}


def prepare_image_mask(batchdata: dict, device: Any = None, non_blocking: bool = False, **kwargs: Any) -> tuple:
    """``(image, mask)`` of a batch (keys ``image`` and ``label``), moved to ``device``."""
    image = _to(batchdata["image"], device, non_blocking, **kwargs)
    return image, _to(batchdata["label"], device, non_blocking, **kwargs)


def _logits(output: Any) -> torch.Tensor:
    """The last tensor of a ``PatchDiscriminator`` output (a list of intermediate features), or the tensor."""
    return output[-1] if isinstance(output, (list, tuple)) else output


class ConditionalAdversarialTrainer(Trainer):
    """One conditional GAN step per iteration: discriminator update, then generator update.

    Per iteration, with ``image`` and ``mask`` (label map) from ``prepare_batch``:

    1. generator forward: ``mode="vae"``: ``(fake, mu, logvar) = inferer(image, g_network, mask)``;
       ``mode="gan"``: ``fake = inferer(mask, g_network, noise)`` with ``noise ~ N(0, I)`` of ``latent_size``;
    2. discriminator step (from epoch ``adv_start_epoch``): one forward of ``d_network`` on the real and the
       detached fake pairs ``[image or fake, mask]`` concatenated along the batch (a single forward per backward, as
       ``DistributedDataParallel`` requires), ``d_loss = (adv(real, real) + adv(fake, fake)) / 2``;
    3. generator step: ``g_loss = generator_loss_weight * generator_loss(pred, image) + adv_weight * adv(D(fake),
       real)`` (``generator_loss`` gets ``(fake, mu, logvar)`` in VAE mode, ``fake`` in GAN mode; None or a zero
       weight leaves it out).

    Stability: ``adversarial_loss`` is MONAI's ``PatchAdversarialLoss`` (least squares or hinge in the configs),
    gradients of both networks are clipped to ``grad_clip_norm`` (None: off), the adversarial term starts at
    ``adv_start_epoch`` (a VAE warm-up), and the output's ``loss`` (``g_loss + d_loss``) feeds
    ``StopOnNonFiniteLoss``. ``precision`` (``fp32``, ``bf16``, ``fp16`` or ``auto``; see ``scripts/precision.py``)
    autocasts both networks' forward passes on the run's device, with one gradient scaler per network for fp16;
    network outputs are cast to float32 before every loss, so the losses are computed in float32.

    The output dict has ``image``, ``label`` (the mask), ``pred`` (the detached fake), ``loss``, ``g_loss``,
    ``d_loss``, ``adv_loss`` (the generator's adversarial term) and ``recon_loss`` (the weighted generator loss).
    """

    def __init__(
        self,
        device: torch.device | str,
        max_epochs: int,
        train_data_loader: Any,
        g_network: torch.nn.Module,
        g_optimizer: torch.optim.Optimizer,
        d_network: torch.nn.Module,
        d_optimizer: torch.optim.Optimizer,
        adversarial_loss: Callable,
        mode: str = "vae",
        generator_loss: Callable | None = None,
        generator_loss_weight: float = 1.0,
        adv_weight: float = 1.0,
        adv_start_epoch: int = 1,
        latent_size: int | None = None,
        grad_clip_norm: float | None = 1.0,
        inferer: Inferer | None = None,
        epoch_length: int | None = None,
        non_blocking: bool = False,
        prepare_batch: Callable = prepare_image_mask,
        iteration_update: Callable | None = None,
        postprocessing: Callable | None = None,
        key_train_metric: dict | None = None,
        additional_metrics: dict | None = None,
        metric_cmp_fn: Callable = default_metric_cmp_fn,
        train_handlers: Sequence | None = None,
        precision: str = "fp32",
        decollate: bool = False,
        optim_set_to_none: bool = False,
        to_kwargs: dict | None = None,
    ) -> None:
        if mode not in ("vae", "gan"):
            raise ValueError(f"mode must be 'vae' or 'gan', got {mode!r}")
        if mode == "gan" and not latent_size:
            raise ValueError("mode='gan' needs latent_size (the length of the generator's noise vector)")
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
        self.g_network = g_network
        self.g_optimizer = g_optimizer
        self.d_network = d_network
        self.d_optimizer = d_optimizer
        self.adversarial_loss = adversarial_loss
        self.mode = mode
        self.generator_loss = generator_loss
        self.generator_loss_weight = float(generator_loss_weight)
        self.adv_weight = float(adv_weight)
        self.adv_start_epoch = int(adv_start_epoch)
        self.latent_size = latent_size
        self.grad_clip_norm = grad_clip_norm
        self.inferer = SimpleInferer() if inferer is None else inferer
        self.optim_set_to_none = optim_set_to_none
        self.precision = precision
        self.g_scaler = grad_scaler(precision, device)
        self.d_scaler = grad_scaler(precision, device)

    def _autocast(self, engine: ConditionalAdversarialTrainer) -> Any:
        return autocast(engine.precision, engine.state.device)

    def _update(self, loss: torch.Tensor, network: torch.nn.Module, optimizer: Any, scaler: Any) -> None:
        scaler.scale(loss).backward()
        if self.grad_clip_norm is not None:
            scaler.unscale_(optimizer)
            torch.nn.utils.clip_grad_norm_(network.parameters(), self.grad_clip_norm)
        scaler.step(optimizer)
        scaler.update()

    def _iteration(self, engine: ConditionalAdversarialTrainer, batchdata: dict) -> dict:
        if batchdata is None:
            raise ValueError("must provide batch data for the current iteration")
        batch = engine.prepare_batch(batchdata, engine.state.device, engine.non_blocking, **engine.to_kwargs)
        image, mask = batch[0], batch[1]
        mask = mask.to(image.dtype)
        g, d = engine.g_network, engine.d_network
        g.train()
        d.train()
        adversarial = engine.state.epoch >= engine.adv_start_epoch and engine.adv_weight > 0

        with engine._autocast(engine):
            if engine.mode == "vae":
                pred = tuple(output.float() for output in engine.inferer(image, g, mask))
                fake = pred[0]
            else:
                noise = torch.randn(image.shape[0], int(engine.latent_size), device=image.device)
                pred = engine.inferer(mask, g, noise).float()
                fake = pred

        d_loss = torch.zeros((), device=image.device)
        if adversarial:
            engine.d_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
            with engine._autocast(engine):
                pairs = torch.cat([torch.cat([image, mask], 1), torch.cat([fake.detach(), mask], 1)], 0)
                logits = _logits(d(pairs.contiguous())).float()
                real_logits, fake_logits = logits[: image.shape[0]], logits[image.shape[0] :]
                d_loss = 0.5 * (
                    engine.adversarial_loss(real_logits, target_is_real=True, for_discriminator=True)
                    + engine.adversarial_loss(fake_logits, target_is_real=False, for_discriminator=True)
                )
            engine._update(d_loss, d, engine.d_optimizer, engine.d_scaler)

        engine.g_optimizer.zero_grad(set_to_none=engine.optim_set_to_none)
        with engine._autocast(engine):
            recon_loss = torch.zeros((), device=image.device)
            if engine.generator_loss is not None and engine.generator_loss_weight != 0:
                recon_loss = engine.generator_loss_weight * engine.generator_loss(pred, image)
            adv_loss = torch.zeros((), device=image.device)
            if adversarial:
                fake_logits = _logits(d(torch.cat([fake, mask], 1).contiguous())).float()
                adv_loss = engine.adversarial_loss(fake_logits, target_is_real=True, for_discriminator=False)
            g_loss = recon_loss + engine.adv_weight * adv_loss
        if g_loss.requires_grad:  # a GAN before adv_start_epoch without a reconstruction term has nothing to learn
            engine._update(g_loss, g, engine.g_optimizer, engine.g_scaler)

        g_loss, d_loss = g_loss.detach(), d_loss.detach()
        return {
            "image": image,
            "label": mask,
            "pred": fake.detach(),
            "loss": g_loss + d_loss,
            "g_loss": g_loss,
            "d_loss": d_loss,
            "adv_loss": adv_loss.detach(),
            "recon_loss": recon_loss.detach(),
        }
