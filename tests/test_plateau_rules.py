"""Each rule of the plateau doctor on hand-written histories, including the edges of its thresholds."""

import math

import pytest

from labutils.history import History
from labutils.plateau_rules import (FEW_IDENTITIES, REPORT_CONFIDENCE, UPDATE_RATIO_LOW, Probe, RunSignals,
                                    check_blank_inputs, check_collapse, check_dead_units, check_eval_mode,
                                    check_label_convention, check_leakage, check_lr_too_high, check_lr_too_low,
                                    check_margin_unreachable, check_memorization, check_metric_shape,
                                    check_metric_threshold, check_mining_artifact, check_noisy_labels,
                                    check_regularization, check_too_few_identities, healthy_finding, ramp)


def signals(config=None, settings=None, stopped=None, **columns):
    """Build RunSignals from columns given as lists over epochs."""
    epochs = len(next(iter(columns.values())))
    rows = [{"epoch": epoch + 1, **{name: values[epoch] for name, values in columns.items()}}
            for epoch in range(epochs)]
    return RunSignals(History(config=config or {}, rows=rows, stopped=stopped), settings or {})


def healthy_columns(epochs=4):
    """Columns of a run that learns: loss falls, AUC rises, distances spread, weights grow a little."""
    return {
        "train_loss": [0.2 / (epoch + 1) for epoch in range(epochs)],
        "train_auc": [0.9 + 0.02 * epoch for epoch in range(epochs)],
        "val_seen_auc": [0.9 + 0.02 * epoch for epoch in range(epochs)],
        "val_unseen_auc": [0.85 + 0.01 * epoch for epoch in range(epochs)],
        "val_unseen_pos_dist": [0.3] * epochs,
        "val_unseen_neg_dist": [0.8] * epochs,
        "val_unseen_emb_norm": [1.1] * epochs,
        "update_ratio": [5e-3] * epochs,
        "weight_norm": [6.8 + 0.1 * epoch for epoch in range(epochs)],
        "dead_units_layer_max": [0.3] * epochs,
        "grad_norm": [0.2] * epochs,
    }


def healthy_run(**changes):
    return signals(config={"loss": "contrastive", "margin": 1.0, "initial_weight_norm": 6.6, "train_classes": 7},
                   **{**healthy_columns(), **changes})


ALL_RULES = (check_collapse, check_dead_units, check_lr_too_high, check_lr_too_low, check_metric_shape,
             check_metric_threshold, check_label_convention, check_memorization, check_noisy_labels,
             check_too_few_identities, check_margin_unreachable, check_regularization, check_mining_artifact)


@pytest.mark.parametrize("rule", ALL_RULES, ids=lambda rule: rule.__name__)
def test_rule_silent_on_healthy_run(rule):
    assert rule(healthy_run(), None) is None


def test_ramp_endpoints():
    assert (ramp(0.0, 0.0, 1.0), ramp(1.0, 0.0, 1.0)) == (0.5, 0.95)


def test_ramp_clips():
    assert ramp(5.0, 0.0, 1.0, low=0.1, high=0.2) == 0.2


def test_ramp_falling_evidence():
    assert ramp(0.25, 0.5, 0.0, low=0.0, high=1.0) == 0.5


def test_collapse_from_zero_distances():
    run = healthy_run(val_unseen_pos_dist=[1e-5] * 4, val_unseen_neg_dist=[1e-5] * 4, train_auc=[0.5] * 4)
    assert check_collapse(run, None).cause == "collapse"


def test_small_distances_with_good_ranking_are_not_collapse():
    # A large shared offset makes distances small next to the norm without any loss of information.
    run = healthy_run(val_unseen_emb_norm=[20.0] * 4)
    assert check_collapse(run, None) is None


def test_collapse_from_probe():
    probe = Probe(pair_spread=0.01)
    assert check_collapse(healthy_run(train_auc=[0.5] * 4), probe).cause == "collapse"


