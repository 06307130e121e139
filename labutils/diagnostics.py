"""Measurements that explain a flat validation curve (read in notebook 03), each small enough to check by hand.

`fit` records the per-epoch ones in its history (embedding spread, dead units, gradient norm, update ratio,
weight norm). `labutils.diagnose` reads them, together with the ones that need a model or the data, to name
the cause of a plateau. Distances are Euclidean and `same = 1` marks a positive pair, as everywhere in the course.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from labutils.losses import pairwise_distance
from labutils.metrics import accuracy_at_threshold, choose_threshold, roc_auc
from labutils.pairs import make_pairs


@dataclass(frozen=True)
class EmbeddingSpread:
    """Spread of a set of embeddings.

    `std` is the per-dimension standard deviation averaged over dimensions, and `norm` the mean L2 norm. A
    collapsed embedding has `std` near 0 whatever its `norm`.
    """

    std: float
    norm: float


def embedding_spread(embeddings: Tensor) -> EmbeddingSpread:
    """Measure the spread of embeddings (N, D), N >= 2, as a mean per-dimension std and a mean norm."""
    _check_matrix("embeddings", embeddings)
    if embeddings.shape[0] < 2:
        raise ValueError(f"embedding_spread needs at least 2 embeddings, got {embeddings.shape[0]}.")
    values = embeddings.detach().double()
    return EmbeddingSpread(std=values.std(dim=0, correction=0).mean().item(),
                           norm=torch.linalg.vector_norm(values, dim=1).mean().item())


def pair_distance_stats(distances: Tensor, same: Tensor) -> dict[str, float]:
    """Summarise the distances (P,) of positive (`same` = 1) and negative (`same` = 0) pairs.

    Returns `pos_mean`, `pos_std`, `neg_mean`, `neg_std` and `separation`, the gap of the means in units of
    their pooled standard deviation (0 when that deviation is 0). NaN marks a mean or std over no pairs.
    """
    values, is_positive = _pairs(distances, same)
    positive, negative = values[is_positive], values[~is_positive]
    stats = {"pos_mean": _mean(positive), "pos_std": _std(positive),
             "neg_mean": _mean(negative), "neg_std": _std(negative)}
    pooled = ((stats["pos_std"] ** 2 + stats["neg_std"] ** 2) / 2) ** 0.5
    gap = stats["neg_mean"] - stats["pos_mean"]
    stats["separation"] = gap / pooled if pooled > 0 else 0.0
    return stats


@dataclass(frozen=True)
class DeadUnits:
    """ReLU units that gave 0 for every input, counted per nn.ReLU module (by its name in the model).

    A unit is one channel of a (B, C, H, W) activation, at every position, or one feature of a (B, F) one.
    """

    dead: dict[str, int]
    total: dict[str, int]

    @property
    def fraction(self) -> float:
        """Dead units over all ReLU units of the model, 0.0 when it has none."""
        total = sum(self.total.values())
        return sum(self.dead.values()) / total if total else 0.0

    @property
    def worst_layer_fraction(self) -> float:
        """The largest dead fraction of a single ReLU module: 1.0 means that layer passes no gradient at all."""
        return max((self.dead[name] / self.total[name] for name in self.total), default=0.0)


class ReluActivity:
    """Forward hooks on every nn.ReLU of a model that record which units were ever positive.

    Use it as a context manager around forward passes, which removes the hooks on exit. Only nn.ReLU modules are
    seen: a model that calls torch.relu or F.relu in `forward` reports no units for those activations.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.active: dict[str, Tensor] = {}
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def __enter__(self) -> ReluActivity:
        for name, module in self.model.named_modules():
            if isinstance(module, nn.ReLU):
                self._handles.append(module.register_forward_hook(self._hook(name or "relu")))
        return self

    def __exit__(self, *exc_info: object) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def _hook(self, name: str):
        def record(module: nn.Module, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            # Reduce over the batch and, for feature maps, over positions: (B, C, ...) -> (C,). ReLU outputs are
            # never negative, so a positive sum means some input fired the unit. A sum is about 10 times faster
            # than amax on channels-last feature maps (measured on an x86 CPU with PyTorch 2.14).
            reduce_dims = [0, *range(2, output.dim())]
            positive = output.detach().sum(dim=reduce_dims) > 0
            seen = self.active.get(name)
            self.active[name] = positive if seen is None else seen | positive

        return record

    def dead_units(self) -> DeadUnits:
        """Count the units that were never positive in the forward passes seen so far."""
        return DeadUnits(dead={name: int((~active).sum()) for name, active in self.active.items()},
                         total={name: active.numel() for name, active in self.active.items()})


def dead_units(model: nn.Module, inputs: Tensor, batch_size: int = 1024) -> DeadUnits:
    """Run `inputs` (N, ...) through `model` in evaluation mode and count the ReLU units that never fire."""
    was_training = model.training
    model.eval()
    try:
        with ReluActivity(model) as activity, torch.inference_mode():
            for chunk in inputs.split(batch_size):
                model(chunk)
    finally:
        model.train(was_training)
    return activity.dead_units()


def gradient_norm(parameters: Iterable[nn.Parameter]) -> float:
    """Compute the L2 norm of all gradients taken together, as torch.nn.utils.clip_grad_norm_ measures it.

    Parameters without a gradient are skipped, and the result is 0.0 when none has one.
    """
    return gradient_norm_tensor(parameters).item()


def gradient_norm_tensor(parameters: Iterable[nn.Parameter]) -> Tensor:
    """Compute `gradient_norm` as a 0-d tensor on the gradients' device, without waiting for the device."""
    norms = [torch.linalg.vector_norm(p.grad.detach()) for p in parameters if p.grad is not None]
    return torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.zeros(())


def weight_norm(parameters: Iterable[Tensor]) -> float:
    """Compute the L2 norm of all parameters taken together."""
    norms = [torch.linalg.vector_norm(p.detach()) for p in parameters]
    return torch.linalg.vector_norm(torch.stack(norms)).item() if norms else 0.0


def update_ratio(before: Sequence[Tensor], after: Sequence[Tensor]) -> float:
    """Compute ||after - before|| / ||before|| over all parameters taken together: the relative size of a step.

    `before` contains copies of the parameters taken before an optimizer step and `after` the same parameters
    after it, in the same order. A common rule of thumb puts a healthy step near 1e-3. Returns NaN when `before`
    is all zeros.
    """
    if len(before) != len(after):
        raise ValueError(f"before has {len(before)} tensors but after has {len(after)}: pass the same parameters.")
    step = weight_norm([b_after.detach() - b_before for b_before, b_after in zip(before, after)])
    size = weight_norm(before)
    return step / size if size > 0 else float("nan")


def collapse_loss(loss: str, margin: float, positive_fraction: float = 0.5) -> float:
    """Return the loss of a collapsed embedding, where every distance is 0.

    Contrastive: only negative pairs pay, (1 - positive_fraction) * margin^2. Triplet: every triplet pays the
    margin. A training loss that sits at this value means the embedding has collapsed to a point.
    """
    if loss == "contrastive":
        return (1 - positive_fraction) * margin ** 2
    if loss == "triplet":
        return margin
    raise ValueError(f"Unknown loss {loss!r}: use 'contrastive' or 'triplet'.")


def loss_to_collapse_ratio(value: float, loss: str, margin: float) -> float:
    """Return `value` divided by `collapse_loss(loss, margin)`: near 1 the loss is what a single point would get."""
    return value / collapse_loss(loss, margin)


def margin_floor(loss: str, margin: float, max_distance: float, positive_fraction: float = 0.5) -> float:
    """Return the smallest loss reachable when no distance can exceed `max_distance`.

    Unit-length embeddings give max_distance = 2, and a distance squashed by a sigmoid gives 1. Contrastive:
    each negative pair pays at least max(0, margin - max_distance)^2. Triplet: each triplet pays at least
    max(0, margin - max_distance), reached with the positive on the anchor and the negative as far as possible.
    """
    shortfall = max(0.0, margin - max_distance)
    if loss == "contrastive":
        return (1 - positive_fraction) * shortfall ** 2
    if loss == "triplet":
        return shortfall
    raise ValueError(f"Unknown loss {loss!r}: use 'contrastive' or 'triplet'.")


def accuracy_vs_auc(distances: Tensor, same: Tensor, threshold: float) -> dict[str, float]:
    """Compare the accuracy at `threshold` with what the ranking of these pairs (P,) allows.

    Returns `auc`, `accuracy` (d < threshold predicts a positive pair) and `best_accuracy` (at the threshold
    that is best on these same pairs, an optimistic bound). A large `best_accuracy - accuracy` with a high AUC
    means the threshold or the accuracy computation is wrong, not the embedding.
    """
    return {"auc": roc_auc(distances, same),
            "accuracy": accuracy_at_threshold(distances, same, threshold),
            "best_accuracy": accuracy_at_threshold(distances, same, choose_threshold(distances, same))}


def generalization_gaps(row: dict[str, float], metric: str = "auc") -> dict[str, float]:
    """Return the gaps of one history row: `seen_gap` = train - val_seen and `unseen_gap` = val_seen - val_unseen.

    A large seen gap means the training images are memorised. A large unseen gap with a small seen gap means
    the model learned its training classes but not what separates new ones.
    """
    return {"seen_gap": row[f"train_{metric}"] - row[f"val_seen_{metric}"],
            "unseen_gap": row[f"val_seen_{metric}"] - row[f"val_unseen_{metric}"]}


def mode_mismatch(model: nn.Module, inputs: Tensor, labels: Tensor, num_pairs: int = 1000,
                  seed: int = 0) -> dict[str, float]:
    """Score the same fixed pairs of `inputs` (N, 1, 28, 28) with `model` in evaluation and in training mode.

    Returns `eval_auc`, `train_mode_auc` and their difference `mode_gap`. Dropout and batch normalisation behave
    differently in the two modes, and a gap of more than a few hundredths means validation scores (taken in eval
    mode) do not describe the network that training sees. The training-mode pass runs on a copy of the model
    under a fixed seed, so the running statistics of `model` are not touched. The images go through in one
    batch, so batch normalisation sees statistics of all of them.
    """
    left, right, same = make_pairs(labels, num_pairs, torch.Generator().manual_seed(seed))
    scores = {}
    for mode, network in (("eval_auc", model), ("train_mode_auc", copy.deepcopy(model))):
        scores[mode] = _pair_auc(network, inputs, left, right, same, training=mode == "train_mode_auc", seed=seed)
    scores["mode_gap"] = scores["train_mode_auc"] - scores["eval_auc"]
    return scores


def split_overlap(first: Tensor, second: Tensor) -> int:
    """Count the distinct image ids (1-D integer tensors) that occur in both splits: anything above 0 is leakage."""
    return int(torch.isin(torch.unique(first), torch.unique(second)).sum())


def duplicate_images(first: Tensor, second: Tensor) -> int:
    """Count the images of `first` (N, ...) that also occur, pixel for pixel, in `second` (M, ...).

    This finds leakage that ids miss, such as the same image saved twice under two names.
    """
    second_rows = {row.numpy().tobytes() for row in second.detach().cpu().flatten(1).contiguous()}
    return sum(row.numpy().tobytes() in second_rows for row in first.detach().cpu().flatten(1).contiguous())


def blank_fraction(images: Tensor, tolerance: float = 1e-6) -> float:
    """Return the fraction of images (N, ...) whose pixels all have the same value (std <= `tolerance`).

    A failed file read or a wrong normalisation usually produces blank images. Every blank image of a split
    gets the same embedding, so pairs of blank images have distance 0 whatever their labels.
    """
    if images.dim() < 2 or images.shape[0] == 0:
        raise ValueError(f"images must have shape (N, ...) with N >= 1, got {tuple(images.shape)}.")
    spread = images.detach().flatten(1).double().std(dim=1, correction=0)
    return (spread <= tolerance).double().mean().item()


@contextmanager
def _mode(model: nn.Module, training: bool) -> Iterator[None]:
    was_training = model.training
    model.train(training)
    try:
        yield
    finally:
        model.train(was_training)


def _pair_auc(model: nn.Module, inputs: Tensor, left: Tensor, right: Tensor, same: Tensor, training: bool,
              seed: int) -> float:
    device = next(model.parameters()).device
    # fork_rng keeps the caller's random state: dropout draws here come from `seed` and leave no trace.
    with torch.random.fork_rng(devices=[]), _mode(model, training), torch.no_grad():
        torch.manual_seed(seed)
        embeddings = model(inputs.to(device)).detach().cpu()
    return roc_auc(pairwise_distance(embeddings[left], embeddings[right]), same)


def _check_matrix(name: str, values: Tensor) -> None:
    if values.dim() != 2:
        raise ValueError(f"{name} must have shape (N, D), got {tuple(values.shape)}.")


def _pairs(distances: Tensor, same: Tensor) -> tuple[Tensor, Tensor]:
    distances = torch.as_tensor(distances).detach().cpu().double()
    same = torch.as_tensor(same).detach().cpu()
    if distances.dim() != 1 or same.shape != distances.shape:
        raise ValueError(f"distances and same must both have shape (P,), got {tuple(distances.shape)} and "
                         f"{tuple(same.shape)}.")
    return distances, same == 1


def _mean(values: Tensor) -> float:
    return values.mean().item() if values.numel() else float("nan")


def _std(values: Tensor) -> float:
    return values.std(correction=0).item() if values.numel() else float("nan")
