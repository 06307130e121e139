"""Seeding, device choice and the training loop (`fit`) shared by every notebook (written out in notebook 02).

Data stay resident as tensors on the device and batches are index tensors, so no DataLoader sits between the
model and the data. An image that occurs several times in a batch is embedded once when the model allows it
(`embeds_each_image_alone`) and that at least halves the encoder's work. Both keep small-image training fast
on a CPU.
"""

from __future__ import annotations

import logging
import math
import random
import time
import warnings
from dataclasses import asdict, dataclass
from typing import Callable, NamedTuple

import numpy as np
import torch
from torch import nn

from labutils.augment import Augmentation, augment
from labutils.data import CourseData, Split
from labutils.diagnostics import ReluActivity, embedding_spread, gradient_norm_tensor, update_ratio, weight_norm
from labutils.history import History
from labutils.losses import contrastive_loss, contrastive_terms, pairwise_distance, triplet_loss
from labutils.metrics import accuracy_at_threshold, choose_threshold, roc_auc
from labutils.models import Encoder
from labutils.pairs import make_pairs, make_triplets

logger = logging.getLogger(__name__)

LOSSES = ("contrastive", "triplet")
OPTIMIZERS = ("adam", "adamw", "sgd")
DEVICES = ("auto", "cpu", "cuda", "mps")
EVAL_SPLITS = ("train", "val_seen", "val_unseen")
# Columns `evaluate` adds besides the per-split metrics, measured on the val_unseen images in evaluation mode.
DIAGNOSTIC_COLUMNS = ("val_unseen_emb_std", "val_unseen_emb_norm", "dead_units", "dead_units_layer_max")

# A replacement training loss: (embeddings (N, D), class labels (N,)) -> 0-d loss. For a batch of B pairs the
# rows are [left; right] (N = 2B), and for B triplets they are [anchor; positive; negative] (N = 3B).
LossFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A replacement accuracy: (distances (P,), same (P,), threshold chosen on the training pairs) -> accuracy.
AccuracyFn = Callable[[torch.Tensor, torch.Tensor, float], float]


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
    augment: float = 0.0  # strength of the batched training augmentation (labutils.augment); 0 turns it off

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
        if self.augment < 0:
            raise ValueError(f"augment must be 0 or more, got {self.augment}: 0 turns augmentation off, 1 is the "
                             "default strength.")


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
    """Build the optimizer named in `config`, with PyTorch's multi-tensor ("foreach") update.

    On the CPU the default update goes through the weights one tensor at a time. The multi-tensor update gives
    the same weights, bit for bit, and is faster: an Adam step on the classic encoder's 3.3 M weights took about
    4 ms instead of 12 ms on a 2-core CPU. PyTorch's fused update took about 1 ms but rounds differently. That
    flips a claim that sits on the edge of divergence (notebook 05's range test), so the course keeps the
    default rounding.
    """
    settings: dict[str, float] = {"lr": config.lr, "weight_decay": config.weight_decay}
    params = model.parameters()
    if config.optimizer == "sgd":
        return torch.optim.SGD(params, **settings, momentum=config.momentum, foreach=True)
    if config.optimizer == "adamw":
        return torch.optim.AdamW(params, **settings, foreach=True)
    return torch.optim.Adam(params, **settings, foreach=True)


