"""The plateau doctor on small runs that break training on purpose, one kind of fault at a time.

Each fixture trains the small encoder for a few hundred steps at most on a subset of the digits, with the fault
built in the way a learner would write it. The tests check the doctor's top finding and the measured value that
gives the fault away.
"""

import json
import math

import matplotlib
import pytest
import torch
import torch.nn.functional as F
from pytorch_metric_learning import losses as pml_losses
from pytorch_metric_learning import miners
from torch import nn

from labutils.data import CourseData, Split, make_course_data
from labutils.diagnose import CAUSES, Finding, diagnose, format_report, load_history, plot_evidence
from labutils.history import History
from labutils.losses import (batch_all_triplet_loss, batch_hard_triplet_loss, contrastive_terms, distance_matrix,
                             pairwise_distance, triplet_loss)
from labutils.models import make_encoder
from labutils.training import TrainConfig, fit

matplotlib.use("Agg")

PAIRS = {"epochs": 5, "pairs_per_epoch": 384, "batch_size": 64, "eval_pairs": 200}
TRIPLETS = {"loss": "triplet", "epochs": 5, "pairs_per_epoch": 258, "batch_size": 43, "eval_pairs": 200,
            "margin": 0.2}


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Train on one CPU thread, so the values measured below do not depend on the machine's core count.

    Small networks also train faster this way than with two threads competing for two busy cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def digits():
    return make_course_data("digits", seed=0, max_images_per_class=40)


def train(model, data, loss_fn=None, accuracy_fn=None, **settings):
    config = TrainConfig(**{**PAIRS, **settings})
    return fit(model, data, config, progress=False, loss_fn=loss_fn, accuracy_fn=accuracy_fn)


def small(seed=0, **overrides):
    torch.manual_seed(seed)
    return make_encoder("small", **overrides)


def top(findings):
    return findings[0].cause


# ---- faults written the way a learner might write them -------------------------------------------------------


def split_pairs(embeddings, labels):
    left, right = embeddings.chunk(2)
    left_labels, right_labels = labels.chunk(2)
    return left, right, (left_labels == right_labels).float()


def dissimilar_is_one_contrastive(embeddings, labels):
    """Hadsell et al.'s contrastive loss, written for label 0 = similar, fed labels where 1 means "same"."""
    left, right, same = split_pairs(embeddings, labels)
    distances = pairwise_distance(left, right)
    return ((1 - same) * distances ** 2 + same * torch.clamp(1.0 - distances, min=0) ** 2).mean()


def swapped_roles_triplet(embeddings, labels):
    anchor, positive, negative = embeddings.chunk(3)
    return triplet_loss(anchor, negative, positive, margin=1.0)


def broadcast_accuracy(distances, same, threshold):
    """Compare predictions of shape (P, 1) with labels of shape (P,), which broadcasts to a P x P table."""
    return ((distances < threshold).float().unsqueeze(1) == same).float().mean().item()


def reversed_accuracy(distances, same, threshold):
    """Calls a pair "same" when its distance is above the threshold."""
    return ((distances > threshold).float() == same).float().mean().item()


def sigmoid_of_distance_bce(embeddings, labels):
    """sigmoid(d) used as the probability of "same", with no learned weight or bias."""
    left, right, same = split_pairs(embeddings, labels)
    return F.binary_cross_entropy(torch.sigmoid(pairwise_distance(left, right)), same)


def sigmoid_of_distance_accuracy(distances, same, threshold):
    return ((torch.sigmoid(distances) > 0.5).float() == same).float().mean().item()


class SquashedDistance(nn.Module):
    """The encoder plus a score head sigmoid(Linear(BatchNorm(d))) that squashes a pair's distance into (0, 1)."""

    def __init__(self, encoder):
        super().__init__()
        self.encoder = encoder
        self.score = nn.Sequential(nn.BatchNorm1d(1), nn.Linear(1, 1), nn.Sigmoid())

    def forward(self, images):
        return self.encoder(images)


def squashed_contrastive(model, margin):
    def loss(embeddings, labels):
        left, right, same = split_pairs(embeddings, labels)
        scores = model.score(pairwise_distance(left, right).unsqueeze(1)).squeeze(1)
        return contrastive_terms(scores, same, margin).mean()

    return loss


