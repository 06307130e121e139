"""Datasets for the course: loading, preprocessing and seeded train / validation splits.

Every loader returns images of shape (N, 1, 28, 28), float32, standardised to zero mean and unit standard
deviation over the whole dataset, and int64 labels of shape (N,). Only `digits` ships with scikit-learn and
works offline. The other datasets are read from the data folder, which data/README.md describes.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor
from torchvision import datasets as tv_datasets

logger = logging.getLogger(__name__)

DATASETS = ("digits", "mnist", "fashion-mnist", "kmnist", "omniglot")
DEFAULT_DATA_DIR = Path(__file__).resolve().parent.parent / "data"
DATA_DIR_ENV_VAR = "LABUTILS_DATA_DIR"
IMAGE_SIZE = 28
DEFAULT_UNSEEN_DIGITS = (7, 8, 9)
OMNIGLOT_UNSEEN_FRACTION = 0.2
OMNIGLOT_FOLDERS = ("images_background", "images_evaluation")

# torchvision class that reads each IDX dataset from <root>/<class name>/raw.
IDX_DATASET_CLASSES = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST", "kmnist": "KMNIST"}
# Bytes per value for each IDX type code (the third byte of the magic number).
IDX_ITEM_SIZES = {0x08: 1, 0x09: 1, 0x0B: 2, 0x0C: 4, 0x0D: 4, 0x0E: 8}
VERIFY_HINT = "`python -m labutils data verify` checks every file against the data folder's manifest."

PathLike = Union[str, "os.PathLike[str]"]

_cache: dict[tuple[str, str], tuple[Tensor, Tensor]] = {}


class DatasetUnavailableError(RuntimeError):
    """A dataset is not in the data folder and could not be downloaded, or its files could not be read."""


class CorruptDataError(DatasetUnavailableError):
    """A data file is present but truncated or corrupted, so it cannot be decoded. `path` names the file."""

    def __init__(self, message: str, path: Path | None = None) -> None:
        super().__init__(message)
        self.path = path


@dataclass(frozen=True, eq=False)
class Split:
    """Images and labels of one part of a dataset.

    images: (N, 1, 28, 28) float32. labels: (N,) int64. indices: (N,) positions of these images in the
    tensors that `load_dataset` returns, or None for a split that was not cut from a loaded dataset.
    """

    images: Tensor
    labels: Tensor
    name: str
    indices: Tensor | None = None

    def __post_init__(self) -> None:
        if self.images.ndim != 4 or self.labels.ndim != 1 or len(self.images) != len(self.labels):
            raise ValueError(f"Split {self.name!r}: expected images (N, C, H, W) and labels (N,), got images "
                             f"{tuple(self.images.shape)} and labels {tuple(self.labels.shape)}: pass one label "
                             "per image.")
        if self.indices is not None and self.indices.shape != self.labels.shape:
            raise ValueError(f"Split {self.name!r}: indices {tuple(self.indices.shape)} must have the shape of "
                             f"labels {tuple(self.labels.shape)}.")

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def classes(self) -> list[int]:
        """Sorted labels that occur in this split."""
        return torch.unique(self.labels).tolist()


@dataclass(frozen=True, eq=False)
class CourseData:
    """The three splits every notebook uses.

    val_seen contains held-out images of the training classes, and val_unseen contains classes never trained on.
    """

    train: Split
    val_seen: Split
    val_unseen: Split


def resolve_data_dir(root: PathLike | None = None) -> Path:
    """Return `root`, else the folder in $LABUTILS_DATA_DIR, else the repository's data/ folder."""
    if root is not None:
        return Path(root).expanduser()
    from_env = os.environ.get(DATA_DIR_ENV_VAR)
    return Path(from_env).expanduser() if from_env else DEFAULT_DATA_DIR


def clear_cache() -> None:
    """Forget the datasets `load_dataset` has decoded in this process, for example after fetching new files."""
    _cache.clear()


