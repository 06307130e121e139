"""Verification and retrieval metrics for embeddings, from pair distances or from embeddings directly.

Every function accepts torch tensors (on any device, with or without grad) or numpy arrays. Distances follow
the rule smaller = more similar, and `same = 1` marks a positive pair (both images show the same class) while
`same = 0` marks a negative pair. A threshold is a distance: a pair is predicted positive iff d < threshold.
"""

from __future__ import annotations

from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

ArrayLike = Union[Tensor, np.ndarray, Sequence[float]]

# Queries (recall_at_1) or episodes (n_way_one_shot_accuracy) evaluated at once, which bounds the temporary
# memory to ROW_CHUNK * N distances or ROW_CHUNK * n_way * D embedding values.
ROW_CHUNK = 1024


def _to_numpy(values: ArrayLike) -> np.ndarray:
    if isinstance(values, Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)


def _to_tensor(values: ArrayLike) -> Tensor:
    if isinstance(values, Tensor):
        return values.detach().cpu()
    return torch.as_tensor(np.asarray(values))


def _check_pairs(distances: ArrayLike, same: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    """Return (distances as float64, same as bool), both (P,), after checking shapes and values."""
    distances_np = _to_numpy(distances).astype(np.float64)
    same_np = _to_numpy(same)
    if distances_np.ndim != 1 or same_np.shape != distances_np.shape:
        raise ValueError(f"distances and same must both have shape (P,), got {distances_np.shape} "
                         f"and {same_np.shape}.")
    if distances_np.size == 0:
        raise ValueError("distances is empty: pass at least one pair.")
    if not np.isfinite(distances_np).all():
        raise ValueError(f"distances contains {int((~np.isfinite(distances_np)).sum())} NaN or infinite "
                         "values: check the embeddings for NaN before computing distances.")
    if not np.isin(same_np, (0, 1)).all():
        raise ValueError(f"same must contain only 0 (negative pair) and 1 (positive pair), found "
                         f"{np.unique(same_np).tolist()}.")
    return distances_np, same_np.astype(bool)


def _require_both_classes(same: np.ndarray, metric: str) -> None:
    num_positive = int(same.sum())
    if num_positive == 0 or num_positive == same.size:
        raise ValueError(f"{metric} needs at least one positive pair (same = 1) and one negative pair (same = 0), "
                         f"got {num_positive} positive and {same.size - num_positive} negative pairs.")


def _threshold_sweep(distances: np.ndarray, same: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Count accepted pairs for every threshold that separates the distinct distances.

    Returns (thresholds, true_accepts, false_accepts), each (U + 1,) for U distinct distances. Threshold k
    accepts (predicts positive for) exactly the k smallest distinct distances: the first threshold equals the
    smallest distance, the middle ones are midpoints, and the last lies just above the largest distance.
    """
    values, inverse = np.unique(distances, return_inverse=True)
    positives_per_value = np.bincount(inverse, weights=same, minlength=values.size)
    negatives_per_value = np.bincount(inverse, weights=~same, minlength=values.size)

    lower, upper = values[:-1], values[1:]
    midpoints = lower / 2 + upper / 2
    # Adjacent floats have no float strictly between them, and the upper one still separates them under d < t.
    midpoints = np.where(midpoints > lower, midpoints, upper)
    thresholds = np.concatenate([values[:1], midpoints, [np.nextafter(values[-1], np.inf)]])

    true_accepts = np.concatenate([[0], np.cumsum(positives_per_value)]).astype(np.int64)
    false_accepts = np.concatenate([[0], np.cumsum(negatives_per_value)]).astype(np.int64)
    return thresholds, true_accepts, false_accepts


def roc_auc(distances: ArrayLike, same: ArrayLike) -> float:
    """Compute the area under the ROC curve with score = -distance, as sklearn.metrics.roc_auc_score does.

    This equals the probability that a random positive pair is closer than a random negative pair, with ties
    counted as 1/2. distances, same: (P,). Raises ValueError unless both pair types are present.
    """
    distances_np, same_np = _check_pairs(distances, same)
    _require_both_classes(same_np, "roc_auc")
    values, inverse = np.unique(distances_np, return_inverse=True)
    positives_per_value = np.bincount(inverse, weights=same_np, minlength=values.size)
    negatives_per_value = np.bincount(inverse, weights=~same_np, minlength=values.size)

    num_positive, num_negative = positives_per_value.sum(), negatives_per_value.sum()
    negatives_farther = num_negative - np.cumsum(negatives_per_value)
    wins = (positives_per_value * (negatives_farther + 0.5 * negatives_per_value)).sum()
    return float(wins / (num_positive * num_negative))


def accuracy_at_threshold(distances: ArrayLike, same: ArrayLike, threshold: float) -> float:
    """Return the fraction of pairs classified correctly when d < threshold predicts a positive pair."""
    distances_np, same_np = _check_pairs(distances, same)
    return float(((distances_np < threshold) == same_np).mean())


def choose_threshold(distances: ArrayLike, same: ArrayLike) -> float:
    """Find the distance threshold that maximises accuracy on these (calibration) pairs.

    Candidates are the midpoints between consecutive distinct distances plus one threshold below and one above
    all of them. When several candidates reach the same accuracy, the smallest one wins.
    distances, same: (P,). Returns a threshold t for the rule "predict positive iff d < t".
    """
    distances_np, same_np = _check_pairs(distances, same)
    thresholds, true_accepts, false_accepts = _threshold_sweep(distances_np, same_np)
    num_negative = int((~same_np).sum())
    correct = true_accepts + (num_negative - false_accepts)
    return float(thresholds[int(np.argmax(correct))])


def equal_error_rate(distances: ArrayLike, same: ArrayLike) -> tuple[float, float]:
    """Find the ROC operating point where the false accept rate (FAR) equals the false reject rate (FRR).

    FAR is the fraction of negative pairs with d < t, FRR the fraction of positive pairs with d >= t. With
    finitely many pairs the two rates rarely meet exactly, so this picks the candidate threshold (see
    `choose_threshold`) with the smallest |FAR - FRR|, breaking ties by the smaller (FAR + FRR) / 2 and then by the
    smaller threshold, and reports (FAR + FRR) / 2 there. No interpolation between ROC points is done.
    distances, same: (P,). Returns (eer, threshold). Raises ValueError unless both pair types are present.
    """
    distances_np, same_np = _check_pairs(distances, same)
    _require_both_classes(same_np, "equal_error_rate")
    thresholds, true_accepts, false_accepts = _threshold_sweep(distances_np, same_np)
    num_positive = int(same_np.sum())
    num_negative = same_np.size - num_positive

    false_accept_rate = false_accepts / num_negative
    false_reject_rate = (num_positive - true_accepts) / num_positive
    gap = np.abs(false_accept_rate - false_reject_rate)
    average = (false_accept_rate + false_reject_rate) / 2
    best = int(np.lexsort((thresholds, average, gap))[0])
    return float(average[best]), float(thresholds[best])


def _check_embeddings_and_labels(embeddings: ArrayLike, labels: ArrayLike) -> tuple[Tensor, Tensor]:
    embeddings_t = _to_tensor(embeddings).to(torch.float64)
    labels_t = _to_tensor(labels)
    if embeddings_t.dim() != 2 or labels_t.shape != (embeddings_t.shape[0],):
        raise ValueError(f"embeddings must have shape (N, D) and labels shape (N,), got "
                         f"{tuple(embeddings_t.shape)} and {tuple(labels_t.shape)}.")
    if not bool(torch.isfinite(embeddings_t).all()):
        raise ValueError("embeddings contains NaN or infinite values: check the model output before evaluating.")
    return embeddings_t, labels_t


def recall_at_1(embeddings: ArrayLike, labels: ArrayLike) -> float:
    """Compute leave-one-out recall@1: how often an embedding's nearest other embedding has the same label.

    Euclidean distance, every embedding is a query once, and a query whose class has no other image counts as
    a miss. When k embeddings tie for nearest, the query earns the fraction of them that share its label, so
    duplicate embeddings do not favour whichever comes first.
    embeddings: (N, D) with N >= 2. labels: (N,).
    """
    embeddings_t, labels_t = _check_embeddings_and_labels(embeddings, labels)
    num_items = embeddings_t.shape[0]
    if num_items < 2:
        raise ValueError(f"recall_at_1 needs at least 2 embeddings, got {num_items}.")

    credit = torch.empty(num_items, dtype=torch.float64)
    for start in range(0, num_items, ROW_CHUNK):
        rows = torch.arange(start, min(start + ROW_CHUNK, num_items))
        # The non-matrix-multiply mode computes exact differences, so identical embeddings tie exactly at 0.
        distances = torch.cdist(embeddings_t[rows], embeddings_t, compute_mode="donot_use_mm_for_euclid_dist")
        distances[torch.arange(rows.numel()), rows] = float("inf")
        nearest = distances == distances.min(dim=1, keepdim=True).values
        same_label = labels_t[rows].unsqueeze(1) == labels_t.unsqueeze(0)
        credit[rows] = (nearest & same_label).sum(dim=1).to(torch.float64) / nearest.sum(dim=1)
    return float(credit.mean())


def _make_generator(generator: torch.Generator | int | None) -> torch.Generator:
    if isinstance(generator, torch.Generator):
        return generator
    created = torch.Generator()
    if generator is None:
        created.seed()
    else:
        created.manual_seed(generator)
    return created


def _sample_episodes(labels: Tensor, n_way: int, episodes: int,
                     generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Return (support_idx (E, n_way), query_idx (E,)); column 0 of support_idx is the query's class."""
    classes, counts = torch.unique(labels, return_counts=True)
    by_class = torch.argsort(labels, stable=True)
    starts = torch.cumsum(counts, dim=0) - counts
    usable = counts >= 2
    if n_way > int(usable.sum()):
        raise ValueError(f"n_way={n_way} is larger than the {int(usable.sum())} classes with at least 2 images "
                         f"(out of {classes.numel()} classes): lower n_way or add images.")
    starts, counts = starts[usable], counts[usable]

    chosen = torch.rand(episodes, starts.numel(), generator=generator).argsort(dim=1)[:, :n_way]
    chosen_starts, chosen_counts = starts[chosen], counts[chosen]
    offsets = (torch.rand(episodes, n_way, generator=generator) * chosen_counts).long()
    offsets = torch.minimum(offsets, chosen_counts - 1)
    # The query is another image of class 0: shift its support offset by 1 .. count - 1, wrapping around.
    shifts = 1 + (torch.rand(episodes, generator=generator) * (chosen_counts[:, 0] - 1)).long()
    shifts = torch.minimum(shifts, chosen_counts[:, 0] - 1)
    query_offsets = (offsets[:, 0] + shifts) % chosen_counts[:, 0]
    return by_class[chosen_starts + offsets], by_class[chosen_starts[:, 0] + query_offsets]


def n_way_one_shot_accuracy(embeddings: ArrayLike, labels: ArrayLike, n_way: int, episodes: int,
                            generator: torch.Generator | int | None = None) -> float:
    """Estimate N-way one-shot accuracy by nearest support embedding, as in Omniglot one-shot evaluation.

    Each episode draws n_way distinct classes among those with at least 2 images, one support image per class,
    and one query image of one of those classes that differs from its support image. The episode is correct
    when the query's nearest support (Euclidean) has the query's class. When k supports tie for nearest and the
    true one is among them, the episode earns 1/k, which is the expected score of a random tie-break.
    embeddings: (N, D). labels: (N,). generator: a torch.Generator, a seed, or None for a fresh random seed.
    Raises ValueError when n_way < 2, episodes < 1, or n_way exceeds the number of classes with 2+ images.
    """
    embeddings_t, labels_t = _check_embeddings_and_labels(embeddings, labels)
    if n_way < 2:
        raise ValueError(f"Invalid n_way={n_way}: use at least 2 classes per episode.")
    if episodes < 1:
        raise ValueError(f"Invalid episodes={episodes}: use at least 1 episode.")
    support_idx, query_idx = _sample_episodes(labels_t, n_way, episodes, _make_generator(generator))

    credit = torch.empty(episodes, dtype=torch.float64)
    for start in range(0, episodes, ROW_CHUNK):
        rows = slice(start, start + ROW_CHUNK)
        supports = embeddings_t[support_idx[rows]]
        queries = embeddings_t[query_idx[rows]].unsqueeze(1)
        distances = ((supports - queries) ** 2).sum(dim=2)
        nearest = distances == distances.min(dim=1, keepdim=True).values
        credit[rows] = nearest[:, 0].to(torch.float64) / nearest.sum(dim=1)
    return float(credit.mean())
