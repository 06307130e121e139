"""Balanced, seeded pairs and triplets drawn from a label vector (built in notebook 00).

Everything is vectorised: indices are drawn for all pairs at once, so building tens of thousands of pairs takes
milliseconds. Pair label convention used throughout the course: `same = 1` for a positive pair (same class),
`same = 0` for a negative pair.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ClassIndex:
    """Image indices grouped by class: `order[offsets[c]:offsets[c] + counts[c]]` are the images of class c."""

    classes: torch.Tensor  # (K,) class labels
    order: torch.Tensor    # (N,) image indices sorted by class
    offsets: torch.Tensor  # (K,) start of each class in `order`
    counts: torch.Tensor   # (K,) images per class

    @classmethod
    def from_labels(cls, labels: torch.Tensor) -> ClassIndex:
        labels = torch.as_tensor(labels)
        if labels.dim() != 1 or labels.numel() == 0:
            raise ValueError(f"labels must be a non-empty 1-D tensor, got shape {tuple(labels.shape)}.")
        order = torch.argsort(labels, stable=True)
        classes, counts = torch.unique_consecutive(labels[order], return_counts=True)
        offsets = torch.cumsum(counts, 0) - counts
        return cls(classes, order, offsets, counts)

    def pick(self, class_pos: torch.Tensor, generator: torch.Generator,
             exclude: torch.Tensor | None = None) -> torch.Tensor:
        """Draw one image index of each class position in `class_pos`, never the image `exclude` when given."""
        counts = self.counts[class_pos]
        if exclude is None:
            within = _randint_below(counts, generator)
        else:
            # Draw among count - 1 slots and skip over the excluded slot, so the two images always differ.
            excluded_slot = self._slot_of(exclude, class_pos)
            within = _randint_below(counts - 1, generator)
            within = within + (within >= excluded_slot).long()
        return self.order[self.offsets[class_pos] + within]

    def _slot_of(self, image_idx: torch.Tensor, class_pos: torch.Tensor) -> torch.Tensor:
        slot_of_image = torch.empty_like(self.order)
        slot_of_image[self.order] = torch.arange(self.order.numel()) - torch.repeat_interleave(self.offsets,
                                                                                               self.counts)
        return slot_of_image[image_idx]


def make_pairs(labels: torch.Tensor, num_pairs: int,
               generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `num_pairs` pairs, half positive and half negative, with classes chosen uniformly.

    Returns `(left_idx, right_idx, same)`, each of shape (num_pairs,); `same` is float 1.0 for a positive pair.
    The two images of a positive pair are always different images. Pairs come in a shuffled order.
    """
    index = _class_index(labels, num_pairs)
    num_pos = num_pairs // 2
    num_neg = num_pairs - num_pos

    pos_class = _eligible_classes(index, num_pos, generator)
    pos_left = index.pick(pos_class, generator)
    pos_right = index.pick(pos_class, generator, exclude=pos_left)

    neg_left_class, neg_right_class = _different_classes(index, num_neg, generator)
    neg_left = index.pick(neg_left_class, generator)
    neg_right = index.pick(neg_right_class, generator)

    left = torch.cat([pos_left, neg_left])
    right = torch.cat([pos_right, neg_right])
    same = torch.cat([torch.ones(num_pos), torch.zeros(num_neg)])
    shuffle = torch.randperm(num_pairs, generator=generator)
    return left[shuffle], right[shuffle], same[shuffle]


def make_triplets(labels: torch.Tensor, num_triplets: int,
                  generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Draw `num_triplets` (anchor, positive, negative) index triplets with anchor classes chosen uniformly.

    The positive is a different image of the anchor's class; the negative comes from another class.
    Returns three index tensors of shape (num_triplets,).
    """
    index = _class_index(labels, num_triplets)
    anchor_class = _eligible_classes(index, num_triplets, generator)
    anchor = index.pick(anchor_class, generator)
    positive = index.pick(anchor_class, generator, exclude=anchor)
    offset = 1 + _randint_below(torch.full_like(anchor_class, index.classes.numel() - 1), generator)
    negative = index.pick((anchor_class + offset) % index.classes.numel(), generator)
    return anchor, positive, negative


def make_pk_batches(labels: torch.Tensor, classes_per_batch: int, images_per_class: int, num_batches: int,
                    generator: torch.Generator) -> torch.Tensor:
    """Draw P x K batches for in-batch mining: P classes, K different images of each (Hermans et al., 2017).

    Returns image indices of shape (num_batches, P * K), grouped by class within each batch.
    """
    index = _class_index(labels, num_batches)
    num_classes = index.classes.numel()
    if classes_per_batch > num_classes:
        raise ValueError(f"classes_per_batch={classes_per_batch} is larger than the {num_classes} classes in the "
                         f"data: use at most {num_classes}.")
    smallest = int(index.counts.min())
    if images_per_class > smallest:
        raise ValueError(f"images_per_class={images_per_class} is larger than the smallest class "
                         f"({smallest} images): use at most {smallest}.")
    class_pos = torch.rand(num_batches, num_classes, generator=generator).argsort(dim=1)[:, :classes_per_batch]
    # Random keys, pushed past 1 for slots beyond a class's size, give K distinct images per class at once.
    max_count = int(index.counts.max())
    keys = torch.rand(num_batches, classes_per_batch, max_count, generator=generator)
    keys[torch.arange(max_count) >= index.counts[class_pos].unsqueeze(-1)] = 2.0
    within = keys.argsort(dim=-1)[..., :images_per_class]
    batches = index.order[index.offsets[class_pos].unsqueeze(-1) + within]
    return batches.reshape(num_batches, classes_per_batch * images_per_class)


def _class_index(labels: torch.Tensor, num_items: int) -> ClassIndex:
    if num_items < 1:
        raise ValueError(f"The number of pairs, triplets or batches must be positive, got {num_items}.")
    index = ClassIndex.from_labels(labels)
    if index.classes.numel() < 2:
        raise ValueError("Negative pairs need at least 2 classes, but the labels contain "
                         f"{index.classes.numel()}.")
    if int((index.counts >= 2).sum()) == 0:
        raise ValueError("Positive pairs need a class with at least 2 images, but every class has 1.")
    return index


def _eligible_classes(index: ClassIndex, size: int, generator: torch.Generator) -> torch.Tensor:
    eligible = torch.nonzero(index.counts >= 2).squeeze(1)
    return eligible[_randint_below(torch.full((size,), eligible.numel()), generator)]


def _different_classes(index: ClassIndex, size: int,
                       generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    num_classes = index.classes.numel()
    first = _randint_below(torch.full((size,), num_classes), generator)
    second = (first + 1 + _randint_below(torch.full((size,), num_classes - 1), generator)) % num_classes
    return first, second


def _randint_below(upper: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """Draw one integer uniformly from [0, upper) for each element of `upper` (all > 0)."""
    draws = (torch.rand(upper.shape, generator=generator, dtype=torch.float64) * upper).long()
    return torch.minimum(draws, upper - 1)
