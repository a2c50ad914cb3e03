"""Optional tokenizer losses: an LPIPS-style perceptual distance on local VGG16 weights and a patch-GAN
discriminator with hinge losses."""

from __future__ import annotations

import os

import torch
import torch.nn.functional as F
from torch import nn

from ..io import load_into, load_weights

_VGG16_LAYOUT = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


_VGG16_TAPS = (3, 8, 15, 22, 29)


_IMAGENET_MEAN = (0.485, 0.456, 0.406)


_IMAGENET_STD = (0.229, 0.224, 0.225)


class VGGPerceptualLoss(nn.Module):
    """LPIPS-style distance on VGG16 features, with uniform layer weights (no learned LPIPS heads).

    ``d(x, y) = sum_l mean_{h,w} || f_l(x) / |f_l(x)| - f_l(y) / |f_l(y)| ||^2`` over relu1_2, relu2_2,
    relu3_3, relu4_3 and relu5_3, the features normalised to unit length over channels.  Images are in
    ``[-1, 1]``, ``[B, 3, H, W]`` with ``H, W >= 16``; returns ``[B]``.

    Args:
        weights: a local file with torchvision's VGG16 state dict (keys ``features.<i>.weight`` /
            ``features.<i>.bias``; ``classifier.*`` keys are ignored), as ``.safetensors`` or as
            ``.pth``/``.pt``/``.bin`` (read with ``torch.load(weights_only=True)``).  Nothing is downloaded.
    """

    def __init__(self, weights: str | os.PathLike):
        super().__init__()
        layers: list[nn.Module] = []
        in_channels = 3
        for item in _VGG16_LAYOUT:
            if item == "M":
                layers.append(nn.MaxPool2d(2, 2))
            else:
                layers += [nn.Conv2d(in_channels, int(item), 3, padding=1), nn.ReLU(inplace=False)]
                in_channels = int(item)
        self.features = nn.Sequential(*layers)
        state = load_weights(weights)
        features = {k: v for k, v in state.items() if k.startswith("features.")}
        if not features:
            raise ValueError(
                f"{weights}: no 'features.<i>.weight' keys; the perceptual loss accepts torchvision's VGG16 "
                f"state dict (.safetensors, or .pth/.pt/.bin loadable with torch.load(weights_only=True)); "
                f"found keys like {sorted(state)[:3]}"
            )
        features = {k: v for k, v in features.items() if int(k.split(".")[1]) < len(layers)}
        load_into(self, features, f"{weights} (VGG16 features)")
        self.register_buffer("mean", torch.tensor(_IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(_IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.requires_grad_(False)
        self.eval()

    def _taps(self, x: torch.Tensor) -> list[torch.Tensor]:
        h = ((x + 1.0) / 2.0 - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            h = layer(h)
            if i in _VGG16_TAPS:
                out.append(h / (h.square().sum(dim=1, keepdim=True).sqrt() + 1e-10))
        return out

    def forward(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        if x.shape != y.shape or x.ndim != 4 or min(x.shape[-2:]) < 16:
            raise ValueError(f"perceptual loss needs two [B, 3, H>=16, W>=16] batches, got {tuple(x.shape)}")
        total = x.new_zeros(x.shape[0])
        for fx, fy in zip(self._taps(x), self._taps(y), strict=True):
            total = total + (fx - fy).square().sum(dim=1).mean(dim=(1, 2))
        return total


class PatchDiscriminator(nn.Module):
    """PatchGAN discriminator: ``[B, 3, H, W] -> [B, 1, h, w]`` real/fake logits per patch.

    4x4 convolutions: stride 2 with widths ``channels * (1, 2, 4)`` (GroupNorm after the first), then a
    stride-1 layer to one channel; LeakyReLU(0.2).  Used with the hinge losses of
    :func:`hinge_discriminator_loss`.
    """

    def __init__(self, in_channels: int = 3, channels: int = 64, num_layers: int = 3):
        super().__init__()
        layers: list[nn.Module] = [nn.Conv2d(in_channels, channels, 4, 2, 1), nn.LeakyReLU(0.2)]
        width = channels
        for i in range(1, num_layers):
            nxt = channels * 2 ** min(i, 3)
            layers += [nn.Conv2d(width, nxt, 4, 2, 1), nn.GroupNorm(8, nxt), nn.LeakyReLU(0.2)]
            width = nxt
        layers.append(nn.Conv2d(width, 1, 4, 1, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


def hinge_discriminator_loss(real_logits: torch.Tensor, fake_logits: torch.Tensor) -> torch.Tensor:
    """``mean(relu(1 - D(x))) + mean(relu(1 + D(x_hat)))`` (scalar)."""
    return F.relu(1.0 - real_logits).mean() + F.relu(1.0 + fake_logits).mean()