def test_collapse_while_training():
    run = healthy_run(train_auc=[0.85, 0.88, 0.75, 0.66], train_loss=[-0.5, -0.8, -0.95, -0.99],
                      val_unseen_pos_dist=[0.3, 0.3, 0.2, 0.15], val_unseen_neg_dist=[0.5, 0.5, 0.3, 0.2])
    assert check_collapse(run, None).evidence["train_auc_drop"] == pytest.approx(0.22)


def test_dead_layer_from_the_start():
    run = healthy_run(dead_units_layer_max=[1.0] * 4, grad_norm=[0.0] * 4)
    assert check_dead_units(run, None).confidence == 0.97


def test_dead_layer_after_weight_jump():
    run = healthy_run(dead_units_layer_max=[1.0] * 4, weight_norm=[18.0] * 4)
    assert check_dead_units(run, None).confidence <= 0.6


def test_healthy_dead_fraction_ignored():
    assert check_dead_units(healthy_run(dead_units_layer_max=[0.59] * 4), None) is None


def test_divergence_is_lr_too_high():
    run = healthy_run()
    run.history.stopped = "Training stopped at epoch 2, step 3: the loss became nan."
    assert check_lr_too_high(run, None).confidence == 0.95


def test_weight_jump_with_dead_layer():
    run = healthy_run(weight_norm=[17.0] * 4, dead_units_layer_max=[0.8] * 4)
    assert check_lr_too_high(run, None).confidence == 0.95


def test_weight_jump_alone_is_weaker():
    run = healthy_run(weight_norm=[17.0] * 4)
    assert check_lr_too_high(run, None).confidence == 0.75


def test_tiny_updates_with_flat_loss():
    run = healthy_run(update_ratio=[1e-5] * 4, train_loss=[0.42, 0.419, 0.418, 0.417])
    assert check_lr_too_low(run, None).cause == "lr_too_low"


def test_tiny_updates_with_falling_loss_are_fine():
    # A loss near 0 makes Adam's steps small too; that is convergence, not a low learning rate.
    assert check_lr_too_low(healthy_run(update_ratio=[UPDATE_RATIO_LOW / 10] * 4), None) is None


def test_tiny_updates_at_zero_loss_are_fine():
    # A batch-hard run that met every margin in its first epoch: the gradients vanish, the learning rate is fine.
    run = healthy_run(update_ratio=[3e-11] * 4, train_loss=[0.0, 0.0, 0.0, 0.0], train_auc=[1.0] * 4)
    assert check_lr_too_low(run, None) is None


def test_accuracy_exactly_half_with_good_auc():
    run = healthy_run(train_acc=[0.5] * 4, val_unseen_acc=[0.5] * 4)
    assert check_metric_shape(run, None).cause == "metric_shape"


def test_half_accuracy_at_chance_auc():
    # A collapsed embedding also scores 0.5 everywhere, but then the AUC is 0.5 too.
    run = healthy_run(train_acc=[0.5] * 4, train_auc=[0.5] * 4)
    assert check_metric_shape(run, None) is None


def test_accuracy_far_below_ranking():
    run = healthy_run(train_acc=[0.1] * 4, train_auc=[0.99] * 4)
    # The rough best accuracy for AUC 0.99 is 0.5 + 0.49 * 0.75 = 0.8675.
    assert check_metric_threshold(run, None).evidence["accuracy_shortfall"] == pytest.approx(0.8675 - 0.1)


def test_accuracy_near_ranking_is_fine():
    assert check_metric_threshold(healthy_run(train_acc=[0.9] * 4, train_auc=[0.96] * 4), None) is None


def test_probe_accuracy_far_below_best():
    probe = Probe(accuracy=0.55, best_accuracy=0.95, auc=0.97)
    assert check_metric_threshold(healthy_run(), probe).cause == "metric_threshold"


def test_training_pairs_at_chance():
    assert check_label_convention(healthy_run(train_auc=[0.52] * 4), None).cause == "label_convention"


