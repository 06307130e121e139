import pytest
import torch

from labutils.augment import Augmentation, augment


def images(batch: int = 8) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, 1, 28, 28, generator=generator)


def generator(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_strength_zero_is_identity():
    x = images()
    assert torch.allclose(augment(x, Augmentation.at_strength(0), generator()), x, atol=1e-5)


def test_shape_kept():
    assert augment(images(), Augmentation(), generator()).shape == (8, 1, 28, 28)


def test_each_image_gets_own_transform():
    x = images(1).repeat(4, 1, 1, 1)
    out = augment(x, Augmentation(), generator())
    assert not torch.allclose(out[0], out[1])


def test_same_seed_same_batch():
    x = images()
    assert torch.equal(augment(x, Augmentation(), generator(3)), augment(x, Augmentation(), generator(3)))


def test_rotation_by_90_degrees_matches_rot90():
    x = images(1)
    settings = Augmentation(degrees=90, translate=0, scale=(1, 1), brightness=0, contrast=0)
    # A draw of 1.0 for the angle would give +90 degrees, but torch.rand is in [0, 1): force it instead.
    from labutils import augment as module

    theta = module._affine_matrices(torch.tensor([[1.0, 0.0, 0.5, 0.5]]), settings)
    grid = torch.nn.functional.affine_grid(theta, [1, 1, 28, 28], align_corners=False)
    rotated = torch.nn.functional.grid_sample(x, grid, align_corners=False)
    assert torch.allclose(rotated[0, 0], torch.rot90(x[0, 0], k=1, dims=(0, 1)), atol=1e-4) or \
        torch.allclose(rotated[0, 0], torch.rot90(x[0, 0], k=-1, dims=(0, 1)), atol=1e-4)


def test_brightness_shifts_mean():
    x = images(64)
    settings = Augmentation(degrees=0, translate=0, scale=(1, 1), brightness=0.5, contrast=0)
    shift = (augment(x, settings, generator()) - x).mean(dim=(1, 2, 3))
    assert shift.abs().max() <= 0.5 + 1e-5
    assert shift.std() > 0.1


@pytest.mark.parametrize("settings", [{"degrees": -1}, {"scale": (1.2, 1.0)}, {"brightness": -0.1}])
def test_invalid_ranges(settings):
    with pytest.raises(ValueError):
        Augmentation(**settings)


def test_negative_strength():
    with pytest.raises(ValueError, match="strength"):
        Augmentation.at_strength(-1)
