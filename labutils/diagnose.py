"""The plateau doctor: name the likely cause of a flat validation curve from a run's history (notebook 03).

`diagnose` reads the per-epoch history that `fit` writes (or a learner's own history in the same form) and,
when given, the trained model, validation images and the loss settings. Each rule in `labutils.plateau_rules`
looks for the signature of one cause and returns a `Finding` with the numbers it measured. The findings come back
ranked by confidence, with `healthy` when no rule is confident.

    findings = diagnose(history, model=encoder, inputs=course, loss_settings={"margin": 1.0})
    print(format_report(findings))

From the shell: `python -m labutils diagnose history.json --figure evidence.png`.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import torch
from matplotlib.figure import Figure
from torch import nn

from labutils.data import CourseData
from labutils.diagnostics import (ReluActivity, accuracy_vs_auc, blank_fraction, duplicate_images,
                                  embedding_spread, mode_mismatch, pair_distance_stats, split_overlap)
from labutils.history import History
from labutils.losses import pairwise_distance
from labutils.pairs import make_pairs
from labutils.plateau_rules import CAUSES, NOTEBOOKS, RULES, Finding, Probe, RunSignals, healthy_finding
from labutils.training import embed

__all__ = ["CAUSES", "NOTEBOOKS", "Finding", "diagnose", "format_report", "load_history", "plot_evidence"]

# Columns every history needs before any rule can read it.
REQUIRED_COLUMNS = ("epoch", "train_loss")
# The figure shows at most this many findings, most confident first, so that it stays readable.
MAX_PLOTTED_FINDINGS = 4
# Pairs drawn from the validation inputs when a model is probed: AUC to within about 0.02.
PROBE_PAIRS = 1000


def diagnose(history: History | Mapping[str, Any] | str | os.PathLike[str], model: nn.Module | None = None,
             inputs: torch.Tensor | CourseData | None = None, labels: torch.Tensor | None = None,
             loss_settings: Mapping[str, Any] | None = None) -> list[Finding]:
    """Name the likely causes of a flat validation curve, most confident first.

    history: a History, its `to_dict()` form, or the path of a JSON file written by `History.save`.
    model: the trained network. With `inputs` it adds embedding spread, dead ReLU units and the gap between
        evaluation-mode and training-mode scores.
    inputs: validation images (N, 1, 28, 28) with their `labels` (N,), or a CourseData, whose val_unseen split
        is used and whose splits are also checked for shared images.
    loss_settings: what the history cannot show, for example {"margin": 2.0, "max_distance": 1.0} for a
        distance squashed into (0, 1), {"normalized": True}, or {"output_range": (0.5, 1.0), "targets":
        (0.0, 1.0)} for a score trained toward targets it may not reach.

    Returns every finding whose rule fired, plus `healthy` when none reaches `REPORT_CONFIDENCE` (0.5).
    """
    run = RunSignals(load_history(history), dict(loss_settings or {}))
    probe = _probe(model, inputs, labels, _last_threshold(run.history))
    findings = [finding for rule in RULES if (finding := rule(run, probe)) is not None]
    healthy = healthy_finding(run, findings)
    if healthy is not None:
        findings.append(healthy)
    return sorted(findings, key=lambda finding: finding.confidence, reverse=True)


def load_history(source: History | Mapping[str, Any] | str | os.PathLike[str]) -> History:
    """Return `source` as a History, reading a JSON file when given a path. Raise ValueError if it is not one."""
    if isinstance(source, History):
        history = source
    elif isinstance(source, Mapping):
        history = _history_from_dict(source, "the history dict")
    elif isinstance(source, (str, os.PathLike)):
        history = _read_history_file(Path(source))
    else:
        raise TypeError(f"history must be a History, a dict or a path, got {type(source).__name__}.")
    _check_columns(history)
    return history


def format_report(findings: list[Finding]) -> str:
    """Render findings as a short text report: one block per finding with its evidence, fix and notebook."""
    lines = [f"Plateau doctor: {len(findings)} finding{'s' if len(findings) != 1 else ''}, most likely first."]
    for rank, finding in enumerate(findings, start=1):
        lines.append("")
        lines.append(f"{rank}. {finding.cause} (confidence {finding.confidence:.2f}), see notebook {finding.notebook}")
        evidence = ", ".join(f"{name} = {_format_number(value)}" for name, value in finding.evidence.items())
        lines.append(f"   evidence: {evidence}")
        lines.append(f"   fix: {finding.fix}")
    return "\n".join(lines)


def plot_evidence(history: History | Mapping[str, Any] | str | os.PathLike[str],
                  findings: list[Finding]) -> Figure:
    """Plot the history columns behind each finding: one panel per finding, after a panel of the losses."""
    history = load_history(history)
    shown = [finding for finding in findings if finding.cause != "healthy"][:MAX_PLOTTED_FINDINGS]
    panels = [("loss", ("train_loss", "val_seen_loss", "val_unseen_loss"), None)]
    panels += [(f"{finding.cause} ({finding.confidence:.2f})", EVIDENCE_COLUMNS.get(finding.cause, ()),
                finding) for finding in shown]
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, columns, finding) in zip(axes[0], panels):
        _plot_panel(ax, history, title, columns, finding)
    fig.tight_layout()
    return fig


# History columns that show each cause. Causes found from the model or the data alone have none.
EVIDENCE_COLUMNS: dict[str, tuple[str, ...]] = {
    "collapse": ("val_unseen_pos_dist", "val_unseen_neg_dist", "val_unseen_emb_norm"),
    "dead_units": ("dead_units", "dead_units_layer_max"),
    "lr_too_high": ("weight_norm",),
    "lr_too_low": ("update_ratio",),
    "label_convention": ("train_auc", "val_seen_auc", "val_unseen_auc"),
    "metric_threshold": ("val_unseen_acc", "val_unseen_auc", "train_acc", "train_auc"),
    "metric_shape": ("val_unseen_acc", "val_unseen_auc", "train_acc", "train_auc"),
    "memorization": ("train_auc", "val_seen_auc", "val_seen_loss"),
    "too_few_identities": ("train_auc", "val_seen_auc", "val_unseen_auc"),
    "margin_unreachable": ("train_loss", "train_auc"),
    "regularization_too_strong": ("weight_norm", "val_unseen_emb_norm"),
    "mining_artifact": ("val_unseen_loss", "val_unseen_auc"),
}
# Columns drawn on a log scale, because their healthy and broken values differ by orders of magnitude.
LOG_SCALE_COLUMNS = frozenset({"update_ratio", "grad_norm"})


def _plot_panel(ax: plt.Axes, history: History, title: str, columns: tuple[str, ...],
                finding: Finding | None) -> None:
    present = [column for column in columns if history.rows and column in history.rows[0]]
    for column in present:
        ax.plot(history["epoch"], history[column], marker="o", markersize=3, label=column)
    if present and all(column in LOG_SCALE_COLUMNS for column in present):
        ax.set_yscale("log")
    for value, label in _reference_lines(history, finding) if present else ():
        ax.axhline(value, color="black", linestyle="--", linewidth=1, label=label)
    if not present and finding is not None:
        text = "\n".join(f"{name} = {_format_number(value)}" for name, value in finding.evidence.items())
        ax.text(0.02, 0.98, text, transform=ax.transAxes, va="top", fontsize=7, family="monospace")
        ax.set_axis_off()
    ax.set_title(title, fontsize=9)
    ax.set_xlabel("epoch")
    if present:
        ax.legend(fontsize=7)


def _reference_lines(history: History, finding: Finding | None) -> list[tuple[float, str]]:
    """Return the (value, label) lines that put a panel's curves in context, such as the weights before training."""
    if finding is None:
        return []
    initial = history.config.get("initial_weight_norm")
    if finding.cause in ("lr_too_high", "regularization_too_strong") and initial:
        return [(float(initial), "weight_norm before training")]
    if finding.cause == "margin_unreachable" and "loss_floor" in finding.evidence:
        return [(float(finding.evidence["loss_floor"]), "loss floor")]
    return []