def load_dataset(name: str = "digits", root: PathLike | None = None,
                 download: bool = False) -> tuple[Tensor, Tensor]:
    """Load a dataset as standardised images (N, 1, 28, 28) float32 and labels (N,) int64.

    digits: scikit-learn's 8x8 digits (values 0..16) divided by 16 and resized bilinearly to 28x28.
    mnist, fashion-mnist, kmnist: the train split only (60000 images), read by torchvision from
    <root>/<MNIST|FashionMNIST|KMNIST>/raw, divided by 255. omniglot: background then evaluation characters,
    inverted so strokes are bright, resized with antialiasing to 28x28; see `load_image_folder`.
    `root` defaults to `resolve_data_dir()`, and `download=True` lets torchvision fetch missing files.
    Decoded datasets are kept in memory per (name, root), and each call returns fresh copies. Raises
    DatasetUnavailableError for missing files, and its subclass CorruptDataError, naming the file, for an IDX
    file whose size does not match its header or a PNG that cannot be decoded.
    """
    key = _normalise_name(name)
    folder = resolve_data_dir(root)
    cache_key = (key, "" if key == "digits" else str(folder.resolve()))
    if cache_key not in _cache:
        if key == "digits":
            images, labels = _load_digits()
        elif key == "omniglot":
            images, labels = _load_omniglot(folder, download)
        else:
            images, labels = _load_idx_dataset(key, folder, download)
        _cache[cache_key] = (_standardise(images, key), labels)
        logger.info("Loaded %s: %d images, %d classes", key, len(labels), len(torch.unique(labels)))
    images, labels = _cache[cache_key]
    return images.clone(), labels.clone()


def load_image_folder(paths: PathLike | Sequence[PathLike]) -> tuple[Tensor, Tensor]:
    """Load drawings stored as <root>/<alphabet>/<character>/*.png, the layout of extracted Omniglot.

    Returns images (N, 1, 28, 28) float32, inverted so strokes are bright, resized with antialiasing and
    standardised, and labels (N,) int64. Classes are (alphabet, character) pairs, numbered root by root in
    sorted order. A pair found under several roots keeps the label it got first, and a file name already
    loaded for that pair is skipped. Folders whose names start with a dot are ignored. A PNG that cannot be
    decoded raises CorruptDataError naming the file.
    """
    roots = [Path(paths)] if isinstance(paths, (str, os.PathLike)) else [Path(p) for p in paths]
    for root in roots:
        if not root.is_dir():
            raise FileNotFoundError(f"Image folder {str(root)!r} not found: pass a folder laid out as "
                                    "<alphabet>/<character>/*.png.")
    images, labels = _read_drawings(roots)
    return _standardise(images, ", ".join(str(r) for r in roots)), labels


def split_by_class(labels: Tensor, unseen_classes: Sequence[int]) -> tuple[Tensor, Tensor]:
    """Return the int64 indices into `labels` (N,) of the seen (S,) and the unseen (U,) images."""
    unseen = sorted({int(c) for c in unseen_classes})
    present = torch.unique(labels).tolist()
    present_set = set(present)
    if not unseen:
        raise ValueError("unseen_classes is empty: name at least one class to hold out for validation.")
    absent = [c for c in unseen if c not in present_set]
    if absent:
        raise ValueError(f"unseen_classes {absent} do not occur in the labels, which contain classes "
                         f"{_describe_classes(present)}: choose unseen classes from those.")
    if len(unseen) == len(present):
        raise ValueError(f"unseen_classes {unseen} cover every class, so no class is left to train on: "
                         "hold out fewer classes.")
    is_unseen = torch.isin(labels, torch.tensor(unseen, dtype=labels.dtype))
    return torch.nonzero(~is_unseen).flatten(), torch.nonzero(is_unseen).flatten()


def split_by_image(indices: Tensor, labels: Tensor, val_fraction: float,
                   generator: torch.Generator) -> tuple[Tensor, Tensor]:
    """Split `indices` (M,) into sorted (train, val) index tensors, stratified by class.

    `labels` (N,) are the labels of the whole dataset that `indices` point into. Each class puts
    round(val_fraction * n) of its n images into val, at least 1 and at most n - 1, chosen with `generator`.
    """
    _check_val_fraction(val_fraction)
    if not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator, got {type(generator).__name__}: pass "
                        "torch.Generator().manual_seed(seed).")
    if len(indices) == 0:
        raise ValueError("indices is empty: there are no images to split.")
    train_parts, val_parts = [], []
    subset_labels = labels[indices]
    for label in torch.unique(subset_labels).tolist():
        members = indices[subset_labels == label]
        if len(members) < 2:
            raise ValueError(f"Class {label} has {len(members)} image among the seen classes, but a class needs "
                             "at least 2 (one for training, one for validation): raise max_images_per_class "
                             "or add the class to unseen_classes.")
        shuffled = members[torch.randperm(len(members), generator=generator)]
        num_val = min(max(round(val_fraction * len(members)), 1), len(members) - 1)
        val_parts.append(shuffled[:num_val])
        train_parts.append(shuffled[num_val:])
    return torch.sort(torch.cat(train_parts)).values, torch.sort(torch.cat(val_parts)).values


