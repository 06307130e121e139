from __future__ import annotations

import numpy as np
import pytest
import torch
from sklearn.metrics import roc_auc_score
from sklearn.neighbors import NearestNeighbors

from labutils.metrics import (
    accuracy_at_threshold,
    choose_threshold,
    equal_error_rate,
    n_way_one_shot_accuracy,
    recall_at_1,
    roc_auc,
)


def random_pairs(seed: int, num_pairs: int = 200, decimals: int = 1) -> tuple[np.ndarray, np.ndarray]:
    """Return overlapping positive and negative distances, rounded so that many of them tie."""
    rng = np.random.default_rng(seed)
    same = rng.random(num_pairs) < 0.4
    distances = np.where(same, rng.normal(1.0, 0.5, num_pairs), rng.normal(1.6, 0.5, num_pairs))
    return np.round(np.abs(distances), decimals), same.astype(np.int64)


def brute_force_candidates(distances: np.ndarray) -> list[float]:
    values = sorted(set(distances.tolist()))
    midpoints = [(low + high) / 2 for low, high in zip(values, values[1:])]
    return [values[0] - 1.0] + midpoints + [values[-1] + 1.0]


def brute_force_accuracy(distances: np.ndarray, same: np.ndarray, threshold: float) -> float:
    correct = sum(int((d < threshold) == bool(s)) for d, s in zip(distances.tolist(), same.tolist()))
    return correct / len(distances)


def brute_force_error_rates(distances: np.ndarray, same: np.ndarray, threshold: float) -> tuple[float, float]:
    pairs = list(zip(distances.tolist(), same.tolist()))
    negatives = [d for d, s in pairs if s == 0]
    positives = [d for d, s in pairs if s == 1]
    false_accept_rate = sum(d < threshold for d in negatives) / len(negatives)
    false_reject_rate = sum(d >= threshold for d in positives) / len(positives)
    return false_accept_rate, false_reject_rate


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("decimals", [1, 6])
def test_roc_auc_matches_sklearn(seed, decimals):
    distances, same = random_pairs(seed, decimals=decimals)
    expected = roc_auc_score(same, -distances)
    assert roc_auc(distances, same) == pytest.approx(expected, abs=1e-12)


def test_roc_auc_accepts_tensors():
    distances, same = random_pairs(3)
    expected = roc_auc_score(same, -distances)
    result = roc_auc(torch.tensor(distances, dtype=torch.float32, requires_grad=True), torch.tensor(same))
    assert result == pytest.approx(expected, abs=1e-12)


def test_roc_auc_perfect_and_reversed():
    distances = np.array([0.1, 0.2, 0.8, 0.9])
    assert roc_auc(distances, [1, 1, 0, 0]) == 1.0
    assert roc_auc(distances, [0, 0, 1, 1]) == 0.0


def test_roc_auc_all_tied_is_half():
    assert roc_auc(np.zeros(6), [1, 0, 1, 0, 1, 1]) == 0.5


@pytest.mark.parametrize("metric", [roc_auc, equal_error_rate])
def test_single_pair_type_rejected(metric):
    with pytest.raises(ValueError, match=r"got 3 positive and 0 negative pairs"):
        metric([0.1, 0.2, 0.3], [1, 1, 1])


def test_accuracy_at_threshold_hand_values():
    distances, same = [0.1, 0.5, 0.9], [1, 1, 0]
    assert accuracy_at_threshold(distances, same, 0.6) == 1.0
    assert accuracy_at_threshold(distances, same, 0.3) == pytest.approx(2 / 3)


def test_accuracy_at_threshold_strict_inequality():
    # A pair exactly at the threshold is predicted negative because the rule is d < threshold.
    assert accuracy_at_threshold([0.5], [1], 0.5) == 0.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("decimals", [1, 3])
def test_choose_threshold_maximises_accuracy(seed, decimals):
    distances, same = random_pairs(seed, decimals=decimals)
    best_accuracy = max(brute_force_accuracy(distances, same, t) for t in brute_force_candidates(distances))
    threshold = choose_threshold(distances, same)
    assert accuracy_at_threshold(distances, same, threshold) == pytest.approx(best_accuracy)


def test_choose_threshold_smallest_of_equal_best():
    # Thresholds 0.25 and 0.75 both classify 3 of 4 pairs correctly, and the smaller one wins.
    assert choose_threshold([0.0, 0.5, 1.0, 1.5], [1, 0, 1, 0]) == 0.25


