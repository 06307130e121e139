"""The rules of the plateau doctor (`labutils.diagnose`): one function per cause, each with its thresholds.

Every rule reads the run's signals (its history and loss settings) and, when a model or data were given, a
`Probe` of measurements on them. It returns a `Finding` when the signals match its cause's signature, else None.
Thresholds are module constants, each with the reason for its value. They were calibrated on the small encoder
trained on the bundled digits, for 2 to 10 epochs of a few hundred to a few thousand pairs. Other data sets or
far longer runs may need them moved.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from labutils.diagnostics import collapse_loss, margin_floor
from labutils.history import History

NOTEBOOKS = {
    "03": "03 plateau mechanisms",
    "04": "04 margin",
    "05": "05 learning rate and schedules",
    "06": "06 optimizers and weight decay",
    "07": "07 batch size and mining",
    "08": "08 augmentation and regularization",
}
# The notebook that teaches each cause.
CAUSES = {
    "collapse": NOTEBOOKS["03"],
    "dead_units": NOTEBOOKS["03"],
    "lr_too_high": NOTEBOOKS["05"],
    "lr_too_low": NOTEBOOKS["05"],
    "label_convention": NOTEBOOKS["03"],
    "metric_threshold": NOTEBOOKS["03"],
    "metric_shape": NOTEBOOKS["03"],
    "memorization": NOTEBOOKS["08"],
    "noisy_labels": NOTEBOOKS["08"],
    "too_few_identities": NOTEBOOKS["08"],
    "margin_unreachable": NOTEBOOKS["04"],
    "regularization_too_strong": NOTEBOOKS["06"],
    "eval_mode_mismatch": NOTEBOOKS["08"],
    "leakage": NOTEBOOKS["03"],
    "blank_inputs": NOTEBOOKS["03"],
    "mining_artifact": NOTEBOOKS["07"],
    "healthy": NOTEBOOKS["03"],
}

# A finding below this confidence is listed, but `healthy` is still reported.
REPORT_CONFIDENCE = 0.5


@dataclass(frozen=True)
class Finding:
    """One likely cause of the plateau, with the measured numbers behind it and what to do about it."""

    cause: str
    confidence: float
    evidence: dict[str, float]
    fix: str
    notebook: str


@dataclass(frozen=True)
class Probe:
    """Measurements on a trained model and its validation inputs, with None for a measurement not taken."""

    emb_std: float | None = None
    emb_norm: float | None = None
    pair_spread: float | None = None
    dead_units: float | None = None
    dead_units_layer_max: float | None = None
    auc: float | None = None
    accuracy: float | None = None
    best_accuracy: float | None = None
    eval_auc: float | None = None
    train_mode_auc: float | None = None
    blank_fraction: float | None = None
    shared_ids: dict[str, int] = field(default_factory=dict)
    duplicate_images: dict[str, int] = field(default_factory=dict)


class RunSignals:
    """A history with the loss settings, and helpers that read its columns and configuration."""

    def __init__(self, history: History, loss_settings: dict[str, Any]) -> None:
        self.history = history
        self.settings = loss_settings
        self.config = history.config

    def has(self, *columns: str) -> bool:
        return all(column in self.history.rows[0] for column in columns)

    def series(self, column: str) -> list[float]:
        """Return the finite values of `column` over epochs, leaving out NaN and missing values."""
        values = (row.get(column) for row in self.history.rows)
        return [float(value) for value in values if value is not None and math.isfinite(value)]

    def last(self, column: str) -> float:
        values = self.series(column)
        return values[-1] if values else math.nan

    def first(self, column: str) -> float:
        values = self.series(column)
        return values[0] if values else math.nan

    @property
    def loss(self) -> str:
        return str(self.settings.get("loss", self.config.get("loss", "contrastive")))

    @property
    def margin(self) -> float:
        return float(self.settings.get("margin", self.config.get("margin", 1.0)))

    @property
    def diverged(self) -> bool:
        """True when training stopped on a non-finite loss, or the loss or AUC became NaN."""
        stopped = (self.history.stopped or "").lower()
        if "nan" in stopped or "inf" in stopped:
            return True
        columns = [column for column in ("train_loss", "val_unseen_auc") if self.has(column)]
        return any(math.isnan(row[column]) for row in self.history.rows for column in columns)


Rule = Callable[[RunSignals, "Probe | None"], "Finding | None"]


def ramp(value: float, start: float, full: float, low: float = 0.5, high: float = 0.95) -> float:
    """Map `value` linearly from [start, full] onto [low, high], clipped. Pass `start > full` for falling evidence."""
    if math.isnan(value):
        return low
    position = (value - start) / (full - start)
    return round(low + (high - low) * min(max(position, 0.0), 1.0), 3)


def finding(cause: str, confidence: float, evidence: dict[str, float], fix: str) -> Finding:
    """Build a Finding for `cause`, filling in the notebook that teaches it and rounding the evidence."""
    rounded = {name: (float(f"{value:.6g}") if isinstance(value, float) else value)
               for name, value in evidence.items()}
    return Finding(cause=cause, confidence=confidence, evidence=rounded, fix=fix, notebook=CAUSES[cause])


# ---- collapse, dead units and the learning rate ----------------------------------------------------------------

# Mean pair distance over mean embedding norm below which the embeddings sit at nearly one point. Healthy digit
# runs measured 0.5-1.1, runs that could not fit (flipped loss, tiny learning rate) 0.17-0.36, collapsed ones
# 0-0.09.
COLLAPSE_SPREAD = 0.15
# Training AUC at or below this counts as chance level for a collapsed embedding.
CHANCE_AUC = 0.7
# Fall of the training AUC from its best epoch, with the training loss still falling, that marks an embedding
# collapsing while it trains. SimSiam without stop-gradient lost 0.2 within 80 steps; healthy runs rose.
AUC_DROP = 0.1
# Share of its widest spread that a collapsing embedding has lost by the last epoch.
SPREAD_LOST = 0.4
# A training loss within this fraction of the collapse value (every distance 0) is that value.
COLLAPSE_LOSS_TOLERANCE = 0.03
# Fraction of one layer's ReLU units that never fire. Healthy small and classic encoders measured at most 0.42
# on the unseen digits; a final ReLU driven negative measured 0.75-1.0.
DEAD_LAYER_FRACTION = 0.6
# Weight-norm growth over the first epoch. Adam at lr 1e-3 grew the weights by 1.02-1.1 times; lr 1e-2, which
# killed units or collapsed the embedding, by 2.5-2.9 times.
WEIGHT_JUMP = 1.5
# Median update-to-weight ratio below which steps are too small to move the weights within a run. Healthy runs
# measured 2e-3 to 8e-3 (the usual rule of thumb is about 1e-3); plain SGD at lr 1e-4 measured 1e-5.
UPDATE_RATIO_LOW = 1e-4
# Relative fall of the training loss over the run below which it counts as not moving.
LOSS_STALL = 0.1
# Training loss, as a fraction of the margin, at or below which every hinge is met: steps are then small because
# the gradients vanished, not because the learning rate is low. Batch-hard triplet runs on 35 digit images
# reached a loss of 0 within their first epoch and then measured update ratios near 1e-11.
LOSS_SOLVED = 1e-3


def check_collapse(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect embeddings gathered at nearly one point: pair distances near 0 next to the embedding norm."""
    spread = _spread(run, probe)
    if math.isnan(spread):
        return None
    if spread >= COLLAPSE_SPREAD:
        return _collapsing(run)
    # Small distances alone also fit an embedding with a large shared offset, so a collapse must also show in
    # training: pairs ranked at chance, or a loss at the value that all distances of 0 give.
    collapse_value = _collapse_value(run)
    at_chance = run.last("train_auc") <= CHANCE_AUC
    if collapse_value is None and not at_chance:
        return None
    evidence = {"pair_spread": spread, "train_auc": run.last("train_auc"), "train_loss": run.last("train_loss")}
    if collapse_value is not None:
        evidence["collapse_loss"] = collapse_value
    return finding("collapse", ramp(spread, COLLAPSE_SPREAD, 0.0, low=0.65, high=0.9), evidence,
                   "Every input maps to nearly the same embedding, so no distance carries information. Lower the "
                   "learning rate, mine less aggressively (batch-all or semi-hard instead of batch-hard), and "
                   "check that pretrained weights actually loaded.")


