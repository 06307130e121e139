from __future__ import annotations

import pytest
import torch
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners as pml_miners
from pytorch_metric_learning import reducers as pml_reducers

from labutils.losses import (
    ContrastiveLoss,
    TripletLoss,
    all_pairs_contrastive_loss,
    batch_all_triplet_loss,
    batch_hard_triplet_loss,
    contrastive_loss,
    distance_matrix,
    pairwise_distance,
    triplet_loss,
)

from loops import euclidean, loop_valid_triplets, pml_distance

DTYPES = [torch.float32, torch.float64]

# Hand-written 2-D embeddings with easy distances: (0,0)-(3,4) is 5, (0,0)-(0.3,0.4) is 0.5.
LEFT = [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (2.0, 0.0), (5.0, 5.0)]
RIGHT = [(3.0, 4.0), (0.3, 0.4), (1.0, 1.5), (0.0, 0.0), (5.0, 7.0)]
SAME = [1, 0, 0, 1, 0]

# Tiny labelled batch for the in-batch losses: two classes of three, one singleton class.
BATCH_POINTS = [(0.0, 0.0), (0.5, 0.0), (0.0, 1.2), (1.0, 0.0), (1.0, 0.4), (3.0, 3.0), (0.2, 0.1)]
BATCH_LABELS = [0, 0, 0, 1, 1, 1, 2]


def loop_contrastive(left, right, same, margin):
    terms = []
    for p, q, s in zip(left, right, same):
        d = euclidean(p, q)
        terms.append(d ** 2 if s == 1 else max(0.0, margin - d) ** 2)
    return terms


@pytest.mark.parametrize("dtype", DTYPES)
def test_pairwise_distance_hand_values(dtype):
    distances = pairwise_distance(torch.tensor(LEFT, dtype=dtype), torch.tensor(RIGHT, dtype=dtype))
    expected = [euclidean(p, q) for p, q in zip(LEFT, RIGHT)]
    assert distances.dtype == dtype
    assert distances.tolist() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("dtype", DTYPES)
def test_distance_matrix_hand_values(dtype):
    matrix = distance_matrix(torch.tensor(BATCH_POINTS, dtype=dtype))
    expected = [[euclidean(p, q) for q in BATCH_POINTS] for p in BATCH_POINTS]
    for row, expected_row in zip(matrix.tolist(), expected):
        assert row == pytest.approx(expected_row, rel=1e-6, abs=1e-4)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("margin", [1.0, 2.5])
def test_contrastive_loss_hand_loop(dtype, margin):
    emb1, emb2 = torch.tensor(LEFT, dtype=dtype), torch.tensor(RIGHT, dtype=dtype)
    same = torch.tensor(SAME, dtype=dtype)
    terms = loop_contrastive(LEFT, RIGHT, SAME, margin)

    mean = contrastive_loss(emb1, emb2, same, margin=margin)
    total = contrastive_loss(emb1, emb2, same, margin=margin, reduction="sum")
    per_pair = contrastive_loss(emb1, emb2, same, margin=margin, reduction="none")

    assert mean.item() == pytest.approx(sum(terms) / len(terms), rel=1e-6)
    assert total.item() == pytest.approx(sum(terms), rel=1e-6)
    assert per_pair.tolist() == pytest.approx(terms, rel=1e-6, abs=1e-6)


@pytest.mark.parametrize("same_dtype", [torch.int64, torch.bool, torch.float32])
def test_contrastive_loss_label_dtypes(same_dtype):
    emb1, emb2 = torch.tensor(LEFT), torch.tensor(RIGHT)
    expected = sum(loop_contrastive(LEFT, RIGHT, SAME, 1.0)) / len(SAME)
    loss = contrastive_loss(emb1, emb2, torch.tensor(SAME).to(same_dtype))
    assert loss.item() == pytest.approx(expected, rel=1e-6)


def test_contrastive_loss_no_factor_half():
    # A positive pair at distance 5 costs 25, not the 12.5 that Hadsell, Chopra and LeCun's 1/2 * d^2 gives.
    loss = contrastive_loss(torch.tensor([[0.0, 0.0]]), torch.tensor([[3.0, 4.0]]), torch.tensor([1]))
    assert loss.item() == pytest.approx(25.0)


