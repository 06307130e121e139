import gzip
import shutil
import struct
from urllib.error import URLError

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import torchvision
from PIL import Image
from sklearn.datasets import load_digits

from labutils import data
from labutils.data import (DATASETS, DatasetUnavailableError, Split, load_dataset, load_image_folder,
                           make_course_data, split_by_class, split_by_image)

IDX_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
DRAWING_SIZE = 105


# ---- writers for the real file formats ------------------------------------------------------------------------

def write_idx_images(path, images):
    """Write uint8 images (n, h, w) as an uncompressed IDX3 file: big-endian magic 2051, then n, h, w."""
    path.write_bytes(struct.pack(">IIII", 2051, *images.shape) + images.astype(np.uint8).tobytes())


def write_idx_labels(path, labels):
    """Write uint8 labels (n,) as an uncompressed IDX1 file: big-endian magic 2049, then n."""
    path.write_bytes(struct.pack(">II", 2049, len(labels)) + labels.astype(np.uint8).tobytes())


def write_idx_dataset(root, folder_name, seed=0, num_train=12, num_test=5):
    """Write train and t10k files where torchvision looks for them, and return the train images and labels."""
    rng = np.random.default_rng(seed)
    raw = root / folder_name / "raw"
    raw.mkdir(parents=True)
    train_images = rng.integers(0, 256, size=(num_train, 28, 28), dtype=np.uint8)
    train_labels = rng.integers(0, 10, size=num_train, dtype=np.uint8)
    write_idx_images(raw / "train-images-idx3-ubyte", train_images)
    write_idx_labels(raw / "train-labels-idx1-ubyte", train_labels)
    write_idx_images(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, size=(num_test, 28, 28), dtype=np.uint8))
    write_idx_labels(raw / "t10k-labels-idx1-ubyte", rng.integers(0, 10, size=num_test, dtype=np.uint8))
    return train_images, train_labels


def random_strokes(seed):
    """Return a (105, 105) bool array, True where the pen drew."""
    return np.random.default_rng(seed).random((DRAWING_SIZE, DRAWING_SIZE)) < 0.2


def write_drawing(path, strokes):
    """Save strokes as a 1-bit PNG with black strokes on white, like the Omniglot files."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(~strokes).save(path)


def expected_drawings(stroke_arrays):
    """Apply the documented preprocessing: bright strokes, antialiased resize to 28x28, standardise."""
    strokes = torch.tensor(np.stack(stroke_arrays), dtype=torch.float32).unsqueeze(1)
    resized = F.interpolate(strokes, size=(28, 28), mode="bilinear", align_corners=False, antialias=True)
    values = resized.double().numpy()
    return (values - values.mean()) / values.std()


# Omniglot fixture: (set folder, alphabet, character) in the order labels are expected, two drawings each.
OMNIGLOT_CHARACTERS = [
    ("images_background", "Alphabet_A", "character01"),
    ("images_background", "Alphabet_A", "character02"),
    ("images_background", "Alphabet_B", "character01"),
    ("images_evaluation", "Alphabet_C", "character01"),
    ("images_evaluation", "Alphabet_C", "character02"),
]


def write_omniglot(root):
    """Write the fixture in torchvision's layout, and return the stroke arrays in expected label order."""
    strokes = []
    # Written in reverse so that creation order differs from the sorted order the loader promises.
    for label, (subset, alphabet, character) in reversed(list(enumerate(OMNIGLOT_CHARACTERS))):
        for drawing in (2, 1):
            array = random_strokes(seed=10 * label + drawing)
            write_drawing(root / "omniglot-py" / subset / alphabet / character / f"{label:04d}_{drawing:02d}.png",
                          array)
            strokes.append((label, drawing, array))
    return [array for _, _, array in sorted(strokes, key=lambda item: item[:2])]


# ---- digits ------------------------------------------------------------------------------------------------

def test_digits_shape_and_dtype():
    images, labels = load_dataset("digits")
    assert images.shape == (1797, 1, 28, 28)
    assert images.dtype == torch.float32
    assert labels.shape == (1797,)
    assert labels.dtype == torch.int64


def test_digits_standardised():
    images, _ = load_dataset("digits")
    assert abs(float(images.double().mean())) < 1e-5
    assert abs(float(images.double().std(correction=0)) - 1.0) < 1e-5


