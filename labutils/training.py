"""Seeding, device choice and the training loop (`fit`) shared by every notebook (written out in notebook 02).

Data stay resident as tensors on the device and batches are index tensors, so no DataLoader sits between the
model and the data; this keeps small-image training fast on a CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable

import numpy as np
import torch
from torch import nn

from labutils.data import CourseData, Split
from labutils.history import History
from labutils.losses import contrastive_loss, contrastive_terms, pairwise_distance, triplet_loss
from labutils.metrics import accuracy_at_threshold, choose_threshold, roc_auc
from labutils.pairs import make_pairs, make_triplets

logger = logging.getLogger(__name__)

LOSSES = ("contrastive", "triplet")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")
EVAL_SPLITS = ("train", "val_seen", "val_unseen")


@dataclass(frozen=True)
class TrainConfig:
    """Settings of one training run. `pairs_per_epoch` counts triplets when `loss="triplet"`."""

    loss: str = "contrastive"
    margin: float = 1.0
    epochs: int = 10
    pairs_per_epoch: int = 2048
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adam"
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_pairs: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        _check_choice("loss", self.loss, LOSSES)
        _check_choice("optimizer", self.optimizer, OPTIMIZERS)
        if not self.margin > 0:
            raise ValueError(f"margin must be positive, got {self.margin}: a margin of 0 or less gives negative "
                             "pairs no reason to move apart. Try 1.0 for raw embeddings or 0.2 for normalised ones.")
        for name in ("epochs", "pairs_per_epoch", "batch_size", "eval_pairs"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}.")
        if not self.lr > 0:
            raise ValueError(f"lr must be positive, got {self.lr}.")
        if self.weight_decay < 0:
            raise ValueError(f"weight_decay must be 0 or more, got {self.weight_decay}.")


def seed_everything(seed: int) -> torch.Generator:
    """Seed Python, NumPy and PyTorch, and return a CPU generator seeded with `seed` for sampling."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    return torch.Generator().manual_seed(seed)


def pick_device(name: str = "auto") -> torch.device:
    """Return the device called `name`; `auto` picks CUDA, then Apple MPS, then the CPU, and logs why."""
    device, reason = _resolve_device(name)
    logger.info("Using device %s: %s", device, reason)
    return device


def describe_device(name: str = "auto") -> str:
    """Return a one-line description of the device `name` resolves to, and why it was chosen."""
    device, reason = _resolve_device(name)
    return f"{device} ({reason})"


def _resolve_device(name: str) -> tuple[torch.device, str]:
    _check_choice("device", name, DEVICES)
    cuda = torch.cuda.is_available()
    mps = hasattr(torch.backends, "mps") and torch.backends.mps.is_available()
    if name == "auto":
        if cuda:
            return torch.device("cuda"), f"auto: CUDA is available ({torch.cuda.get_device_name(0)})"
        if mps:
            return torch.device("mps"), "auto: no CUDA, Apple MPS is available"
        return torch.device("cpu"), "auto: neither CUDA nor Apple MPS is available"
    if name == "cuda" and not cuda:
        raise ValueError("DEVICE='cuda' was requested but CUDA is not available here: use DEVICE='auto' or 'cpu'.")
    if name == "mps" and not mps:
        raise ValueError("DEVICE='mps' was requested but Apple MPS is not available here: use DEVICE='auto' or "
                         "'cpu'.")
    return torch.device(name), "requested"


def make_optimizer(model: nn.Module, config: TrainConfig) -> torch.optim.Optimizer:
    """Build the optimizer named in `config`."""
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, lr=config.lr, momentum=config.momentum, weight_decay=config.weight_decay)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=config.lr, weight_decay=config.weight_decay)
    return torch.optim.Adam(params, lr=config.lr, weight_decay=config.weight_decay)