def batch_hard(margin):
    return lambda embeddings, labels: batch_hard_triplet_loss(embeddings, labels, margin)


def batch_all(margin):
    return lambda embeddings, labels: batch_all_triplet_loss(embeddings, labels, margin)[0]


def soft_margin_batch_hard(embeddings, labels):
    """Batch-hard with log(1 + exp(hardest positive - hardest negative)) in place of the hinge."""
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    not_self = ~torch.eye(len(labels), dtype=torch.bool)
    positive, negative = same & not_self, ~same
    usable = positive.any(dim=1) & negative.any(dim=1)
    distances = distance_matrix(embeddings)[usable]
    hardest_positive = distances.masked_fill(~positive[usable], float("-inf")).amax(dim=1)
    hardest_negative = distances.masked_fill(~negative[usable], float("inf")).amin(dim=1)
    return F.softplus(hardest_positive - hardest_negative).mean()


def semihard_mined_loss(margin):
    """Triplet loss over semi-hard triplets mined in the batch, averaged over the triplets with loss above 0."""
    miner = miners.TripletMarginMiner(margin=margin, type_of_triplets="semihard")
    loss = pml_losses.TripletMarginLoss(margin=margin)
    return lambda embeddings, labels: loss(embeddings, labels, miner(embeddings, labels))


def with_l2_penalty(model, weight):
    def loss(embeddings, labels):
        left, right, same = split_pairs(embeddings, labels)
        data_term = contrastive_terms(pairwise_distance(left, right), same, 1.0).mean()
        return data_term + weight * sum((p ** 2).sum() for p in model.parameters())

    return loss


class SimSiam(nn.Module):
    """Encoder, projector and predictor of a SimSiam-style network; `forward` returns unit-length projections."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.encoder = make_encoder("small")
        self.projector = nn.Sequential(nn.Linear(16, 64), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 16))
        self.predictor = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, images):
        return F.normalize(self.projector(self.encoder(images)), dim=1)


def negative_cosine(model, stop_gradient):
    """SimSiam's loss, with the two images of each positive pair as the two views."""

    def loss(embeddings, labels):
        left, right, same = split_pairs(embeddings, labels)
        first, second = left[same == 1], right[same == 1]
        targets = (first.detach(), second.detach()) if stop_gradient else (first, second)
        return -(F.cosine_similarity(model.predictor(first), targets[1]).mean()
                 + F.cosine_similarity(model.predictor(second), targets[0]).mean()) / 2

    return loss


def with_noisy_labels(data, rate, seed=0):
    generator = torch.Generator().manual_seed(seed)
    labels = data.train.labels.clone()
    flipped = torch.rand(len(labels), generator=generator) < rate
    labels[flipped] = torch.randint(0, 7, (int(flipped.sum()),), generator=generator)
    train_split = Split(data.train.images, labels, "train", data.train.indices)
    return CourseData(train_split, data.val_seen, data.val_unseen)


def pretrain_as_classifier(encoder, split, classes):
    """One epoch of cross-entropy on `classes` through a temporary linear head, as a stand-in for pretraining."""
    torch.manual_seed(0)
    keep = torch.isin(split.labels, torch.tensor(classes))
    images, labels = split.images[keep], torch.searchsorted(torch.tensor(classes), split.labels[keep])
    head = nn.Linear(encoder.embedding_dim, len(classes))
    optimizer = torch.optim.Adam([*encoder.parameters(), *head.parameters()], lr=1e-3)
    for batch in torch.randperm(len(labels)).split(64):
        loss = F.cross_entropy(head(encoder(images[batch])), labels[batch])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return encoder


# ---- label convention ----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def flipped_contrastive_run(digits):
    return train(small(), digits, loss_fn=dissimilar_is_one_contrastive)


@pytest.fixture(scope="module")
def swapped_triplet_run(digits):
    return train(small(), digits, loss_fn=swapped_roles_triplet, **{**TRIPLETS, "margin": 1.0})


def test_flipped_contrastive_labels(flipped_contrastive_run):
    assert top(diagnose(flipped_contrastive_run)) == "label_convention"


def test_flipped_labels_keep_training_at_chance(flipped_contrastive_run):
    # Pushing positive pairs out to the margin while pulling negatives in cannot be satisfied on a metric, so
    # even the training pairs end up ranked at chance instead of inverted.
    assert max(flipped_contrastive_run["train_auc"]) < 0.6


