"""Benchmark: the course's tensor-resident training path against a naive per-sample pipeline.

Both variants run the same job: an encoder (by default the small one that the lever notebooks train dozens of
times) trained with the contrastive loss on freshly drawn pairs of the digits training split. Two jobs exist:

- `augmented`: the whole training split, each image randomly rotated, scaled, shifted and brightened;
- `few-images`: the lever notebooks' set-up, 5 training images per class and no augmentation.

The naive variant is how many tutorials write it: a `Dataset` of explicit pairs built in a Python loop,
per-sample torchvision transforms on PIL images, a `DataLoader`, and one encoder call per side of the pair. The
fast variant is what the course does: data resident as tensors, vectorised pair sampling, batched
augmentation, one forward pass over both sides, each distinct image embedded once when nothing random
happens per image, channels-last, the multi-tensor optimizer update, and freed memory kept for reuse
(`labutils.allocator`). Each variant runs in its own process so its peak memory and allocator settings are its
own.
"""

from __future__ import annotations

import json
import random
import resource
import subprocess
import sys
import time
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch.utils.flop_counter import FlopCounterMode

from labutils.allocator import reuse_freed_memory
from labutils.augment import Augmentation, augment
from labutils.data import Split, make_course_data
from labutils.experiments import FEW_IMAGES_PER_CLASS, limit_train_images
from labutils.losses import contrastive_loss
from labutils.models import make_encoder
from labutils.pairs import make_pairs
from labutils.training import TrainConfig, batch_loss, make_optimizer

BATCH_SIZE = 128
MATMUL_SIZE = 2048
JOBS = ("augmented", "few-images")


@dataclass(frozen=True)
class BenchResult:
    """One variant's measurements.

    `images_per_second` counts the images of the job, two per pair. `encoder_images_per_second` counts the
    images the encoder actually processed, fewer when the fast path embeds each distinct image of a batch once.
    """

    variant: str
    capacity: str
    images_per_second: float
    epoch_seconds: float
    peak_memory_mb: float
    pairs_per_epoch: int
    job: str = "augmented"
    encoder_images_per_second: float = 0.0


def run_fast(pairs_per_epoch: int, epochs: int, capacity: str = "small", seed: int = 0,
             job: str = "augmented") -> BenchResult:
    """Train as the course does: keep freed memory for reuse as `session.start` does, then follow `training.fit`.

    That means resident tensors, vectorised pairs, batched augmentation, one forward pass, and the optimizer
    that `training.make_optimizer` builds.
    """
    reuse_freed_memory()
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    train = _training_split(job, seed)
    model = make_encoder(capacity).to(memory_format=torch.channels_last)
    encoder_images = _count_encoder_images(model)
    config = TrainConfig(batch_size=BATCH_SIZE, pairs_per_epoch=pairs_per_epoch, lr=1e-3)
    optimizer = make_optimizer(model, config)
    settings = Augmentation()
    transform = (lambda batch: augment(batch, settings, generator)) if job == "augmented" else None
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        batches = make_pairs(train.labels, pairs_per_epoch, generator)
        for batch in zip(*(indices.split(BATCH_SIZE) for indices in batches)):
            _step(optimizer, batch_loss(model, train.images, batch, config, transform=transform))
    return _result("fast", capacity, started, epochs, pairs_per_epoch, job, sum(encoder_images))