def fit(model: nn.Module, data: CourseData, config: TrainConfig, device: str | torch.device = "cpu",
        progress: bool = True, scheduler_fn: Callable[[torch.optim.Optimizer], object] | None = None,
        loss_fn: LossFn | None = None, accuracy_fn: AccuracyFn | None = None) -> History:
    """Train `model` on `data.train` and evaluate it after every epoch; return the per-epoch history.

    Each epoch draws fresh balanced pairs (or triplets) from the training images. Evaluation uses fixed, seeded
    pairs for each split, so epochs are comparable. `val_*_acc` is accuracy at a distance threshold chosen on the
    fixed training pairs, never on the split it is reported for. Training stops early, with a warning recorded in
    the history, when the loss becomes NaN or infinite.

    Besides the metrics, each row records what `labutils.diagnose` reads. These are the spread of the
    val_unseen embeddings and the fraction of dead ReLU units on those images, the mean gradient norm of the
    epoch, the update-to-weight ratio of its last step and the weight norm after it. `history.config` contains
    the settings plus the number of training and unseen classes, the number of training images and the weight
    norm before training. `loss_fn` replaces the configured loss in training and in the validation loss, and
    `accuracy_fn` replaces `accuracy_at_threshold`. Both exist to reproduce a learner's own (possibly broken)
    code, and their names are recorded in `history.config`.
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
    history = History(config={**asdict(config), **_describe_run(data, loss_fn, accuracy_fn),
                              "initial_weight_norm": weight_norm(model.parameters())})

    epochs = _progress(range(1, config.epochs + 1), progress)
    for epoch in epochs:
        started = time.perf_counter()
        result = train_one_epoch(model, data.train, images["train"], config, optimizer, generator, epoch, loss_fn)
        train_loss, failure = result.loss, result.failure
        row = {"epoch": epoch, "train_loss": train_loss, "lr": optimizer.param_groups[0]["lr"],
               "grad_norm": result.grad_norm, "update_ratio": result.update_ratio,
               "weight_norm": weight_norm(model.parameters())}
        row.update(evaluate(model, images, eval_sets, config, loss_fn, accuracy_fn))
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


class EpochResult(NamedTuple):
    """Measurements of one training epoch: mean loss, failure message or None, mean gradient norm, last update ratio."""

    loss: float
    failure: str | None
    grad_norm: float
    update_ratio: float


def train_one_epoch(model: nn.Module, split: Split, images: torch.Tensor, config: TrainConfig,
                    optimizer: torch.optim.Optimizer, generator: torch.Generator, epoch: int,
                    loss_fn: LossFn | None = None) -> EpochResult:
    """Run one epoch of freshly drawn pairs or triplets and measure its loss, gradients and last update."""
    model.train()
    batches = _draw_epoch(split.labels, config, generator)
    parameters = [p for p in model.parameters() if p.requires_grad]
    num_steps = math.ceil(batches[0].numel() / config.batch_size)
    # Losses and gradient norms stay on the device until the epoch ends, so a GPU need not wait for the host.
    losses: list[torch.Tensor] = []
    sizes: list[int] = []
    grad_norms: list[torch.Tensor] = []
    ratio = math.nan
    transform = _augmenter(config, generator)
    for step, batch in enumerate(zip(*(b.split(config.batch_size) for b in batches)), start=1):
        loss = batch_loss(model, images, batch, config, loss_fn, split.labels, transform)
        # The loop's one read-back per step: a non-finite loss must stop training before it reaches the weights.
        if not torch.isfinite(loss):
            return EpochResult(_batch_mean(losses, sizes), (
                f"Training stopped at epoch {epoch}, step {step}: the loss became {loss.item()}. The learning rate "
                f"(lr={config.lr}) is probably too high for this setup; try a value 3 to 10 times smaller."),
                _tensor_mean(grad_norms), ratio)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        grad_norms.append(gradient_norm_tensor(parameters))
        # Copying the weights only before the epoch's last step keeps the cost to one copy per epoch.
        before = [p.detach().clone() for p in parameters] if step == num_steps else None
        optimizer.step()
        if before is not None:
            ratio = update_ratio(before, parameters)
        losses.append(loss.detach())
        sizes.append(batch[0].numel())
    return EpochResult(_batch_mean(losses, sizes), None, _tensor_mean(grad_norms), ratio)


def batch_loss(model: nn.Module, images: torch.Tensor, batch: tuple[torch.Tensor, ...], config: TrainConfig,
               loss_fn: LossFn | None = None, labels: torch.Tensor | None = None,
               transform: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Return the loss of one batch of pair indices `(left, right, same)` or triplet indices `(a, p, n)`.

    With `loss_fn`, the embeddings of the batch's images and their class `labels` (indexed like `images`) go to
    it instead, laid out as `LossFn` describes. `transform`, when given, augments the batch's images first.
    Without one, when `embeds_each_image_alone(model)` and at most half of the rows are distinct images, each
    distinct image is embedded once.
    """
    device = images.device
    rows = torch.cat(batch[:2] if config.loss == "contrastive" else batch).to(device)
    # One forward pass for the whole batch keeps the Python overhead low.
    if transform is None and embeds_each_image_alone(model):
        embeddings = _embed_distinct(model, images, rows)
    else:
        embeddings = model(images[rows] if transform is None else transform(images[rows]))
    if loss_fn is not None:
        if labels is None:
            raise ValueError("batch_loss got a loss_fn but no labels: pass the class labels of `images`.")
        return loss_fn(embeddings, labels.to(device)[rows])
    if config.loss == "contrastive":
        left_emb, right_emb = embeddings.chunk(2)
        return contrastive_loss(left_emb, right_emb, batch[2].to(device), margin=config.margin)
    return triplet_loss(*embeddings.chunk(3), margin=config.margin)


