from __future__ import annotations

import math

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from labutils.data import make_course_data
from labutils.losses import all_pairs_contrastive_loss, batch_all_triplet_loss, batch_hard_triplet_loss
from labutils.mining import (INFORMATIVE_TOLERANCE, KINDS, TrackedLoss, informative_fraction,
                             semi_hard_triplet_loss, semi_hard_triplets)
from labutils.models import make_encoder
from labutils.training import TrainConfig, fit

from loops import euclidean, loop_valid_triplets, pml_distance

DTYPES = [torch.float32, torch.float64]

# Two classes of three and a singleton class, with distances easy to check by hand.
POINTS = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.2), (1.0, 0.0), (1.0, 0.4), (3.0, 3.0), (0.2, 0.1)]
LABELS = [0, 0, 0, 1, 1, 1, 2]


def loop_semi_hard(points, labels, margin):
    mined = []
    for a, p, n in loop_valid_triplets(labels):
        gap = euclidean(points[a], points[n]) - euclidean(points[a], points[p])
        if 0 < gap <= margin:
            mined.append((a, p, n))
    return mined


def random_batch(seed, size=24, dim=5, classes=4):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(size, dim, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, classes, (size,), generator=generator)
    return embeddings, labels


def pml_semi_hard_miner(margin):
    return pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard", distance=pml_distance())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_semi_hard_triplets_hand_loop(dtype, margin):
    mined = semi_hard_triplets(torch.tensor(POINTS, dtype=dtype), torch.tensor(LABELS), margin)
    found = list(zip(*(index.tolist() for index in mined)))
    expected = loop_semi_hard(POINTS, LABELS, margin)
    assert expected, "the hand-written batch should contain semi-hard triplets"
    assert found == expected


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semi_hard_triplets_match_pml_miner(seed):
    embeddings, labels = random_batch(seed)
    margin = 0.5
    miner = pml_semi_hard_miner(margin)
    theirs = set(zip(*(index.tolist() for index in miner(embeddings, labels))))
    ours = set(zip(*(index.tolist() for index in semi_hard_triplets(embeddings, labels, margin))))
    assert len(ours) > 0
    assert ours == theirs


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_semi_hard_loss_matches_pml(seed):
    embeddings, labels = random_batch(seed)
    margin = 0.5
    miner = pml_semi_hard_miner(margin)
    # MeanReducer averages over every mined triplet, as semi_hard_triplet_loss does.
    pml_loss = pml_losses.TripletMarginLoss(margin=margin, distance=pml_distance(),
                                            reducer=pml_reducers.MeanReducer())
    expected = pml_loss(embeddings, labels, miner(embeddings, labels))
    assert semi_hard_triplet_loss(embeddings, labels, margin).item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_semi_hard_loss_hand_loop(dtype):
    margin = 1.0
    mined = loop_semi_hard(POINTS, LABELS, margin)
    terms = [euclidean(POINTS[a], POINTS[p]) - euclidean(POINTS[a], POINTS[n]) + margin for a, p, n in mined]
    loss = semi_hard_triplet_loss(torch.tensor(POINTS, dtype=dtype), torch.tensor(LABELS), margin)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def test_semi_hard_loss_without_triplets_is_zero():
    # Each class sits far from the other, so every negative lies beyond the margin and nothing is semi-hard.
    embeddings = torch.tensor([[0.0, 0.0], [0.1, 0.0], [10.0, 0.0], [10.1, 0.0]], requires_grad=True)
    loss = semi_hard_triplet_loss(embeddings, torch.tensor([0, 0, 1, 1]), margin=1.0)
    loss.backward()
    assert loss.item() == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_semi_hard_gradient_reproducible():
    # A batch of 64 rows mines thousands of triplets over the same few rows, where a gather's backward pass would
    # add their gradients in a thread-dependent order.
    generator = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 7, (64,), generator=generator)
    points = torch.randn(64, 16, generator=generator)
    gradients = []
    for _ in range(10):
        embeddings = points.clone().requires_grad_(True)
        semi_hard_triplet_loss(embeddings, labels, margin=1.0).backward()
        gradients.append(embeddings.grad)
    assert semi_hard_triplets(points, labels, 1.0)[0].numel() > 1000
    assert all(torch.equal(gradients[0], gradient) for gradient in gradients[1:])


def test_semi_hard_rejects_bad_margin():
    with pytest.raises(ValueError, match="margin"):
        semi_hard_triplets(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), margin=0.0)


def loop_pair_terms(points, labels, margin):
    half = len(points) // 2
    terms = []
    for p, q, label_p, label_q in zip(points[:half], points[half:], labels[:half], labels[half:]):
        d = euclidean(p, q)
        terms.append(d ** 2 if label_p == label_q else max(0.0, margin - d) ** 2)
    return terms