def run_naive(pairs_per_epoch: int, epochs: int, capacity: str = "small", seed: int = 0,
              job: str = "augmented") -> BenchResult:
    """Train the way a per-sample tutorial pipeline does: Dataset, PIL transforms, DataLoader, two calls."""
    from torch.utils.data import DataLoader, Dataset
    from torchvision import transforms

    torch.manual_seed(seed)
    random.seed(seed)
    train = _training_split(job, seed)
    pil_images = _to_pil(train.images)
    labels = train.labels.tolist()
    mean, std = float(train.images.mean()), float(train.images.std())
    random_transforms = [transforms.RandomAffine(degrees=15, translate=(0.1, 0.1), scale=(0.9, 1.1)),
                         transforms.ColorJitter(brightness=0.2, contrast=0.2)] if job == "augmented" else []
    transform = transforms.Compose([*random_transforms, transforms.ToTensor(), transforms.Normalize((mean,), (std,))])

    class PairDataset(Dataset):
        def __init__(self, pairs: list[tuple[int, int, float]]) -> None:
            self.pairs = pairs

        def __len__(self) -> int:
            return len(self.pairs)

        def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, float]:
            left, right, same = self.pairs[index]
            return transform(pil_images[left]), transform(pil_images[right]), same

    model = make_encoder(capacity)
    encoder_images = _count_encoder_images(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    model.train()
    started = time.perf_counter()
    for _ in range(epochs):
        loader = DataLoader(PairDataset(_python_pairs(labels, pairs_per_epoch)), batch_size=BATCH_SIZE,
                            shuffle=True, num_workers=0)
        for left_images, right_images, same in loader:
            _step(optimizer, contrastive_loss(model(left_images), model(right_images), same.float()))
    return _result("naive", capacity, started, epochs, pairs_per_epoch, job, sum(encoder_images))


def _training_split(job: str, seed: int) -> Split:
    """Return the digits training split of `job`: whole, or limited to the lever notebooks' few images."""
    _check_job(job)
    course = make_course_data("digits", seed=seed)
    if job == "few-images":
        course = limit_train_images(course, FEW_IMAGES_PER_CLASS, seed=seed)
    return course.train


def _check_job(job: str) -> None:
    if job not in JOBS:
        raise ValueError(f"Unknown job {job!r}: use one of {', '.join(JOBS)}.")


def _count_encoder_images(model: torch.nn.Module) -> list[int]:
    """Return a list that collects the number of images of every forward pass of `model`."""
    counts: list[int] = []
    model.register_forward_pre_hook(lambda module, args: counts.append(len(args[0])))
    return counts


def _python_pairs(labels: list[int], count: int) -> list[tuple[int, int, float]]:
    """Draw balanced pairs one at a time in Python, as a per-sample pipeline typically does."""
    by_class: dict[int, list[int]] = {}
    for index, label in enumerate(labels):
        by_class.setdefault(label, []).append(index)
    classes = list(by_class)
    pairs = []
    for item in range(count):
        if item % 2 == 0:
            members = by_class[random.choice(classes)]
            left, right = random.sample(members, 2)
            pairs.append((left, right, 1.0))
        else:
            first, second = random.sample(classes, 2)
            pairs.append((random.choice(by_class[first]), random.choice(by_class[second]), 0.0))
    return pairs


def _to_pil(images: torch.Tensor) -> list[Any]:
    from PIL import Image

    low, high = images.min(), images.max()
    pixels = ((images[:, 0] - low) / (high - low) * 255).round().to(torch.uint8).numpy()
    return [Image.fromarray(image) for image in pixels]


def _step(optimizer: torch.optim.Optimizer, loss: torch.Tensor) -> None:
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()


def _result(variant: str, capacity: str, started: float, epochs: int, pairs_per_epoch: int, job: str,
            encoder_images: int) -> BenchResult:
    seconds = time.perf_counter() - started
    # ru_maxrss is in kilobytes on Linux and in bytes on macOS.
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1e6 if sys.platform == "darwin" else 1e3)
    return BenchResult(variant, capacity, 2 * pairs_per_epoch * epochs / seconds, seconds / epochs, peak,
                       pairs_per_epoch, job, encoder_images / seconds)


