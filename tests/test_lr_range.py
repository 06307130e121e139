import math

import numpy as np
import pytest
import torch

from labutils.data import Split
from labutils.lr_range import RangeTestResult, lr_range_test
from labutils.models import make_encoder
from labutils.training import TrainConfig

STEPS = 12


@pytest.fixture
def split() -> Split:
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(12, 1, 28, 28, generator=generator)
    labels = torch.arange(3).repeat_interleave(4)
    return Split(images, labels, "train", torch.arange(12))


@pytest.fixture
def config() -> TrainConfig:
    return TrainConfig(batch_size=8, pairs_per_epoch=8, seed=0)


def tiny_encoder() -> torch.nn.Module:
    torch.manual_seed(0)
    return make_encoder("small", channels=(2, 4), hidden=8, embedding_dim=4)


def test_lrs_grow_geometrically(split, config):
    result = lr_range_test(tiny_encoder(), split, config, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    assert len(result.lrs) == STEPS
    assert result.lrs[0] == pytest.approx(1e-5)
    assert result.lrs[-1] == pytest.approx(1e-2)
    ratios = np.diff(np.log10(result.lrs))
    assert np.allclose(ratios, 3 / (STEPS - 1))
    assert result.stopped is None


def test_records_one_loss_per_step(split, config):
    result = lr_range_test(tiny_encoder(), split, config, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    assert len(result.losses) == STEPS
    assert len(result.smoothed) == STEPS
    assert all(math.isfinite(loss) for loss in result.losses)


def test_smoothing_is_bias_corrected_average(split, config):
    result = lr_range_test(tiny_encoder(), split, config, min_lr=1e-5, max_lr=1e-2, steps=STEPS, smoothing=0.5)
    average, expected = 0.0, []
    for step, loss in enumerate(result.losses):
        average = 0.5 * average + 0.5 * loss
        expected.append(average / (1 - 0.5 ** (step + 1)))
    assert result.smoothed[0] == pytest.approx(result.losses[0])
    assert result.smoothed == pytest.approx(expected)


def test_leaves_model_untouched(split, config):
    model = tiny_encoder()
    before = [parameter.detach().clone() for parameter in model.parameters()]
    lr_range_test(model, split, config, min_lr=1e-4, max_lr=1.0, steps=STEPS)
    for old, new in zip(before, model.parameters()):
        assert torch.equal(old, new)


def test_same_seed_same_losses(split, config):
    first = lr_range_test(tiny_encoder(), split, config, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    second = lr_range_test(tiny_encoder(), split, config, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    assert first.losses == second.losses


def test_stops_when_loss_blows_up(split, config):
    sgd = TrainConfig(batch_size=8, pairs_per_epoch=8, seed=0, optimizer="sgd")
    result = lr_range_test(tiny_encoder(), split, sgd, min_lr=1e-3, max_lr=1e6, steps=60)
    assert result.stopped is not None
    assert len(result.lrs) < 60


def test_stop_rule_compares_with_starting_loss(split, config):
    # Adam from 1e-2 to 10 lowers the loss first and then raises it past 1.5 times its start, all finite.
    result = lr_range_test(tiny_encoder(), split, config, min_lr=1e-2, max_lr=10.0, steps=30, divergence=1.5)
    assert result.stopped is not None
    assert "starting value" in result.stopped
    assert min(result.smoothed) < result.smoothed[0]
    assert result.smoothed[-1] > 1.5 * result.smoothed[0]
    assert all(value <= 1.5 * result.smoothed[0] for value in result.smoothed[:-1])


def test_triplet_loss_runs(split):
    triplet = TrainConfig(loss="triplet", batch_size=8, pairs_per_epoch=8, seed=0)
    result = lr_range_test(tiny_encoder(), split, triplet, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    assert len(result.losses) == STEPS


def test_augmented_batches_run(split):
    augmented = TrainConfig(batch_size=8, pairs_per_epoch=8, seed=0, augment=1.0)
    plain = TrainConfig(batch_size=8, pairs_per_epoch=8, seed=0)
    with_augment = lr_range_test(tiny_encoder(), split, augmented, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    without = lr_range_test(tiny_encoder(), split, plain, min_lr=1e-5, max_lr=1e-2, steps=STEPS)
    assert with_augment.losses != without.losses


@pytest.mark.parametrize("arguments", [
    {"min_lr": 0.0}, {"min_lr": 1e-2, "max_lr": 1e-3}, {"steps": 1}, {"smoothing": 1.0}, {"divergence": 1.0},
])
def test_invalid_arguments_raise(split, config, arguments):
    with pytest.raises(ValueError):
        lr_range_test(tiny_encoder(), split, config, **arguments)


def test_min_loss_lr_picks_lowest_smoothed_loss():
    result = RangeTestResult(lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1], losses=[0.0] * 5,
                             smoothed=[1.0, 0.9, 0.3, 0.25, 2.0])
    assert result.min_loss_lr() == 1e-2


def test_steepest_lr_picks_fastest_fall():
    # Slopes per decade up to the minimum (central differences): -0.1, -0.35, -0.325, -0.05.
    result = RangeTestResult(lrs=[1e-5, 1e-4, 1e-3, 1e-2, 1e-1], losses=[0.0] * 5,
                             smoothed=[1.0, 0.9, 0.3, 0.25, 2.0])
    assert result.steepest_lr() == 1e-4


def test_steepest_lr_when_loss_only_rises():
    result = RangeTestResult(lrs=[1e-3, 1e-2, 1e-1], losses=[0.0] * 3, smoothed=[0.1, 0.5, 2.0])
    assert result.steepest_lr() == 1e-3


def test_empty_result_raises():
    result = RangeTestResult(lrs=[], losses=[], smoothed=[], stopped="the loss became nan at lr=1")
    with pytest.raises(ValueError, match="no step"):
        result.min_loss_lr()
    with pytest.raises(ValueError, match="no step"):
        result.steepest_lr()
