"""Semi-hard triplet mining, and a training loss that logs how much of each batch still carries a loss (notebook 07).

`training.fit` passes a replacement loss the embeddings of every image in the batch with their class labels:
rows [left; right] for a batch of pairs. `TrackedLoss` is such a replacement. It computes one of the in-batch
losses below and, at every training step, records the loss and the **informative fraction**: the share of the
terms it averages over (pairs, triplets or anchors) whose loss is above `INFORMATIVE_TOLERANCE`.

| kind | terms | loss |
|---|---|---|
| `pairs` | the batch's own pairs, left[i] with right[i] | contrastive, as `fit` computes it without a loss_fn |
| `all_pairs` | every pair i < j of the 2B rows | `losses.all_pairs_contrastive_loss` |
| `batch_all` | every valid triplet of the rows | `losses.batch_all_triplet_loss` |
| `batch_hard` | every anchor with a positive and a negative | `losses.batch_hard_triplet_loss` |
| `semi_hard` | every valid triplet; the mined ones carry the loss | `semi_hard_triplet_loss` |

Source for semi-hard triplets: Schroff, Kalenichenko and Philbin (2015), "FaceNet: A Unified Embedding for Face
Recognition and Clustering", which keeps negatives farther from the anchor than the positive but inside the margin.
"""

from __future__ import annotations

import time

import pandas as pd
import torch
from torch import Tensor

from labutils.losses import (_check_embeddings, _check_labels, _check_margin, _label_masks, _zero_loss,
                             all_pairs_contrastive_loss, batch_all_triplet_loss, batch_hard_triplet_loss,
                             contrastive_loss, contrastive_terms, distance_matrix, pairwise_distance)

# A term counts as informative above this loss. Hinge terms are exactly 0 once satisfied, but the contrastive
# term of a positive pair, d^2, never is. The tolerance therefore counts a positive pair closer than 0.01 (a
# hundredth of a margin of 1) as satisfied, because its gradient, 2d, is then negligible.
INFORMATIVE_TOLERANCE = 1e-4

KINDS = ("pairs", "all_pairs", "batch_all", "batch_hard", "semi_hard")


def valid_triplets(labels: Tensor) -> Tensor:
    """Return a (B, B, B) bool mask of valid triplets [a, p, n]: a != p, labels[a] == labels[p] != labels[n]."""
    positive_mask, negative_mask = _label_masks(labels)
    return positive_mask.unsqueeze(2) & negative_mask.unsqueeze(1)


def semi_hard_triplets(embeddings: Tensor, labels: Tensor, margin: float) -> tuple[Tensor, Tensor, Tensor]:
    """Mine every semi-hard triplet of a batch: 0 < d(a, n) - d(a, p) <= margin, with Euclidean distances.

    The negative is farther from the anchor than the positive, so the triplet is not "hard", but by no more than
    the margin, so it still has a loss. pytorch-metric-learning 2.9 makes the same selection with
    TripletMarginMiner(type_of_triplets="semihard") and a plain Euclidean distance. FaceNet defines its
    semi-hard negatives by the same band on squared distances.

    embeddings: (B, D). labels: (B,). Returns (anchor_idx, positive_idx, negative_idx), each (T,), in the order
    of a row-major scan over (a, p, n).
    """
    _check_embeddings(embeddings=embeddings)
    _check_labels(embeddings, labels)
    _check_margin(margin)
    with torch.no_grad():
        mined = _semi_hard_mask(distance_matrix(embeddings), labels, margin)
    anchor_idx, positive_idx, negative_idx = mined.nonzero(as_tuple=True)
    return anchor_idx, positive_idx, negative_idx


def semi_hard_triplet_loss(embeddings: Tensor, labels: Tensor, margin: float = 1.0) -> Tensor:
    """Average the triplet loss max(0, d(a, p) - d(a, n) + margin) over the batch's semi-hard triplets.

    Every mined triplet has a loss in [0, margin), so the mean stays of the order of margin / 2 however well the
    model ranks: it measures the triplets still being worked on, not progress. A batch without a semi-hard
    triplet returns an explicit zero. embeddings: (B, D). labels: (B,). Returns a 0-d tensor.
    """
    _check_embeddings(embeddings=embeddings)
    _check_labels(embeddings, labels)
    _check_margin(margin)
    distances = distance_matrix(embeddings)
    with torch.no_grad():
        mined = _semi_hard_mask(distances, labels, margin)
    count = int(mined.sum())
    if count == 0:
        return _zero_loss(embeddings)
    # A masked mean over the dense (B, B, B) table replaces a gather of the mined rows. The backward pass of a
    # gather adds thousands of triplet gradients into B rows in a thread-dependent order, so two identical runs
    # would drift apart. The dense form gives the same loss with a reproducible gradient.
    hinge = torch.clamp(distances.unsqueeze(2) - distances.unsqueeze(1) + margin, min=0)
    return torch.where(mined, hinge, torch.zeros_like(hinge)).sum() / count


