"""Plain-Python references that the vectorised losses and miners are tested against.

Imported by the loss and mining tests: distances and triplets computed one by one, and the
pytorch-metric-learning distance that matches labutils' own.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from pytorch_metric_learning.distances import LpDistance


def euclidean(p: Sequence[float], q: Sequence[float]) -> float:
    return math.sqrt(sum((a - b) ** 2 for a, b in zip(p, q)))


def loop_valid_triplets(labels: Sequence[int]) -> Iterator[tuple[int, int, int]]:
    """Yield every (anchor, positive, negative) index triple of a labelled batch."""
    for a in range(len(labels)):
        for p in range(len(labels)):
            for n in range(len(labels)):
                if a != p and labels[a] == labels[p] and labels[a] != labels[n]:
                    yield a, p, n


def pml_distance() -> LpDistance:
    # Plain, non-squared Euclidean distance on the raw embeddings, the distance labutils.losses uses.
    return LpDistance(normalize_embeddings=False, p=2, power=1)