def make_course_data(name: str = "digits", unseen_classes: Sequence[int] | None = None,
                     val_fraction: float = 0.2, seed: int = 0, max_images_per_class: int | None = None,
                     root: PathLike | None = None, download: bool = False) -> CourseData:
    """Load a dataset and split it into train, val_seen (same classes) and val_unseen (held-out classes).

    Default unseen classes: 7, 8 and 9 for the digit-like datasets, the last 20% of characters for omniglot.
    With `max_images_per_class`, each class keeps its first k images after a seeded shuffle. The same seed
    gives the same splits. Raises RuntimeError if two splits share an image index.
    """
    key = _normalise_name(name)
    _check_val_fraction(val_fraction)
    _check_max_images(max_images_per_class)
    images, labels = load_dataset(key, root=root, download=download)
    generator = torch.Generator().manual_seed(seed)

    kept = _limit_images_per_class(labels, max_images_per_class, generator)
    if unseen_classes is None:
        unseen_classes = _default_unseen_classes(key, labels)
    seen_local, unseen_local = split_by_class(labels[kept], unseen_classes)
    unseen = kept[unseen_local]
    train, val_seen = split_by_image(kept[seen_local], labels, val_fraction, generator)

    _check_disjoint({"train": train, "val_seen": val_seen, "val_unseen": unseen})
    return CourseData(train=_take(images, labels, train, "train"),
                      val_seen=_take(images, labels, val_seen, "val_seen"),
                      val_unseen=_take(images, labels, unseen, "val_unseen"))


def _normalise_name(name: str) -> str:
    key = str(name).strip().lower()
    if key not in DATASETS:
        raise ValueError(f"Unknown dataset {name!r}: use one of {', '.join(DATASETS)}.")
    return key


def _unavailable(name: str, folder: Path, reason: str) -> DatasetUnavailableError:
    return DatasetUnavailableError(
        f"Dataset {name!r} is not available in {folder}: {reason}. To get it, run "
        f"`python -m labutils data fetch {name}` while online, or copy the data folder from a machine that has "
        f"it to {folder} (or set {DATA_DIR_ENV_VAR} to the copy). "
        'DATASET = "digits" works offline because scikit-learn ships it.')


def _damaged(name: str, folder: Path, error: CorruptDataError) -> CorruptDataError:
    return CorruptDataError(
        f"Dataset {name!r} in {folder} has a damaged file: {error}. Delete that file and run "
        f"`python -m labutils data fetch {name}` while online, or copy it again from the machine the data folder "
        f"came from. {VERIFY_HINT}", error.path)


def _standardise(images: Tensor, source: str) -> Tensor:
    std, mean = torch.std_mean(images, correction=0)
    if std == 0:
        raise ValueError(f"Every pixel of {source} has the value {float(mean)}, so the images cannot be "
                         "standardised: check that the files contain drawings.")
    return (images - mean) / std


