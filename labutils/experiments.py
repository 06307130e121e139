"""Seeded comparisons of training variants, the measuring tool of notebooks 03-09.

A lever notebook trains a few variants (a baseline and the lever's settings) for several seeds each and
reduces every run to its last-epoch metrics. It states a claim only when the difference between variants is
larger than the spread across seeds. The data helpers build the regimes those notebooks study: few training images
per identity, noisy labels and class imbalance.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, Iterable, Mapping, Sequence

import pandas as pd
import torch
from torch import nn

from labutils.data import CourseData, Split
from labutils.history import History
from labutils.models import make_encoder
from labutils.profiles import Profile
from labutils.training import AccuracyFn, LossFn, TrainConfig, fit

# Training images kept per seen digit in the few-images regime: few enough that the training loss reaches zero
# while the validation loss on new images of the same digits stops improving.
FEW_IMAGES_PER_CLASS = 5


@dataclass(frozen=True)
class Variant:
    """One setting of a comparison: overrides of the baseline TrainConfig and of the encoder, and hooks for fit."""

    name: str
    config: Mapping[str, Any] = field(default_factory=dict)
    encoder: Mapping[str, Any] = field(default_factory=dict)
    capacity: str = "small"
    data: CourseData | None = None
    scheduler_fn: Callable[[torch.optim.Optimizer], object] | None = None
    loss_fn: LossFn | None = None
    accuracy_fn: AccuracyFn | None = None


@dataclass
class Run:
    """A trained model and its history, for one variant and one seed."""

    variant: str
    seed: int
    model: nn.Module
    history: History


def base_config(profile: Profile, **overrides: Any) -> TrainConfig:
    """Return the TrainConfig sized by `profile` (epochs, pairs per epoch, evaluation pairs) with `overrides`."""
    settings = {"epochs": profile.epochs, "pairs_per_epoch": profile.pairs_per_epoch,
                "eval_pairs": profile.eval_pairs, **overrides}
    return TrainConfig(**settings)


def run_variants(course: CourseData, variants: Iterable[Variant], base: TrainConfig, seeds: Sequence[int],
                 device: str | torch.device = "cpu", verbose: bool = True) -> list[Run]:
    """Train every variant once per seed and return the runs, variant by variant.

    The encoder's initial weights and the run's pairs both come from the seed, so two variants with the same
    seed start from the same weights and differ only by what the variant changes.
    """
    runs = []
    for variant in variants:
        for seed in seeds:
            torch.manual_seed(seed)
            model = make_encoder(variant.capacity, **dict(variant.encoder))
            config = replace(base, seed=seed, **dict(variant.config))
            history = fit(model, variant.data or course, config, device=device, progress=False,
                          scheduler_fn=variant.scheduler_fn, loss_fn=variant.loss_fn,
                          accuracy_fn=variant.accuracy_fn)
            runs.append(Run(variant.name, seed, model, history))
            if verbose:
                print(f"{variant.name:>18s} seed {seed}: train loss {history['train_loss'][0]:.3f} -> "
                      f"{history.last('train_loss'):.3f}, val_seen loss {history.last('val_seen_loss'):.3f}, "
                      f"AUC {history.last('val_seen_auc'):.3f}, acc {history.last('val_seen_acc'):.3f}; "
                      f"val_unseen AUC {history.last('val_unseen_auc'):.3f}")
    return runs


def final_table(runs: Iterable[Run]) -> pd.DataFrame:
    """Return one row per run: variant, seed and every metric of the run's last epoch."""
    rows = []
    for run in runs:
        rows.append({"variant": run.variant, "seed": run.seed, **run.history.rows[-1],
                     "train_loss_first": run.history["train_loss"][0]})
    return pd.DataFrame(rows)


def summarize(table: pd.DataFrame, columns: Sequence[str]) -> pd.DataFrame:
    """Return the mean, standard deviation (0 for one seed), minimum and maximum of `columns` per variant."""
    grouped = table.groupby("variant", sort=False)[list(columns)]
    summary = grouped.agg(["mean", "std", "min", "max"])
    return summary.fillna(0.0)