def probe_model(model: nn.Module | None, inputs: torch.Tensor | None, labels: torch.Tensor | None = None,
                course: CourseData | None = None, threshold: float | None = None) -> Probe:
    """Measure what a history cannot show: embeddings, ReLU units, mode gap, blank images and shared images.

    inputs are (N, 1, 28, 28) validation images and labels (N,) their classes. course gives the splits to check
    for shared images. threshold is the distance threshold the run used, whose accuracy is compared with the best
    one.
    """
    values: dict[str, Any] = {}
    if inputs is not None:
        values["blank_fraction"] = blank_fraction(inputs)
    if model is not None and inputs is not None:
        values.update(_probe_embeddings(model, inputs, labels, threshold))
    if course is not None:
        values.update(_probe_splits(course))
    return Probe(**values)


def _probe(model: nn.Module | None, inputs: torch.Tensor | CourseData | None, labels: torch.Tensor | None,
           threshold: float | None) -> Probe | None:
    if model is None and inputs is None:
        return None
    if isinstance(inputs, CourseData):
        if labels is not None:
            raise ValueError("labels must be None when inputs is a CourseData: its val_unseen labels are used.")
        return probe_model(model, inputs.val_unseen.images, inputs.val_unseen.labels, inputs, threshold)
    if inputs is not None and labels is not None and len(labels) != len(inputs):
        raise ValueError(f"inputs has {len(inputs)} images but labels has {len(labels)}: pass one label per "
                         "image.")
    return probe_model(model, inputs, labels, None, threshold)


