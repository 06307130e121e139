import math

import pytest
import torch

from labutils.data import make_course_data
from labutils.models import make_encoder
from labutils.experiments import limit_train_images
from labutils.training import (TrainConfig, _draw_epoch, batch_loss, embeds_each_image_alone, fit, make_optimizer,
                               pick_device, seed_everything)


@pytest.fixture(scope="module")
def course():
    return make_course_data("digits", seed=0, max_images_per_class=30)


def small_fit(course, loss_fn=None, accuracy_fn=None, **settings):
    torch.manual_seed(0)
    config = TrainConfig(**{"epochs": 2, "pairs_per_epoch": 128, "batch_size": 64, "eval_pairs": 64, **settings})
    return fit(make_encoder("small"), course, config, progress=False, loss_fn=loss_fn, accuracy_fn=accuracy_fn)


def test_history_has_every_column(course):
    history = small_fit(course)
    expected = {"epoch", "train_loss", "lr", "threshold", "seconds", "grad_norm", "update_ratio", "weight_norm",
                "val_unseen_emb_std", "val_unseen_emb_norm", "dead_units", "dead_units_layer_max"} | {
        f"{split}_{metric}" for split in ("train", "val_seen", "val_unseen")
        for metric in ("loss", "auc", "acc", "pos_dist", "neg_dist")}
    assert set(history.rows[0]) == expected
    assert history["epoch"] == [1, 2]


def test_contrastive_training_lowers_loss(course):
    history = small_fit(course, epochs=4)
    assert history["train_loss"][-1] < history["train_loss"][0]


def test_triplet_training_runs(course):
    history = small_fit(course, loss="triplet", margin=0.5)
    assert all(math.isfinite(value) for value in history["val_unseen_loss"])


def test_same_seed_same_history(course):
    first, second = small_fit(course), small_fit(course)
    drop_time = [{k: v for k, v in row.items() if k != "seconds"} for row in first.rows]
    assert drop_time == [{k: v for k, v in row.items() if k != "seconds"} for row in second.rows]


def test_divergence_stops_and_is_recorded(course):
    with pytest.warns(RuntimeWarning, match="epoch 1, step"):
        history = small_fit(course, lr=1e12, optimizer="sgd", epochs=3)
    assert "lr=1000000000000.0" in history.stopped
    assert len(history) == 1


def test_scheduler_is_stepped(course):
    torch.manual_seed(0)
    config = TrainConfig(epochs=3, pairs_per_epoch=64, batch_size=64, eval_pairs=64)
    history = fit(make_encoder("small"), course, config, progress=False,
                  scheduler_fn=lambda optimizer: torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1))
    assert history["lr"] == pytest.approx([1e-3, 1e-4, 1e-5])


@pytest.mark.parametrize("settings, message", [
    ({"margin": 0.0}, "margin must be positive"),
    ({"loss": "hinge"}, "contrastive, triplet"),
    ({"optimizer": "rmsprop"}, "adam, adamw, sgd"),
    ({"epochs": 0}, "epochs must be at least 1"),
    ({"lr": -1.0}, "lr must be positive"),
    ({"weight_decay": -0.1}, "weight_decay"),
    ({"augment": -1.0}, "augment must be 0 or more"),
])
def test_config_rejects(settings, message):
    with pytest.raises(ValueError, match=message):
        TrainConfig(**settings)


def test_batch_larger_than_epoch(course):
    with pytest.raises(ValueError, match="batch_size=256 is larger than pairs_per_epoch=128"):
        small_fit(course, batch_size=256)


@pytest.mark.parametrize("name, optimizer_class, settings", [
    ("adam", torch.optim.Adam, {"lr": 0.01, "weight_decay": 0.1}),
    ("adamw", torch.optim.AdamW, {"lr": 0.01, "weight_decay": 0.1}),
    ("sgd", torch.optim.SGD, {"lr": 0.01, "weight_decay": 0.1, "momentum": 0.5}),
])
def test_optimizer_follows_config(name, optimizer_class, settings):
    optimizer = make_optimizer(make_encoder("small"), TrainConfig(optimizer=name, lr=0.01, weight_decay=0.1,
                                                                 momentum=0.5))
    assert type(optimizer) is optimizer_class
    assert {key: optimizer.defaults[key] for key in settings} == settings


@pytest.mark.parametrize("name", ["adam", "adamw", "sgd"])
def test_optimizer_matches_default_update(name):
    models = [make_encoder("small") for _ in range(2)]
    models[1].load_state_dict(models[0].state_dict())
    config = TrainConfig(optimizer=name, weight_decay=0.01)
    course_optimizer = make_optimizer(models[0], config)
    momentum = {"momentum": config.momentum} if name == "sgd" else {}
    default_optimizer = type(course_optimizer)(models[1].parameters(), lr=config.lr,
                                               weight_decay=config.weight_decay, foreach=False, **momentum)
    generator = torch.Generator().manual_seed(0)
    for _ in range(20):
        for course_weight, default_weight in zip(*(model.parameters() for model in models)):
            course_weight.grad = torch.randn(course_weight.shape, generator=generator)
            default_weight.grad = course_weight.grad.clone()
        course_optimizer.step()
        default_optimizer.step()
    assert course_optimizer.defaults["foreach"]
    for course_weight, default_weight in zip(*(model.parameters() for model in models)):
        assert torch.equal(course_weight, default_weight)


