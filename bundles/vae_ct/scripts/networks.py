"""Mask-conditioned generators of the vae_ct bundle: a conditional VAE and a mask + noise -> CT generator (GAN).

Why this is not plain MONAI: ``monai.networks.nets.VarAutoEncoder`` is unconditional (its decoder sees only ``z``,
so a sample could not be tied to a given pancreas mask) and returns ``(recon, mu, logvar, z)`` from one input, and
MONAI has no conditional generator for ``mask + noise -> image``. Both are assembled here from MONAI blocks
(``Convolution``, ``ResidualUnit``, the activation factory); only the conditioning and the dense latent are new.

Design (``docs/README.md`` says why):

* Every network is a 3D convolutional network (``spatial_dims=3``). A seed-000 sub-volume of 4 axial slices is a
  ``(256, 256, 4)`` volume: strides ``(2, 2, 1)`` halve the plane and never the 4 slices, 3x3x3 kernels mix the
  neighbouring slices (2.5D), and the same classes run on full 3D crops (strides 2, e.g. ``96^3``) with only
  arguments changed.
* The condition is the label map itself (0 background, 1 pancreas, 2 tumour) as one input channel, turned inside
  the network into ``condition_levels`` binary channels (``label >= 1``: pancreas with tumour, ``label >= 2``:
  tumour). The encoder sees ``[image, condition]``; the generator / decoder gets the condition, area-resized, at
  the input of every stage and before its last convolution, so the output follows the mask at every scale.
* The latent is a dense vector (``latent_size``), so ``z ~ N(0, I)`` is a whole new anatomy for the given mask
  (a spatial latent sampled independently per position gives incoherent anatomy).
"""

from __future__ import annotations

import math
from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F
from monai.networks.blocks import Convolution, ResidualUnit
from monai.networks.layers.utils import get_act_layer
from torch import nn

DEFAULT_ACT = ("LEAKYRELU", {"negative_slope": 0.2})


def _per_dim(value: int | Sequence[int], spatial_dims: int, name: str) -> list[int]:
    values = [int(value)] * spatial_dims if isinstance(value, int) else [int(v) for v in value]
    if len(values) != spatial_dims:
        raise ValueError(f"{name} {value!r} must have {spatial_dims} entries")
    return values