def test_training_auc_unlearned_from_its_start():
    # An untrained encoder ranks digit pairs at about 0.65; a flipped loss drags that down over the epochs.
    run = healthy_run(train_auc=[0.68, 0.65, 0.63, 0.62])
    assert check_label_convention(run, None).cause == "label_convention"


def test_training_auc_flat_above_chance_is_not_flipped():
    assert check_label_convention(healthy_run(train_auc=[0.64, 0.65, 0.64, 0.65]), None) is None


def test_chance_pairs_without_updates():
    run = healthy_run(train_auc=[0.52] * 4, update_ratio=[1e-6] * 4)
    assert check_label_convention(run, None) is None


def test_seen_gap_is_memorization():
    run = healthy_run(train_auc=[0.99] * 4, val_seen_auc=[0.85] * 4)
    assert check_memorization(run, None).evidence["seen_gap"] == pytest.approx(0.14)


@pytest.mark.parametrize("classes, reported", [(2, True), (FEW_IDENTITIES - 1, True), (FEW_IDENTITIES, False),
                                               (7, False)])
def test_unseen_gap_blamed_on_few_classes(classes, reported):
    run = healthy_run(val_seen_auc=[0.98] * 4, train_auc=[0.99] * 4, val_unseen_auc=[0.7] * 4)
    run.config["train_classes"] = classes
    assert (check_too_few_identities(run, None).confidence >= REPORT_CONFIDENCE) is reported


def test_unseen_gap_with_seen_gap_is_not_identities():
    run = healthy_run(train_auc=[1.0] * 4, val_seen_auc=[0.85] * 4, val_unseen_auc=[0.6] * 4)
    assert check_too_few_identities(run, None) is None


@pytest.mark.parametrize("loss, margin, floor", [("contrastive", 3.0, 0.5), ("contrastive", 4.0, 2.0),
                                                 ("triplet", 2.5, 0.5), ("triplet", 3.0, 1.0)])
def test_margin_beyond_unit_sphere(loss, margin, floor):
    run = healthy_run(val_unseen_emb_norm=[1.0] * 4)
    run.config.update(loss=loss, margin=margin)
    assert check_margin_unreachable(run, None).evidence["loss_floor"] == pytest.approx(floor)


def test_margin_within_unit_sphere():
    run = healthy_run(val_unseen_emb_norm=[1.0] * 4)
    run.config["margin"] = 2.0
    assert check_margin_unreachable(run, None) is None


def test_declared_max_distance():
    run = signals(settings={"margin": 2.0, "max_distance": 1.0}, **healthy_columns())
    assert check_margin_unreachable(run, None).evidence["loss_floor"] == pytest.approx(0.5)


def test_declared_unreachable_target():
    run = signals(settings={"output_range": (0.5, 1.0), "targets": (0.0, 1.0)}, **healthy_columns())
    assert check_margin_unreachable(run, None).evidence["unreachable_target"] == 0.0


def test_declared_reachable_targets():
    run = healthy_run()
    run.settings.update(output_range=(0.0, 1.0), targets=(0.0, 1.0))
    assert check_margin_unreachable(run, None) is None


def test_contrastive_loss_stuck_with_separated_pairs():
    run = healthy_run(train_auc=[0.995] * 4, train_loss=[0.3] * 4)
    assert check_margin_unreachable(run, None).cause == "margin_unreachable"


def test_shrinking_weights():
    run = healthy_run(weight_norm=[5.0, 4.0, 3.0, 2.5])
    assert check_regularization(run, None).evidence["weight_norm_ratio"] == pytest.approx(2.5 / 6.6)


def test_flat_custom_loss_with_rising_auc():
    run = healthy_run(val_unseen_loss=[0.1] * 4, val_unseen_auc=[0.65, 0.7, 0.72, 0.78])
    run.config["loss_fn"] = "mined"
    assert check_mining_artifact(run, None).cause == "mining_artifact"


def test_fit_losses_cannot_be_mined():
    run = healthy_run(val_unseen_loss=[0.1] * 4, val_unseen_auc=[0.65, 0.7, 0.72, 0.78])
    assert check_mining_artifact(run, None) is None