def test_auto_device_without_accelerator(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu")


def test_missing_cuda_named(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ValueError, match="CUDA is not available"):
        pick_device("cuda")


def test_seed_everything_repeats():
    first = torch.rand(3, generator=seed_everything(5))
    assert torch.equal(first, torch.rand(3, generator=seed_everything(5)))


def test_history_records_training_signals(course):
    row = small_fit(course).rows[-1]
    assert row["grad_norm"] > 0
    assert row["update_ratio"] > 0
    assert 0 <= row["dead_units"] <= 1


def test_history_config_records_data_sizes(course):
    config = small_fit(course).config
    assert (config["train_classes"], config["val_unseen_classes"]) == (7, 3)


def test_custom_loss_replaces_training_and_validation_loss(course):
    def constant_loss(embeddings, labels):
        return embeddings.sum() * 0 + 7.0

    history = small_fit(course, loss_fn=constant_loss)
    assert (history.last("train_loss"), history.last("val_unseen_loss")) == (7.0, 7.0)


def test_custom_loss_gets_one_label_per_row(course):
    shapes = []

    def recording_loss(embeddings, labels):
        shapes.append((embeddings.shape[0], labels.shape[0]))
        return embeddings.pow(2).mean()

    small_fit(course, loss_fn=recording_loss, loss="triplet", margin=0.5)
    assert all(rows == labels for rows, labels in shapes)


def test_custom_loss_name_recorded(course):
    def my_loss(embeddings, labels):
        return embeddings.pow(2).mean()

    assert small_fit(course, loss_fn=my_loss).config["loss_fn"] == "my_loss"


def test_custom_accuracy_replaces_accuracy(course):
    history = small_fit(course, accuracy_fn=lambda distances, same, threshold: 0.25)
    assert set(history["val_unseen_acc"]) == {0.25}


def test_augmentation_changes_training(course):
    assert small_fit(course, augment=1.0)["train_loss"] != small_fit(course)["train_loss"]


def test_augmented_training_repeats(course):
    first, second = small_fit(course, augment=1.0), small_fit(course, augment=1.0)
    assert first["train_loss"] == second["train_loss"]


def test_augmentation_leaves_evaluation_images_alone(course, monkeypatch):
    # Augmentation is a training-time transform: evaluation must score the images as they are.
    import labutils.training as training

    seen = []
    original = training.augment
    monkeypatch.setattr(training, "augment", lambda images, *args: seen.append(len(images)) or original(images, *args))
    small_fit(course, augment=1.0, epochs=1)
    assert seen and max(seen) <= 2 * 64


@pytest.fixture(scope="module")
def few_images(course):
    # The lever notebooks' setting: 5 training images per class, so each image occurs many times in a batch.
    return limit_train_images(course, per_class=5)


def encoder_inputs(model):
    """Record the number of images of every training-mode forward pass of `model`."""
    sizes = []
    model.register_forward_pre_hook(lambda module, args: sizes.append(len(args[0])) if module.training else None)
    return sizes


def test_fit_embeds_distinct_images_once(few_images):
    torch.manual_seed(0)
    model = make_encoder("small")
    sizes = encoder_inputs(model)
    config = TrainConfig(epochs=1, pairs_per_epoch=256, batch_size=128, eval_pairs=64)
    fit(model, few_images, config, progress=False)
    assert len(sizes) == 2
    assert max(sizes) <= len(few_images.train) < 2 * 128


@pytest.mark.parametrize("loss", ["contrastive", "triplet"])
def test_distinct_images_give_same_gradients(few_images, loss):
    config = TrainConfig(loss=loss, batch_size=64)
    generator = torch.Generator().manual_seed(0)
    batch = _draw_epoch(few_images.train.labels, config, generator)
    batch = tuple(indices[:64] for indices in batch)
    images = few_images.train.images
    results = []
    for deduplicate in (True, False):
        torch.manual_seed(0)
        model = make_encoder("small")
        sizes = encoder_inputs(model)
        transform = None if deduplicate else (lambda x: x)  # any transform turns deduplication off
        batch_loss(model, images, batch, config, transform=transform).backward()
        results.append((max(sizes), [p.grad for p in model.parameters()]))
    (distinct_size, distinct_grads), (full_size, full_grads) = results
    assert distinct_size < full_size
    for distinct, full in zip(distinct_grads, full_grads):
        torch.testing.assert_close(distinct, full, rtol=1e-4, atol=1e-6)


def test_distinct_image_training_repeats(few_images):
    def run():
        torch.manual_seed(0)
        config = TrainConfig(epochs=2, pairs_per_epoch=256, batch_size=128, eval_pairs=64)
        return fit(make_encoder("small"), few_images, config, progress=False)["train_loss"]

    assert run() == run()


class UnknownLayer(torch.nn.Module):
    # A layer the check cannot see into: it might mix the images of a batch, as BatchNorm does.
    def forward(self, x):
        return x - x.mean(dim=0)


@pytest.mark.parametrize("model, expected", [
    (make_encoder("small"), True),
    (make_encoder("small", dropout=0.5), False),
    (make_encoder("small", dropout=0.5).eval(), True),
    (make_encoder("small", normalize=True), True),
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.BatchNorm1d(8)), False),
    (torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, 8), torch.nn.Tanh()), True),
    (torch.nn.Sequential(torch.nn.Flatten(), UnknownLayer()), False),
])
def test_per_image_model_check(model, expected):
    assert embeds_each_image_alone(model) is expected