def _stage_shapes(spatial_size: Sequence[int], strides: Sequence[Sequence[int]]) -> list[list[int]]:
    """Feature-map shapes from the input down: ``[spatial_size, after stride 1, ..., base]``."""
    shapes = [list(spatial_size)]
    for stride in strides:
        previous = shapes[-1]
        if any(size % step for size, step in zip(previous, stride)):
            raise ValueError(
                f"spatial size {list(spatial_size)} cannot be divided by the strides {[list(s) for s in strides]}: "
                f"{previous} is not a multiple of {list(stride)}"
            )
        shapes.append([size // step for size, step in zip(previous, stride)])
    return shapes


def label_condition(mask: torch.Tensor, levels: int) -> torch.Tensor:
    """``levels`` binary channels of a label map: channel ``i`` is ``mask >= i + 1`` (1: pancreas, 2: tumour)."""
    channels = [(mask >= (level + 0.5)).float() for level in range(levels)]
    return torch.cat(channels, dim=1)


class MaskConditionedGenerator(nn.Module):
    """Noise vector + label map -> image, with transposed convolutions (the GAN generator and the VAE decoder).

    ``z`` goes through a linear layer to a ``channels[0]`` x ``base`` feature map (``base`` = ``spatial_size``
    divided by all ``strides``); each stage concatenates the area-resized condition, upsamples with a transposed
    ``Convolution`` (``up_kernel_size``, stride of the stage, norm + activation) to ``channels[i + 1]`` and adds
    ``convs_per_stage`` plain ``Convolution`` s; a last convolution (condition concatenated again) gives
    ``out_channels`` without activation (the image in the normalised intensity range).

    Args:
        spatial_dims: 2 or 3.
        spatial_size: output size, e.g. ``(256, 256, 4)``; each entry a multiple of the product of its strides.
        latent_size: length of the noise vector.
        channels: ``len(strides) + 1`` widths, from the base feature map to the last stage.
        strides: one stride (an int or one per dimension) per stage, from the base up.
        out_channels: image channels.
        condition_levels: binary channels made from the label map (see :func:`label_condition`).
        up_kernel_size, kernel_size: kernel of the transposed / plain convolutions.
        convs_per_stage: plain convolutions after each transposed one (0: a pure transposed-conv generator).
        norm, act: MONAI norm / activation of every hidden layer.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        spatial_size: Sequence[int] = (256, 256, 4),
        latent_size: int = 128,
        channels: Sequence[int] = (512, 256, 128, 64, 32, 32),
        strides: Sequence[int | Sequence[int]] = ((2, 2, 1),) * 5,
        out_channels: int = 1,
        condition_levels: int = 2,
        up_kernel_size: int | Sequence[int] = 3,
        kernel_size: int | Sequence[int] = 3,
        convs_per_stage: int = 1,
        norm: str | tuple | None = "INSTANCE",
        act: str | tuple | None = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides) + 1:
            raise ValueError(f"channels needs len(strides) + 1 = {len(strides) + 1} entries, got {list(channels)}")
        if condition_levels < 1:
            raise ValueError("condition_levels must be at least 1")
        self.spatial_dims = spatial_dims
        self.latent_size = int(latent_size)
        self.condition_levels = int(condition_levels)
        self.spatial_size = _per_dim(list(spatial_size), spatial_dims, "spatial_size")
        stride_list = [_per_dim(s, spatial_dims, "stride") for s in strides]
        # shapes from the base up to the output: the condition is resized to each before the stage that uses it
        down = _stage_shapes(self.spatial_size, stride_list[::-1])
        self.scale_shapes: List[List[int]] = down[::-1]
        self.base_shape: List[int] = self.scale_shapes[0]
        self.base_channels = int(channels[0])
        self.fc = nn.Linear(self.latent_size, self.base_channels * math.prod(self.base_shape))
        self.fc_act = get_act_layer(act) if act is not None else nn.Identity()
        stages = []
        for i, stride in enumerate(stride_list):
            layers = [
                Convolution(
                    spatial_dims, channels[i] + condition_levels, channels[i + 1], strides=stride,
                    kernel_size=up_kernel_size, norm=norm, act=act, is_transposed=True,
                )  # fmt: skip
            ]
            for _ in range(convs_per_stage):
                layers.append(
                    Convolution(
                        spatial_dims, channels[i + 1], channels[i + 1], kernel_size=kernel_size, norm=norm, act=act
                    )
                )
            stages.append(nn.Sequential(*layers))
        self.stages = nn.ModuleList(stages)
        self.head = Convolution(
            spatial_dims, channels[-1] + condition_levels, out_channels, kernel_size=kernel_size, conv_only=True
        )

    def forward(self, mask: torch.Tensor, noise: Optional[torch.Tensor] = None) -> torch.Tensor:
        """``mask``: label map ``(B, 1, *spatial_size)``; ``noise``: ``(B, latent_size)``, zeros (the prior's mean,
        a deterministic output) when not given."""
        if noise is None:
            noise = torch.zeros(mask.shape[0], self.latent_size, device=mask.device)
        condition = label_condition(mask, self.condition_levels)
        x = self.fc_act(self.fc(noise.float()))
        x = x.reshape([noise.shape[0], self.base_channels] + self.base_shape)
        for i, stage in enumerate(self.stages):
            resized = F.interpolate(condition, size=self.scale_shapes[i], mode="area")
            x = stage(torch.cat([x, resized.to(x.dtype)], dim=1))
        return self.head(torch.cat([x, condition.to(x.dtype)], dim=1))


class ConditionalVAE(nn.Module):
    """Conditional VAE: ``(image, label map) -> (reconstruction, mu, logvar)`` (the training network).

    Encoder: ``len(strides)`` MONAI ``ResidualUnit`` s (``subunits`` convolutions each, the first strided) on
    ``[image, condition]``, flattened into two linear layers for ``mu`` and ``logvar``. Decoder: a
    :class:`MaskConditionedGenerator` (``decoder_channels``, default the encoder widths reversed). In training mode
    ``z = mu + sigma * eps``; in eval mode ``z = mu`` (the reconstruction used for validation).
    :class:`ConditionalVAESampler` has the same weights and samples ``mask + z -> image``.

    Args:
        spatial_dims, spatial_size, strides, latent_size, condition_levels, kernel_size, up_kernel_size, norm, act:
            as for :class:`MaskConditionedGenerator` (``strides`` from the input down for the encoder; the decoder
            mirrors them).
        in_channels / out_channels: image channels in and out.
        channels: encoder widths, one per stage.
        decoder_channels: ``len(strides) + 1`` decoder widths from the base up (default: ``channels`` reversed,
            then ``channels[0]`` again).
        subunits: convolutions per encoder ``ResidualUnit``.
        decoder_convs_per_stage: plain convolutions after each transposed convolution of the decoder.
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        spatial_size: Sequence[int] = (256, 256, 4),
        in_channels: int = 1,
        out_channels: int = 1,
        channels: Sequence[int] = (32, 64, 128, 256, 512),
        strides: Sequence[int | Sequence[int]] = ((2, 2, 1),) * 5,
        latent_size: int = 128,
        condition_levels: int = 2,
        decoder_channels: Sequence[int] | None = None,
        subunits: int = 2,
        decoder_convs_per_stage: int = 1,
        kernel_size: int | Sequence[int] = 3,
        up_kernel_size: int | Sequence[int] = 3,
        norm: str | tuple | None = "INSTANCE",
        act: str | tuple | None = DEFAULT_ACT,
    ) -> None:
        super().__init__()
        if len(channels) != len(strides):
            raise ValueError(f"channels needs one entry per stride ({len(strides)}), got {list(channels)}")
        self.latent_size = int(latent_size)
        self.condition_levels = int(condition_levels)
        size = _per_dim(list(spatial_size), spatial_dims, "spatial_size")
        stride_list = [_per_dim(s, spatial_dims, "stride") for s in strides]
        base = _stage_shapes(size, stride_list)[-1]
        encoder = []
        previous = in_channels + condition_levels
        for width, stride in zip(channels, stride_list):
            encoder.append(
                ResidualUnit(
                    spatial_dims, previous, width, strides=stride, kernel_size=kernel_size, subunits=subunits,
                    norm=norm, act=act,
                )  # fmt: skip
            )
            previous = width
        self.encoder = nn.Sequential(*encoder)
        flat = int(channels[-1]) * math.prod(base)
        self.fc_mu = nn.Linear(flat, self.latent_size)
        self.fc_logvar = nn.Linear(flat, self.latent_size)
        if decoder_channels is None:
            decoder_channels = list(channels[::-1]) + [channels[0]]
        self.decoder = MaskConditionedGenerator(
            spatial_dims=spatial_dims, spatial_size=size, latent_size=latent_size, channels=decoder_channels,
            strides=stride_list[::-1], out_channels=out_channels, condition_levels=condition_levels,
            up_kernel_size=up_kernel_size, kernel_size=kernel_size, convs_per_stage=decoder_convs_per_stage,
            norm=norm, act=act,
        )  # fmt: skip

    def encode(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(mu, logvar)`` of ``q(z | image, mask)``; ``logvar`` is clamped to [-30, 20] for stability."""
        condition = label_condition(mask, self.condition_levels).to(image.dtype)
        features = self.encoder(torch.cat([image, condition], dim=1)).flatten(1)
        return self.fc_mu(features), self.fc_logvar(features).clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.decoder(mask, z)

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        mu, logvar = self.encode(image, mask)
        z = mu + torch.randn_like(mu) * torch.exp(0.5 * logvar) if self.training else mu
        return self.decoder(mask, z), mu, logvar


class ConditionalVAESampler(ConditionalVAE):
    """The generation view of :class:`ConditionalVAE` (same arguments, same weights): ``(mask, noise) -> image``.

    ``noise`` is ``z ~ N(0, I)`` of shape ``(B, latent_size)``; without it ``z = 0`` (the prior's mean: a
    deterministic image, which is what TorchScript export and the network checks compare). This is the
    ``network_def`` of ``inference.json``; it loads the ``model.pt`` that training writes.
    """

    def forward(  # type: ignore[override]
        self, mask: torch.Tensor, noise: Optional[torch.Tensor] = None
    ) -> torch.Tensor:
        return self.decoder(mask, noise)


def count_parameters(network: nn.Module, trainable_only: bool = True) -> int:
    """Number of (trainable) parameters; works on networks built on the ``meta`` device (no memory used)."""
    return sum(p.numel() for p in network.parameters() if p.requires_grad or not trainable_only)