def fit(model: nn.Module, data: CourseData, config: TrainConfig, device: str | torch.device = "cpu",
        progress: bool = True, scheduler_fn: Callable[[torch.optim.Optimizer], object] | None = None) -> History:
    """Train `model` on `data.train` and evaluate it after every epoch; return the per-epoch history.

    Each epoch draws fresh balanced pairs (or triplets) from the training images. Evaluation uses fixed, seeded
    pairs for each split, so epochs are comparable. `val_*_acc` is accuracy at a distance threshold chosen on the
    fixed training pairs, never on the split it is reported for. Training stops early, with a warning recorded in
    the history, when the loss becomes NaN or infinite.
    """
    if config.batch_size > config.pairs_per_epoch:
        raise ValueError(f"batch_size={config.batch_size} is larger than pairs_per_epoch={config.pairs_per_epoch}: "
                         "lower batch_size or draw more pairs per epoch.")
    device = torch.device(device)
    generator = seed_everything(config.seed)
    # channels-last makes the CPU convolutions about twice as fast here (measured on a 2-core x86 CPU).
    model.to(device, memory_format=torch.channels_last)
    images = {split: getattr(data, split).images.to(device) for split in EVAL_SPLITS}
    eval_sets = {split: EvalSet.draw(getattr(data, split).labels, config, generator) for split in EVAL_SPLITS}
    optimizer = make_optimizer(model, config)
    scheduler = scheduler_fn(optimizer) if scheduler_fn else None
    history = History(config=asdict(config))

    epochs = _progress(range(1, config.epochs + 1), progress)
    for epoch in epochs:
        started = time.perf_counter()
        train_loss, failure = train_one_epoch(model, data.train, images["train"], config, optimizer, generator,
                                              epoch)
        row = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"]}
        row.update(evaluate(model, images, eval_sets, config))
        row["seconds"] = time.perf_counter() - started
        history.append(row)
        if failure is None and math.isnan(row["val_unseen_auc"]):
            failure = (f"Training stopped after epoch {epoch}: the embeddings became NaN or infinite. The learning "
                       f"rate (lr={config.lr}) is probably too high for this setup; try a value 3 to 10 times "
                       "smaller.")
        if failure:
            history.stopped = failure
            warnings.warn(failure, RuntimeWarning, stacklevel=2)
            break
        if scheduler is not None:
            _step_scheduler(scheduler, row)
        if hasattr(epochs, "set_postfix"):
            epochs.set_postfix(train_loss=f"{train_loss:.3f}", val_unseen_auc=f"{row['val_unseen_auc']:.3f}")
    return history


def train_one_epoch(model: nn.Module, split: Split, images: torch.Tensor, config: TrainConfig,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator,
                    epoch: int) -> tuple[float, str | None]:
    """Run one epoch of freshly drawn pairs or triplets; return the mean loss and a failure message or None."""
    model.train()
    batches = _draw_epoch(split.labels, config, generator)
    total, count = 0.0, 0
    for step, batch in enumerate(zip(*(b.split(config.batch_size) for b in batches)), start=1):
        loss = batch_loss(model, images, batch, config)
        if not torch.isfinite(loss):
            return _mean(total, count), (
                f"Training stopped at epoch {epoch}, step {step}: the loss became {loss.item()}. The learning rate "
                f"(lr={config.lr}) is probably too high for this setup; try a value 3 to 10 times smaller.")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * batch[0].numel()
        count += batch[0].numel()
    return _mean(total, count), None


def batch_loss(model: nn.Module, images: torch.Tensor, batch: tuple[torch.Tensor, ...],
               config: TrainConfig) -> torch.Tensor:
    """Return the loss of one batch of pair indices `(left, right, same)` or triplet indices `(a, p, n)`."""
    device = images.device
    if config.loss == "contrastive":
        left, right, same = batch
        # One forward pass over both sides keeps batch statistics shared and halves the Python overhead.
        embeddings = model(images[torch.cat([left, right]).to(device)])
        left_emb, right_emb = embeddings.chunk(2)
        return contrastive_loss(left_emb, right_emb, same.to(device), margin=config.margin)
    anchor, positive, negative = batch
    embeddings = model(images[torch.cat([anchor, positive, negative]).to(device)])
    return triplet_loss(*embeddings.chunk(3), margin=config.margin)