def test_contrastive_module_matches_function():
    emb1, emb2, same = torch.tensor(LEFT), torch.tensor(RIGHT), torch.tensor(SAME)
    module = ContrastiveLoss(margin=2.0)
    assert module(emb1, emb2, same).item() == contrastive_loss(emb1, emb2, same, margin=2.0).item()
    assert "margin=2.0" in repr(module)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triplet_loss_hand_loop(dtype):
    anchors = [(0.0, 0.0), (0.0, 0.0), (1.0, 1.0), (2.0, 2.0)]
    positives = [(3.0, 4.0), (0.3, 0.4), (1.0, 1.1), (2.0, 2.0)]
    negatives = [(0.0, 4.0), (0.0, 0.6), (1.0, 3.0), (2.05, 2.0)]
    margin = 0.2
    expected = [max(0.0, euclidean(a, p) - euclidean(a, n) + margin)
                for a, p, n in zip(anchors, positives, negatives)]

    per_triplet = triplet_loss(torch.tensor(anchors, dtype=dtype), torch.tensor(positives, dtype=dtype),
                               torch.tensor(negatives, dtype=dtype), margin=margin, reduction="none")
    assert per_triplet.tolist() == pytest.approx(expected, rel=1e-5, abs=1e-4)


@pytest.mark.parametrize("margin", [0.2, 1.0])
def test_triplet_loss_matches_torch(margin):
    generator = torch.Generator().manual_seed(0)
    anchor, positive, negative = torch.randn(3, 64, 8, generator=generator)
    expected = torch.nn.TripletMarginLoss(margin=margin, p=2)(anchor, positive, negative)
    # torch adds eps = 1e-6 to every coordinate difference, which moves each distance by up to sqrt(D) * 1e-6.
    assert triplet_loss(anchor, positive, negative, margin=margin).item() == pytest.approx(expected.item(),
                                                                                           abs=1e-5)


def test_triplet_module_matches_function():
    generator = torch.Generator().manual_seed(1)
    anchor, positive, negative = torch.randn(3, 16, 4, generator=generator)
    module = TripletLoss(margin=0.5, reduction="sum")
    expected = triplet_loss(anchor, positive, negative, margin=0.5, reduction="sum")
    assert module(anchor, positive, negative).item() == expected.item()


def test_contrastive_and_triplet_gradcheck():
    generator = torch.Generator().manual_seed(2)
    emb1, emb2, emb3 = torch.randn(3, 6, 3, generator=generator, dtype=torch.float64).requires_grad_()
    same = torch.tensor([1, 0, 1, 0, 1, 0])
    assert torch.autograd.gradcheck(lambda a, b: contrastive_loss(a, b, same, margin=2.0), (emb1, emb2))
    assert torch.autograd.gradcheck(lambda a, p, n: triplet_loss(a, p, n, margin=1.0), (emb1, emb2, emb3))


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_all_hand_loop(dtype):
    margin = 0.5
    losses = []
    for a, p, n in loop_valid_triplets(BATCH_LABELS):
        d_ap = euclidean(BATCH_POINTS[a], BATCH_POINTS[p])
        d_an = euclidean(BATCH_POINTS[a], BATCH_POINTS[n])
        losses.append(max(0.0, d_ap - d_an + margin))
    active = sum(loss > 0 for loss in losses) / len(losses)

    loss, fraction_active = batch_all_triplet_loss(torch.tensor(BATCH_POINTS, dtype=dtype),
                                                   torch.tensor(BATCH_LABELS), margin=margin)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert fraction_active == pytest.approx(active)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_all_matches_pml(seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(24, 5, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 5, (24,), generator=generator)
    margin = 0.3
    # Without a miner pml's TripletMarginLoss uses every valid triplet (triplets_per_anchor="all"). Its default
    # AvgNonZeroReducer averages only over triplets with a loss above zero, so MeanReducer is needed to average
    # over all valid triplets as batch_all_triplet_loss does.
    pml_loss = pml_losses.TripletMarginLoss(margin=margin, distance=pml_distance(),
                                            reducer=pml_reducers.MeanReducer())
    loss, _ = batch_all_triplet_loss(embeddings, labels, margin=margin)
    assert loss.item() == pytest.approx(pml_loss(embeddings, labels).item(), rel=1e-9)


def test_batch_all_fraction_matches_pml_miner():
    generator = torch.Generator().manual_seed(3)
    embeddings = torch.randn(20, 4, generator=generator, dtype=torch.float64)
    labels = torch.randint(0, 4, (20,), generator=generator)
    margin = 0.5
    num_valid = len(list(loop_valid_triplets(labels.tolist())))
    # The miner keeps triplets with d(a, n) - d(a, p) <= margin, a loss >= 0 rather than > 0. The two counts differ
    # only for a triplet exactly at the margin, which random float64 embeddings do not produce.
    miner = pml_miners.TripletMarginMiner(margin=margin, type_of_triplets="all", distance=pml_distance())
    mined_anchors, _, _ = miner(embeddings, labels)
    _, fraction_active = batch_all_triplet_loss(embeddings, labels, margin=margin)
    assert fraction_active == pytest.approx(len(mined_anchors) / num_valid)


@pytest.mark.parametrize("dtype", DTYPES)
def test_batch_hard_hand_loop(dtype):
    margin = 0.5
    losses = []
    for a, label in enumerate(BATCH_LABELS):
        positives = [p for p, other in enumerate(BATCH_LABELS) if other == label and p != a]
        negatives = [n for n, other in enumerate(BATCH_LABELS) if other != label]
        if not positives or not negatives:
            continue
        hardest_positive = max(euclidean(BATCH_POINTS[a], BATCH_POINTS[p]) for p in positives)
        hardest_negative = min(euclidean(BATCH_POINTS[a], BATCH_POINTS[n]) for n in negatives)
        losses.append(max(0.0, hardest_positive - hardest_negative + margin))

    loss = batch_hard_triplet_loss(torch.tensor(BATCH_POINTS, dtype=dtype), torch.tensor(BATCH_LABELS),
                                   margin=margin)
    assert loss.item() == pytest.approx(sum(losses) / len(losses), rel=1e-5)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_batch_hard_matches_pml(seed):
    generator = torch.Generator().manual_seed(seed)
    embeddings = torch.randn(24, 5, generator=generator, dtype=torch.float64)
    # Label 9 has a single image, so that anchor has no positive and both implementations must skip it.
    labels = torch.cat([torch.randint(0, 4, (23,), generator=generator), torch.tensor([9])])
    margin = 0.3
    # BatchHardMiner returns one (anchor, hardest positive, hardest negative) triplet per anchor that has both.
    # MeanReducer then averages over those anchors, like batch_hard_triplet_loss. The default AvgNonZeroReducer
    # would skip anchors whose loss is already zero.
    miner = pml_miners.BatchHardMiner(distance=pml_distance())
    pml_loss = pml_losses.TripletMarginLoss(margin=margin, distance=pml_distance(),
                                            reducer=pml_reducers.MeanReducer())
    expected = pml_loss(embeddings, labels, miner(embeddings, labels))
    loss = batch_hard_triplet_loss(embeddings, labels, margin=margin)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-9)