def test_swapped_triplet_roles(swapped_triplet_run):
    assert top(diagnose(swapped_triplet_run)) == "label_convention"


# ---- the accuracy metric -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def broadcast_run(digits):
    return train(small(), digits, accuracy_fn=broadcast_accuracy)


@pytest.fixture(scope="module")
def broadcast_triplet_run(digits):
    return train(small(), digits, accuracy_fn=broadcast_accuracy, **TRIPLETS)


@pytest.fixture(scope="module")
def reversed_run(digits):
    return train(small(), digits, accuracy_fn=reversed_accuracy)


def test_broadcast_accuracy(broadcast_run):
    assert top(diagnose(broadcast_run)) == "metric_shape"


def test_broadcast_accuracy_is_exactly_half(broadcast_run):
    # On balanced pairs every row of the (P, P) table matches half the labels, whatever the predictions.
    assert set(broadcast_run["val_unseen_acc"]) == {0.5}


def test_broadcast_accuracy_hides_good_ranking(broadcast_run):
    assert broadcast_run.last("val_seen_auc") > 0.95


def test_broadcast_accuracy_with_triplets(broadcast_triplet_run):
    assert top(diagnose(broadcast_triplet_run)) == "metric_shape"


def test_reversed_comparison(reversed_run):
    assert top(diagnose(reversed_run)) == "metric_threshold"


def test_reversed_comparison_inverts_accuracy(reversed_run):
    assert reversed_run.last("train_acc") < 0.1


# ---- loss floors: targets the model cannot reach ---------------------------------------------------------------


@pytest.fixture(scope="module")
def sigmoid_score_run(digits):
    return train(small(), digits, loss_fn=sigmoid_of_distance_bce, accuracy_fn=sigmoid_of_distance_accuracy)


@pytest.fixture(scope="module")
def squashed_distance_run(digits):
    model = SquashedDistance(small())
    return train(model, digits, loss_fn=squashed_contrastive(model, margin=2.0), margin=2.0)


@pytest.fixture(scope="module")
def unit_length_margin_run(digits):
    return train(small(normalize=True), digits, margin=3.0)


@pytest.fixture(scope="module")
def unit_length_triplet_margin_run(digits):
    return train(small(normalize=True), digits, **{**TRIPLETS, "margin": 2.5})


def test_sigmoid_of_distance_score(sigmoid_score_run):
    # sigmoid(d) >= 0.5 for every distance d >= 0, so the target 0 of negative pairs is out of reach.
    findings = diagnose(sigmoid_score_run, loss_settings={"output_range": (0.5, 1.0), "targets": (0.0, 1.0)})
    assert top(findings) == "margin_unreachable"


def test_sigmoid_of_distance_calls_every_pair_same(sigmoid_score_run):
    assert set(sigmoid_score_run["val_unseen_acc"]) == {0.5}


def test_sigmoid_of_distance_loss_floor(sigmoid_score_run):
    # At best every negative pair sits at d = 0, where sigmoid(d) = 0.5 costs ln 2.
    assert min(sigmoid_score_run["train_loss"]) > math.log(2) / 2


def test_squashed_distance_below_margin(squashed_distance_run):
    findings = diagnose(squashed_distance_run, loss_settings={"max_distance": 1.0})
    assert top(findings) == "margin_unreachable"


def test_squashed_distance_floor_in_evidence(squashed_distance_run):
    finding = diagnose(squashed_distance_run, loss_settings={"max_distance": 1.0})[0]
    assert finding.evidence["loss_floor"] == pytest.approx(0.5)


def test_squashed_distance_loss_stays_above_floor(squashed_distance_run):
    assert min(squashed_distance_run["train_loss"]) > 0.5


def test_unit_length_embeddings_with_large_margin(unit_length_margin_run):
    # No settings given: the history shows unit-length embeddings, which are at most 2 apart.
    assert top(diagnose(unit_length_margin_run)) == "margin_unreachable"


def test_unit_length_triplet_margin(unit_length_triplet_margin_run):
    assert top(diagnose(unit_length_triplet_margin_run)) == "margin_unreachable"


