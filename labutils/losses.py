"""Contrastive and triplet losses for Siamese networks, with the checks a course needs.

Label convention for pairs: `same = 1` marks a positive pair (both images show the same class) and `same = 0`
a negative pair. Distances are Euclidean and computed as sqrt(sum of squares + eps), so gradients stay finite
when two embeddings are identical. A batch without a single valid pair or triplet returns an explicit zero that
still supports `.backward()` instead of the NaN that averaging an empty tensor gives.

Sources:
- Hadsell, Chopra and LeCun (2006), "Dimensionality Reduction by Learning an Invariant Mapping" (contrastive loss).
- Schroff, Kalenichenko and Philbin (2015), "FaceNet: A Unified Embedding for Face Recognition and Clustering"
  (triplet loss).
- Hermans, Beyer and Leibe (2017), "In Defense of the Triplet Loss for Person Re-Identification" (batch-all
  and batch-hard triplets).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

REDUCTIONS = ("mean", "sum", "none")
DEFAULT_EPS = 1e-9


def _check_margin(margin: float) -> None:
    if not math.isfinite(margin) or margin <= 0:
        raise ValueError(f"Invalid margin={margin!r}: the margin must be positive and finite, for example 1.0.")


def _check_reduction(reduction: str) -> None:
    if reduction not in REDUCTIONS:
        raise ValueError(f"Invalid reduction={reduction!r}: use one of {', '.join(REDUCTIONS)}.")


def _check_embeddings(**named: Tensor) -> None:
    """Raise ValueError unless every named tensor is 2-D (B, D) and all have the same shape."""
    shapes = {name: tuple(tensor.shape) for name, tensor in named.items()}
    for name, shape in shapes.items():
        if len(shape) != 2:
            raise ValueError(f"{name} must have shape (B, D), got {shape}: pass one embedding per row.")
    if len(set(shapes.values())) > 1:
        listed = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"Embedding shapes differ ({listed}): every input needs the same (B, D) shape.")


def _check_labels(embeddings: Tensor, labels: Tensor) -> None:
    if labels.dim() != 1 or labels.shape[0] != embeddings.shape[0]:
        raise ValueError(f"labels must have shape ({embeddings.shape[0]},) to match embeddings "
                         f"{tuple(embeddings.shape)}, got {tuple(labels.shape)}.")


def _zero_loss(*inputs: Tensor) -> Tensor:
    """Return a 0-d zero that is connected to the inputs, so `.backward()` works and yields zero gradients."""
    total = inputs[0].sum()
    for tensor in inputs[1:]:
        total = total + tensor.sum()
    return total * 0


def _reduce(losses: Tensor, reduction: str, *inputs: Tensor) -> Tensor:
    if reduction == "none":
        return losses
    if losses.numel() == 0:
        return _zero_loss(*inputs)
    return losses.mean() if reduction == "mean" else losses.sum()


def pairwise_distance(x1: Tensor, x2: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Compute the Euclidean distance between matching rows, sqrt(sum((x1 - x2)^2) + eps).

    x1, x2: (B, D). Returns (B,). The eps keeps the gradient finite (zero) for identical rows, at the price of a
    distance of sqrt(eps) instead of 0 there.
    """
    _check_embeddings(x1=x1, x2=x2)
    if eps < 0:
        raise ValueError(f"Invalid eps={eps!r}: eps must be >= 0, for example {DEFAULT_EPS}.")
    return torch.sqrt(((x1 - x2) ** 2).sum(dim=1) + eps)


def distance_matrix(embeddings: Tensor, eps: float = DEFAULT_EPS) -> Tensor:
    """Compute all Euclidean distances within a batch, sqrt(sum of squares + eps) as in `pairwise_distance`.

    embeddings: (B, D). Returns (B, B). The differences are formed explicitly instead of through the
    |a|^2 + |b|^2 - 2ab identity, which loses precision for close embeddings.
    NOTE: this needs B * B * D temporary elements, about 134 MB for B = 512 and D = 128 in float32.
    """
    _check_embeddings(embeddings=embeddings)
    return torch.sqrt(_squared_distance_matrix(embeddings) + eps)


def _squared_distance_matrix(embeddings: Tensor) -> Tensor:
    differences = embeddings.unsqueeze(1) - embeddings.unsqueeze(0)
    return (differences ** 2).sum(dim=2)