@torch.inference_mode()
def evaluate(model: nn.Module, images: dict[str, torch.Tensor], eval_sets: dict[str, EvalSet],
             config: TrainConfig) -> dict[str, float]:
    """Compute loss, ROC AUC, accuracy and mean pair distances on the fixed pairs of every split.

    The accuracy threshold is chosen on the training pairs and then applied unchanged to each split.
    """
    embeddings = {split: embed(model, images[split]) for split in EVAL_SPLITS}
    distances = {split: eval_sets[split].pair_distances(embeddings[split]).cpu() for split in EVAL_SPLITS}
    if not all(torch.isfinite(d).all() for d in distances.values()):
        # Diverged weights give NaN or infinite embeddings; record NaN so the history shows where it happened.
        return {"threshold": math.nan, **{f"{split}_{metric}": math.nan for split in EVAL_SPLITS
                                          for metric in ("loss", "auc", "acc", "pos_dist", "neg_dist")}}
    threshold = choose_threshold(distances["train"], eval_sets["train"].same)
    row: dict[str, float] = {"threshold": threshold}
    for split in EVAL_SPLITS:
        d, same = distances[split], eval_sets[split].same
        row[f"{split}_loss"] = eval_sets[split].loss(embeddings[split], d, config)
        row[f"{split}_auc"] = roc_auc(d, same)
        row[f"{split}_acc"] = accuracy_at_threshold(d, same, threshold)
        row[f"{split}_pos_dist"] = d[same == 1].mean().item()
        row[f"{split}_neg_dist"] = d[same == 0].mean().item()
    return row


@dataclass(frozen=True)
class EvalSet:
    """Fixed, seeded pairs (and triplets, for triplet training) of one split, drawn once per run."""

    left: torch.Tensor
    right: torch.Tensor
    same: torch.Tensor
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None

    @classmethod
    def draw(cls, labels: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> EvalSet:
        left, right, same = make_pairs(labels, config.eval_pairs, generator)
        triplets = make_triplets(labels, config.eval_pairs, generator) if config.loss == "triplet" else None
        return cls(left, right, same, triplets)

    def pair_distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        device = embeddings.device
        return pairwise_distance(embeddings[self.left.to(device)], embeddings[self.right.to(device)])

    def loss(self, embeddings: torch.Tensor, distances: torch.Tensor, config: TrainConfig) -> float:
        """The training loss evaluated on these fixed pairs or triplets."""
        if self.triplets is None:
            return contrastive_terms(distances, self.same, config.margin).mean().item()
        anchor, positive, negative = (idx.to(embeddings.device) for idx in self.triplets)
        return triplet_loss(embeddings[anchor], embeddings[positive], embeddings[negative],
                            margin=config.margin).item()


def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Embed `images` (N, 1, 28, 28) in evaluation mode, in batches; return (N, D) on the images' device."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in images.split(batch_size)])


def _draw_epoch(labels: torch.Tensor, config: TrainConfig,
                generator: torch.Generator) -> tuple[torch.Tensor, ...]:
    if config.loss == "contrastive":
        return make_pairs(labels, config.pairs_per_epoch, generator)
    return make_triplets(labels, config.pairs_per_epoch, generator)


def _step_scheduler(scheduler: object, row: dict[str, float]) -> None:
    if isinstance(scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        scheduler.step(row["val_seen_loss"])
    else:
        scheduler.step()


def _progress(iterable: range, enabled: bool) -> range:
    if not enabled:
        return iterable
    from tqdm.auto import tqdm

    return tqdm(iterable, desc="epochs", leave=False)


def _mean(total: float, count: int) -> float:
    return total / count if count else math.nan


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}: use one of {', '.join(allowed)}.")
