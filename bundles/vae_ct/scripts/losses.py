"""Losses of the conditional VAE: reconstruction + KL divergence with configurable weights.

Why this is not plain MONAI: MONAI has no KL-divergence loss for a Gaussian posterior (its generative tutorials
compute the term inline in the training loop), and a ``SupervisedTrainer`` calls ``loss_function(pred, target)``
once, so the VAE's two terms must be one callable that takes the network's ``(recon, mu, logvar)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn


def kl_divergence(mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """``KL(N(mu, exp(logvar)) || N(0, I))`` per sample, summed over the latent dimensions: shape ``(B,)``."""
    per_dim = 0.5 * (mu.float().pow(2) + logvar.float().exp() - 1.0 - logvar.float())
    return per_dim.flatten(1).sum(dim=1)


class KLDivergenceLoss(nn.Module):
    """Mean over the batch of :func:`kl_divergence` (nats per sample)."""

    def forward(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        return kl_divergence(mu, logvar).mean()


class CVAELoss(nn.Module):
    """``recon_weight * reconstruction(recon, target) + kl_weight * KL`` for a ``(recon, mu, logvar)`` prediction.

    ``reconstruction`` is the mean absolute error (``"l1"``) or mean squared error (``"l2"``) per voxel in the
    normalised intensity range ([-1, 1] for the bundle's HU window), and KL is in nats per sample, so
    ``kl_weight`` trades one nat against ``kl_weight`` of mean voxel error. The last terms are kept in
    ``last_terms`` (floats) for logging.
    """

    def __init__(self, recon_weight: float = 1.0, kl_weight: float = 1e-3, recon_loss: str = "l1") -> None:
        super().__init__()
        if recon_loss not in ("l1", "l2"):
            raise ValueError(f"recon_loss must be 'l1' or 'l2', got {recon_loss!r}")
        self.recon_weight = float(recon_weight)
        self.kl_weight = float(kl_weight)
        self.recon = nn.L1Loss() if recon_loss == "l1" else nn.MSELoss()
        self.kl = KLDivergenceLoss()
        self.last_terms: dict[str, float] = {}

    def forward(self, pred: Sequence[torch.Tensor], target: torch.Tensor) -> torch.Tensor:
        recon, mu, logvar = pred[0], pred[1], pred[2]
        recon_term = self.recon(recon.float(), target.float())
        kl_term = self.kl(mu.float(), logvar.float())  # float32 under autocast too
        self.last_terms = {"recon": float(recon_term.detach()), "kl": float(kl_term.detach())}
        return self.recon_weight * recon_term + self.kl_weight * kl_term