def contrastive_terms(distances: Tensor, same: Tensor, margin: float) -> Tensor:
    """Compute same * d^2 + (1 - same) * max(0, margin - d)^2 element-wise, with `same` 1 for positive pairs."""
    same = same.to(distances.dtype)
    return same * distances ** 2 + (1 - same) * torch.clamp(margin - distances, min=0) ** 2


def contrastive_loss(emb1: Tensor, emb2: Tensor, same: Tensor, margin: float = 1.0,
                     reduction: str = "mean") -> Tensor:
    """Compute the contrastive loss of Hadsell, Chopra and LeCun (2006) for a batch of pairs.

    L_i = same_i * d_i^2 + (1 - same_i) * max(0, margin - d_i)^2 with d_i the Euclidean distance between
    emb1[i] and emb2[i]. `same` is 1 for a positive pair (same class) and 0 for a negative pair. The paper
    writes this with `Y = 0` for similar pairs and a factor 1/2 on each term. This course uses `same = 1` for
    similar pairs, drops the 1/2 and averages the per-pair terms under reduction="mean".

    emb1, emb2: (B, D). same: (B,) with values in {0, 1}, any numeric or bool dtype. Returns a 0-d tensor, or
    (B,) for reduction="none". An empty batch (B = 0) returns an explicit zero under "mean" and "sum".
    """
    _check_embeddings(emb1=emb1, emb2=emb2)
    _check_margin(margin)
    _check_reduction(reduction)
    if same.dim() != 1 or same.shape[0] != emb1.shape[0]:
        raise ValueError(f"same must have shape ({emb1.shape[0]},) to match emb1 {tuple(emb1.shape)}, "
                         f"got {tuple(same.shape)}.")
    if not bool(((same == 0) | (same == 1)).all()):
        found = torch.unique(same).tolist()
        raise ValueError(f"same must contain only 0 (negative pair) and 1 (positive pair), found {found}.")
    losses = contrastive_terms(pairwise_distance(emb1, emb2), same, margin)
    return _reduce(losses, reduction, emb1, emb2)


def triplet_loss(anchor: Tensor, positive: Tensor, negative: Tensor, margin: float = 0.2,
                 reduction: str = "mean") -> Tensor:
    """Compute the triplet loss of Schroff, Kalenichenko and Philbin (2015, FaceNet).

    L_i = max(0, d(a_i, p_i) - d(a_i, n_i) + margin) with non-squared Euclidean distances, as in
    torch.nn.TripletMarginLoss(margin, p=2). That class differs only in its eps, which it adds (1e-6) to every
    coordinate of the difference.
    FaceNet itself uses squared distances on L2-normalised embeddings.

    anchor, positive, negative: (B, D), where positive shares the anchor's class and negative does not.
    Returns a 0-d tensor, or (B,) for reduction="none". An empty batch returns an explicit zero.
    """
    _check_embeddings(anchor=anchor, positive=positive, negative=negative)
    _check_margin(margin)
    _check_reduction(reduction)
    losses = torch.clamp(pairwise_distance(anchor, positive) - pairwise_distance(anchor, negative) + margin,
                         min=0)
    return _reduce(losses, reduction, anchor, positive, negative)