@pytest.mark.parametrize("dtype", DTYPES)
def test_all_pairs_contrastive_hand_loop(dtype):
    margin = 1.5
    left, right, same = [], [], []
    for i in range(len(BATCH_POINTS)):
        for j in range(i + 1, len(BATCH_POINTS)):
            left.append(BATCH_POINTS[i])
            right.append(BATCH_POINTS[j])
            same.append(int(BATCH_LABELS[i] == BATCH_LABELS[j]))
    terms = loop_contrastive(left, right, same, margin)

    loss = all_pairs_contrastive_loss(torch.tensor(BATCH_POINTS, dtype=dtype), torch.tensor(BATCH_LABELS),
                                      margin=margin)
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-5)


def identical_embeddings(dtype=torch.float32) -> torch.Tensor:
    return torch.ones(4, 3, dtype=dtype, requires_grad=True)


ZERO_DISTANCE_CASES = {
    "contrastive_positive": lambda e: contrastive_loss(e, e.detach().clone(), torch.ones(4)),
    "contrastive_negative": lambda e: contrastive_loss(e, e.detach().clone(), torch.zeros(4)),
    "triplet": lambda e: triplet_loss(e, e * 1, e * 1),
    "batch_all": lambda e: batch_all_triplet_loss(e, torch.tensor([0, 0, 1, 1]))[0],
    "batch_hard": lambda e: batch_hard_triplet_loss(e, torch.tensor([0, 0, 1, 1])),
    "all_pairs_contrastive": lambda e: all_pairs_contrastive_loss(e, torch.tensor([0, 0, 1, 1])),
}


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("case", sorted(ZERO_DISTANCE_CASES))
def test_zero_distance_gradient_finite(case, dtype):
    embeddings = identical_embeddings(dtype)
    loss = ZERO_DISTANCE_CASES[case](embeddings)
    loss.backward()
    assert torch.isfinite(loss)
    assert torch.isfinite(embeddings.grad).all()