# ---- collapse and dead units -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def noisy_soft_margin_run(digits):
    return train(small(), with_noisy_labels(digits, 0.3), loss_fn=soft_margin_batch_hard, **TRIPLETS)


@pytest.fixture(scope="module")
def noisy_batch_hard_run(digits):
    return train(small(normalize=True), with_noisy_labels(digits, 0.3), loss_fn=batch_hard(0.2), **TRIPLETS)


@pytest.fixture(scope="module")
def simsiam_without_stop_gradient_run(digits):
    model = SimSiam()
    return train(model, digits, loss_fn=negative_cosine(model, stop_gradient=False), epochs=8, pairs_per_epoch=960)


@pytest.fixture(scope="module")
def dead_output_run(digits):
    encoder = small()
    nn.init.constant_(encoder.head[-1].bias, -5.0)
    return train(nn.Sequential(encoder, nn.ReLU()), digits)


@pytest.fixture(scope="module")
def dead_output_triplet_run(digits):
    encoder = small()
    nn.init.constant_(encoder.head[-1].bias, -5.0)
    return train(nn.Sequential(encoder, nn.ReLU()), digits, **{**TRIPLETS, "margin": 1.0})


def test_noisy_labels_collapse_soft_margin(noisy_soft_margin_run):
    assert top(diagnose(noisy_soft_margin_run)) == "collapse"


def test_soft_margin_collapse_sits_at_ln2(noisy_soft_margin_run):
    # With every distance equal, log(1 + exp(0)) = ln 2.
    assert noisy_soft_margin_run.last("train_loss") == pytest.approx(math.log(2), abs=0.01)


def test_noisy_labels_collapse_batch_hard(noisy_batch_hard_run):
    assert top(diagnose(noisy_batch_hard_run)) == "collapse"


def test_simsiam_without_stop_gradient(simsiam_without_stop_gradient_run):
    assert top(diagnose(simsiam_without_stop_gradient_run)) == "collapse"


def test_dead_output_relu(dead_output_run):
    assert top(diagnose(dead_output_run)) == "dead_units"


def test_dead_output_layer_fully_dead(dead_output_run):
    assert set(dead_output_run["dead_units_layer_max"]) == {1.0}


def test_dead_output_loss_is_half_margin_squared(dead_output_run):
    # Every embedding is 0, so positive pairs cost 0 and negative pairs margin^2 = 1: half of 1 on average. The
    # eps inside the distance's square root makes each distance 3.2e-5 instead of 0.
    assert max(abs(loss - 0.5) for loss in dead_output_run["train_loss"]) < 1e-4


def test_dead_output_accuracy_is_half(dead_output_run):
    assert set(dead_output_run["val_unseen_acc"]) == {0.5}


def test_dead_output_relu_with_triplets(dead_output_triplet_run):
    assert top(diagnose(dead_output_triplet_run)) == "dead_units"


def test_dead_output_triplet_loss_is_margin(dead_output_triplet_run):
    assert set(dead_output_triplet_run["train_loss"]) == {1.0}


# ---- the learning rate -----------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def batch_hard_high_lr_run(digits):
    return train(small(seed=1), digits, loss_fn=batch_hard(0.5), lr=1e-2, seed=1,
                 **{**TRIPLETS, "margin": 0.5, "pairs_per_epoch": 860, "epochs": 2})


@pytest.fixture(scope="module")
def contrastive_high_lr_run(digits):
    return train(small(), digits, lr=3e-2)


@pytest.fixture(scope="module")
def fine_tune_high_lr_run(digits):
    encoder = pretrain_as_classifier(small(), digits.train, [0, 1, 2, 3, 4])
    encoder.head[-1] = nn.Linear(64, 16)
    encoder.normalize = True
    return train(encoder, digits, loss_fn=batch_all(0.2), lr=1e-2, **TRIPLETS)


@pytest.fixture(scope="module")
def plain_sgd_low_lr_run(digits):
    return train(small(), digits, optimizer="sgd", momentum=0.0, lr=1e-4)


@pytest.fixture(scope="module")
def adam_low_lr_run(digits):
    return train(small(), digits, lr=1e-6)


def test_batch_hard_high_lr(batch_hard_high_lr_run):
    assert top(diagnose(batch_hard_high_lr_run)) == "lr_too_high"


