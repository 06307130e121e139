"""Bad input gets a clear error where it enters: the value, what is allowed, and the fix.

One row per mistake a learner or instructor makes; each row names the call, the exception type and phrases the
message must contain.
"""

import pytest
import torch

from labutils import data, losses, metrics, models, profiles, record, runner, training
from labutils.history import History


@pytest.fixture(autouse=True)
def no_profile_override(monkeypatch):
    # `make test` exports LABUTILS_PROFILE=quick, which would replace the misspelt profile under test.
    monkeypatch.delenv(profiles.PROFILE_ENV_VAR, raising=False)


def not_json(tmp_path):
    path = tmp_path / "history.json"
    path.write_text("epoch,loss\n1,0.5\n")
    return lambda: History.load(path)


def unwritable_results(tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("")
    return lambda: record.Recorder("00_demo", blocker / "results")


def missing_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    return lambda: training.pick_device("cuda")


def one_image_classes():
    return lambda: data.make_course_data("digits", max_images_per_class=1)


def unknown_notebook():
    return lambda: runner.select_notebooks(runner.find_notebooks(runner.NOTEBOOKS_DIR), ["42"])


def oversized_batch():
    course = data.make_course_data("digits", max_images_per_class=10)
    config = training.TrainConfig(batch_size=512, pairs_per_epoch=256)
    return lambda: training.fit(models.make_encoder("small"), course, config, progress=False)


def too_many_ways():
    embeddings, labels = torch.randn(9, 4), torch.arange(3).repeat_interleave(3)
    return lambda: metrics.n_way_one_shot_accuracy(embeddings, labels, n_way=5, episodes=10)


CASES = {
    "unknown dataset": (lambda: data.load_dataset("cifar10"), ValueError, ["cifar10", "digits"]),
    "unknown profile": (lambda: profiles.get_profile("fast"), ValueError, ["fast", "smoke, quick, full"]),
    "unknown device": (lambda: training.pick_device("tpu"), ValueError, ["tpu", "auto, cpu, cuda, mps"]),
    "margin zero": (lambda: training.TrainConfig(margin=0.0), ValueError, ["margin must be positive", "0.0"]),
    "margin negative in loss": (lambda: losses.contrastive_loss(torch.zeros(2, 3), torch.ones(2, 3),
                                                                torch.ones(2), margin=-1.0),
                                ValueError, ["margin", "-1.0"]),
    "embedding size zero": (lambda: models.make_encoder("small", embedding_dim=0), ValueError,
                            ["embedding_dim", "0"]),
}
FACTORY_CASES = {
    "history not json": (not_json, ValueError, ["not valid JSON", "History.save"]),
    "results not writable": (unwritable_results, ValueError, ["RESULTS_DIR"]),
    "device not available": (missing_cuda, ValueError, ["CUDA is not available", "DEVICE='auto'"]),
}
BUILT_CASES = {
    "class with one image": (one_image_classes, ValueError, ["max_images_per_class"]),
    "notebook number missing": (unknown_notebook, ValueError, ["'42' not found", "00_setup_and_data.ipynb"]),
    "batch larger than epoch": (oversized_batch, ValueError, ["batch_size=512", "pairs_per_epoch=256"]),
    "more ways than classes": (too_many_ways, ValueError, ["n_way", "5", "3"]),
}


@pytest.mark.parametrize("name", sorted(CASES | FACTORY_CASES | BUILT_CASES))
def test_bad_input_message(name, tmp_path, monkeypatch):
    if name in CASES:
        call, error, phrases = CASES[name]
    elif name in FACTORY_CASES:
        factory, error, phrases = FACTORY_CASES[name]
        call = factory(tmp_path) if name != "device not available" else factory(monkeypatch)
    else:
        factory, error, phrases = BUILT_CASES[name]
        call = factory()
    with pytest.raises(error) as caught:
        call()
    for phrase in phrases:
        assert phrase in str(caught.value), f"{name}: {phrase!r} missing from: {caught.value}"
