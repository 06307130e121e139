import pytest
import torch

from labutils.pairs import make_pairs, make_pk_batches, make_triplets


@pytest.fixture
def labels() -> torch.Tensor:
    # Unequal class sizes, so uniform sampling over images and over classes would differ.
    return torch.tensor([0] * 50 + [1] * 10 + [2] * 5 + [3] * 2)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_pairs_half_positive(labels):
    _, _, same = make_pairs(labels, 1000, generator())
    assert same.sum().item() == 500


def test_pairs_labels_match_classes(labels):
    left, right, same = make_pairs(labels, 1000, generator())
    assert torch.equal((labels[left] == labels[right]).float(), same)


def test_positive_pairs_use_two_images(labels):
    left, right, same = make_pairs(labels, 1000, generator())
    positive = same == 1
    assert not torch.any(left[positive] == right[positive])


def test_pairs_classes_roughly_uniform(labels):
    left, _, same = make_pairs(labels, 8000, generator())
    counts = torch.bincount(labels[left[same == 1]], minlength=4).float()
    # Each of the 4 classes should get about a quarter of 4000 positive pairs, whatever its size.
    assert torch.all((counts - 1000).abs() < 150)


def test_pairs_same_seed_same_pairs(labels):
    first = make_pairs(labels, 200, generator(3))
    second = make_pairs(labels, 200, generator(3))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_pairs_other_seed_other_pairs(labels):
    first = make_pairs(labels, 200, generator(3))
    second = make_pairs(labels, 200, generator(4))
    assert not torch.equal(first[0], second[0])


def test_pairs_odd_count(labels):
    _, _, same = make_pairs(labels, 7, generator())
    assert same.sum().item() == 3


def test_pairs_skip_single_image_classes():
    labels = torch.tensor([0, 0, 0, 1, 2])
    left, right, same = make_pairs(labels, 400, generator())
    assert torch.all(labels[left[same == 1]] == 0)


def test_pairs_need_two_classes():
    with pytest.raises(ValueError, match="at least 2 classes"):
        make_pairs(torch.zeros(10, dtype=torch.long), 4, generator())


def test_pairs_need_positive_count(labels):
    with pytest.raises(ValueError, match="must be positive"):
        make_pairs(labels, 0, generator())


def test_triplets_roles(labels):
    anchor, positive, negative = make_triplets(labels, 1000, generator())
    assert torch.all(labels[anchor] == labels[positive])
    assert torch.all(labels[anchor] != labels[negative])
    assert not torch.any(anchor == positive)


def test_triplets_negative_classes_cover_all(labels):
    _, _, negative = make_triplets(labels, 2000, generator())
    assert set(labels[negative].tolist()) == {0, 1, 2, 3}


def test_pk_batches_shape_and_balance(labels):
    batches = make_pk_batches(labels, classes_per_batch=3, images_per_class=2, num_batches=50,
                              generator=generator())
    assert batches.shape == (50, 6)
    for batch in batches:
        batch_labels = labels[batch].view(3, 2)
        assert torch.all(batch_labels[:, 0] == batch_labels[:, 1])
        assert batch_labels[:, 0].unique().numel() == 3
        assert batch.unique().numel() == 6


def test_pk_batches_reject_large_k(labels):
    with pytest.raises(ValueError, match="smallest class"):
        make_pk_batches(labels, classes_per_batch=2, images_per_class=3, num_batches=1, generator=generator())


def test_pk_batches_reject_large_p(labels):
    with pytest.raises(ValueError, match="4 classes"):
        make_pk_batches(labels, classes_per_batch=5, images_per_class=2, num_batches=1, generator=generator())