def _load_digits() -> tuple[Tensor, Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.from_numpy(digits.images).float().unsqueeze(1) / 16.0
    images = F.interpolate(images, size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear", align_corners=False)
    return images, torch.from_numpy(digits.target).long()


def _load_idx_dataset(name: str, folder: Path, download: bool) -> tuple[Tensor, Tensor]:
    dataset_class = getattr(tv_datasets, IDX_DATASET_CLASSES[name])
    raw_folder = folder / dataset_class.__name__ / "raw"
    # torchvision 0.29 `MNIST._check_exists` requires all four uncompressed files, test split included.
    file_names = [Path(url).name.removesuffix(".gz") for url, _ in dataset_class.resources]
    missing = [f for f in file_names if not (raw_folder / f).is_file()]
    if missing and not download:
        raise _unavailable(name, folder, f"{', '.join(missing)} missing in {raw_folder}")
    if not missing:
        for file_name in file_names:
            try:
                check_idx_file(raw_folder / file_name)
            except CorruptDataError as error:
                raise _damaged(name, folder, error) from None
    try:
        dataset = dataset_class(str(folder), train=True, download=download)
    except (RuntimeError, OSError) as error:
        if missing:
            raise _unavailable(name, folder, f"the download failed ({error})") from error
        raise _unavailable(name, folder, f"the files in {raw_folder} could not be read ({error}), "
                           "so delete them before fetching again") from error
    except (AssertionError, TypeError, ValueError) as error:
        raise _unavailable(name, folder, f"the files in {raw_folder} are not valid IDX files ({error!r}), "
                           "so delete them before fetching again") from error
    return dataset.data.unsqueeze(1).float() / 255.0, dataset.targets.long()


def _load_omniglot(folder: Path, download: bool) -> tuple[Tensor, Tensor]:
    # torchvision 0.29's Omniglot class needs the zip archives beside the folders (it checks their MD5) and numbers
    # characters in os.listdir order, which differs between file systems. Reading the extracted folders in
    # sorted order gives the same labels on every machine and also works for a copy without the archives.
    roots = [folder / tv_datasets.Omniglot.folder / subfolder for subfolder in OMNIGLOT_FOLDERS]
    missing = [str(root) for root in roots if not root.is_dir()]
    if missing and not download:
        noun = "folders" if len(missing) > 1 else "folder"
        raise _unavailable("omniglot", folder, f"{noun} {' and '.join(missing)} not found")
    if missing and download:
        _extract_omniglot_archives(folder, roots)
    if any(not root.is_dir() for root in roots):
        for background in (True, False):
            try:
                tv_datasets.Omniglot(str(folder), background=background, download=True)
            except (RuntimeError, OSError) as error:
                raise _unavailable("omniglot", folder, f"the download failed ({error})") from error
    try:
        return _read_drawings(roots)
    except CorruptDataError as error:
        damaged_set = next((root for root in roots if error.path and root in error.path.parents), None)
        if damaged_set is None:
            raise _damaged("omniglot", folder, error) from None
        raise CorruptDataError(
            f"Dataset 'omniglot' in {folder} has a damaged file: {error}. Delete the folder {damaged_set} and run "
            f"`python -m labutils data fetch omniglot`, which extracts it again from {damaged_set.name}.zip when "
            f"that archive is there, or downloads it while online. Or copy the folder again from the machine the "
            f"data folder came from. {VERIFY_HINT}", error.path) from None


def _extract_omniglot_archives(folder: Path, roots: list[Path]) -> None:
    """Extract each missing Omniglot folder from the zip archive beside it, which needs no network."""
    for root in roots:
        archive = root.with_name(root.name + ".zip")
        if root.is_dir() or not archive.is_file():
            continue
        try:
            with zipfile.ZipFile(archive) as contents:
                contents.extractall(root.parent)
        except (zipfile.BadZipFile, OSError) as error:
            raise CorruptDataError(f"Dataset 'omniglot' in {folder}: the archive {archive} could not be extracted "
                                   f"({error}). Delete it and run `python -m labutils data fetch omniglot` while "
                                   "online.", archive) from error
        logger.info("Extracted %s from %s", root, archive)


def check_idx_file(path: Path) -> None:
    """Raise CorruptDataError unless `path` is an uncompressed IDX file whose size matches its header.

    An IDX file starts with two zero bytes, a type code, the number of dimensions n and n big-endian uint32
    sizes, followed by the values. A name such as train-images-idx3-ubyte also fixes n, here 3.
    """
    size = path.stat().st_size
    with path.open("rb") as handle:
        magic = handle.read(4)
        if len(magic) < 4 or magic[:2] != b"\0\0" or magic[2] not in IDX_ITEM_SIZES:
            raise CorruptDataError(f"{path} is not an uncompressed IDX file (it starts with {magic!r}), so it is "
                                   "corrupted or still gzip-compressed", path)
        dimensions = magic[3]
        named = re.search(r"idx(\d)", path.name)
        if named and int(named.group(1)) != dimensions:
            raise CorruptDataError(f"{path} has {dimensions} dimensions where its name promises {named.group(1)}, "
                                   "so it is corrupted or a different file under this name", path)
        header = handle.read(4 * dimensions)
    if len(header) < 4 * dimensions:
        raise CorruptDataError(f"{path} is truncated: {size} bytes, shorter than its own header", path)
    shape = struct.unpack(f">{dimensions}I", header)
    expected = 4 + 4 * dimensions + int(np.prod(shape, dtype=np.int64)) * IDX_ITEM_SIZES[magic[2]]
    if size < expected:
        raise CorruptDataError(f"{path} is truncated: {size:,} of the {expected:,} bytes its header "
                               f"{'x'.join(map(str, shape))} implies", path)
    if size > expected:
        raise CorruptDataError(f"{path} has {size - expected:,} bytes more than its header "
                               f"{'x'.join(map(str, shape))} implies, so it is corrupted", path)


def _read_drawings(roots: list[Path]) -> tuple[Tensor, Tensor]:
    """Decode every drawing under `roots` into images (N, 1, 28, 28) in [0, 1], strokes bright, and labels (N,)."""
    files, labels = _list_drawings(roots)
    if not files:
        raise ValueError(f"No PNG drawings found under {', '.join(map(str, roots))}: expected the layout "
                         "<alphabet>/<character>/*.png.")
    images = torch.stack([_read_drawing(path) for path in files])
    return images, torch.tensor(labels, dtype=torch.int64)


def _list_drawings(roots: list[Path]) -> tuple[list[Path], list[int]]:
    """List the PNG files under `roots` with the label of their (alphabet, character) pair."""
    class_ids: dict[tuple[str, str], int] = {}
    loaded: set[tuple[str, str, str]] = set()
    files: list[Path] = []
    labels: list[int] = []
    for root in roots:
        for character in (c for alphabet in _sorted_subfolders(root) for c in _sorted_subfolders(alphabet)):
            class_key = (character.parent.name, character.name)
            new_files = [p for p in _sorted_pngs(character) if (*class_key, p.name) not in loaded]
            if not new_files:
                continue
            label = class_ids.setdefault(class_key, len(class_ids))
            loaded.update((*class_key, p.name) for p in new_files)
            files.extend(new_files)
            labels.extend([label] * len(new_files))
    return files, labels


def _sorted_subfolders(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _sorted_pngs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() == ".png")


def _read_drawing(path: Path) -> Tensor:
    """Decode one PNG into (1, 28, 28): 1 - gray / 255, so the dark strokes of Omniglot become bright."""
    try:
        with Image.open(path) as image:
            gray = np.asarray(image.convert("L"), dtype=np.float32) / 255.0
    except (OSError, SyntaxError, ValueError) as error:  # Pillow raises SyntaxError for a broken PNG chunk
        raise CorruptDataError(f"{path} could not be decoded as a PNG ({error}), so it is truncated or "
                               "corrupted", path) from error
    inverted = 1.0 - torch.from_numpy(gray)
    resized = F.interpolate(inverted[None, None], size=(IMAGE_SIZE, IMAGE_SIZE), mode="bilinear",
                            align_corners=False, antialias=True)
    return resized[0]


def _describe_classes(classes: list[int]) -> str:
    if len(classes) <= 12:
        return str(classes)
    return f"{classes[:5]} ... {classes[-3:]} ({len(classes)} classes)"


def _check_val_fraction(val_fraction: float) -> None:
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction={val_fraction} is outside (0, 1): use a fraction such as 0.2.")


def _check_max_images(max_images_per_class: int | None) -> None:
    if max_images_per_class is None:
        return
    if isinstance(max_images_per_class, bool) or not isinstance(max_images_per_class, int):
        raise TypeError(f"max_images_per_class must be an int or None, got {max_images_per_class!r}.")
    if max_images_per_class < 2:
        raise ValueError(f"max_images_per_class={max_images_per_class} is too small: each class needs at least "
                         "2 images (one for training, one for validation), so use 2 or more, or None for all.")


def _limit_images_per_class(labels: Tensor, max_images_per_class: int | None,
                            generator: torch.Generator) -> Tensor:
    """Return sorted indices (K,) that keep the first k images of each class after a seeded shuffle."""
    if max_images_per_class is None:
        return torch.arange(len(labels))
    parts = []
    for label in torch.unique(labels).tolist():
        members = torch.nonzero(labels == label).flatten()
        parts.append(members[torch.randperm(len(members), generator=generator)][:max_images_per_class])
    return torch.sort(torch.cat(parts)).values


def _default_unseen_classes(name: str, labels: Tensor) -> list[int]:
    if name != "omniglot":
        return list(DEFAULT_UNSEEN_DIGITS)
    classes = torch.unique(labels).tolist()
    num_unseen = max(1, round(OMNIGLOT_UNSEEN_FRACTION * len(classes)))
    return classes[-num_unseen:]


def _check_disjoint(splits: dict[str, Tensor]) -> None:
    names = list(splits)
    for position, first in enumerate(names):
        for second in names[position + 1:]:
            shared = splits[first][torch.isin(splits[first], splits[second])]
            if len(shared) > 0:
                raise RuntimeError(f"Splits {first} and {second} share {len(shared)} image indices, for example "
                                   f"{shared[:5].tolist()}: this is a bug in labutils.data.")


def _take(images: Tensor, labels: Tensor, indices: Tensor, name: str) -> Split:
    return Split(images=images[indices], labels=labels[indices], name=name, indices=indices)
