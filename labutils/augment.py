"""Batched image augmentation: one call transforms a whole batch, each image with its own random parameters.

Per-sample torchvision transforms cost tens of microseconds of Python per image. Here the random rotation,
scale, shift and brightness of every image become one affine grid and one `grid_sample` call on the batch, so
augmentation stays a small fraction of a training step on a CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F


@dataclass(frozen=True)
class Augmentation:
    """Ranges of the random transforms: rotation in degrees, shift as a fraction of the image size, scale factor
    range, and brightness and contrast changes applied to standardised images. `strength` 0 turns all off."""

    degrees: float = 15.0
    translate: float = 0.1
    scale: tuple[float, float] = (0.9, 1.1)
    brightness: float = 0.2
    contrast: float = 0.2

    def __post_init__(self) -> None:
        if self.degrees < 0 or self.translate < 0 or self.brightness < 0 or self.contrast < 0:
            raise ValueError(f"Augmentation ranges must be 0 or more, got {self}.")
        low, high = self.scale
        if not 0 < low <= high:
            raise ValueError(f"scale must be (low, high) with 0 < low <= high, got {self.scale}.")

    @classmethod
    def at_strength(cls, strength: float) -> Augmentation:
        """Scale the default ranges by `strength` (0 = no augmentation, 1 = the defaults, 2 = twice as strong)."""
        if strength < 0:
            raise ValueError(f"strength must be 0 or more, got {strength}.")
        default = cls()
        half_range = (default.scale[1] - default.scale[0]) / 2 * strength
        return cls(degrees=default.degrees * strength, translate=default.translate * strength,
                   scale=(max(1.0 - half_range, 0.05), 1.0 + half_range),
                   brightness=default.brightness * strength, contrast=default.contrast * strength)


def augment(images: torch.Tensor, settings: Augmentation, generator: torch.Generator) -> torch.Tensor:
    """Return a randomly transformed copy of `images` (B, C, H, W); every image gets its own parameters.

    Random numbers come from `generator` (a CPU generator), so the same seed gives the same batch on any device.
    """
    if images.dim() != 4:
        raise ValueError(f"augment expects images of shape (B, C, H, W), got {tuple(images.shape)}.")
    batch = images.shape[0]
    draws = torch.rand(batch, 6, generator=generator).to(images.device, images.dtype)
    theta = _affine_matrices(draws[:, :4], settings)
    # Pad with the image's minimum (the standardised background) so shifted-in borders look like background.
    background = images.amin(dim=(1, 2, 3), keepdim=True)
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    moved = F.grid_sample(images - background, grid, mode="bilinear", padding_mode="zeros",
                          align_corners=False) + background
    contrast = 1 + settings.contrast * (2 * draws[:, 4] - 1)
    brightness = settings.brightness * (2 * draws[:, 5] - 1)
    mean = moved.mean(dim=(1, 2, 3), keepdim=True)
    return (moved - mean) * contrast.view(-1, 1, 1, 1) + mean + brightness.view(-1, 1, 1, 1)


def _affine_matrices(draws: torch.Tensor, settings: Augmentation) -> torch.Tensor:
    """Build (B, 2, 3) matrices for `affine_grid` from uniform draws in [0, 1) of shape (B, 4)."""
    angle = math.radians(settings.degrees) * (2 * draws[:, 0] - 1)
    low, high = settings.scale
    scale = low + (high - low) * draws[:, 1]
    # affine_grid maps output to input coordinates in [-1, 1], so a shift of t image widths is 2 * t there.
    shift = 2 * settings.translate * (2 * draws[:, 2:4] - 1)
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    return torch.stack([torch.stack([cos, -sin, shift[:, 0]], dim=1),
                        torch.stack([sin, cos, shift[:, 1]], dim=1)], dim=1)