def separation(table: pd.DataFrame, column: str, better: str, worse: str, higher_is_better: bool = True) -> float:
    """Return the worst seed of `better` minus the best seed of `worse` on `column`.

    Positive means every seed of `better` beats every seed of `worse`, so the difference is larger than the
    seed noise of this comparison. For a metric where lower is better (a loss), pass `higher_is_better=False`.
    """
    better_values = _values(table, better, column)
    worse_values = _values(table, worse, column)
    if higher_is_better:
        return float(better_values.min() - worse_values.max())
    return float(worse_values.min() - better_values.max())


def mean_of(table: pd.DataFrame, variant: str, column: str) -> float:
    """Return the mean of `column` over the seeds of `variant`."""
    return float(_values(table, variant, column).mean())


def spread_of(table: pd.DataFrame, variant: str, column: str) -> float:
    """Return the standard deviation of `column` over the seeds of `variant`, or 0 for a single seed."""
    values = _values(table, variant, column)
    return float(values.std(ddof=1)) if len(values) > 1 else 0.0


def record_means(recorder: Any, table: pd.DataFrame, columns: Sequence[str], prefix: str = "") -> None:
    """Record the mean over seeds, with its spread, of each of `columns` for every variant."""
    for variant in table["variant"].unique():
        for column in columns:
            recorder.metric(f"{prefix}{variant}_{column}", mean_of(table, variant, column),
                            spread=spread_of(table, variant, column))


def _values(table: pd.DataFrame, variant: str, column: str) -> pd.Series:
    values = table.loc[table["variant"] == variant, column]
    if values.empty:
        known = ", ".join(map(str, table["variant"].unique()))
        raise KeyError(f"No runs of variant {variant!r} in the table: it has {known}.")
    return values


# ---- data regimes ------------------------------------------------------------------------------------------


def limit_train_images(course: CourseData, per_class: int, seed: int = 0) -> CourseData:
    """Keep `per_class` randomly chosen training images of each seen class; both validation splits stay whole.

    This is the few-images regime: a model can memorise every training image, and held-out images of the same
    classes show whether it learned the class or the images.
    """
    if per_class < 2:
        raise ValueError(f"per_class must be at least 2, got {per_class}: a positive pair needs two images of "
                         "one class.")
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in course.train.classes:
        members = (course.train.labels == label).nonzero().flatten()
        keep.append(members[torch.randperm(len(members), generator=generator)[:per_class]])
    return replace(course, train=_subset(course.train, torch.cat(keep).sort().values))


def with_label_noise(course: CourseData, fraction: float, seed: int = 0) -> CourseData:
    """Give a `fraction` of the training images a wrong label, drawn uniformly from the other seen classes."""
    if not 0 <= fraction < 1:
        raise ValueError(f"fraction must be in [0, 1), got {fraction}.")
    generator = torch.Generator().manual_seed(seed)
    labels = course.train.labels.clone()
    classes = torch.tensor(course.train.classes)
    noisy = (torch.rand(len(labels), generator=generator) < fraction).nonzero().flatten()
    # Adding 1..C-1 classes (mod C) to a label's position always lands on a different class.
    positions = torch.searchsorted(classes, labels[noisy])
    shift = torch.randint(1, len(classes), (len(noisy),), generator=generator)
    labels[noisy] = classes[(positions + shift) % len(classes)]
    train = Split(course.train.images, labels, course.train.name, course.train.indices)
    return replace(course, train=train)


def with_class_imbalance(course: CourseData, rare_classes: Sequence[int], keep_fraction: float,
                         seed: int = 0) -> CourseData:
    """Keep only `keep_fraction` of the training images (at least 2) of each class in `rare_classes`."""
    if not 0 < keep_fraction <= 1:
        raise ValueError(f"keep_fraction must be in (0, 1], got {keep_fraction}.")
    unknown = sorted(set(rare_classes) - set(course.train.classes))
    if unknown:
        raise ValueError(f"rare_classes {unknown} are not training classes: use some of {course.train.classes}.")
    generator = torch.Generator().manual_seed(seed)
    keep = []
    for label in course.train.classes:
        members = (course.train.labels == label).nonzero().flatten()
        count = max(2, round(keep_fraction * len(members))) if label in rare_classes else len(members)
        keep.append(members[torch.randperm(len(members), generator=generator)[:count]])
    return replace(course, train=_subset(course.train, torch.cat(keep).sort().values))


def _subset(split: Split, keep: torch.Tensor) -> Split:
    return Split(split.images[keep], split.labels[keep], split.name, split.indices[keep])