def test_digits_values_and_labels():
    digits = load_digits()
    small = torch.tensor(digits.images / 16.0, dtype=torch.float32).unsqueeze(1)
    resized = F.interpolate(small, size=(28, 28), mode="bilinear", align_corners=False).double().numpy()
    expected = (resized - resized.mean()) / resized.std()
    images, labels = load_dataset("digits")
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-5)
    np.testing.assert_array_equal(labels.numpy(), digits.target)


def test_load_returns_fresh_copies():
    images, _ = load_dataset("digits")
    images.zero_()
    again, _ = load_dataset("digits")
    assert float(again.abs().sum()) > 0


def test_name_is_case_insensitive():
    upper, _ = load_dataset("DIGITS")
    lower, _ = load_dataset("digits")
    assert torch.equal(upper, lower)


def test_unknown_dataset_lists_names():
    with pytest.raises(ValueError, match="Unknown dataset 'cifar'") as info:
        load_dataset("cifar")
    for name in DATASETS:
        assert name in str(info.value)


# ---- IDX datasets through torchvision -------------------------------------------------------------------------

@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_idx_values_match_written(tmp_path, name):
    written, _ = write_idx_dataset(tmp_path, IDX_FOLDERS[name])
    images, _ = load_dataset(name, root=tmp_path)
    scaled = written.astype(np.float64) / 255.0
    expected = (scaled - scaled.mean()) / scaled.std()
    np.testing.assert_allclose(images.numpy()[:, 0], expected, atol=1e-5)


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "kmnist"])
def test_idx_labels_match_written(tmp_path, name):
    _, written = write_idx_dataset(tmp_path, IDX_FOLDERS[name])
    _, labels = load_dataset(name, root=tmp_path)
    assert labels.dtype == torch.int64
    np.testing.assert_array_equal(labels.numpy(), written)


def test_idx_uses_train_split_only(tmp_path):
    write_idx_dataset(tmp_path, "MNIST", num_train=12, num_test=5)
    images, _ = load_dataset("mnist", root=tmp_path)
    assert images.shape == (12, 1, 28, 28)


def test_data_dir_from_environment(tmp_path, monkeypatch):
    _, written = write_idx_dataset(tmp_path, "KMNIST")
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(tmp_path))
    _, labels = load_dataset("kmnist")
    np.testing.assert_array_equal(labels.numpy(), written)