def test_mode_gap_from_probe():
    probe = Probe(eval_auc=0.6, train_mode_auc=0.9)
    assert check_eval_mode(healthy_run(), probe).evidence["mode_gap"] == pytest.approx(0.3)


def test_small_mode_gap_ignored():
    assert check_eval_mode(healthy_run(), Probe(eval_auc=0.85, train_mode_auc=0.9)) is None


def test_shared_ids_are_leakage():
    probe = Probe(shared_ids={"val_seen": 3, "val_unseen": 0})
    assert check_leakage(healthy_run(), probe).evidence == {"shared_ids_val_seen": 3.0}


def test_no_shared_images():
    probe = Probe(shared_ids={"val_seen": 0}, duplicate_images={"val_seen": 0})
    assert check_leakage(healthy_run(), probe) is None


def test_blank_images_found():
    assert check_blank_inputs(healthy_run(), Probe(blank_fraction=0.2)).confidence == 0.97


def test_few_blank_images_ignored():
    assert check_blank_inputs(healthy_run(), Probe(blank_fraction=0.005)) is None


def test_healthy_when_nothing_fires():
    assert healthy_finding(healthy_run(), []).confidence == 1.0


def test_no_healthy_next_to_a_confident_finding():
    confident = check_lr_too_high(healthy_run(weight_norm=[17.0] * 4, dead_units_layer_max=[0.8] * 4), None)
    assert healthy_finding(healthy_run(), [confident]) is None


def test_missing_columns_are_skipped():
    run = signals(train_loss=[0.5, 0.4])
    assert all(rule(run, None) is None for rule in ALL_RULES)


def test_nan_loss_counts_as_divergence():
    assert signals(train_loss=[0.5, math.nan]).diverged


# ---- memorisation seen in the losses, and noisy labels -------------------------------------------------------


def memorizing_run(val_seen_auc, train_loss_last=1e-5):
    """Training pairs fitted to a loss near 0 while held-out images of the same classes keep a loss of 0.15."""
    return healthy_run(train_loss=[0.03, 0.001, 1e-4, train_loss_last], train_auc=[1.0] * 4,
                       val_seen_loss=[0.13, 0.15, 0.16, 0.15], val_seen_auc=[val_seen_auc] * 4)


def test_memorization_from_loss_ratio_below_auc_gap():
    # An AUC gap of 0.05 alone is below SEEN_GAP; the held-out loss 15000 times the training loss reveals it.
    assert check_memorization(memorizing_run(0.95), None).evidence["seen_loss_ratio"] == pytest.approx(15000)


def test_memorization_from_loss_ratio_is_reported():
    assert check_memorization(memorizing_run(0.95), None).confidence >= REPORT_CONFIDENCE


def test_memorization_ratio_with_zero_training_loss():
    assert check_memorization(memorizing_run(0.95, train_loss_last=0.0), None).evidence["seen_loss_ratio"] == 1e6


def test_loss_ratio_without_auc_gap_is_not_memorization():
    # Both losses near 0 and held-out pairs ranked perfectly: nothing is lost on new images.
    assert check_memorization(memorizing_run(0.995), None) is None


def test_loss_ratio_finding_stays_below_auc_gap_finding():
    by_loss = check_memorization(memorizing_run(0.95), None).confidence
    by_gap = check_memorization(memorizing_run(0.75), None).confidence
    assert by_loss < by_gap


def test_noisy_labels_when_training_pairs_rank_below_held_out():
    run = healthy_run(train_auc=[0.74, 0.75, 0.76, 0.76], val_seen_auc=[0.88, 0.9, 0.9, 0.9])
    finding = check_noisy_labels(run, None)
    assert (finding.cause, finding.evidence["noisy_gap"]) == ("noisy_labels", pytest.approx(0.14))


def test_noisy_labels_silent_at_threshold_edge():
    run = healthy_run(train_auc=[0.9] * 4, val_seen_auc=[0.94] * 4)
    assert check_noisy_labels(run, None) is None
