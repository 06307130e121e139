"""The convolutional encoder that maps a 28x28 grayscale image to an embedding (built step by step in notebook 01)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

CAPACITIES: dict[str, dict[str, Any]] = {
    "small": {"channels": (16, 32), "hidden": 64, "embedding_dim": 16},
    "classic": {"channels": (64, 128), "hidden": 512, "embedding_dim": 128},
    "large": {"channels": (96, 192), "hidden": 1024, "embedding_dim": 128},
}


class Encoder(nn.Module):
    """Two conv blocks (3x3 conv, ReLU, 2x2 max-pool), a hidden layer and a linear embedding layer.

    Input (B, 1, 28, 28); output (B, embedding_dim). The embedding has no output activation: a final ReLU would
    confine embeddings to the positive orthant and can die, so every distance becomes 0. With `normalize=True`
    the embeddings are scaled to unit length, so distances lie in [0, 2].
    """

    def __init__(self, channels: tuple[int, int] = (64, 128), hidden: int = 512, embedding_dim: int = 128,
                 dropout: float = 0.0, normalize: bool = False) -> None:
        super().__init__()
        _check_positive("embedding_dim", embedding_dim)
        _check_positive("hidden", hidden)
        for width in channels:
            _check_positive("channels", width)
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}.")
        c1, c2 = channels
        self.features = nn.Sequential(
            nn.Conv2d(1, c1, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),   # (B, c1, 14, 14)
            nn.Conv2d(c1, c2, kernel_size=3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, c2, 7, 7)
        )
        self.head = nn.Sequential(
            nn.Flatten(),
            nn.Linear(c2 * 7 * 7, hidden), nn.ReLU(), nn.Dropout(dropout),
            nn.Linear(hidden, embedding_dim),
        )
        self.embedding_dim = embedding_dim
        self.normalize = normalize

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() != 4 or images.shape[1:] != (1, 28, 28):
            raise ValueError(f"Encoder expects images of shape (B, 1, 28, 28), got {tuple(images.shape)}.")
        embeddings = self.head(self.features(images))
        if self.normalize:
            embeddings = nn.functional.normalize(embeddings, dim=1)
        return embeddings


def make_encoder(capacity: str = "classic", **overrides: Any) -> Encoder:
    """Build the `small`, `classic` or `large` encoder; keyword arguments override its settings."""
    if capacity not in CAPACITIES:
        raise ValueError(f"Unknown capacity {capacity!r}: use one of {', '.join(CAPACITIES)}.")
    return Encoder(**{**CAPACITIES[capacity], **overrides})


def count_parameters(model: nn.Module) -> int:
    """Count the trainable parameters of `model`."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def _check_positive(name: str, value: int) -> None:
    if value <= 0:
        raise ValueError(f"{name} must be a positive integer, got {value}.")
