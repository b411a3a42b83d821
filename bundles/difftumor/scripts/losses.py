"""Optional perceptual term of stage 1: LPIPS-style distance of VGG16 features on three orthogonal slices.

Why this is not plain MONAI: ``monai.losses.PerceptualLoss`` cannot run offline here in any mode (its LPIPS and
torchvision backbones download weights, and the PyPI torchvision wheel does not load with this CPU torch; SPEC 1).
The reference (DiffTumor) applies an LPIPS VGG16 loss to one random slice along each of the three axes of the
reconstruction. :class:`SlicePerceptualLoss` does the same with a VGG16 feature stack built here with the exact
layer layout of ``torchvision.models.vgg16().features``, so a torchvision VGG16 state dict (``features.N.*`` keys, or
the ``features`` module's own ``N.*`` keys) loads from a **local file**; nothing is downloaded. The distance is
LPIPS's without its learned linear calibration: channel-normalised features, squared differences averaged over
space and summed over the taps relu1_2, relu2_2, relu3_3, relu4_3, relu5_3.

It is off by default (``perceptual_weight`` 0 in ``configs/train.json``); set the weight and
``perceptual_weights_path`` to switch it on.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from typing import Sequence

import torch
import torch.nn as nn

#: VGG16 ``features``: channels per conv, "M" a 2x2 max-pool (torchvision's configuration "D").
VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512, "M")
#: Indices of the ReLUs LPIPS reads in ``vgg16().features``.
LPIPS_TAPS = (3, 8, 15, 22, 29)
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def vgg16_features() -> nn.Sequential:
    """An untrained VGG16 feature stack with torchvision's module indices (conv, ReLU, ..., max-pool)."""
    layers: list[nn.Module] = []
    channels = 3
    for item in VGG16_LAYOUT:
        if item == "M":
            layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
        else:
            layers.append(nn.Conv2d(channels, int(item), kernel_size=3, padding=1))
            layers.append(nn.ReLU(inplace=False))
            channels = int(item)
    return nn.Sequential(*layers)


def load_vgg16_features(path: str | os.PathLike) -> nn.Sequential:
    """VGG16 features with the weights of a local file (torchvision ``vgg16`` or ``vgg16().features`` state dict)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(state, dict):
        raise ValueError(f"{path}: expected a state dict, got {type(state).__name__}")
    if any(key.startswith("features.") for key in state):
        state = OrderedDict((key[len("features.") :], v) for key, v in state.items() if key.startswith("features."))
    network = vgg16_features()
    network.load_state_dict(state, strict=True)
    return network


class SlicePerceptualLoss(nn.Module):
    """LPIPS-style VGG16 distance on one random slice per axis of 3D volumes in ``input_range`` (see module doc).

    Args:
        weights_path: local VGG16 weights file (required: an untrained VGG is no perceptual measure).
        taps: indices of ``features`` whose outputs are compared.
        input_range: intensity range of the volumes (the autoencoder's [-1, 1]).
    """

    def __init__(
        self,
        weights_path: str | os.PathLike,
        taps: Sequence[int] = LPIPS_TAPS,
        input_range: Sequence[float] = (-1.0, 1.0),
    ):
        super().__init__()
        if weights_path is None or not os.path.isfile(weights_path):
            raise FileNotFoundError(
                f"perceptual loss: VGG16 weights file {weights_path!r} not found (it is never downloaded; set "
                "perceptual_weights_path to a local torchvision vgg16 state dict, or perceptual_weight to 0)"
            )
        self.features = load_vgg16_features(weights_path).eval()
        for parameter in self.features.parameters():
            parameter.requires_grad_(False)
        self.taps = tuple(sorted(int(t) for t in taps))
        self.input_range = (float(input_range[0]), float(input_range[1]))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1))

    def train(self, mode: bool = True) -> "SlicePerceptualLoss":
        super().train(mode)
        self.features.eval()  # fixed feature extractor
        return self

    def _tapped(self, images: torch.Tensor) -> list[torch.Tensor]:
        low, high = self.input_range
        x = ((images - low) / (high - low)).repeat(1, 3, 1, 1)
        x = (x - self.mean) / self.std
        outputs = []
        for index, layer in enumerate(self.features):
            x = layer(x)
            if index in self.taps:
                outputs.append(x)
            if index >= self.taps[-1]:
                break
        return outputs

    def distance(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """LPIPS-style distance of two batches of 2D images (``B x 1 x H x W``), averaged over the batch."""
        total = fake.new_zeros(())
        for a, b in zip(self._tapped(fake), self._tapped(real)):
            a = a / (a.norm(dim=1, keepdim=True) + 1e-10)
            b = b / (b.norm(dim=1, keepdim=True) + 1e-10)
            total = total + ((a - b) ** 2).sum(1).mean()
        return total

    def forward(self, fake: torch.Tensor, real: torch.Tensor) -> torch.Tensor:
        """Sum over the three axes of the distance between the same random slice of ``fake`` and ``real``."""
        total = fake.new_zeros(())
        for axis in (2, 3, 4):
            index = int(torch.randint(0, fake.shape[axis], (1,)))
            total = total + self.distance(fake.select(axis, index), real.select(axis, index))
        return total
