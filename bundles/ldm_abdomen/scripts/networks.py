"""Thin network wrappers around MONAI's generative networks, for the places where MONAI's call signatures do not fit.

Why these exist (MONAI core has the networks themselves, not these compositions):

* :class:`ControlledDiffusionUNet`: a diffusion UNet steered by a ControlNet, called like the plain UNet
  (``model(x, timesteps)``) so that one sampling loop serves the unconditional and the mask-conditioned model.
  MONAI's ``ControlNetLatentDiffusionInferer.sample`` has no seed argument and decodes the whole volume at once,
  which is what this bundle's sampler does differently (seeded, sliding-window decoding).
* :class:`LatentDecoder`: the decoder half of an ``AutoencoderKL`` as a one-input module, so that
  ``monai.inferers.SlidingWindowInferer`` can decode a large latent patch by patch.
* :class:`TimestepChannelDiffusionUNet`: the diffusion UNet with its timestep packed into an extra input channel, so
  that one-tensor tools (``monai.bundle.ckpt_export`` with ``use_trace``, ``verify_net_in_out``, TensorRT
  converters) can export and call it. It has the same parameters and state-dict keys as ``DiffusionModelUNet``, so
  it loads ``models/model.pt`` unchanged.
"""

from __future__ import annotations

import torch
from monai.networks.nets import ControlNet, DiffusionModelUNet
from torch import nn


class ControlledDiffusionUNet(nn.Module):
    """``unet(x, t)`` plus the residuals a ControlNet computes from a conditioning image (here the pancreas mask).

    Args:
        unet: the (frozen) diffusion UNet.
        controlnet: the ControlNet; its conditioning embedding downsamples ``cn_cond`` from image to latent size.
        conditioning_scale: multiplies the ControlNet residuals (1 = as trained, 0 = the unconditional model).
    """

    def __init__(self, unet: nn.Module, controlnet: ControlNet, conditioning_scale: float = 1.0):
        super().__init__()
        self.unet = unet
        self.controlnet = controlnet
        self.conditioning_scale = conditioning_scale

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, cn_cond: torch.Tensor | None = None) -> torch.Tensor:
        if cn_cond is None:
            raise ValueError("ControlledDiffusionUNet needs cn_cond, the conditioning mask at image resolution")
        down, mid = self.controlnet(
            x=x, timesteps=timesteps, controlnet_cond=cn_cond, conditioning_scale=self.conditioning_scale
        )
        return self.unet(
            x=x, timesteps=timesteps, down_block_additional_residuals=down, mid_block_additional_residual=mid
        )


class LatentDecoder(nn.Module):
    """``z -> autoencoder.decode(z)``: the decoder of an AutoencoderKL (post-quantisation conv + decoder)."""

    def __init__(self, autoencoder: nn.Module):
        super().__init__()
        self.autoencoder = autoencoder

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.autoencoder.decode(z)


class TimestepChannelDiffusionUNet(DiffusionModelUNet):
    """``DiffusionModelUNet`` whose last input channel carries the timestep (the same value in every voxel).

    ``forward(x)`` with ``x`` of shape ``(N, in_channels + 1, ...)`` returns ``super().forward(x[:, :-1], t)`` with
    ``t = x[:, -1]`` at the first voxel. Only for export and one-tensor checks; training and sampling use the plain
    network.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        timesteps = x[:, -1].reshape(x.shape[0], -1)[:, 0]
        return super().forward(x[:, :-1], timesteps)