def test_batch_hard_high_lr_first_epoch_at_margin(batch_hard_high_lr_run):
    # Collapsed embeddings make every hardest positive and negative equally far, so each anchor costs the margin.
    # The weights then blow up and the loss leaves the margin in the second epoch. The first epoch's mean also
    # includes the steps where the loss starts to fall, which CPUs with different vector units round
    # differently: 0.455-0.5 measured.
    first, second = batch_hard_high_lr_run["train_loss"][:2]
    assert first == pytest.approx(0.5, abs=0.1)
    assert second < 0.25


def test_contrastive_high_lr(contrastive_high_lr_run):
    assert top(diagnose(contrastive_high_lr_run)) == "lr_too_high"


def test_fine_tune_everything_high_lr(fine_tune_high_lr_run):
    assert top(diagnose(fine_tune_high_lr_run)) == "lr_too_high"


def test_divergence_is_lr_too_high(digits):
    with pytest.warns(RuntimeWarning, match="loss became"):
        history = train(small(), digits, optimizer="sgd", lr=1e12, epochs=2)
    assert top(diagnose(history)) == "lr_too_high"


def test_plain_sgd_low_lr(plain_sgd_low_lr_run):
    assert top(diagnose(plain_sgd_low_lr_run)) == "lr_too_low"


def test_plain_sgd_update_ratio(plain_sgd_low_lr_run):
    assert max(plain_sgd_low_lr_run["update_ratio"]) < 1e-4


def test_adam_low_lr(adam_low_lr_run):
    assert top(diagnose(adam_low_lr_run)) == "lr_too_low"


# ---- regularisation, generalisation and mined losses ----------------------------------------------------------


@pytest.fixture(scope="module")
def l2_penalty_run(digits):
    model = small()
    return train(model, digits, loss_fn=with_l2_penalty(model, 0.01))


@pytest.fixture(scope="module")
def weight_decay_run(digits):
    return train(small(), digits, weight_decay=0.1)


@pytest.fixture(scope="module")
def three_identities_run():
    data = make_course_data("digits", seed=0, max_images_per_class=40, unseen_classes=[3, 4, 5, 6, 7, 8, 9])
    return train(small(), data)


@pytest.fixture(scope="module")
def two_identities_triplet_run():
    data = make_course_data("digits", seed=0, max_images_per_class=40, unseen_classes=[2, 3, 4, 5, 6, 7, 8, 9])
    return train(small(normalize=True), data, loss_fn=batch_all(0.2), **TRIPLETS)


@pytest.fixture(scope="module")
def memorized_noise_run():
    data = with_noisy_labels(make_course_data("digits", seed=0, max_images_per_class=20), 0.4)
    return train(small(hidden=256, embedding_dim=64), data, epochs=10)


@pytest.fixture(scope="module")
def mined_loss_run(digits):
    return train(small(normalize=True), digits, loss_fn=semihard_mined_loss(0.2), **TRIPLETS)


def test_l2_penalty_too_strong(l2_penalty_run):
    assert top(diagnose(l2_penalty_run)) == "regularization_too_strong"


def test_l2_penalty_shrinks_weights(l2_penalty_run):
    assert l2_penalty_run.last("weight_norm") < 0.75 * l2_penalty_run.config["initial_weight_norm"]


def test_weight_decay_too_strong(weight_decay_run):
    assert top(diagnose(weight_decay_run)) == "regularization_too_strong"


def test_three_training_identities(three_identities_run):
    assert top(diagnose(three_identities_run)) == "too_few_identities"


def test_two_training_identities_with_triplets(two_identities_triplet_run):
    assert top(diagnose(two_identities_triplet_run)) == "too_few_identities"


def test_few_identities_is_not_memorization(three_identities_run):
    causes = [finding.cause for finding in diagnose(three_identities_run)]
    assert "memorization" not in causes


def test_memorized_noisy_labels(memorized_noise_run):
    assert top(diagnose(memorized_noise_run)) == "memorization"


def test_memorization_is_not_few_identities(memorized_noise_run):
    causes = [finding.cause for finding in diagnose(memorized_noise_run)]
    assert "too_few_identities" not in causes


def test_mined_validation_loss(mined_loss_run):
    assert top(diagnose(mined_loss_run)) == "mining_artifact"


# ---- findings that need the model or the data ------------------------------------------------------------------


