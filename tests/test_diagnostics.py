import math

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from torch import nn

from labutils.diagnostics import (ReluActivity, accuracy_vs_auc, blank_fraction, collapse_loss, dead_units,
                                  duplicate_images, embedding_spread, generalization_gaps, gradient_norm,
                                  gradient_norm_tensor, loss_to_collapse_ratio, margin_floor, mode_mismatch,
                                  pair_distance_stats, split_overlap, update_ratio, weight_norm)
from labutils.losses import contrastive_loss, triplet_loss


def test_spread_std_by_hand():
    # Dimension 0 contains 0 and 2 (population std 1) and dimension 1 contains 0 and 0 (std 0), so the mean is 0.5.
    spread = embedding_spread(torch.tensor([[0.0, 0.0], [2.0, 0.0]]))
    assert spread.std == pytest.approx(0.5)


def test_spread_norm_by_hand():
    spread = embedding_spread(torch.tensor([[0.0, 0.0], [3.0, 4.0]]))
    assert spread.norm == pytest.approx(2.5)


def test_spread_matches_numpy():
    embeddings = torch.randn(50, 8, generator=torch.Generator().manual_seed(0))
    expected = np.asarray(embeddings).std(axis=0).mean()
    assert embedding_spread(embeddings).std == pytest.approx(expected, rel=1e-6)


def test_spread_of_identical_rows_is_zero():
    assert embedding_spread(torch.ones(5, 3)).std == 0.0


def test_spread_needs_two_rows():
    with pytest.raises(ValueError, match="at least 2"):
        embedding_spread(torch.ones(1, 3))


def test_pair_stats_by_hand():
    stats = pair_distance_stats(torch.tensor([1.0, 3.0, 2.0, 6.0]), torch.tensor([1, 1, 0, 0]))
    assert stats == pytest.approx({"pos_mean": 2.0, "pos_std": 1.0, "neg_mean": 4.0, "neg_std": 2.0,
                                   "separation": 2.0 / math.sqrt(2.5)})


def test_pair_stats_without_negatives_gives_nan():
    stats = pair_distance_stats(torch.tensor([1.0, 3.0]), torch.tensor([1, 1]))
    assert math.isnan(stats["neg_mean"])


def test_pair_stats_shape_mismatch():
    with pytest.raises(ValueError, match="shape"):
        pair_distance_stats(torch.ones(3), torch.ones(4))


def relu_probe() -> nn.Sequential:
    # Unit 0 copies the input, unit 1 is always negative for non-negative inputs, unit 2 copies it doubled.
    linear = nn.Linear(1, 3)
    with torch.no_grad():
        linear.weight.copy_(torch.tensor([[1.0], [-1.0], [2.0]]))
        linear.bias.zero_()
    return nn.Sequential(linear, nn.ReLU())


def test_dead_linear_unit_counted():
    counts = dead_units(relu_probe(), torch.tensor([[0.5], [1.0], [2.0]]))
    assert counts.dead == {"1": 1}


def test_dead_fraction_over_all_units():
    assert dead_units(relu_probe(), torch.tensor([[0.5], [1.0]])).fraction == pytest.approx(1 / 3)


def test_unit_alive_if_any_input_fires_it():
    # A negative input fires unit 1, so only a unit that never fires counts as dead.
    assert dead_units(relu_probe(), torch.tensor([[1.0], [-1.0]])).dead == {"1": 0}


def test_dead_conv_channel_counted():
    conv = nn.Conv2d(1, 2, kernel_size=1)
    with torch.no_grad():
        conv.weight.fill_(1.0)
        conv.bias.copy_(torch.tensor([0.0, -100.0]))
    model = nn.Sequential(conv, nn.ReLU())
    counts = dead_units(model, torch.rand(4, 1, 5, 5))
    assert counts.worst_layer_fraction == 0.5


def test_dead_units_restores_training_mode():
    model = relu_probe().train()
    dead_units(model, torch.ones(2, 1))
    assert model.training


def test_relu_hooks_removed_on_exit():
    model = relu_probe()
    with ReluActivity(model):
        model(torch.ones(2, 1))
    assert not model[1]._forward_hooks


def test_gradient_norm_matches_clip_grad_norm():
    model = nn.Linear(4, 3)
    model(torch.randn(5, 4, generator=torch.Generator().manual_seed(0))).pow(2).sum().backward()
    expected = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm=float("inf")).item()
    assert gradient_norm(model.parameters()) == pytest.approx(expected, rel=1e-6)


def test_gradient_norm_without_gradients():
    assert gradient_norm(nn.Linear(2, 2).parameters()) == 0.0


def test_gradient_norm_tensor_stays_tensor():
    model = nn.Linear(4, 3)
    model(torch.ones(2, 4)).sum().backward()
    norm = gradient_norm_tensor(model.parameters())
    assert isinstance(norm, torch.Tensor)
    assert norm.dim() == 0
    assert norm.item() == gradient_norm(model.parameters())


