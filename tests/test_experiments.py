"""Seeded comparisons of variants and the data regimes of the lever notebooks, on small digit runs."""

import pandas as pd
import pytest
import torch

from labutils.data import make_course_data
from labutils.experiments import (Variant, base_config, final_table, limit_train_images, mean_of, record_means,
                                  run_variants, separation, spread_of, summarize, with_class_imbalance,
                                  with_label_noise)
from labutils.profiles import PROFILES
from labutils.record import Recorder


@pytest.fixture(scope="module")
def digits():
    return make_course_data("digits", seed=0, max_images_per_class=40)


@pytest.fixture(scope="module")
def runs(digits):
    base = base_config(PROFILES["smoke"], eval_pairs=64, pairs_per_epoch=128, batch_size=64)
    variants = [Variant("baseline"), Variant("augmented", config={"augment": 1.0})]
    return run_variants(digits, variants, base, [0, 1], verbose=False)


def table_of(values):
    """A final table with one metric, `auc`, for variants a and b over the seeds given."""
    return pd.DataFrame([{"variant": variant, "seed": seed, "auc": value}
                         for variant, seeds in values.items() for seed, value in enumerate(seeds)])


def test_limit_train_images_keeps_k_per_class(digits):
    few = limit_train_images(digits, 5, seed=0)
    assert torch.bincount(few.train.labels).tolist() == [5] * 7


def test_limit_train_images_keeps_validation(digits):
    few = limit_train_images(digits, 5, seed=0)
    assert (len(few.val_seen), len(few.val_unseen)) == (len(digits.val_seen), len(digits.val_unseen))


def test_limit_train_images_is_seeded(digits):
    first, second = limit_train_images(digits, 5, seed=3), limit_train_images(digits, 5, seed=3)
    assert torch.equal(first.train.indices, second.train.indices)


def test_limit_train_images_rejects_one_image(digits):
    with pytest.raises(ValueError, match="per_class must be at least 2"):
        limit_train_images(digits, 1)


def test_label_noise_changes_the_fraction_asked(digits):
    noisy = with_label_noise(digits, 0.3, seed=0)
    changed = (noisy.train.labels != digits.train.labels).float().mean().item()
    assert changed == pytest.approx(0.3, abs=0.06)


def test_label_noise_never_keeps_a_picked_label(digits):
    # Every label drawn for noise moves to another seen class, so none stays right by chance.
    noisy = with_label_noise(digits, 0.999, seed=0)
    assert (noisy.train.labels == digits.train.labels).sum().item() <= 1


def test_label_noise_stays_within_seen_classes(digits):
    assert with_label_noise(digits, 0.5, seed=1).train.classes == digits.train.classes


def test_label_noise_rejects_fraction_of_one(digits):
    with pytest.raises(ValueError, match=r"fraction must be in \[0, 1\)"):
        with_label_noise(digits, 1.0)


def test_class_imbalance_keeps_fraction_of_rare_classes(digits):
    imbalanced = with_class_imbalance(digits, [0, 1], 0.25, seed=0)
    counts, full = torch.bincount(imbalanced.train.labels), torch.bincount(digits.train.labels)
    assert counts[:2].tolist() == [round(0.25 * n) for n in full[:2].tolist()]


def test_class_imbalance_leaves_other_classes(digits):
    imbalanced = with_class_imbalance(digits, [0], 0.25, seed=0)
    assert torch.bincount(imbalanced.train.labels)[1:].tolist() == torch.bincount(digits.train.labels)[1:].tolist()


def test_class_imbalance_rejects_unseen_class(digits):
    with pytest.raises(ValueError, match=r"rare_classes \[9\] are not training classes"):
        with_class_imbalance(digits, [9], 0.5)


def test_base_config_follows_profile():
    config = base_config(PROFILES["quick"], lr=3e-3)
    assert (config.epochs, config.pairs_per_epoch, config.eval_pairs, config.lr) == (6, 2048, 1000, 3e-3)


def test_run_variants_order(runs):
    assert [(run.variant, run.seed) for run in runs] == [("baseline", 0), ("baseline", 1), ("augmented", 0),
                                                         ("augmented", 1)]


def test_same_seed_same_start(digits, runs):
    # Both variants of one seed start from the same weights, so their first epochs differ only by the variant.
    assert runs[0].history.config["initial_weight_norm"] == runs[2].history.config["initial_weight_norm"]


def test_run_variants_applies_config(runs):
    assert runs[2].history.config["augment"] == 1.0


def test_final_table_has_last_epoch(runs):
    table = final_table(runs)
    assert table.loc[0, "val_seen_auc"] == runs[0].history.last("val_seen_auc")


def test_summarize_columns(runs):
    summary = summarize(final_table(runs), ["val_seen_auc"])
    assert list(summary.columns.get_level_values(1)) == ["mean", "std", "min", "max"]


def test_separation_positive_when_every_seed_wins():
    assert separation(table_of({"a": [0.9, 0.95], "b": [0.8, 0.85]}), "auc", "a", "b") == pytest.approx(0.05)


def test_separation_negative_when_seeds_overlap():
    assert separation(table_of({"a": [0.8, 0.95], "b": [0.85, 0.9]}), "auc", "a", "b") < 0


def test_separation_for_lower_is_better():
    table = table_of({"a": [0.1, 0.12], "b": [0.2, 0.3]})
    assert separation(table, "auc", "a", "b", higher_is_better=False) == pytest.approx(0.08)


def test_separation_names_missing_variant():
    with pytest.raises(KeyError, match="No runs of variant 'c'"):
        separation(table_of({"a": [0.1], "b": [0.2]}), "auc", "c", "b")


def test_mean_and_spread():
    table = table_of({"a": [0.8, 0.9]})
    assert (mean_of(table, "a", "auc"), spread_of(table, "a", "auc")) == pytest.approx((0.85, 0.0707), abs=1e-4)


def test_spread_of_single_seed_is_zero():
    assert spread_of(table_of({"a": [0.8]}), "a", "auc") == 0.0


def test_record_means(tmp_path):
    recorder = Recorder("demo", tmp_path, enforce_claims=True)
    record_means(recorder, table_of({"a": [0.8, 0.9]}), ["auc"], prefix="x_")
    recorder.save()
    assert '"x_a_auc"' in (tmp_path / "demo.json").read_text()