EMPTY_CASES = {
    "contrastive_empty_batch": lambda e: contrastive_loss(e[:0], e[:0], torch.zeros(0)),
    "triplet_empty_batch": lambda e: triplet_loss(e[:0], e[:0], e[:0]),
    "batch_all_one_class": lambda e: batch_all_triplet_loss(e, torch.zeros(4, dtype=torch.long))[0],
    "batch_all_all_distinct": lambda e: batch_all_triplet_loss(e, torch.arange(4))[0],
    "batch_hard_all_distinct": lambda e: batch_hard_triplet_loss(e, torch.arange(4)),
    "batch_hard_one_class": lambda e: batch_hard_triplet_loss(e, torch.zeros(4, dtype=torch.long)),
    "all_pairs_single_embedding": lambda e: all_pairs_contrastive_loss(e[:1], torch.zeros(1)),
}


@pytest.mark.parametrize("case", sorted(EMPTY_CASES))
def test_no_valid_input_zero_loss(case):
    embeddings = torch.randn(4, 3, generator=torch.Generator().manual_seed(0)).requires_grad_()
    loss = EMPTY_CASES[case](embeddings)
    loss.backward()
    assert loss.shape == ()
    assert loss.item() == 0.0
    assert torch.equal(embeddings.grad, torch.zeros_like(embeddings))


def test_batch_all_no_triplets_fraction_zero():
    _, fraction_active = batch_all_triplet_loss(torch.randn(4, 3), torch.zeros(4, dtype=torch.long))
    assert fraction_active == 0.0


MARGIN_CALLS = {
    "contrastive_loss": lambda m: contrastive_loss(torch.zeros(2, 2), torch.ones(2, 2), torch.ones(2), margin=m),
    "triplet_loss": lambda m: triplet_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.ones(2, 2), margin=m),
    "batch_all": lambda m: batch_all_triplet_loss(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), margin=m),
    "batch_hard": lambda m: batch_hard_triplet_loss(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), margin=m),
    "all_pairs": lambda m: all_pairs_contrastive_loss(torch.zeros(4, 2), torch.tensor([0, 0, 1, 1]), margin=m),
    "ContrastiveLoss": lambda m: ContrastiveLoss(margin=m),
    "TripletLoss": lambda m: TripletLoss(margin=m),
}


@pytest.mark.parametrize("margin", [0.0, -1.0, float("nan"), float("inf")])
@pytest.mark.parametrize("call", sorted(MARGIN_CALLS))
def test_invalid_margin_rejected(call, margin):
    with pytest.raises(ValueError, match=r"margin=.*must be positive"):
        MARGIN_CALLS[call](margin)


def test_mismatched_pair_shapes_named():
    with pytest.raises(ValueError, match=r"emb1 \(4, 2\), emb2 \(4, 3\)"):
        contrastive_loss(torch.zeros(4, 2), torch.zeros(4, 3), torch.ones(4))


def test_mismatched_triplet_shapes_named():
    with pytest.raises(ValueError, match=r"negative \(3, 2\)"):
        triplet_loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.zeros(3, 2))


def test_one_dimensional_embeddings_rejected():
    with pytest.raises(ValueError, match=r"emb1 must have shape \(B, D\), got \(4,\)"):
        contrastive_loss(torch.zeros(4), torch.zeros(4), torch.ones(4))


def test_same_wrong_length_rejected():
    with pytest.raises(ValueError, match=r"same must have shape \(4,\).*got \(3,\)"):
        contrastive_loss(torch.zeros(4, 2), torch.zeros(4, 2), torch.ones(3))


def test_same_outside_zero_one_rejected():
    with pytest.raises(ValueError, match=r"found \[0, 1, 2\]"):
        contrastive_loss(torch.zeros(3, 2), torch.zeros(3, 2), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("loss_function", [batch_all_triplet_loss, batch_hard_triplet_loss,
                                           all_pairs_contrastive_loss])
def test_labels_wrong_length_rejected(loss_function):
    with pytest.raises(ValueError, match=r"labels must have shape \(4,\).*got \(5,\)"):
        loss_function(torch.zeros(4, 2), torch.zeros(5, dtype=torch.long))


def test_invalid_reduction_rejected():
    with pytest.raises(ValueError, match=r"reduction='avg'"):
        triplet_loss(torch.zeros(2, 2), torch.zeros(2, 2), torch.zeros(2, 2), reduction="avg")


def test_negative_eps_rejected():
    with pytest.raises(ValueError, match=r"eps=-1"):
        pairwise_distance(torch.zeros(2, 2), torch.zeros(2, 2), eps=-1.0)