def _probe_embeddings(model: nn.Module, inputs: torch.Tensor, labels: torch.Tensor | None,
                      threshold: float | None) -> dict[str, Any]:
    device = next(model.parameters()).device
    with ReluActivity(model) as activity:
        embeddings = embed(model, inputs.to(device)).cpu()
    spread, dead = embedding_spread(embeddings), activity.dead_units()
    values: dict[str, Any] = {"emb_std": spread.std, "emb_norm": spread.norm, "dead_units": dead.fraction,
                              "dead_units_layer_max": dead.worst_layer_fraction}
    if labels is None or torch.unique(labels).numel() < 2 or not torch.isfinite(embeddings).all():
        return values
    left, right, same = make_pairs(labels.cpu(), PROBE_PAIRS, torch.Generator().manual_seed(0))
    distances = pairwise_distance(embeddings[left], embeddings[right])
    stats = pair_distance_stats(distances, same)
    mean_distance = (stats["pos_mean"] + stats["neg_mean"]) / 2
    values["pair_spread"] = mean_distance / spread.norm if spread.norm > 1e-8 else 0.0
    scores = accuracy_vs_auc(distances, same, threshold if threshold is not None else math.inf)
    values["auc"] = scores["auc"]
    if threshold is not None:
        values.update(accuracy=scores["accuracy"], best_accuracy=scores["best_accuracy"])
    mismatch = mode_mismatch(model, inputs, labels, PROBE_PAIRS)
    values.update(eval_auc=mismatch["eval_auc"], train_mode_auc=mismatch["train_mode_auc"])
    return values


def _probe_splits(course: CourseData) -> dict[str, Any]:
    shared, duplicates = {}, {}
    for name in ("val_seen", "val_unseen"):
        split = getattr(course, name)
        if course.train.indices is not None and split.indices is not None:
            shared[name] = split_overlap(course.train.indices, split.indices)
        duplicates[name] = duplicate_images(split.images, course.train.images)
    return {"shared_ids": shared, "duplicate_images": duplicates}


def _read_history_file(path: Path) -> History:
    try:
        text = path.read_text()
    except FileNotFoundError:
        raise ValueError(f"History file {str(path)!r} not found: pass the path of a file written by "
                         "History.save.") from None
    except (IsADirectoryError, UnicodeDecodeError) as error:
        raise ValueError(f"{str(path)!r} could not be read as a history file ({error}): pass a JSON file "
                         "written by History.save.") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}): pass a "
                         "history file written by History.save.") from None
    if not isinstance(data, dict):
        raise ValueError(f"{str(path)!r} contains a JSON {type(data).__name__}, not a history: expected an object "
                         'with "config" and "rows", as History.save writes.')
    return _history_from_dict(data, repr(str(path)))


def _history_from_dict(data: Mapping[str, Any], source: str) -> History:
    rows = data.get("rows")
    if not isinstance(rows, list) or not rows or not all(isinstance(row, dict) for row in rows):
        raise ValueError(f"{source} is not a history: expected a non-empty list of per-epoch objects under "
                         '"rows", as History.save writes.')
    config = data.get("config") or {}
    if not isinstance(config, dict):
        raise ValueError(f"{source} is not a history: \"config\" must be an object, got "
                         f"{type(config).__name__}.")
    clean_rows = [{key: _number(value, key, source) for key, value in row.items()} for row in rows]
    return History(config=dict(config), rows=clean_rows, stopped=data.get("stopped"))


def _number(value: Any, key: str, source: str) -> float:
    if value is None:
        return math.nan
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{source} is not a history: column {key!r} contains {value!r}, but every value in a "
                         "row must be a number or null.")
    return value


def _check_columns(history: History) -> None:
    if not history.rows:
        raise ValueError("The history has no epochs: train for at least one epoch before diagnosing.")
    missing = [column for column in REQUIRED_COLUMNS if column not in history.rows[0]]
    if missing:
        raise ValueError(f"The history has no column {', '.join(missing)}: its columns are "
                         f"{', '.join(history.rows[0])}. Pass a history written by fit or with the same columns.")


def _last_threshold(history: History) -> float | None:
    if "threshold" not in history.rows[-1]:
        return None
    value = history.rows[-1]["threshold"]
    return float(value) if isinstance(value, (int, float)) and math.isfinite(value) else None


def _format_number(value: float) -> str:
    if isinstance(value, float) and (value == 0 or 1e-3 <= abs(value) < 1e4):
        return f"{value:.4g}"
    if isinstance(value, float):
        return f"{value:.2e}"
    return str(value)