def test_missing_dataset_message(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert "'mnist'" in message
    assert str(tmp_path) in message
    assert "python -m labutils data fetch mnist" in message
    assert "while online" in message
    assert "copy the data folder" in message
    assert "digits" in message


def test_missing_test_split_is_unavailable(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST")
    (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").unlink()
    with pytest.raises(DatasetUnavailableError, match="t10k-labels-idx1-ubyte"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_failed_download_is_unavailable(tmp_path, monkeypatch):
    def fail_download(self):
        raise RuntimeError("Error downloading train-images-idx3-ubyte.gz")

    # Replaces the network call, so the test never leaves this machine.
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", fail_download)
    with pytest.raises(DatasetUnavailableError, match="download failed") as info:
        load_dataset("mnist", root=tmp_path, download=True)
    assert "python -m labutils data fetch mnist" in str(info.value)


def test_invalid_idx_file_is_unavailable(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    # A label file where the image file belongs has one dimension instead of three.
    write_idx_labels(tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte", np.zeros(4, dtype=np.uint8))
    with pytest.raises(DatasetUnavailableError, match="train-images-idx3-ubyte|MNIST/raw"):
        load_dataset("mnist", root=tmp_path)


# ---- Omniglot and image folders ---------------------------------------------------------------------------

def test_omniglot_values_match_written(tmp_path):
    strokes = write_omniglot(tmp_path)
    images, _ = load_dataset("omniglot", root=tmp_path)
    np.testing.assert_allclose(images.numpy(), expected_drawings(strokes), atol=1e-5)


def test_omniglot_labels_background_first(tmp_path):
    write_omniglot(tmp_path)
    _, labels = load_dataset("omniglot", root=tmp_path)
    assert labels.tolist() == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]


def test_omniglot_strokes_are_bright(tmp_path):
    strokes = np.zeros((DRAWING_SIZE, DRAWING_SIZE), dtype=bool)
    strokes[40:60, 40:60] = True
    for drawing, subset in enumerate(["images_background", "images_evaluation"]):
        write_drawing(tmp_path / "omniglot-py" / subset / f"Alphabet_{drawing}" / "character01" / "01.png", strokes)
    images, _ = load_dataset("omniglot", root=tmp_path)
    assert float(images[0, 0, 14, 14]) > float(images[0, 0, 0, 0])


def test_fixture_layout_read_by_torchvision(tmp_path):
    class OmniglotWithoutArchives(torchvision.datasets.Omniglot):
        # The fixture has only the extracted folders, not the zip archives whose MD5 torchvision checks.
        def _check_integrity(self):
            return True

    write_omniglot(tmp_path)
    background = OmniglotWithoutArchives(str(tmp_path), background=True)
    evaluation = OmniglotWithoutArchives(str(tmp_path), background=False)
    assert len(background) == 6
    assert len(evaluation) == 4
    assert len({target for _, target in background}) == 3


def test_missing_omniglot_message(tmp_path):
    with pytest.raises(DatasetUnavailableError) as info:
        load_dataset("omniglot", root=tmp_path)
    message = str(info.value)
    assert "images_background" in message
    assert "python -m labutils data fetch omniglot" in message
    assert "digits" in message


def test_failed_omniglot_download_is_unavailable(tmp_path, monkeypatch):
    def fail_download(self):
        raise URLError("no network")

    monkeypatch.setattr(torchvision.datasets.Omniglot, "download", fail_download)
    with pytest.raises(DatasetUnavailableError, match="download failed"):
        load_dataset("omniglot", root=tmp_path, download=True)


def test_image_folder_merges_roots(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    kept = random_strokes(1)
    write_drawing(first / "Alphabet_A" / "character01" / "01.png", random_strokes(0))
    write_drawing(first / "Alphabet_A" / "character01" / "02.png", kept)
    write_drawing(second / "Alphabet_A" / "character01" / "02.png", random_strokes(2))
    write_drawing(second / "Alphabet_A" / "character01" / "03.png", random_strokes(3))
    write_drawing(second / "Alphabet_B" / "character01" / "01.png", random_strokes(4))
    images, labels = load_image_folder([first, second])
    assert labels.tolist() == [0, 0, 0, 1]
    expected = expected_drawings([random_strokes(0), kept, random_strokes(3), random_strokes(4)])
    np.testing.assert_allclose(images.numpy(), expected, atol=1e-5)


def test_image_folder_single_root(tmp_path):
    write_drawing(tmp_path / "Alphabet_A" / "character01" / "01.png", random_strokes(0))
    write_drawing(tmp_path / "Alphabet_A" / "character02" / "01.png", random_strokes(1))
    images, labels = load_image_folder(tmp_path)
    assert images.shape == (2, 1, 28, 28)
    assert labels.tolist() == [0, 1]


def test_image_folder_skips_hidden_folders(tmp_path):
    write_drawing(tmp_path / "Alphabet_A" / "character01" / "01.png", random_strokes(0))
    write_drawing(tmp_path / "Alphabet_A" / "character01" / "02.png", random_strokes(1))
    write_drawing(tmp_path / ".ipynb_checkpoints" / "character01" / "01.png", random_strokes(2))
    _, labels = load_image_folder(tmp_path)
    assert labels.tolist() == [0, 0]


def test_image_folder_missing_root(tmp_path):
    with pytest.raises(FileNotFoundError, match="missing"):
        load_image_folder(tmp_path / "missing")


def test_image_folder_without_pngs(tmp_path):
    (tmp_path / "Alphabet_A" / "character01").mkdir(parents=True)
    with pytest.raises(ValueError, match="No PNG drawings"):
        load_image_folder(tmp_path)


def test_omniglot_default_unseen_is_last_fifth(tmp_path):
    write_omniglot(tmp_path)
    course = make_course_data("omniglot", root=tmp_path)
    assert course.val_unseen.classes == [4]
    assert course.train.classes == [0, 1, 2, 3]


# ---- Split --------------------------------------------------------------------------------------------------

def test_split_len_and_classes():
    split = Split(images=torch.zeros(4, 1, 28, 28), labels=torch.tensor([3, 1, 3, 0]), name="demo")
    assert len(split) == 4
    assert split.classes == [0, 1, 3]


def test_split_rejects_length_mismatch():
    with pytest.raises(ValueError, match="demo"):
        Split(images=torch.zeros(4, 1, 28, 28), labels=torch.zeros(3, dtype=torch.int64), name="demo")


# ---- splitting --------------------------------------------------------------------------------------------------

def test_course_data_deterministic():
    first = make_course_data("digits", seed=3)
    second = make_course_data("digits", seed=3)
    assert torch.equal(first.train.indices, second.train.indices)
    assert torch.equal(first.val_seen.indices, second.val_seen.indices)
    assert torch.equal(first.train.images, second.train.images)


def test_course_data_seed_changes_split():
    first = make_course_data("digits", seed=0)
    second = make_course_data("digits", seed=1)
    assert not torch.equal(first.val_seen.indices, second.val_seen.indices)


def test_course_data_splits_disjoint():
    course = make_course_data("digits")
    train = set(course.train.indices.tolist())
    val_seen = set(course.val_seen.indices.tolist())
    val_unseen = set(course.val_unseen.indices.tolist())
    assert not train & val_seen
    assert not train & val_unseen
    assert not val_seen & val_unseen
    assert len(train | val_seen | val_unseen) == 1797


def test_course_data_default_unseen_digits():
    course = make_course_data("digits")
    assert course.val_unseen.classes == [7, 8, 9]
    assert course.train.classes == list(range(7))
    assert course.val_seen.classes == list(range(7))


def test_course_data_matches_loaded_images():
    images, labels = load_dataset("digits")
    course = make_course_data("digits")
    assert torch.equal(course.val_seen.images, images[course.val_seen.indices])
    assert torch.equal(course.val_seen.labels, labels[course.val_seen.indices])


def test_course_data_stratified():
    targets = load_digits().target
    course = make_course_data("digits", val_fraction=0.2)
    val_labels = course.val_seen.labels.tolist()
    for label in range(7):
        expected = round(0.2 * int((targets == label).sum()))
        assert val_labels.count(label) == expected, f"class {label}"


def test_max_images_per_class_keeps_k():
    course = make_course_data("digits", max_images_per_class=10)
    labels = torch.cat([course.train.labels, course.val_seen.labels, course.val_unseen.labels]).tolist()
    for label in range(10):
        assert labels.count(label) == 10, f"class {label}"


def test_max_images_per_class_deterministic():
    first = make_course_data("digits", max_images_per_class=10, seed=5)
    second = make_course_data("digits", max_images_per_class=10, seed=5)
    assert torch.equal(first.val_unseen.indices, second.val_unseen.indices)


def test_split_by_image_keeps_one_each_side():
    labels = torch.tensor([0, 0] + [1] * 10)
    generator = torch.Generator().manual_seed(0)
    train, val = split_by_image(torch.arange(12), labels, 0.2, generator)
    assert labels[val].tolist().count(0) == 1
    assert labels[train].tolist().count(0) == 1
    assert labels[val].tolist().count(1) == 2


def test_split_by_image_large_fraction_leaves_train():
    labels = torch.tensor([0, 0, 1, 1, 1])
    generator = torch.Generator().manual_seed(0)
    train, _ = split_by_image(torch.arange(5), labels, 0.9, generator)
    assert sorted(labels[train].tolist()) == [0, 1]


def test_split_by_image_uses_given_indices():
    labels = torch.tensor([5, 0, 0, 1, 1, 5])
    generator = torch.Generator().manual_seed(0)
    train, val = split_by_image(torch.tensor([1, 2, 3, 4]), labels, 0.5, generator)
    assert sorted(train.tolist() + val.tolist()) == [1, 2, 3, 4]


def test_split_by_class_indices():
    labels = torch.tensor([0, 7, 1, 8, 7])
    seen, unseen = split_by_class(labels, [7, 8])
    assert seen.tolist() == [0, 2]
    assert unseen.tolist() == [1, 3, 4]


# ---- input checks -----------------------------------------------------------------------------------------------

def test_unseen_class_not_present():
    with pytest.raises(ValueError, match=r"\[42\]"):
        make_course_data("digits", unseen_classes=[42])


def test_unseen_classes_empty():
    with pytest.raises(ValueError, match="empty"):
        split_by_class(torch.tensor([0, 1]), [])


def test_unseen_classes_cover_all():
    with pytest.raises(ValueError, match="every class"):
        split_by_class(torch.tensor([0, 1]), [0, 1])


@pytest.mark.parametrize("val_fraction", [0.0, 1.0, -0.1, 1.5])
def test_val_fraction_outside_range(val_fraction):
    with pytest.raises(ValueError, match=f"val_fraction={val_fraction}"):
        make_course_data("digits", val_fraction=val_fraction)


def test_class_with_one_seen_image():
    generator = torch.Generator().manual_seed(0)
    with pytest.raises(ValueError, match="Class 1 has 1 image"):
        split_by_image(torch.arange(3), torch.tensor([0, 0, 1]), 0.2, generator)


def test_max_images_per_class_too_small():
    with pytest.raises(ValueError, match="max_images_per_class=1"):
        make_course_data("digits", max_images_per_class=1)


def test_split_by_image_needs_generator():
    with pytest.raises(TypeError, match="torch.Generator"):
        split_by_image(torch.arange(4), torch.tensor([0, 0, 1, 1]), 0.5, 0)


# ---- damaged files ----------------------------------------------------------------------------------------------

def test_truncated_idx_names_file(tmp_path):
    write_idx_dataset(tmp_path, "MNIST")
    images = tmp_path / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:3000])
    with pytest.raises(data.CorruptDataError) as info:
        load_dataset("mnist", root=tmp_path)
    message = str(info.value)
    assert f"{images} is truncated: 3,000 of the 9,424 bytes its header 12x28x28 implies" in message
    assert "Delete that file and run `python -m labutils data fetch mnist`" in message
    assert "python -m labutils data verify" in message
    assert info.value.path == images


def test_idx_with_extra_bytes_is_corrupt(tmp_path):
    write_idx_dataset(tmp_path, "KMNIST")
    labels = tmp_path / "KMNIST" / "raw" / "t10k-labels-idx1-ubyte"
    labels.write_bytes(labels.read_bytes() + b"\0\0")
    with pytest.raises(data.CorruptDataError, match="has 2 bytes more than its header 5 implies"):
        load_dataset("kmnist", root=tmp_path)


def test_gzipped_idx_is_corrupt(tmp_path):
    write_idx_dataset(tmp_path, "FashionMNIST")
    labels = tmp_path / "FashionMNIST" / "raw" / "train-labels-idx1-ubyte"
    labels.write_bytes(gzip.compress(labels.read_bytes()))
    with pytest.raises(data.CorruptDataError, match="not an uncompressed IDX file"):
        load_dataset("fashion-mnist", root=tmp_path)


def test_corrupt_error_is_unavailable():
    # Callers that catch DatasetUnavailableError, such as `data fetch`, also catch damaged files.
    assert issubclass(data.CorruptDataError, DatasetUnavailableError)


def test_truncated_png_names_file_and_set(tmp_path):
    write_omniglot(tmp_path)
    drawing = sorted((tmp_path / "omniglot-py" / "images_background").rglob("*.png"))[3]
    drawing.write_bytes(drawing.read_bytes()[:60])
    with pytest.raises(data.CorruptDataError) as info:
        load_dataset("omniglot", root=tmp_path)
    message = str(info.value)
    assert f"{drawing} could not be decoded as a PNG" in message
    assert f"Delete the folder {tmp_path / 'omniglot-py' / 'images_background'} and run" in message
    assert info.value.path == drawing


def test_truncated_png_in_image_folder(tmp_path):
    write_drawing(tmp_path / "Alphabet_A" / "character01" / "01.png", random_strokes(0))
    drawing = tmp_path / "Alphabet_A" / "character01" / "02.png"
    drawing.write_bytes(b"\x89PNG\r\n\x1a\n")
    with pytest.raises(data.CorruptDataError, match="02.png could not be decoded as a PNG"):
        load_image_folder(tmp_path)


def test_omniglot_extracted_again_from_zip(tmp_path, monkeypatch):
    strokes = write_omniglot(tmp_path)
    evaluation = tmp_path / "omniglot-py" / "images_evaluation"
    shutil.make_archive(str(evaluation), "zip", root_dir=evaluation.parent, base_dir=evaluation.name)
    shutil.rmtree(evaluation)

    def no_network(self):
        raise AssertionError("the archive beside the folder must be used, not the network")

    monkeypatch.setattr(torchvision.datasets.Omniglot, "download", no_network)
    images, _ = load_dataset("omniglot", root=tmp_path, download=True)
    np.testing.assert_allclose(images.numpy(), expected_drawings(strokes), atol=1e-5)


def test_broken_omniglot_zip_is_corrupt(tmp_path):
    write_omniglot(tmp_path)
    evaluation = tmp_path / "omniglot-py" / "images_evaluation"
    shutil.rmtree(evaluation)
    (evaluation.parent / "images_evaluation.zip").write_bytes(b"PK\x03\x04 cut short")
    with pytest.raises(data.CorruptDataError, match="images_evaluation.zip could not be extracted"):
        load_dataset("omniglot", root=tmp_path, download=True)