@pytest.fixture(scope="module")
def frozen_batch_norm_run(digits):
    encoder = small()
    # Momentum 0 keeps the running statistics at their initial mean 0 and variance 1 for ever.
    encoder.head = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.BatchNorm1d(64, momentum=0.0),
                                 nn.ReLU(), nn.Linear(64, 16))
    return train(encoder, digits), encoder


@pytest.fixture(scope="module")
def heavy_dropout_run(digits):
    encoder = small(dropout=0.8)
    return train(encoder, digits), encoder


@pytest.fixture(scope="module")
def leaky_data(digits):
    # Validation built from the same pool of images as training, as happens when pairs are split instead of images.
    shared = torch.arange(0, len(digits.train), 2)
    val_seen = Split(torch.cat([digits.val_seen.images, digits.train.images[shared]]),
                     torch.cat([digits.val_seen.labels, digits.train.labels[shared]]), "val_seen",
                     torch.cat([digits.val_seen.indices, digits.train.indices[shared]]))
    return CourseData(digits.train, val_seen, digits.val_unseen)


@pytest.fixture(scope="module")
def blank_data(digits):
    def blank_every_third(split):
        images = split.images.clone()
        images[::3] = 0.0
        return Split(images, split.labels, split.name, split.indices)

    return CourseData(*(blank_every_third(getattr(digits, name)) for name in ("train", "val_seen", "val_unseen")))


def test_frozen_batch_norm_statistics(frozen_batch_norm_run, digits):
    history, encoder = frozen_batch_norm_run
    assert top(diagnose(history, model=encoder, inputs=digits)) == "eval_mode_mismatch"


def test_heavy_dropout(heavy_dropout_run, digits):
    history, encoder = heavy_dropout_run
    assert top(diagnose(history, model=encoder, inputs=digits)) == "eval_mode_mismatch"


def test_shared_images_are_leakage(leaky_data):
    history = train(small(), leaky_data, epochs=2)
    assert top(diagnose(history, inputs=leaky_data)) == "leakage"


def test_leakage_counts_shared_ids(leaky_data, digits):
    finding = next(f for f in diagnose(History(rows=[{"epoch": 1, "train_loss": 0.1}]), inputs=leaky_data)
                   if f.cause == "leakage")
    assert finding.evidence["shared_ids_val_seen"] == math.ceil(len(digits.train) / 2)


def test_blank_images(blank_data):
    history = train(small(), blank_data, epochs=2)
    assert top(diagnose(history, inputs=blank_data)) == "blank_inputs"


def test_blank_fraction_in_evidence(blank_data):
    finding = diagnose(History(rows=[{"epoch": 1, "train_loss": 0.1}]), inputs=blank_data)[0]
    assert finding.evidence["blank_fraction"] == pytest.approx(1 / 3, abs=0.01)


# ---- healthy runs and recipes that train normally --------------------------------------------------------------


@pytest.fixture(scope="module", params=[0, 1, 2])
def course_run(request, digits):
    return train(small(seed=request.param), digits, seed=request.param)


@pytest.fixture(scope="module")
def tiny_margin_batch_hard_run(digits):
    return train(small(normalize=True), digits, loss_fn=batch_hard(0.01), **{**TRIPLETS, "margin": 0.01})


@pytest.fixture(scope="module")
def unloaded_pretrained_run(digits):
    pretrained = pretrain_as_classifier(small(), digits.train, list(range(7)))
    # A checkpoint saved from nn.DataParallel prefixes every key with "module.", so nothing matches.
    checkpoint = {f"module.{key}": value for key, value in pretrained.state_dict().items()}
    fresh = small(seed=1)
    result = fresh.load_state_dict(checkpoint, strict=False)
    return train(fresh, digits, loss_fn=soft_margin_batch_hard, **TRIPLETS), result


def test_course_run_is_healthy(course_run):
    assert top(diagnose(course_run)) == "healthy"


def test_course_run_lists_unseen_gap_below_report(course_run):
    # Seven training digits leave unseen digits well behind; with that many classes it is noted, not blamed.
    finding = next(f for f in diagnose(course_run) if f.cause == "too_few_identities")
    assert finding.confidence < 0.5


