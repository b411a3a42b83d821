"""The stage-1 autoencoder as a plain image -> image network, and the codebook helpers DiffTumor's latents need.

Why this is not plain MONAI: ``monai.networks.nets.VQVAE`` returns ``(reconstruction, quantization_loss)``, which
``verify_net_in_out``, TorchScript export and MONAI inferers cannot use as "the" output; and its quantizer builds a
one-hot matrix of ``latent voxels x codebook size`` (13,824 x 16,384 floats = 0.9 GB for one 96^3 crop), fine for
its EMA update in training, wasteful for inference. :class:`DiffTumorVQVAE` is ``VQVAE`` with the same weights and
``state_dict`` keys whose ``forward`` returns the reconstruction (``return_quantization_loss=True`` gives the
training pair, through ``forward`` so DDP sees it); :func:`nearest_codes` quantizes in chunks without the one-hot.

The layout used at the reference scale (``configs/train.json`` ``network_def``) and how it maps to the DiffTumor
VQGAN-3D (SPEC 3.4) is described in ``docs/README.md``.
"""

from __future__ import annotations

from typing import Tuple, Union

import torch
from monai.networks.nets import VQVAE


class DiffTumorVQVAE(VQVAE):
    """``monai.networks.nets.VQVAE`` whose ``forward`` returns the reconstruction alone (same ``state_dict``).

    ``forward(x, return_quantization_loss=True)`` returns ``(reconstruction, quantization_loss)`` as VQVAE does;
    the training engine calls it that way so a DDP wrapper still sees a ``forward`` call. Under autocast the encoder
    and decoder run in the autocast dtype, the quantizer in float32: MONAI's quantizer switches off only CUDA
    autocast, and in bf16 on a CPU its codebook distances would pick other codes and its EMA update lose precision.
    """

    def forward(  # type: ignore[override]
        self, images: torch.Tensor, return_quantization_loss: bool = False
    ) -> Union[torch.Tensor, Tuple[torch.Tensor, torch.Tensor]]:
        encodings = self.encode(images)
        with torch.autocast(encodings.device.type, enabled=False):
            quantizations, quantization_losses = self.quantize(encodings.float())
        reconstruction = self.decode(quantizations)
        if return_quantization_loss:
            return reconstruction, quantization_losses
        return reconstruction


def codebook(autoencoder: torch.nn.Module) -> torch.Tensor:
    """The codebook (``num_embeddings x embedding_dim``) of a VQVAE (or a DDP / wrapper around one)."""
    module = getattr(autoencoder, "module", autoencoder)
    return module.quantizer.quantizer.embedding.weight


def codebook_range(autoencoder: torch.nn.Module) -> tuple[float, float]:
    """``(min, max)`` over every codebook entry: DiffTumor min-max normalises latents by it to [-1, 1]."""
    weight = codebook(autoencoder).detach()
    low, high = float(weight.min()), float(weight.max())
    if not high > low:
        raise ValueError(f"degenerate codebook range [{low}, {high}]: is the autoencoder trained?")
    return low, high


def normalize_latent(latent: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Latent -> [-1, 1] by the codebook range (the reference's ``(z - min) / (max - min) * 2 - 1``)."""
    low, high = value_range
    return (latent - low) / (high - low) * 2.0 - 1.0


def denormalize_latent(latent: torch.Tensor, value_range: tuple[float, float]) -> torch.Tensor:
    """Inverse of :func:`normalize_latent`."""
    low, high = value_range
    return (latent + 1.0) / 2.0 * (high - low) + low


@torch.no_grad()
def nearest_codes(autoencoder: torch.nn.Module, latent: torch.Tensor, chunk: int = 4096) -> torch.Tensor:
    """Replace each latent vector by its nearest codebook entry (Euclidean), chunked, without a one-hot matrix.

    ``latent`` is ``B x C x *spatial``; the result has the same shape. Same nearest code as the quantizer's own
    ``quantize`` (ties aside).
    """
    weight = codebook(autoencoder).detach().to(latent.dtype)
    channels = latent.shape[1]
    flat = latent.movedim(1, -1).reshape(-1, channels)
    squared = (weight**2).sum(1)
    indices = torch.empty(flat.shape[0], dtype=torch.long, device=latent.device)
    for start in range(0, flat.shape[0], chunk):
        part = flat[start : start + chunk]
        distances = squared[None, :] - 2.0 * part @ weight.t()  # |x|^2 is the same for every code
        indices[start : start + chunk] = distances.argmin(1)
    quantized = weight[indices].reshape(*latent.movedim(1, -1).shape)
    return quantized.movedim(-1, 1).contiguous()
