import pytest
import torch

from labutils.data import CourseData, Split
from labutils.evaluation import score_embeddings, score_model, score_pixels
from labutils.models import make_encoder


def clustered_split(name: str, classes: list[int], per_class: int = 12, spread: float = 0.05) -> Split:
    generator = torch.Generator().manual_seed(len(name))
    labels = torch.tensor(classes).repeat_interleave(per_class)
    images = torch.randn(len(labels), 1, 28, 28, generator=generator) * spread
    # Each class lights up its own pixel, so raw pixels separate the classes perfectly.
    images[torch.arange(len(labels)), 0, labels, labels] += 3.0
    return Split(images, labels, name)


@pytest.fixture
def course() -> CourseData:
    return CourseData(train=clustered_split("train", [0, 1, 2, 3, 4, 5]),
                      val_seen=clustered_split("val_seen", [0, 1, 2, 3, 4, 5]),
                      val_unseen=clustered_split("val_unseen", [6, 7, 8]))


def test_pixels_separate_clusters(course):
    scores = score_pixels(course, num_pairs=200)
    assert scores["val_unseen_auc"] == 1.0
    assert scores["val_unseen_acc"] == 1.0
    assert scores["val_unseen_recall1"] == 1.0
    assert scores["val_unseen_nway"] == 1.0


def test_ways_capped_by_classes(course):
    scores = score_pixels(course, num_pairs=200)
    assert scores["val_unseen_ways"] == 3
    assert scores["val_seen_ways"] == 5


def test_identical_embeddings_at_chance(course):
    splits = {"train": course.train, "val_seen": course.val_seen, "val_unseen": course.val_unseen}
    embeddings = {name: torch.zeros(len(s), 4) for name, s in splits.items()}
    labels = {name: s.labels for name, s in splits.items()}
    scores = score_embeddings(embeddings, labels, num_pairs=200)
    assert scores["val_unseen_auc"] == 0.5
    assert scores["val_unseen_nway"] == pytest.approx(1 / 3)


def test_same_seed_same_scores(course):
    model = make_encoder("small")
    assert score_model(model, course, num_pairs=200, seed=3) == score_model(model, course, num_pairs=200, seed=3)