# Modules whose output for one image does not depend on the other images of the batch. BatchNorm is not among
# them: in training mode it normalises with the statistics of the whole batch, duplicates included.
_PER_IMAGE_LAYERS = (Encoder, nn.Sequential, nn.Conv2d, nn.Linear, nn.Flatten, nn.Identity, nn.MaxPool2d, nn.AvgPool2d,
                     nn.AdaptiveAvgPool2d, nn.ReLU, nn.LeakyReLU, nn.ELU, nn.GELU, nn.Tanh, nn.Sigmoid,
                     nn.LayerNorm, nn.GroupNorm)


def embeds_each_image_alone(model: nn.Module) -> bool:
    """Return True when `model` maps each image of a batch on its own and without randomness.

    Then an image that occurs several times in a batch needs its embedding only once. This is true of the
    course's `Encoder` without dropout (or in evaluation mode). Any layer not known to be per-image, such as
    BatchNorm or a custom module, gives False.
    """
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            if module.p > 0 and module.training:
                return False
        elif not isinstance(module, _PER_IMAGE_LAYERS):
            return False
    return True


def _embed_distinct(model: nn.Module, images: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """Embed `images[rows]`, running the model once per distinct image when that at least halves the work.

    In the few-images setting of the lever notebooks, 256 rows contain about 35 distinct images, so this cuts the
    encoder's work about sevenfold. The gradient is the same sum over rows. The rows are gathered with a one-hot
    matrix product because the backward pass of an index gather adds duplicate rows in a thread-dependent order,
    which would make two identical runs drift apart.
    """
    distinct, slots = torch.unique(rows, return_inverse=True)
    if 2 * distinct.numel() > rows.numel():
        return model(images[rows])
    embeddings = model(images[distinct])
    one_hot = nn.functional.one_hot(slots, distinct.numel()).to(embeddings.dtype)
    return one_hot @ embeddings


def _augmenter(config: TrainConfig, generator: torch.Generator) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """Return the training augmentation of `config`, drawing from `generator`, or None when it is off."""
    if config.augment == 0:
        return None
    settings = Augmentation.at_strength(config.augment)
    return lambda batch: augment(batch, settings, generator)


@torch.inference_mode()
def evaluate(model: nn.Module, images: dict[str, torch.Tensor], eval_sets: dict[str, EvalSet],
             config: TrainConfig, loss_fn: LossFn | None = None,
             accuracy_fn: AccuracyFn | None = None) -> dict[str, float]:
    """Compute loss, ROC AUC, accuracy and mean pair distances on the fixed pairs of every split.

    The accuracy threshold is chosen on the training pairs and then applied unchanged to each split. The
    val_unseen images also give the `DIAGNOSTIC_COLUMNS`: embedding spread and dead ReLU units.
    """
    embeddings = {split: embed(model, images[split]) for split in EVAL_SPLITS[:2]}
    with ReluActivity(model) as activity:
        embeddings["val_unseen"] = embed(model, images["val_unseen"])
    distances = {split: eval_sets[split].pair_distances(embeddings[split]).cpu() for split in EVAL_SPLITS}
    if not all(torch.isfinite(d).all() for d in distances.values()):
        # Diverged weights give NaN or infinite embeddings; record NaN so the history shows where it happened.
        return {"threshold": math.nan, **{f"{split}_{metric}": math.nan for split in EVAL_SPLITS
                                          for metric in ("loss", "auc", "acc", "pos_dist", "neg_dist")},
                **{column: math.nan for column in DIAGNOSTIC_COLUMNS}}
    threshold = choose_threshold(distances["train"], eval_sets["train"].same)
    accuracy = accuracy_fn or accuracy_at_threshold
    row: dict[str, float] = {"threshold": threshold}
    for split in EVAL_SPLITS:
        d, same = distances[split], eval_sets[split].same
        row[f"{split}_loss"] = eval_sets[split].loss(embeddings[split], d, config, loss_fn)
        row[f"{split}_auc"] = roc_auc(d, same)
        row[f"{split}_acc"] = float(accuracy(d, same, threshold))
        row[f"{split}_pos_dist"] = d[same == 1].mean().item()
        row[f"{split}_neg_dist"] = d[same == 0].mean().item()
    spread = embedding_spread(embeddings["val_unseen"])
    dead = activity.dead_units()
    row.update({"val_unseen_emb_std": spread.std, "val_unseen_emb_norm": spread.norm,
                "dead_units": dead.fraction, "dead_units_layer_max": dead.worst_layer_fraction})
    return row


@dataclass(frozen=True)
class EvalSet:
    """Fixed, seeded pairs (and triplets, for triplet training) of one split, drawn once per run."""

    left: torch.Tensor
    right: torch.Tensor
    same: torch.Tensor
    triplets: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None
    labels: torch.Tensor | None = None  # (N,) class labels of the split, which a custom loss_fn receives

    @classmethod
    def draw(cls, labels: torch.Tensor, config: TrainConfig, generator: torch.Generator) -> EvalSet:
        left, right, same = make_pairs(labels, config.eval_pairs, generator)
        triplets = make_triplets(labels, config.eval_pairs, generator) if config.loss == "triplet" else None
        return cls(left, right, same, triplets, labels)

    def pair_distances(self, embeddings: torch.Tensor) -> torch.Tensor:
        device = embeddings.device
        return pairwise_distance(embeddings[self.left.to(device)], embeddings[self.right.to(device)])

    def loss(self, embeddings: torch.Tensor, distances: torch.Tensor, config: TrainConfig,
             loss_fn: LossFn | None = None) -> float:
        """Compute the training loss on these fixed pairs or triplets."""
        if loss_fn is not None and self.labels is not None:
            return self._custom_loss(embeddings, config.batch_size, loss_fn)
        if self.triplets is None:
            return contrastive_terms(distances, self.same, config.margin).mean().item()
        anchor, positive, negative = (idx.to(embeddings.device) for idx in self.triplets)
        return triplet_loss(embeddings[anchor], embeddings[positive], embeddings[negative],
                            margin=config.margin).item()

    def _custom_loss(self, embeddings: torch.Tensor, batch_size: int, loss_fn: LossFn) -> float:
        """Average `loss_fn` over batches of `batch_size` pairs or triplets, as batched in training.

        A loss that mines within its batch, or builds (N, N, N) tables, would behave differently on one large batch.
        """
        groups = (self.left, self.right) if self.triplets is None else self.triplets
        total, count = 0.0, 0
        for batch in zip(*(group.split(batch_size) for group in groups)):
            rows = torch.cat(batch).to(embeddings.device)
            total += loss_fn(embeddings[rows], self.labels.to(embeddings.device)[rows]).item() * batch[0].numel()
            count += batch[0].numel()
        return _mean(total, count)


def embed(model: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Embed `images` (N, 1, 28, 28) in evaluation mode, in batches; return (N, D) on the images' device."""
    model.eval()
    with torch.inference_mode():
        return torch.cat([model(chunk) for chunk in images.split(batch_size)])


def _describe_run(data: CourseData, loss_fn: LossFn | None, accuracy_fn: AccuracyFn | None) -> dict[str, object]:
    """Return the data sizes, and the names of any replaced loss or accuracy, to add to history.config."""
    described: dict[str, object] = {"train_classes": len(data.train.classes), "train_images": len(data.train),
                                    "val_unseen_classes": len(data.val_unseen.classes)}
    for key, function in (("loss_fn", loss_fn), ("accuracy_fn", accuracy_fn)):
        if function is not None:
            described[key] = getattr(function, "__name__", type(function).__name__)
    return described


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


def _batch_mean(losses: list[torch.Tensor], sizes: list[int]) -> float:
    """Return the mean loss per row of batches of `sizes` rows, adding in float64 on the host in batch order."""
    total = 0.0
    for loss, size in zip(losses, sizes):
        total += loss.item() * size
    return _mean(total, sum(sizes))


def _tensor_mean(values: list[torch.Tensor]) -> float:
    return _mean(sum(value.item() for value in values), len(values))


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"Unknown {name} {value!r}: use one of {', '.join(allowed)}.")