def test_tiny_margin_batch_hard_does_not_collapse(tiny_margin_batch_hard_run):
    # Hardest-triplet mining at margin 0.01 packs unit-length embeddings within a few hundredths of each other,
    # yet it ranks the training pairs perfectly and its loss falls far below the margin: no collapse here.
    assert "collapse" not in [finding.cause for finding in diagnose(tiny_margin_batch_hard_run)]


def test_tiny_margin_batch_hard_ranks_training_pairs(tiny_margin_batch_hard_run):
    assert tiny_margin_batch_hard_run.last("train_auc") > 0.99


def test_unloaded_checkpoint_misses_every_key(unloaded_pretrained_run):
    _, result = unloaded_pretrained_run
    assert len(result.missing_keys) == 8


def test_unloaded_checkpoint_trains_from_scratch(unloaded_pretrained_run):
    # On digits the randomly initialised encoder learns with the soft-margin loss instead of stalling at ln 2.
    history, _ = unloaded_pretrained_run
    assert history.last("train_loss") < math.log(2) - 0.1


def test_unloaded_checkpoint_run_is_healthy(unloaded_pretrained_run):
    history, _ = unloaded_pretrained_run
    assert top(diagnose(history)) == "healthy"


# ---- the interface -----------------------------------------------------------------------------------------------


def test_findings_ranked_by_confidence(flipped_contrastive_run):
    confidences = [finding.confidence for finding in diagnose(flipped_contrastive_run)]
    assert confidences == sorted(confidences, reverse=True)


def test_finding_is_frozen(dead_output_run):
    finding = diagnose(dead_output_run)[0]
    with pytest.raises(AttributeError):
        finding.cause = "healthy"


def test_finding_names_its_notebook(dead_output_run):
    finding = diagnose(dead_output_run)[0]
    assert finding.notebook == CAUSES["dead_units"]


def test_every_cause_has_a_course_notebook():
    assert {notebook[:2] for notebook in CAUSES.values()} <= {"03", "04", "05", "06", "07", "08"}


def test_diagnose_accepts_dict_and_file(dead_output_run, tmp_path):
    path = dead_output_run.save(tmp_path / "history.json")
    from_file, from_dict = diagnose(path), diagnose(json.loads(path.read_text()))
    assert [f.cause for f in from_file] == [f.cause for f in from_dict]


def test_diagnose_rejects_invalid_json(tmp_path):
    path = tmp_path / "history.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        diagnose(path)


def test_diagnose_rejects_other_json(tmp_path):
    path = tmp_path / "results.json"
    path.write_text(json.dumps({"status": "passed", "notebooks": []}))
    with pytest.raises(ValueError, match="not a history"):
        load_history(path)


def test_diagnose_rejects_missing_file(tmp_path):
    with pytest.raises(ValueError, match="not found"):
        load_history(tmp_path / "missing.json")


def test_diagnose_rejects_history_without_loss():
    with pytest.raises(ValueError, match="train_loss"):
        diagnose({"rows": [{"epoch": 1, "val_unseen_auc": 0.7}]})


def test_diagnose_rejects_labels_with_course(dead_output_run, digits):
    with pytest.raises(ValueError, match="labels must be None"):
        diagnose(dead_output_run, inputs=digits, labels=digits.val_unseen.labels)


def test_report_lists_each_finding(broadcast_run):
    findings = diagnose(broadcast_run)
    report = format_report(findings)
    assert report.count("confidence") == len(findings)


def test_report_shows_evidence(dead_output_run):
    assert "dead_units_layer_max = 1" in format_report(diagnose(dead_output_run))


def test_report_of_healthy_run(course_run):
    assert "1. healthy" in format_report(diagnose(course_run))


def test_plot_has_panel_per_finding(l2_penalty_run):
    findings = diagnose(l2_penalty_run)
    shown = [finding for finding in findings if finding.cause != "healthy"][:4]
    assert len(plot_evidence(l2_penalty_run, findings).axes) == 1 + len(shown)


def test_plot_draws_weight_norm_for_regularization(l2_penalty_run):
    figure = plot_evidence(l2_penalty_run, diagnose(l2_penalty_run))
    labels = {line.get_label() for line in figure.axes[1].get_lines()}
    assert "weight_norm" in labels


def test_finding_type():
    finding = Finding("healthy", 1.0, {}, "keep going", CAUSES["healthy"])
    assert finding.notebook.startswith("03")