def loop_terms(kind, points, labels, margin):
    """Per-term losses of each kind, written as plain loops over the batch."""
    if kind == "pairs":
        return loop_pair_terms(points, labels, margin)
    if kind == "all_pairs":
        terms = []
        for i in range(len(points)):
            for j in range(i + 1, len(points)):
                d = euclidean(points[i], points[j])
                terms.append(d ** 2 if labels[i] == labels[j] else max(0.0, margin - d) ** 2)
        return terms
    if kind == "batch_hard":
        terms = []
        for a, label in enumerate(labels):
            positives = [euclidean(points[a], points[p]) for p, other in enumerate(labels) if other == label and p != a]
            negatives = [euclidean(points[a], points[n]) for n, other in enumerate(labels) if other != label]
            if positives and negatives:
                terms.append(max(0.0, max(positives) - min(negatives) + margin))
        return terms
    semi_hard = set(loop_semi_hard(points, labels, margin))
    terms = []
    for a, p, n in loop_valid_triplets(labels):
        hinge = max(0.0, euclidean(points[a], points[p]) - euclidean(points[a], points[n]) + margin)
        terms.append(hinge if kind == "batch_all" or (a, p, n) in semi_hard else 0.0)
    return terms


# Eight rows, so that the `pairs` kind gets four pairs: rows 0-3 against rows 4-7.
PAIR_POINTS = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.2), (1.0, 0.0), (0.005, 0.0), (3.0, 3.0), (0.2, 0.1), (4.0, 4.0)]
PAIR_LABELS = [0, 0, 0, 1, 0, 1, 2, 1]


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("margin", [0.5, 1.0])
def test_informative_fraction_hand_loop(kind, margin):
    terms = loop_terms(kind, PAIR_POINTS, PAIR_LABELS, margin)
    expected = sum(term > INFORMATIVE_TOLERANCE for term in terms) / len(terms)
    fraction = informative_fraction(kind, torch.tensor(PAIR_POINTS), torch.tensor(PAIR_LABELS), margin)
    assert fraction == pytest.approx(expected)


def test_informative_fraction_counts_close_positive_as_satisfied():
    # A positive pair 0.005 apart has a loss of 2.5e-5, below the tolerance. A negative pair inside the margin counts.
    embeddings = torch.tensor([[0.0, 0.0], [0.0, 0.0], [0.005, 0.0], [0.5, 0.0]])
    assert informative_fraction("pairs", embeddings, torch.tensor([0, 0, 0, 1]), margin=1.0) == 0.5


def test_batch_all_fraction_matches_library():
    embeddings, labels = random_batch(4)
    _, active = batch_all_triplet_loss(embeddings, labels, margin=0.5)
    assert informative_fraction("batch_all", embeddings, labels, 0.5) == pytest.approx(active, abs=1e-3)


def test_informative_fraction_without_terms_is_nan():
    assert math.isnan(informative_fraction("batch_all", torch.zeros(3, 2), torch.tensor([0, 1, 2]), 1.0))


@pytest.mark.parametrize("kind, library", [
    ("all_pairs", lambda e, y: all_pairs_contrastive_loss(e, y, margin=0.7)),
    ("batch_all", lambda e, y: batch_all_triplet_loss(e, y, margin=0.7)[0]),
    ("batch_hard", lambda e, y: batch_hard_triplet_loss(e, y, margin=0.7)),
    ("semi_hard", lambda e, y: semi_hard_triplet_loss(e, y, margin=0.7)),
])
def test_tracked_loss_equals_library(kind, library):
    embeddings, labels = random_batch(5)
    assert TrackedLoss(kind, margin=0.7)(embeddings, labels).item() == library(embeddings, labels).item()


def test_tracked_loss_logs_training_calls_only():
    tracked = TrackedLoss("batch_all", margin=1.0)
    embeddings, labels = random_batch(6)
    tracked(embeddings, labels)
    with torch.inference_mode():
        tracked(embeddings, labels)
    tracked(embeddings, labels)
    log = tracked.log()
    assert log["step"].tolist() == [1, 2]
    assert log["informative"].between(0, 1).all()
    assert log["seconds"].is_monotonic_increasing


def test_tracked_loss_rejects_unknown_kind():
    with pytest.raises(ValueError, match="Unknown kind 'hardest'"):
        TrackedLoss("hardest")


@pytest.fixture(scope="module")
def course():
    return make_course_data("digits", seed=0, max_images_per_class=30)


def small_fit(course, loss_fn=None):
    torch.manual_seed(0)
    config = TrainConfig(epochs=2, pairs_per_epoch=128, batch_size=64, eval_pairs=64)
    return fit(make_encoder("small"), course, config, progress=False, loss_fn=loss_fn)


def test_pairs_kind_reproduces_fit(course):
    plain = small_fit(course)
    tracked = TrackedLoss("pairs", margin=1.0)
    logged = small_fit(course, loss_fn=tracked)
    assert logged["train_loss"] == plain["train_loss"]
    assert logged["val_seen_auc"] == plain["val_seen_auc"]
    assert logged.config["loss_fn"] == "pairs"
    assert len(tracked.log()) == 4