def test_choose_threshold_separates_clean_split():
    threshold = choose_threshold(torch.tensor([0.1, 0.2, 0.7, 0.9]), torch.tensor([1, 1, 0, 0]))
    assert threshold == pytest.approx(0.45)


def test_choose_threshold_all_positive_accepts_all():
    distances = [0.3, 0.1, 0.2]
    threshold = choose_threshold(distances, [1, 1, 1])
    assert accuracy_at_threshold(distances, [1, 1, 1], threshold) == 1.0


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
@pytest.mark.parametrize("decimals", [1, 3])
def test_equal_error_rate_brute_force(seed, decimals):
    distances, same = random_pairs(seed, decimals=decimals)
    best = None
    for threshold in brute_force_candidates(distances):
        far, frr = brute_force_error_rates(distances, same, threshold)
        key = (abs(far - frr), (far + frr) / 2)
        if best is None or key < best[0]:
            best = (key, threshold)
    (_, expected_eer), expected_threshold = best

    eer, threshold = equal_error_rate(distances, same)
    assert eer == pytest.approx(expected_eer)
    assert brute_force_error_rates(distances, same, threshold) == pytest.approx(
        brute_force_error_rates(distances, same, expected_threshold))


def test_equal_error_rate_separable_is_zero():
    eer, threshold = equal_error_rate([0.1, 0.2, 0.7, 0.9], [1, 1, 0, 0])
    assert eer == 0.0
    assert 0.2 < threshold <= 0.7


def test_equal_error_rate_uniform_overlap():
    # Positive distances ~ U(0, 1) and negative ~ U(0.5, 1.5): FAR(t) = t - 0.5 and FRR(t) = 1 - t meet at
    # t = 0.75 with EER = 0.25.
    rng = np.random.default_rng(0)
    distances = np.concatenate([rng.uniform(0.0, 1.0, 20000), rng.uniform(0.5, 1.5, 20000)])
    same = np.concatenate([np.ones(20000), np.zeros(20000)])
    eer, threshold = equal_error_rate(distances, same)
    assert eer == pytest.approx(0.25, abs=0.01)
    assert threshold == pytest.approx(0.75, abs=0.01)


def test_pair_shape_mismatch_rejected():
    with pytest.raises(ValueError, match=r"got \(3,\) and \(2,\)"):
        roc_auc([0.1, 0.2, 0.3], [1, 0])


def test_same_outside_zero_one_rejected():
    with pytest.raises(ValueError, match=r"found \[0, 1, 2\]"):
        choose_threshold([0.1, 0.2, 0.3], [0, 1, 2])


def test_empty_pairs_rejected():
    with pytest.raises(ValueError, match=r"distances is empty"):
        accuracy_at_threshold([], [], 0.5)


def test_nan_distance_rejected():
    with pytest.raises(ValueError, match=r"1 NaN or infinite"):
        roc_auc([0.1, float("nan"), 0.3], [1, 0, 1])


def clustered_embeddings(seed: int, num_classes: int, per_class: int, spread: float) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    centres = rng.normal(0.0, 1.0, (num_classes, 8))
    labels = np.repeat(np.arange(num_classes), per_class)
    return centres[labels] + rng.normal(0.0, spread, (labels.size, 8)), labels


@pytest.mark.parametrize("seed", [0, 1])
def test_recall_at_1_matches_sklearn(seed):
    embeddings, labels = clustered_embeddings(seed, num_classes=6, per_class=15, spread=0.6)
    # kneighbors() without X excludes each point from its own neighbours, which is leave-one-out.
    nearest = NearestNeighbors(n_neighbors=1).fit(embeddings).kneighbors(return_distance=False)[:, 0]
    expected = float(np.mean(labels[nearest] == labels))
    assert recall_at_1(torch.tensor(embeddings, dtype=torch.float32), torch.tensor(labels)) == pytest.approx(expected)


def test_recall_at_1_chunked_matches_sklearn(monkeypatch):
    monkeypatch.setattr("labutils.metrics.ROW_CHUNK", 7)
    embeddings, labels = clustered_embeddings(2, num_classes=5, per_class=10, spread=0.8)
    nearest = NearestNeighbors(n_neighbors=1).fit(embeddings).kneighbors(return_distance=False)[:, 0]
    assert recall_at_1(embeddings, labels) == pytest.approx(float(np.mean(labels[nearest] == labels)))


