"""One evaluation of a trained encoder on every split, used for the tables that compare runs (notebook 02 on).

`fit` tracks a few metrics per epoch. This module computes the full set once, at the end, on fixed pairs drawn
from their own seed, so runs with different training seeds are scored on the same pairs.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from labutils.data import CourseData
from labutils.losses import pairwise_distance
from labutils.metrics import (accuracy_at_threshold, choose_threshold, equal_error_rate, n_way_one_shot_accuracy,
                              recall_at_1, roc_auc)
from labutils.pairs import make_pairs
from labutils.training import EVAL_SPLITS, embed

MAX_WAYS = 5
EPISODES = 2000


def score_embeddings(embeddings: dict[str, torch.Tensor], labels: dict[str, torch.Tensor], num_pairs: int = 1000,
                     seed: int = 0) -> dict[str, float]:
    """Score embeddings of the `train`, `val_seen` and `val_unseen` splits.

    Returns `<split>_auc`, `<split>_acc`, `<split>_eer`, `<split>_recall1` and `<split>_nway` (N-way one-shot
    accuracy with N = min(5, classes in the split), also stored as `<split>_ways`) for both validation splits,
    plus `threshold`. Accuracy uses a distance threshold chosen on the training pairs, never on the split it is
    reported for. Pairs and episodes are drawn from `seed` alone.
    """
    generator = torch.Generator().manual_seed(seed)
    distances, same = {}, {}
    for split in EVAL_SPLITS:
        left, right, same[split] = make_pairs(labels[split], num_pairs, generator)
        cpu = embeddings[split].detach().cpu()
        distances[split] = pairwise_distance(cpu[left], cpu[right])
    threshold = choose_threshold(distances["train"], same["train"])
    scores: dict[str, float] = {"threshold": threshold}
    for split in EVAL_SPLITS[1:]:
        d, s = distances[split], same[split]
        ways = min(MAX_WAYS, int(torch.unique(labels[split]).numel()))
        scores[f"{split}_auc"] = roc_auc(d, s)
        scores[f"{split}_acc"] = accuracy_at_threshold(d, s, threshold)
        scores[f"{split}_eer"] = equal_error_rate(d, s)[0]
        scores[f"{split}_recall1"] = recall_at_1(embeddings[split], labels[split])
        scores[f"{split}_nway"] = n_way_one_shot_accuracy(embeddings[split], labels[split], ways, EPISODES,
                                                          generator)
        scores[f"{split}_ways"] = float(ways)
    return scores


def score_model(model: nn.Module, course: CourseData, num_pairs: int = 1000, seed: int = 0) -> dict[str, float]:
    """Embed every split with `model` in evaluation mode and score it with `score_embeddings`."""
    device = next(model.parameters()).device
    return _score(lambda images: embed(model, images.to(device)), course, num_pairs, seed)


def score_pixels(course: CourseData, num_pairs: int = 1000, seed: int = 0) -> dict[str, float]:
    """Score raw pixels as embeddings: the baseline a trained encoder has to beat."""
    return _score(lambda images: images.flatten(1), course, num_pairs, seed)


def _score(embed_fn: Callable[[torch.Tensor], torch.Tensor], course: CourseData, num_pairs: int,
           seed: int) -> dict[str, float]:
    splits = {split: getattr(course, split) for split in EVAL_SPLITS}
    embeddings = {split: embed_fn(s.images).cpu() for split, s in splits.items()}
    labels = {split: s.labels for split, s in splits.items()}
    return score_embeddings(embeddings, labels, num_pairs, seed)