def test_weight_norm_by_hand():
    assert weight_norm([torch.tensor([3.0]), torch.tensor([4.0])]) == pytest.approx(5.0)


def test_update_ratio_by_hand():
    before = [torch.tensor([3.0]), torch.tensor([4.0])]
    after = [torch.tensor([3.0]), torch.tensor([5.0])]
    assert update_ratio(before, after) == pytest.approx(0.2)


def test_update_ratio_needs_matching_lists():
    with pytest.raises(ValueError, match="same parameters"):
        update_ratio([torch.ones(1)], [])


def test_collapse_loss_matches_contrastive_loss():
    # Identical embeddings put every distance at (almost) 0; half the pairs are negative.
    same = torch.tensor([1.0, 0.0, 1.0, 0.0])
    embeddings = torch.zeros(4, 3)
    expected = contrastive_loss(embeddings, embeddings, same, margin=2.0).item()
    assert collapse_loss("contrastive", 2.0) == pytest.approx(expected, abs=1e-3)


def test_collapse_loss_matches_triplet_loss():
    embeddings = torch.zeros(4, 3)
    expected = triplet_loss(embeddings, embeddings, embeddings, margin=0.5).item()
    assert collapse_loss("triplet", 0.5) == pytest.approx(expected)


def test_collapse_loss_rejects_unknown_loss():
    with pytest.raises(ValueError, match="Unknown loss"):
        collapse_loss("hinge", 1.0)


def test_loss_to_collapse_ratio():
    assert loss_to_collapse_ratio(0.25, "contrastive", 1.0) == pytest.approx(0.5)


def test_margin_floor_contrastive():
    # Negative pairs can be at most 2 apart, 1 short of margin 3: each pays 1, half the pairs are negative.
    assert margin_floor("contrastive", 3.0, 2.0) == pytest.approx(0.5)


def test_margin_floor_triplet():
    assert margin_floor("triplet", 2.5, 2.0) == pytest.approx(0.5)


def test_margin_floor_reachable_margin():
    assert margin_floor("contrastive", 1.0, 2.0) == 0.0


def test_accuracy_vs_auc_by_hand():
    distances = torch.tensor([0.1, 0.2, 0.9, 0.8])
    same = torch.tensor([1, 1, 0, 0])
    scores = accuracy_vs_auc(distances, same, threshold=0.05)
    assert scores == pytest.approx({"auc": 1.0, "accuracy": 0.5, "best_accuracy": 1.0})


def test_accuracy_vs_auc_matches_sklearn():
    generator = torch.Generator().manual_seed(1)
    distances, same = torch.rand(40, generator=generator), torch.arange(40) % 2
    expected = roc_auc_score(same.numpy(), -distances.numpy())
    assert accuracy_vs_auc(distances, same, 0.5)["auc"] == pytest.approx(expected)


def test_generalization_gaps():
    row = {"train_auc": 0.99, "val_seen_auc": 0.9, "val_unseen_auc": 0.7}
    assert generalization_gaps(row) == pytest.approx({"seen_gap": 0.09, "unseen_gap": 0.2})


def test_mode_mismatch_without_mode_layers():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8))
    images, labels = torch.randn(40, 1, 28, 28), torch.arange(40) % 4
    assert mode_mismatch(model, images, labels, num_pairs=100)["mode_gap"] == 0.0


def test_mode_mismatch_keeps_running_statistics():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(784, 8), nn.BatchNorm1d(8))
    mode_mismatch(model, torch.randn(40, 1, 28, 28), torch.arange(40) % 4, num_pairs=100)
    assert torch.equal(model[2].running_mean, torch.zeros(8))


def test_mode_mismatch_keeps_global_random_state():
    model = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(784, 8))
    images, labels = torch.randn(40, 1, 28, 28), torch.arange(40) % 4
    torch.manual_seed(3)
    expected = torch.rand(1)
    torch.manual_seed(3)
    mode_mismatch(model, images, labels, num_pairs=100)
    assert torch.equal(torch.rand(1), expected)


def test_split_overlap_counts_distinct_ids():
    assert split_overlap(torch.tensor([1, 2, 3, 3]), torch.tensor([3, 4, 3])) == 1


def test_split_overlap_disjoint():
    assert split_overlap(torch.tensor([1, 2]), torch.tensor([3, 4])) == 0


def test_duplicate_images_found():
    first = torch.stack([torch.zeros(1, 2, 2), torch.ones(1, 2, 2)])
    second = torch.stack([torch.ones(1, 2, 2), torch.full((1, 2, 2), 2.0)])
    assert duplicate_images(first, second) == 1


def test_blank_fraction_by_hand():
    images = torch.rand(4, 1, 3, 3, generator=torch.Generator().manual_seed(0))
    images[2] = 0.7
    assert blank_fraction(images) == pytest.approx(0.25)


def test_blank_fraction_rejects_empty():
    with pytest.raises(ValueError, match="N >= 1"):
        blank_fraction(torch.zeros(0, 1, 3, 3))
