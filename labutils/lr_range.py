"""The learning-rate range test: train briefly while the learning rate grows exponentially (notebook 05).

L. N. Smith, "Cyclical Learning Rates for Training Neural Networks" (2017), introduced the test: train while
raising the learning rate and watch how the model responds. The variant here, as in fastai and torch-lr-finder,
raises it exponentially over a few hundred steps and reads the training loss against it. The loss stays flat
while the rate is too small to matter, falls once it is large enough, and shoots up once it is too large. A
usable rate lies where the loss falls fastest, or about ten times below the rate of the lowest loss.

    result = lr_range_test(models.make_encoder("small"), course.train, TrainConfig(), device=lab.device)
    print(result.steepest_lr(), result.min_loss_lr())
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, replace

import numpy as np
import torch
from torch import nn

from labutils.augment import Augmentation, augment
from labutils.data import Split
from labutils.pairs import make_pairs, make_triplets
from labutils.training import TrainConfig, batch_loss, make_optimizer


@dataclass(frozen=True)
class RangeTestResult:
    """The learning rate and training-batch loss of every step of a range test, with the smoothed loss.

    `stopped` gives the reason when the test ended before reaching its maximum learning rate, else None.
    """

    lrs: list[float]
    losses: list[float]
    smoothed: list[float]
    stopped: str | None = None

    def min_loss_lr(self) -> float:
        """Return the learning rate at which the smoothed loss is lowest."""
        return self.lrs[self._lowest_step()]

    def steepest_lr(self) -> float:
        """Return the learning rate, up to the lowest-loss one, at which the smoothed loss falls fastest.

        The slope is the change of the smoothed loss per decade of learning rate (central differences).
        """
        end = self._lowest_step()
        if end < 1:
            return self.lrs[0]
        log_lrs = np.log10(self.lrs[: end + 1])
        slopes = np.gradient(np.asarray(self.smoothed[: end + 1]), log_lrs)
        return self.lrs[int(np.nanargmin(slopes))]

    def _lowest_step(self) -> int:
        if not self.smoothed:
            raise ValueError(f"The range test recorded no step ({self.stopped}): lower min_lr and run it again.")
        return int(np.nanargmin(self.smoothed))


def lr_range_test(model: nn.Module, train: Split, config: TrainConfig, min_lr: float = 1e-6, max_lr: float = 1.0,
                  steps: int = 200, smoothing: float = 0.9, divergence: float = 4.0,
                  device: str | torch.device = "cpu") -> RangeTestResult:
    """Train a copy of `model` on `train` for `steps` batches while the learning rate grows from `min_lr` to `max_lr`.

    The learning rate of step k (0-based) is min_lr * (max_lr / min_lr) ** (k / (steps - 1)), set on every
    parameter group of the optimizer that `config` names. Batches are freshly drawn pairs (or triplets) of
    `config.batch_size`, augmented when `config.augment` is above 0, as in `training.fit`. The loss is smoothed
    by an exponential moving average with factor `smoothing` and bias correction. The test stops early when
    the loss stops being finite, or when the smoothed loss exceeds `divergence` times its value at the first
    step, so training has undone more than it achieved. `model` itself is left untouched.

    The usual stop rule compares with the lowest loss so far instead (4 or 5 times it in fastai and
    torch-lr-finder). When a few training images are memorised, that lowest loss is close to 0, so the rule
    fires at the first small rise, well before the loss climbs back to where training started.
    """
    if not 0 < min_lr < max_lr:
        raise ValueError(f"Expected 0 < min_lr < max_lr, got min_lr={min_lr} and max_lr={max_lr}.")
    if steps < 2:
        raise ValueError(f"steps must be at least 2, got {steps}.")
    if not 0 <= smoothing < 1:
        raise ValueError(f"smoothing must be in [0, 1), got {smoothing}.")
    if not divergence > 1:
        raise ValueError(f"divergence must be above 1, got {divergence}: it is a multiple of the starting loss.")

    device = torch.device(device)
    # channels-last, as in training.fit, makes the CPU convolutions about twice as fast.
    trained = copy.deepcopy(model).to(device, memory_format=torch.channels_last)
    trained.train()
    optimizer = make_optimizer(trained, replace(config, lr=min_lr))
    generator = torch.Generator().manual_seed(config.seed)
    images = train.images.to(device)
    draw = make_pairs if config.loss == "contrastive" else make_triplets
    settings = Augmentation.at_strength(config.augment) if config.augment > 0 else None
    transform = None if settings is None else (lambda inputs: augment(inputs, settings, generator))

    lrs, losses, smoothed = [], [], []
    average, stopped = 0.0, None
    for step in range(steps):
        lr = min_lr * (max_lr / min_lr) ** (step / (steps - 1))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = draw(train.labels, config.batch_size, generator)
        loss = batch_loss(trained, images, batch, config, transform=transform)
        if not torch.isfinite(loss):
            stopped = f"the loss became {loss.item()} at lr={lr:.3g}"
            break
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

        average = smoothing * average + (1 - smoothing) * loss.item()
        corrected = average / (1 - smoothing ** (step + 1))
        lrs.append(lr)
        losses.append(loss.item())
        smoothed.append(corrected)
        if corrected > divergence * smoothed[0]:
            stopped = f"the smoothed loss exceeded {divergence:g} times its starting value at lr={lr:.3g}"
            break
    return RangeTestResult(lrs, losses, smoothed, stopped)