def _semi_hard_mask(distances: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Return the (B, B, B) bool mask of the semi-hard triplets [a, p, n] given the (B, B) distances."""
    # gap[a, p, n] = d(a, n) - d(a, p)
    gap = distances.unsqueeze(1) - distances.unsqueeze(2)
    return valid_triplets(labels) & (gap > 0) & (gap <= margin)


def informative_fraction(kind: str, embeddings: Tensor, labels: Tensor, margin: float) -> float:
    """Return the share of the terms a loss of `kind` averages over whose loss is above INFORMATIVE_TOLERANCE.

    For `semi_hard` the terms are all valid triplets and the informative ones are those the miner keeps.
    Returns NaN for a batch without a single term (no valid triplet, for example).
    """
    with torch.no_grad():
        terms = _terms(kind, embeddings.detach(), labels, margin)
    if terms.numel() == 0:
        return float("nan")
    return float((terms > INFORMATIVE_TOLERANCE).float().mean())


def _terms(kind: str, embeddings: Tensor, labels: Tensor, margin: float) -> Tensor:
    """Return the per-term losses of `kind` as a flat tensor, one value per pair, triplet or anchor."""
    if kind == "pairs":
        left, right = embeddings.chunk(2)
        left_labels, right_labels = labels.chunk(2)
        return contrastive_terms(pairwise_distance(left, right), left_labels == right_labels, margin)
    distances = distance_matrix(embeddings)
    if kind == "all_pairs":
        rows, cols = torch.triu_indices(len(labels), len(labels), offset=1, device=embeddings.device)
        return contrastive_terms(distances[rows, cols], labels[rows] == labels[cols], margin)
    positive_mask, negative_mask = _label_masks(labels)
    if kind == "batch_hard":
        usable = positive_mask.any(dim=1) & negative_mask.any(dim=1)
        hardest_positive = distances.masked_fill(~positive_mask, float("-inf")).amax(dim=1)
        hardest_negative = distances.masked_fill(~negative_mask, float("inf")).amin(dim=1)
        return torch.clamp(hardest_positive - hardest_negative + margin, min=0)[usable]
    valid = valid_triplets(labels)
    # hinge[a, p, n] = max(0, d(a, p) - d(a, n) + margin)
    hinge = torch.clamp(distances.unsqueeze(2) - distances.unsqueeze(1) + margin, min=0)
    if kind == "batch_all":
        return hinge[valid]
    if kind == "semi_hard":
        # Only mined triplets carry the loss, so the others count as satisfied whatever their hinge.
        return torch.where(_semi_hard_mask(distances, labels, margin), hinge, torch.zeros_like(hinge))[valid]
    raise ValueError(f"Unknown kind {kind!r}: use one of {', '.join(KINDS)}.")


class TrackedLoss:
    """A `loss_fn` for `training.fit` that logs the loss and informative fraction of every training step.

    Calls made with gradients disabled (the validation loss that `fit` computes in inference mode) are not
    logged. Use one instance per training run, because the log simply grows with every training call.
    """

    def __init__(self, kind: str, margin: float = 1.0) -> None:
        if kind not in KINDS:
            raise ValueError(f"Unknown kind {kind!r}: use one of {', '.join(KINDS)}.")
        _check_margin(margin)
        self.kind = kind
        self.margin = margin
        # fit stores a loss_fn's __name__ in history.config, where the plateau doctor and the reader find it.
        self.__name__ = kind
        self.rows: list[dict[str, float]] = []
        self._started: float | None = None

    def __call__(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        loss = self.loss(embeddings, labels)
        if torch.is_grad_enabled():
            if self._started is None:
                self._started = time.perf_counter()
            self.rows.append({"step": len(self.rows) + 1, "loss": loss.item(),
                              "informative": informative_fraction(self.kind, embeddings, labels, self.margin),
                              "seconds": time.perf_counter() - self._started})
        return loss

    def loss(self, embeddings: Tensor, labels: Tensor) -> Tensor:
        """Compute the loss of `kind` on one batch, without logging."""
        if self.kind == "pairs":
            left, right = embeddings.chunk(2)
            left_labels, right_labels = labels.chunk(2)
            return contrastive_loss(left, right, (left_labels == right_labels).float(), margin=self.margin)
        if self.kind == "all_pairs":
            return all_pairs_contrastive_loss(embeddings, labels, margin=self.margin)
        if self.kind == "batch_all":
            return batch_all_triplet_loss(embeddings, labels, margin=self.margin)[0]
        if self.kind == "batch_hard":
            return batch_hard_triplet_loss(embeddings, labels, margin=self.margin)
        return semi_hard_triplet_loss(embeddings, labels, margin=self.margin)

    def log(self) -> pd.DataFrame:
        """Return the training log: one row per step with loss, informative fraction and seconds since step 1."""
        return pd.DataFrame(self.rows, columns=["step", "loss", "informative", "seconds"])