def test_recall_at_1_ties_share_credit():
    # With identical embeddings every other image ties for nearest, so a query earns the fraction of the others
    # that share its label: 2/4 for the three images of class 0, 1/4 for the two of class 1.
    labels = [0, 0, 0, 1, 1]
    expected = (3 * (2 / 4) + 2 * (1 / 4)) / 5
    assert recall_at_1(np.zeros((5, 3)), labels) == pytest.approx(expected)


def test_recall_at_1_singleton_counts_as_miss():
    embeddings = np.array([[0.0], [0.1], [5.0]])
    assert recall_at_1(embeddings, [0, 0, 1]) == pytest.approx(2 / 3)


def test_recall_at_1_too_few_rejected():
    with pytest.raises(ValueError, match=r"at least 2 embeddings, got 1"):
        recall_at_1(np.zeros((1, 3)), [0])


def test_embedding_label_shape_mismatch_rejected():
    with pytest.raises(ValueError, match=r"got \(4, 3\) and \(5,\)"):
        recall_at_1(np.zeros((4, 3)), np.zeros(5))


def test_nan_embedding_rejected():
    embeddings = np.zeros((4, 3))
    embeddings[1, 2] = np.nan
    with pytest.raises(ValueError, match=r"NaN or infinite"):
        n_way_one_shot_accuracy(embeddings, [0, 0, 1, 1], n_way=2, episodes=5, generator=0)


def test_n_way_separated_clusters_perfect():
    embeddings, labels = clustered_embeddings(0, num_classes=10, per_class=5, spread=0.01)
    accuracy = n_way_one_shot_accuracy(torch.tensor(embeddings), torch.tensor(labels), n_way=5, episodes=300,
                                       generator=torch.Generator().manual_seed(0))
    assert accuracy == 1.0


@pytest.mark.parametrize("n_way", [2, 5, 10])
def test_n_way_all_tied_gives_chance(n_way):
    labels = np.repeat(np.arange(12), 3)
    accuracy = n_way_one_shot_accuracy(np.zeros((labels.size, 4)), labels, n_way=n_way, episodes=200, generator=0)
    assert accuracy == pytest.approx(1 / n_way, abs=1e-12)


def test_n_way_query_differs_from_support():
    # Unstructured embeddings give chance accuracy only if the query is never its own support image, which would
    # sit at distance 0 and always win.
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(20), 3)
    embeddings = rng.normal(size=(labels.size, 16))
    accuracy = n_way_one_shot_accuracy(embeddings, labels, n_way=5, episodes=3000, generator=1)
    assert accuracy == pytest.approx(0.2, abs=0.04)


def test_n_way_same_seed_same_result():
    embeddings, labels = clustered_embeddings(1, num_classes=8, per_class=4, spread=1.5)
    first = n_way_one_shot_accuracy(embeddings, labels, n_way=4, episodes=100, generator=7)
    second = n_way_one_shot_accuracy(embeddings, labels, n_way=4, episodes=100, generator=7)
    assert first == second


def test_n_way_chunked_same_result(monkeypatch):
    embeddings, labels = clustered_embeddings(1, num_classes=8, per_class=4, spread=1.5)
    whole = n_way_one_shot_accuracy(embeddings, labels, n_way=4, episodes=100, generator=7)
    monkeypatch.setattr("labutils.metrics.ROW_CHUNK", 9)
    assert n_way_one_shot_accuracy(embeddings, labels, n_way=4, episodes=100, generator=7) == whole


def test_n_way_ignores_single_image_classes():
    # Class 3 has one image, so it can serve neither as query class nor, under this rule, as a distractor.
    embeddings = np.array([[0.0], [0.1], [5.0], [5.1], [9.0], [9.1], [0.05]])
    labels = np.array([0, 0, 1, 1, 2, 2, 3])
    assert n_way_one_shot_accuracy(embeddings, labels, n_way=3, episodes=50, generator=0) == 1.0


def test_n_way_too_many_classes_rejected():
    labels = np.array([0, 0, 1, 1, 2, 2, 3, 4])
    with pytest.raises(ValueError, match=r"n_way=4 is larger than the 3 classes with at least 2 images"):
        n_way_one_shot_accuracy(np.zeros((8, 2)), labels, n_way=4, episodes=10, generator=0)


@pytest.mark.parametrize("n_way, episodes, pattern", [(1, 10, r"n_way=1"), (2, 0, r"episodes=0")])
def test_n_way_invalid_arguments_rejected(n_way, episodes, pattern):
    with pytest.raises(ValueError, match=pattern):
        n_way_one_shot_accuracy(np.zeros((4, 2)), [0, 0, 1, 1], n_way=n_way, episodes=episodes, generator=0)