def _collapsing(run: RunSignals) -> Finding | None:
    """Detect a collapse in progress: the loss improves while training pairs blur together and distances shrink."""
    aucs, losses = run.series("train_auc"), run.series("train_loss")
    spreads = [value for value in map(_spread_of_row, run.history.rows) if not math.isnan(value)]
    if len(aucs) < 3 or len(aucs) != len(losses) or not spreads:
        return None
    best = max(range(len(aucs)), key=aucs.__getitem__)
    auc_drop = aucs[best] - aucs[-1]
    spread_lost = 1 - spreads[-1] / max(spreads)
    if auc_drop < AUC_DROP or losses[-1] >= losses[best] or spread_lost < SPREAD_LOST:
        return None
    return finding("collapse", ramp(auc_drop, AUC_DROP, 0.3, low=0.65, high=0.85),
                   {"train_auc_drop": auc_drop, "spread_lost": spread_lost, "pair_spread": spreads[-1],
                    "train_loss": losses[-1]},
                   "The loss keeps improving while the embeddings move together and training pairs get harder to "
                   "tell apart: the network is collapsing toward a constant output. For SimSiam-style losses "
                   "keep the stop-gradient and predictor. Otherwise lower the learning rate or mine less hard.")


def check_dead_units(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect a ReLU layer whose units never fire, which passes no gradient to the layers before it."""
    worst = _latest(run, probe, "dead_units_layer_max")
    if math.isnan(worst) or worst < DEAD_LAYER_FRACTION:
        return None
    evidence = {"dead_units_layer_max": worst, "dead_units": _latest(run, probe, "dead_units")}
    confidence = ramp(worst, DEAD_LAYER_FRACTION, 1.0, low=0.55, high=0.9)
    first_gradient = run.first("grad_norm")
    if worst >= 0.99 and first_gradient == 0.0:
        # Dead from the first step: the units were never alive, so the learning rate cannot have killed them.
        evidence["first_epoch_grad_norm"] = first_gradient
        confidence = 0.97
    elif _weight_jump(run) >= WEIGHT_JUMP:
        # The units died in a first epoch that blew the weights up: the learning rate is the cause to fix first.
        evidence["first_epoch_weight_growth"] = _weight_jump(run)
        confidence = min(confidence, 0.6)
    return finding("dead_units", confidence, evidence,
                   "A ReLU layer outputs 0 for every input, so no gradient flows through it. Remove a ReLU on the "
                   "embedding output, check bias initialisation, and lower the learning rate if units die during "
                   "training.")


def check_lr_too_high(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect divergence, or a first epoch that blew up the weights and left the embedding collapsed or a layer dead."""
    lr = float(run.config.get("lr", math.nan))
    if run.diverged:
        return finding("lr_too_high", 0.95, {"lr": lr, "epochs_recorded": float(len(run.history))},
                       "Training diverged to NaN or infinity. Lower the learning rate 3 to 10 times, or add "
                       "warm-up and gradient clipping.")
    jump = _weight_jump(run)
    if math.isnan(jump) or jump < WEIGHT_JUMP:
        return None
    spread, dead = _spread(run, probe), _latest(run, probe, "dead_units_layer_max")
    damaged = spread < COLLAPSE_SPREAD or dead >= DEAD_LAYER_FRACTION
    evidence = {"lr": lr, "first_epoch_weight_growth": jump, "update_ratio_first": run.first("update_ratio"),
                "pair_spread": spread, "dead_units_layer_max": dead}
    confidence = ramp(jump, WEIGHT_JUMP, 2.5, low=0.55, high=0.75) + (0.2 if damaged else 0.0)
    return finding("lr_too_high", min(confidence, 0.95), evidence,
                   "The first epoch blew the weights up, which collapses the embedding or kills ReLU units. Lower "
                   "the learning rate 3 to 10 times, or warm it up, or fine-tune a pretrained network in two "
                   "stages (new head first, then everything at a small learning rate).")


def check_lr_too_low(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect steps so small that the weights barely change and the loss hardly moves."""
    ratios = sorted(run.series("update_ratio"))
    if not ratios:
        return None
    median = ratios[len(ratios) // 2]
    losses = run.series("train_loss")
    drop = _relative_drop(losses)
    if median >= UPDATE_RATIO_LOW or median == 0.0 or drop >= LOSS_STALL:
        return None
    if losses and sorted(losses)[len(losses) // 2] <= LOSS_SOLVED * float(run.config.get("margin", 1.0)):
        return None  # nothing left to learn on the training pairs
    confidence = ramp(math.log10(median), math.log10(UPDATE_RATIO_LOW), -6.0, low=0.6, high=0.95)
    evidence = {"update_ratio_median": median, "train_loss_drop": drop, "lr": float(run.config.get("lr", math.nan))}
    return finding("lr_too_low", confidence, evidence,
                   "Each step changes the weights by far less than 1e-3 of their size, so the loss hardly moves. "
                   "Raise the learning rate 10 to 100 times or switch to momentum or Adam, and judge a slow start "
                   "only after a few thousand steps.")


def _spread(run: RunSignals, probe: Probe | None) -> float:
    """Mean val_unseen pair distance over mean embedding norm: the last epoch's, or the median epoch's if smaller.

    The median keeps a run that sat collapsed for most epochs from looking healthy because it began to recover.
    """
    if probe is not None and probe.pair_spread is not None:
        return probe.pair_spread
    if not run.has("val_unseen_pos_dist", "val_unseen_neg_dist", "val_unseen_emb_norm"):
        return math.nan
    spreads = [_spread_of_row(row) for row in run.history.rows]
    spreads = [value for value in spreads if not math.isnan(value)]
    if not spreads:
        return math.nan
    return min(spreads[-1], sorted(spreads)[len(spreads) // 2])


def _spread_of_row(row: dict[str, float]) -> float:
    mean_distance = (row["val_unseen_pos_dist"] + row["val_unseen_neg_dist"]) / 2
    norm = row["val_unseen_emb_norm"]
    if math.isnan(mean_distance) or math.isnan(norm):
        return math.nan
    return 0.0 if norm < 1e-8 else mean_distance / norm


def _latest(run: RunSignals, probe: Probe | None, name: str) -> float:
    measured = getattr(probe, name, None) if probe is not None else None
    return measured if measured is not None else run.last(name)


def _collapse_value(run: RunSignals) -> float | None:
    """Return the collapse loss that the median training loss matches, if any (margin, m^2 / 2 or ln 2)."""
    losses = sorted(run.series("train_loss"))
    if not losses:
        return None
    loss = losses[len(losses) // 2]
    candidates = [math.log(2)]
    if run.loss in ("contrastive", "triplet"):
        candidates.append(collapse_loss(run.loss, run.margin))
    for value in candidates:
        if abs(loss - value) <= COLLAPSE_LOSS_TOLERANCE * value:
            return value
    return None


def _weight_jump(run: RunSignals) -> float:
    initial = run.config.get("initial_weight_norm")
    first = run.first("weight_norm")
    if not initial or math.isnan(first):
        return math.nan
    return first / float(initial)


def _relative_drop(values: list[float]) -> float:
    if len(values) < 2 or values[0] == 0:
        return math.nan
    return (values[0] - values[-1]) / abs(values[0])


# ---- the accuracy metric and the label convention -------------------------------------------------------------

# AUC above which a split's pairs are well ranked, so an accuracy near 0.5 cannot come from the embedding.
AUC_RANKED = 0.75
# Tolerance around 0.5 for the broadcast artefact. A real accuracy on a few hundred pairs does not stay at 0.5 to
# this precision epoch after epoch.
EXACT_HALF = 1e-9
# Accuracy this far below the best accuracy the AUC allows means the decision rule, not the embedding, is off.
# With AUC >= 0.9 the best threshold on the course's pairs gave accuracy >= 0.8.
ACCURACY_SHORTFALL = 0.25
# Training AUC at or below this, after training, means the model could not even rank its training pairs.
TRAIN_AUC_CHANCE = 0.6
# A training AUC that fell by this much from its best epoch and ended at or below TRAIN_AUC_FALLEN is a model
# unlearning its start: healthy runs only rise there.
TRAIN_AUC_FALL = 0.05
TRAIN_AUC_FALLEN = 0.7


def check_metric_shape(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect an accuracy of exactly 0.5 at every epoch next to a high AUC: the accuracy compares wrong shapes."""
    splits = [split for split in ("train", "val_seen", "val_unseen") if run.has(f"{split}_acc", f"{split}_auc")]
    stuck = [split for split in splits if _exactly_half(run.series(f"{split}_acc"))
             and run.last(f"{split}_auc") >= AUC_RANKED]
    if not stuck:
        return None
    split = stuck[-1]
    return finding("metric_shape", ramp(len(stuck), 1, 3, low=0.85, high=0.95),
                   {f"{split}_acc": run.last(f"{split}_acc"), f"{split}_auc": run.last(f"{split}_auc"),
                    "splits_at_exactly_half": float(len(stuck)), "epochs": float(len(run.history))},
                   "Accuracy is exactly 0.5 every epoch while AUC shows well-ranked pairs: the accuracy ignores the "
                   "predictions. Compare tensors of the same shape (labels (B,) against predictions (B, 1) "
                   "broadcast to a B x B table), and check that the threshold does not accept every pair.")


def check_metric_threshold(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect an accuracy far below what the ranking allows: a wrong threshold or comparison direction."""
    for split in ("train", "val_seen"):
        if not run.has(f"{split}_acc", f"{split}_auc"):
            continue
        accuracy, auc = run.last(f"{split}_acc"), run.last(f"{split}_auc")
        if _exactly_half(run.series(f"{split}_acc")) or auc < 0.9:
            continue
        shortfall = _best_accuracy_for(auc) - accuracy
        if shortfall >= ACCURACY_SHORTFALL:
            return finding("metric_threshold", ramp(shortfall, ACCURACY_SHORTFALL, 0.7, low=0.7, high=0.93),
                           {f"{split}_acc": accuracy, f"{split}_auc": auc, "accuracy_shortfall": shortfall},
                           "The pairs are well ranked but the accuracy is far below what that ranking allows. "
                           "Predict 'same' when the distance is below the threshold (not above), and choose the "
                           "threshold on training pairs at the embeddings' current scale.")
    if probe is not None and probe.best_accuracy is not None and probe.accuracy is not None \
            and probe.auc is not None and probe.auc >= 0.9 \
            and probe.best_accuracy - probe.accuracy >= ACCURACY_SHORTFALL:
        return finding("metric_threshold", 0.7, {"accuracy": probe.accuracy, "best_accuracy": probe.best_accuracy,
                                                 "auc": probe.auc},
                       "The recorded threshold misclassifies pairs that the embedding ranks well. Choose the "
                       "threshold on training pairs at the embeddings' current scale.")
    return None


def check_label_convention(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect training pairs ranked at chance although the weights move and have not collapsed: flipped labels."""
    if not run.has("train_auc"):
        return None
    # The last epoch counts, not the best: an untrained encoder already ranks digit pairs above chance (about
    # 0.6-0.7), and a flipped loss takes an epoch or two to undo that.
    series = run.series("train_auc")
    if not series:
        return None
    auc, peak = series[-1], max(series)
    spread = _spread(run, probe)
    ratios = sorted(run.series("update_ratio"))
    moving = not ratios or ratios[len(ratios) // 2] >= UPDATE_RATIO_LOW
    falling = peak - auc >= TRAIN_AUC_FALL and auc <= TRAIN_AUC_FALLEN
    if math.isnan(auc) or (auc > TRAIN_AUC_CHANCE and not falling) or not moving or spread < COLLAPSE_SPREAD:
        return None
    evidence = {"train_auc": auc, "train_auc_max": peak, "val_unseen_auc": run.last("val_unseen_auc"),
                "pair_spread": spread}
    if run.has("train_pos_dist", "train_neg_dist"):
        evidence["train_pos_minus_neg_dist"] = run.last("train_pos_dist") - run.last("train_neg_dist")
    return finding("label_convention", ramp(min(auc, TRAIN_AUC_CHANCE), TRAIN_AUC_CHANCE, 0.3, low=0.75, high=0.95),
                   evidence,
                   "The weights move but even training pairs are ranked at chance or inverted: the loss pulls "
                   "apart the pairs it should pull together. Check that the loss and the labels use the same "
                   "convention (here same = 1) and that a score used as a similarity is not a distance.")


def _exactly_half(values: list[float]) -> bool:
    return bool(values) and all(abs(value - 0.5) <= EXACT_HALF for value in values)


def _best_accuracy_for(auc: float) -> float:
    """Estimate a rough lower bound of the best accuracy on balanced pairs with this AUC (0.5 at 0.5, 1 at 1)."""
    return 0.5 + (auc - 0.5) * 0.75


# ---- generalisation: memorisation and identities --------------------------------------------------------------

# Train-minus-val_seen AUC above which held-out images of the training classes are no longer recognised.
# Healthy digit runs measured at most 0.035.
SEEN_GAP = 0.08
# val_seen loss over training loss above which the training pairs are fitted far better than held-out images of
# the same classes. Healthy digit runs measured 1.1-2.8 (40 or all images per class); five training images per
# class drove the training loss to 0 while the held-out loss stayed at 0.14-0.17, a ratio above 1000.
SEEN_LOSS_RATIO = 10.0
# With that loss ratio, the AUC gap that must come with it, so that a loss ratio alone (both losses near 0,
# held-out AUC at 1) is not blamed. Healthy runs measured a gap of at most 0.03; five images per class 0.03-0.06.
SEEN_GAP_WITH_LOSS = 0.02
# val_seen-minus-val_unseen AUC above which new identities are far worse than new images of known ones.
UNSEEN_GAP = 0.15
# Training classes below which an unseen gap is blamed on the identities with confidence. Digit runs on the
# course's 7 classes show an unseen gap of 0.2-0.35, and so do runs on 2 or 3 classes. The gap alone cannot tell
# them apart, so with 5 or more classes the finding stays below REPORT_CONFIDENCE.
FEW_IDENTITIES = 5


def check_memorization(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect training pairs fitted far better than new images of the same classes: memorised images.

    Two signs count: the AUC gap between training pairs and held-out images of the training classes, and the
    ratio of their losses, which stays large even when the held-out AUC is too close to 1 to show a gap.
    """
    if not run.has("train_auc", "val_seen_auc"):
        return None
    gap = run.last("train_auc") - run.last("val_seen_auc")
    ratio = _seen_loss_ratio(run)
    confidence = 0.0
    if not math.isnan(gap) and gap >= SEEN_GAP:
        confidence = ramp(gap, SEEN_GAP, 0.3, low=0.6, high=0.92)
    if ratio >= SEEN_LOSS_RATIO and not math.isnan(gap) and gap >= SEEN_GAP_WITH_LOSS:
        # A hinge loss reaches exactly 0 on training pairs easily, so the ratio says little about how much is
        # lost; the AUC gap grades it, and stays below a strong finding such as too few identities.
        confidence = max(confidence, ramp(gap, SEEN_GAP_WITH_LOSS, SEEN_GAP, low=0.55, high=0.75))
    if confidence == 0.0:
        return None
    return finding("memorization", confidence,
                   {"seen_gap": gap, "seen_loss_ratio": ratio, "train_auc": run.last("train_auc"),
                    "val_seen_auc": run.last("val_seen_auc"),
                    "train_images": float(run.config.get("train_images", math.nan))},
                   "The network recognises its training images but not new images of the same classes. Add "
                   "images per class or augmentation, shrink the network or stop earlier.")


def _seen_loss_ratio(run: RunSignals) -> float:
    """val_seen loss over training loss at the last epoch; NaN without both columns or for a negative loss."""
    if not run.has("train_loss", "val_seen_loss"):
        return math.nan
    train, held_out = run.last("train_loss"), run.last("val_seen_loss")
    if math.isnan(train) or math.isnan(held_out) or train < 0 or held_out <= 0:
        return math.nan
    # A training loss of exactly 0 (every pair beyond the margin) makes the ratio as large as it can be.
    return held_out / max(train, held_out * 1e-6)


# val_seen-minus-train AUC above which the training pairs are ranked worse than held-out pairs of the same
# classes. Training pairs take their labels from the training split, so wrong labels there, and only there, make
# the network look worse on data it was trained on. Healthy digit runs measured -0.03 to 0 (training never
# behind); 40% of training labels made wrong (20 images per class) gave 0.11 to 0.15.
NOISY_GAP = 0.05


def check_noisy_labels(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect training pairs ranked worse than held-out pairs of the same classes: wrong training labels."""
    if not run.has("train_auc", "val_seen_auc"):
        return None
    gap = run.last("val_seen_auc") - run.last("train_auc")
    if math.isnan(gap) or gap < NOISY_GAP:
        return None
    return finding("noisy_labels", ramp(gap, NOISY_GAP, 0.2, low=0.6, high=0.9),
                   {"val_seen_auc": run.last("val_seen_auc"), "train_auc": run.last("train_auc"),
                    "noisy_gap": gap},
                   "Held-out pairs rank better than the training pairs they should trail: some training labels are "
                   "probably wrong. Look at the training pairs the model ranks worst, fix or drop their labels, and "
                   "compare with a run on a cleaned subset.")


def check_too_few_identities(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect new classes ranked far worse than new images of known ones: too few identities to generalise."""
    if not run.has("train_auc", "val_seen_auc", "val_unseen_auc"):
        return None
    seen_gap = run.last("train_auc") - run.last("val_seen_auc")
    unseen_gap = run.last("val_seen_auc") - run.last("val_unseen_auc")
    if math.isnan(unseen_gap) or unseen_gap < UNSEEN_GAP or seen_gap >= SEEN_GAP:
        return None
    classes = float(run.config.get("train_classes", math.nan))
    if classes < FEW_IDENTITIES:
        confidence = ramp(unseen_gap, UNSEEN_GAP, 0.45, low=0.6, high=0.92)
    elif math.isnan(classes):
        confidence = ramp(unseen_gap, UNSEEN_GAP, 0.45, low=0.35, high=0.6)
    else:
        confidence = ramp(unseen_gap, UNSEEN_GAP, 0.45, low=0.3, high=0.45)
    return finding("too_few_identities", confidence,
                   {"unseen_gap": unseen_gap, "seen_gap": seen_gap, "val_unseen_auc": run.last("val_unseen_auc"),
                    "train_classes": classes},
                   "The embedding separates the training classes, new images included, but not new classes. Train "
                   "on more identities, and use augmentation or a smaller embedding so it learns general features.")


# ---- loss floors: unreachable margins, over-regularisation and mined losses -----------------------------------

# Training AUC above which the training pairs are separated; a contrastive loss still far above 0 then has a floor.
SEPARATED_AUC = 0.99
# Contrastive training loss, as a fraction of the collapse loss, that a separated run should have left behind.
# Healthy runs at training AUC >= 0.99 measured 0.01-0.15 of it; a distance squashed below margin 2, 0.33-0.45.
FLOOR_FRACTION = 0.25
# Final weight norm over the initial one below which a penalty is shrinking the network. Healthy runs grew by
# 1.02-1.25 times; an L2 penalty of 0.01 or Adam weight decay of 0.1 shrank it to 0.34-0.72.
WEIGHT_SHRINK = 0.75
# Tolerance of the mean embedding norm around 1 within which the embeddings count as L2-normalised.
UNIT_NORM_TOLERANCE = 1e-3
# Rise of a validation AUC over the run that a loss on all pairs would follow with a clear fall. Healthy digit runs
# whose val_seen AUC rose by 0.03-0.07 saw their loss fall by 0.3-0.5 of its first value.
AUC_RISE = 0.05
# Relative fall of that loss below which it counts as flat.
LOSS_FLAT = 0.1


def check_margin_unreachable(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect a loss whose targets the model cannot reach, which gives the loss a floor above 0."""
    declared = _declared_floor(run)
    if declared is not None:
        return declared
    # Batch-hard and other mined triplet losses hover near the margin while they learn, so only the contrastive
    # loss is read this way.
    if not run.has("train_auc") or run.loss != "contrastive":
        return None
    floor_share = run.last("train_loss") / collapse_loss(run.loss, run.margin)
    if run.last("train_auc") < SEPARATED_AUC or floor_share < FLOOR_FRACTION \
            or _spread(run, None) < COLLAPSE_SPREAD or _weight_shrink(run) <= WEIGHT_SHRINK:
        return None
    return finding("margin_unreachable", ramp(floor_share, FLOOR_FRACTION, 0.5, low=0.55, high=0.7),
                   {"train_loss": run.last("train_loss"), "loss_over_collapse_loss": floor_share,
                    "train_auc": run.last("train_auc"), "margin": run.margin},
                   "Training pairs are already separated but the loss stays far above 0: some term can never be "
                   "satisfied. Check that the margin is below the largest distance the model can output (2 for "
                   "unit-length embeddings) and that nothing squashes the distance before the loss.")


def check_regularization(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect weights that shrink during training: a penalty that outweighs the data term and drags distances down."""
    shrink = _weight_shrink(run)
    if math.isnan(shrink) or shrink > WEIGHT_SHRINK:
        return None
    return finding("regularization_too_strong", ramp(shrink, WEIGHT_SHRINK, 0.35, low=0.6, high=0.92),
                   {"weight_norm_ratio": shrink, "weight_norm_last": run.last("weight_norm"),
                    "weight_decay": float(run.config.get("weight_decay", 0.0)),
                    "val_unseen_emb_norm": run.last("val_unseen_emb_norm")},
                   "The weight norm keeps falling, so the penalty outweighs the data loss and pulls all distances "
                   "toward 0. Lower the weight decay or L2 penalty 100 to 1000 times (1e-5 to 1e-4 is typical).")


def check_mining_artifact(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect a validation AUC that rises while its loss stays flat: a loss averaged over a mined subset."""
    if "loss" in run.config and "loss_fn" not in run.config:
        # fit's own losses average over fixed pairs or triplets, which cannot show this artefact.
        return None
    if _spread(run, probe) < COLLAPSE_SPREAD:
        # Near-collapsed distances keep any distance loss flat whatever the ranking does.
        return None
    for split in ("val_unseen", "val_seen"):
        if not run.has(f"{split}_loss", f"{split}_auc"):
            continue
        losses, aucs = run.series(f"{split}_loss"), run.series(f"{split}_auc")
        if len(losses) < 3 or len(aucs) < 3:
            continue
        auc_rise = aucs[-1] - aucs[0]
        loss_drop = _relative_drop(losses)
        if auc_rise >= AUC_RISE and loss_drop <= LOSS_FLAT:
            return finding("mining_artifact", ramp(auc_rise, AUC_RISE, 0.15, low=0.55, high=0.75),
                           {f"{split}_auc_rise": auc_rise, f"{split}_loss_change": -loss_drop,
                            f"{split}_loss_last": losses[-1]},
                           "The validation AUC improves while the validation loss does not fall, so the loss "
                           "averages over a mined subset that shrinks and hardens as the model improves. Judge "
                           "by AUC or recall on fixed pairs, or report the loss over all triplets.")
    return None


def _declared_floor(run: RunSignals) -> Finding | None:
    """Return a finding when the loss settings (or unit-norm embeddings) make the margin or a target unreachable."""
    settings = run.settings
    if "output_range" in settings and "targets" in settings:
        low, high = (float(value) for value in settings["output_range"])
        outside = [float(t) for t in settings["targets"] if not low <= float(t) <= high]
        if outside:
            return finding("margin_unreachable", 0.96,
                           {"output_low": low, "output_high": high, "unreachable_target": outside[0],
                            "train_loss": run.last("train_loss")},
                           f"The score can only take values in [{low:g}, {high:g}] but is trained toward "
                           f"{outside[0]:g}, so the loss has a floor and the easiest way down collapses the "
                           "embedding. Use a learned score such as sigmoid(w * |e1 - e2| + b), or a distance loss.")
    max_distance = _max_distance(run)
    if max_distance is None or run.loss not in ("contrastive", "triplet") or run.margin <= max_distance:
        return None
    floor = margin_floor(run.loss, run.margin, max_distance)
    return finding("margin_unreachable", 0.93,
                   {"margin": run.margin, "max_distance": max_distance, "loss_floor": floor,
                    "train_loss": run.last("train_loss")},
                   f"No distance can exceed {max_distance:g}, so negative pairs never reach the margin "
                   f"{run.margin:g} and the loss cannot fall below {floor:.3g}. Use a margin below "
                   f"{max_distance:g}, or remove what bounds the distance.")


def _max_distance(run: RunSignals) -> float | None:
    if "max_distance" in run.settings:
        return float(run.settings["max_distance"])
    if run.settings.get("normalized"):
        return 2.0
    norm = run.last("val_unseen_emb_norm")
    # Unit-length embeddings are at most 2 apart.
    return 2.0 if abs(norm - 1.0) <= UNIT_NORM_TOLERANCE else None


def _weight_shrink(run: RunSignals) -> float:
    """Final weight norm over the initial one, or over the first epoch's when the history lacks the initial one."""
    first = float(run.config.get("initial_weight_norm") or run.first("weight_norm"))
    last = run.last("weight_norm")
    return last / first if first > 0 else math.nan


# ---- findings from the model and the data ---------------------------------------------------------------------

# Difference between training-mode and evaluation-mode AUC on the same pairs. Encoders without dropout or batch
# norm measured 0, and a gap of 0.1 means validation scores a different network from the one being trained.
MODE_GAP = 0.1
# Fraction of blank (constant) images from which they matter: 1% of a split is a few images per class.
BLANK_FRACTION = 0.01


def check_eval_mode(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect evaluation-mode scores that differ from training-mode ones: dropout or batch-norm statistics."""
    if probe is None or probe.eval_auc is None or probe.train_mode_auc is None:
        return None
    gap = probe.train_mode_auc - probe.eval_auc
    if abs(gap) < MODE_GAP:
        return None
    return finding("eval_mode_mismatch", ramp(abs(gap), MODE_GAP, 0.3, low=0.6, high=0.95),
                   {"eval_auc": probe.eval_auc, "train_mode_auc": probe.train_mode_auc, "mode_gap": gap},
                   "The network scores differently in evaluation mode than in training mode. Check that batch-norm "
                   "running statistics are updated during training (momentum above 0, model.train() while "
                   "training) and that dropout is not so strong that the two modes disagree.")


def check_leakage(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect validation images that also occur in the training split."""
    if probe is None:
        return None
    counts = {f"shared_ids_{name}": float(count) for name, count in probe.shared_ids.items() if count}
    counts.update({f"duplicate_images_{name}": float(count) for name, count in probe.duplicate_images.items()
                   if count})
    if not counts:
        return None
    return finding("leakage", 0.95, counts,
                   "Validation contains images that are also in training, so it measures recall of training "
                   "images. Split by image id (and by class for unseen identities) before building pairs, and "
                   "remove duplicates across splits.")


def check_blank_inputs(run: RunSignals, probe: Probe | None) -> Finding | None:
    """Detect constant images, which all share one embedding whatever their label."""
    if probe is None or probe.blank_fraction is None or probe.blank_fraction < BLANK_FRACTION:
        return None
    return finding("blank_inputs", ramp(probe.blank_fraction, BLANK_FRACTION, 0.2, low=0.6, high=0.97),
                   {"blank_fraction": probe.blank_fraction},
                   "Some inputs are constant images, which all get one embedding, so their pairs carry no signal. "
                   "Find the loading or normalisation step that blanks them, usually a failed file read.")


RULES: tuple[Rule, ...] = (
    check_collapse, check_dead_units, check_lr_too_high, check_lr_too_low, check_metric_shape,
    check_metric_threshold, check_label_convention, check_memorization, check_noisy_labels,
    check_too_few_identities, check_margin_unreachable, check_regularization, check_mining_artifact,
    check_eval_mode, check_leakage, check_blank_inputs,
)


def healthy_finding(run: RunSignals, findings: list[Finding]) -> Finding | None:
    """Return `healthy` when no finding reaches REPORT_CONFIDENCE, with 1 minus the strongest one as confidence."""
    strongest = max((f.confidence for f in findings), default=0.0)
    if strongest >= REPORT_CONFIDENCE:
        return None
    evidence = {name: run.last(name) for name in ("train_auc", "val_seen_auc", "val_unseen_auc") if run.has(name)}
    return finding("healthy", round(1.0 - strongest, 3), evidence,
                   "No known plateau signature: keep training, or compare against the baselines of notebook 02.")