class ContrastiveLoss(nn.Module):
    """Module form of `contrastive_loss` that stores the margin and reduction."""

    def __init__(self, margin: float = 1.0, reduction: str = "mean") -> None:
        super().__init__()
        _check_margin(margin)
        _check_reduction(reduction)
        self.margin = margin
        self.reduction = reduction

    def forward(self, emb1: Tensor, emb2: Tensor, same: Tensor) -> Tensor:
        return contrastive_loss(emb1, emb2, same, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


class TripletLoss(nn.Module):
    """Module form of `triplet_loss` that stores the margin and reduction."""

    def __init__(self, margin: float = 0.2, reduction: str = "mean") -> None:
        super().__init__()
        _check_margin(margin)
        _check_reduction(reduction)
        self.margin = margin
        self.reduction = reduction

    def forward(self, anchor: Tensor, positive: Tensor, negative: Tensor) -> Tensor:
        return triplet_loss(anchor, positive, negative, margin=self.margin, reduction=self.reduction)

    def extra_repr(self) -> str:
        return f"margin={self.margin}, reduction={self.reduction!r}"


def _label_masks(labels: Tensor) -> tuple[Tensor, Tensor]:
    """Return (positive_mask, negative_mask), both (B, B) bool, the positive one excluding i == j."""
    same_label = labels.unsqueeze(0) == labels.unsqueeze(1)
    not_self = ~torch.eye(labels.shape[0], dtype=torch.bool, device=labels.device)
    return same_label & not_self, ~same_label


def batch_all_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.2) -> tuple[Tensor, float]:
    """Average the triplet loss over every valid triplet in the batch ("batch all" in Hermans et al. 2017).

    A triplet (a, p, n) is valid when a != p, labels[a] == labels[p] and labels[a] != labels[n]. Its loss is
    max(0, d(a, p) - d(a, n) + margin) with Euclidean distances. The mean runs over all valid triplets,
    including the ones already satisfied with zero loss, so the loss shrinks as training satisfies more of them.

    embeddings: (B, D). labels: (B,). Returns (loss, fraction_active), where fraction_active is the fraction of
    valid triplets with a loss above zero. Without a valid triplet the result is (explicit zero, 0.0).
    """
    _check_embeddings(embeddings=embeddings)
    _check_labels(embeddings, labels)
    _check_margin(margin)
    positive_mask, negative_mask = _label_masks(labels)
    valid = positive_mask.unsqueeze(2) & negative_mask.unsqueeze(1)
    num_valid = int(valid.sum())
    if num_valid == 0:
        return _zero_loss(embeddings), 0.0

    squared = _squared_distance_matrix(embeddings)
    distances = torch.sqrt(squared + DEFAULT_EPS)
    # losses[a, p, n] = max(0, d(a, p) - d(a, n) + margin)
    losses = torch.clamp(distances.unsqueeze(2) - distances.unsqueeze(1) + margin, min=0) * valid

    # The eps lifts a triplet that sits exactly on the margin to a loss of about 1e-10, so activity is decided on
    # distances without eps.
    with torch.no_grad():
        exact = torch.sqrt(squared)
        active = (exact.unsqueeze(2) - exact.unsqueeze(1) + margin > 0) & valid
    return losses.sum() / num_valid, int(active.sum()) / num_valid


def batch_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 0.2) -> Tensor:
    """Compute the batch-hard triplet loss of Hermans, Beyer and Leibe (2017) with a hinge at `margin`.

    For each anchor a: max(0, max_p d(a, p) - min_n d(a, n) + margin), taking the farthest positive
    (same label, other image) and the closest negative (other label), averaged over anchors. Anchors without a
    positive or without a negative in the batch are skipped, and a batch where every anchor is skipped returns an
    explicit zero. The paper also proposes a soft-margin variant, log(1 + exp(.)), which this function omits.

    embeddings: (B, D). labels: (B,). Returns a 0-d tensor.
    """
    _check_embeddings(embeddings=embeddings)
    _check_labels(embeddings, labels)
    _check_margin(margin)
    positive_mask, negative_mask = _label_masks(labels)
    usable = positive_mask.any(dim=1) & negative_mask.any(dim=1)
    if not bool(usable.any()):
        return _zero_loss(embeddings)

    distances = distance_matrix(embeddings)[usable]
    hardest_positive = distances.masked_fill(~positive_mask[usable], float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(~negative_mask[usable], float("inf")).amin(dim=1)
    return torch.clamp(hardest_positive - hardest_negative + margin, min=0).mean()


def all_pairs_contrastive_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Average the contrastive loss (see `contrastive_loss`) over every pair i < j in the batch.

    Pairs with labels[i] == labels[j] are positive pairs (same = 1), all others negative pairs.
    embeddings: (B, D). labels: (B,). Returns a 0-d tensor, an explicit zero when B < 2.
    """
    _check_embeddings(embeddings=embeddings)
    _check_labels(embeddings, labels)
    _check_margin(margin)
    batch_size = embeddings.shape[0]
    if batch_size < 2:
        return _zero_loss(embeddings)

    rows, cols = torch.triu_indices(batch_size, batch_size, offset=1, device=embeddings.device)
    same = labels[rows] == labels[cols]
    distances = distance_matrix(embeddings)[rows, cols]
    return contrastive_terms(distances, same, margin).mean()
