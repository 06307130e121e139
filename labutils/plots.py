"""Figures the notebooks show: learning curves, distance histograms, ROC curves, embeddings and sample pairs."""

from __future__ import annotations

from typing import Mapping, Sequence

import matplotlib.pyplot as plt
import numpy as np
import torch
from matplotlib.figure import Figure
from sklearn.decomposition import PCA
from sklearn.manifold import TSNE
from sklearn.metrics import roc_curve

from labutils.history import History


def learning_curves(histories: History | Mapping[str, History],
                    panels: Sequence[tuple[str, Sequence[str]]] = (
                        ("loss", ("train_loss", "val_unseen_loss")),
                        ("ROC AUC", ("train_auc", "val_seen_auc", "val_unseen_auc")),
                        ("accuracy", ("train_acc", "val_seen_acc", "val_unseen_acc")))) -> Figure:
    """Plot history columns over epochs, one panel per (title, columns); several runs share each panel."""
    runs = {"": histories} if isinstance(histories, History) else dict(histories)
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.2), squeeze=False)
    for ax, (title, columns) in zip(axes[0], panels):
        for run_name, history in runs.items():
            for column in columns:
                label = f"{run_name} {column}".strip()
                ax.plot(history["epoch"], history[column], marker="o", markersize=3, label=label)
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.legend(fontsize=7)
    fig.tight_layout()
    return fig


def distance_histograms(distances: torch.Tensor, same: torch.Tensor, threshold: float | None = None,
                        title: str = "", ax: plt.Axes | None = None) -> Figure:
    """Overlay the distance histograms of positive and negative pairs, with the decision threshold if given."""
    fig, ax = _figure(ax, (5, 3.2))
    d, s = _numpy(distances), _numpy(same)
    bins = np.linspace(0, max(float(d.max()), 1e-6), 40)
    ax.hist(d[s == 1], bins=bins, alpha=0.6, label="positive pairs (same)")
    ax.hist(d[s == 0], bins=bins, alpha=0.6, label="negative pairs (different)")
    if threshold is not None:
        ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.2f}")
    ax.set_xlabel("distance")
    ax.set_ylabel("pairs")
    ax.set_title(title)
    ax.legend(fontsize=7)
    return fig


def roc_plot(curves: Mapping[str, tuple[torch.Tensor, torch.Tensor]], ax: plt.Axes | None = None) -> Figure:
    """Plot ROC curves, one per name, from (distances, same) where a smaller distance means "same"."""
    fig, ax = _figure(ax, (4, 4))
    for name, (distances, same) in curves.items():
        fpr, tpr, _ = roc_curve(_numpy(same), -_numpy(distances))
        ax.plot(fpr, tpr, label=name)
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", label="chance")
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(fontsize=7)
    return fig


def embedding_projection(embeddings: torch.Tensor, labels: torch.Tensor, method: str = "pca",
                         title: str = "", seed: int = 0, ax: plt.Axes | None = None) -> Figure:
    """Scatter embeddings projected to 2-D with PCA or t-SNE, coloured by class."""
    if method not in ("pca", "tsne"):
        raise ValueError(f"Unknown projection method {method!r}: use 'pca' or 'tsne'.")
    fig, ax = _figure(ax, (4.5, 4))
    x, y = _numpy(embeddings), _numpy(labels)
    if method == "pca":
        points = PCA(n_components=2, random_state=seed).fit_transform(x)
    else:
        points = TSNE(n_components=2, random_state=seed, init="pca",
                      perplexity=min(30.0, max(2.0, (len(x) - 1) / 3))).fit_transform(x)
    scatter = ax.scatter(points[:, 0], points[:, 1], c=y, cmap="tab10", s=6)
    ax.legend(*scatter.legend_elements(), fontsize=6, title="class", loc="best")
    ax.set_title(title or method.upper())
    ax.set_xticks([])
    ax.set_yticks([])
    return fig


def show_pairs(images: torch.Tensor, left: torch.Tensor, right: torch.Tensor, same: torch.Tensor,
               num_pairs: int = 6) -> Figure:
    """Show the first `num_pairs` pairs side by side with their label (1 = same)."""
    fig, axes = plt.subplots(2, num_pairs, figsize=(1.4 * num_pairs, 3.2), squeeze=False)
    for column in range(num_pairs):
        for row, index in enumerate((left[column], right[column])):
            axes[row, column].imshow(_numpy(images[index, 0]), cmap="gray")
            axes[row, column].axis("off")
        axes[0, column].set_title(f"same={int(same[column])}", fontsize=8)
    fig.tight_layout()
    return fig


def show_samples(images: torch.Tensor, labels: torch.Tensor, per_class: int = 6) -> Figure:
    """Show `per_class` images of every class, one row per class."""
    classes = torch.unique(labels)
    fig, axes = plt.subplots(len(classes), per_class, figsize=(per_class * 0.9, len(classes) * 0.9),
                             squeeze=False)
    for row, label in enumerate(classes):
        indices = torch.nonzero(labels == label).squeeze(1)[:per_class]
        for column in range(per_class):
            ax = axes[row, column]
            ax.axis("off")
            if column < len(indices):
                ax.imshow(_numpy(images[indices[column], 0]), cmap="gray")
        axes[row, 0].set_title(str(int(label)), fontsize=7, loc="left")
    fig.tight_layout()
    return fig


def _figure(ax: plt.Axes | None, size: tuple[float, float]) -> tuple[Figure, plt.Axes]:
    if ax is not None:
        return ax.figure, ax
    fig, ax = plt.subplots(figsize=size)
    return fig, ax


def _numpy(values: torch.Tensor | np.ndarray) -> np.ndarray:
    if isinstance(values, torch.Tensor):
        return values.detach().cpu().numpy()
    return np.asarray(values)