def matmul_peak_gflops(size: int = MATMUL_SIZE, repeats: int = 5) -> float:
    """Measure the best fp32 square matrix multiply rate on this CPU, in GFLOP/s."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    a @ b  # warm-up: the first call allocates and picks kernels
    best = min(_timed(lambda: a @ b) for _ in range(repeats))
    return 2 * size**3 / best / 1e9


def training_flops_per_image(capacity: str = "small") -> float:
    """Count the forward and backward FLOPs of the encoder per image with PyTorch's FLOP counter."""
    model = make_encoder(capacity)
    images = torch.randn(BATCH_SIZE, 1, 28, 28)
    with FlopCounterMode(display=False) as counter:
        model(images).sum().backward()
    return counter.get_total_flops() / BATCH_SIZE


def _timed(function: Any) -> float:
    started = time.perf_counter()
    function()
    return time.perf_counter() - started


def run_variant_in_subprocess(variant: str, pairs_per_epoch: int, epochs: int, capacity: str,
                              job: str = "augmented") -> BenchResult:
    """Run one variant in a fresh Python process and return its measurements."""
    command = [sys.executable, "-m", "labutils.bench", variant, str(pairs_per_epoch), str(epochs), capacity, job]
    output = subprocess.run(command, check=True, capture_output=True, text=True).stdout
    return BenchResult(**json.loads(output.strip().splitlines()[-1]))


def benchmark(pairs_per_epoch: int = 2048, epochs: int = 2, capacity: str = "small",
              job: str = "augmented") -> dict[str, Any]:
    """Run both variants and the matmul peak; return every figure the report prints.

    The fast path's GFLOP/s counts only the encoder work it performed, so embedding fewer images raises its
    speed-up but not its share of the peak.
    """
    _check_job(job)  # here too, so a typo fails before the naive variant's subprocess starts
    naive = run_variant_in_subprocess("naive", pairs_per_epoch, epochs, capacity, job)
    fast = run_variant_in_subprocess("fast", pairs_per_epoch, epochs, capacity, job)
    peak = matmul_peak_gflops()
    achieved = fast.encoder_images_per_second * training_flops_per_image(capacity) / 1e9
    return {"naive": asdict(naive), "fast": asdict(fast), "speedup": fast.images_per_second /
            naive.images_per_second, "matmul_peak_gflops": peak, "fast_gflops": achieved,
            "fraction_of_peak": achieved / peak, "threads": torch.get_num_threads(), "torch": torch.__version__}


def format_benchmark(figures: dict[str, Any]) -> str:
    """Render the benchmark figures as a short plain-text table."""
    lines = [f"{figures['fast']['capacity']} encoder, {figures['fast']['pairs_per_epoch']} pairs per epoch, "
             f"job {figures['fast']['job']}",
             f"{'variant':8s} {'images/s':>10s} {'encoded/s':>10s} {'epoch s':>9s} {'peak MB':>9s}"]
    for variant in ("naive", "fast"):
        row = figures[variant]
        lines.append(f"{variant:8s} {row['images_per_second']:10.0f} {row['encoder_images_per_second']:10.0f} "
                     f"{row['epoch_seconds']:9.2f} {row['peak_memory_mb']:9.0f}")
    lines.append(f"fast / naive: {figures['speedup']:.1f}x")
    lines.append(f"fp32 matmul peak: {figures['matmul_peak_gflops']:.0f} GFLOP/s; fast path trains at "
                 f"{figures['fast_gflops']:.0f} GFLOP/s = {figures['fraction_of_peak']:.0%} of it "
                 f"({figures['threads']} threads, PyTorch {figures['torch']})")
    return "\n".join(lines)


if __name__ == "__main__":
    # Entry point of one variant's subprocess: prints its BenchResult as JSON on the last line.
    variant_name, pairs, epoch_count, encoder_capacity, job_name = (sys.argv[1], int(sys.argv[2]), int(sys.argv[3]),
                                                                    sys.argv[4], sys.argv[5])
    runner = {"fast": run_fast, "naive": run_naive}[variant_name]
    print(json.dumps(asdict(runner(pairs, epoch_count, encoder_capacity, job=job_name))))
