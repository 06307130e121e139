"""The set-up every notebook runs first: profile, seed, device, data set name and the results recorder."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from labutils.data import DATASETS
from labutils.profiles import Profile, get_profile
from labutils.record import Recorder
from labutils.training import describe_device, pick_device, seed_everything

RESULTS_ENV_VAR = "LABUTILS_RESULTS_DIR"


@dataclass
class Lab:
    """The state a notebook keeps after set-up: profile, device, seed, data set name and recorder."""

    notebook: str
    profile: Profile
    dataset: str
    device: torch.device
    seed: int
    recorder: Recorder
    generator: torch.Generator


def start(notebook: str, profile: str, dataset: str, device: str, seed: int,
          results_dir: str | os.PathLike[str]) -> Lab:
    """Check the parameters, seed everything, pick the device, open the recorder and print a summary.

    $LABUTILS_PROFILE and $LABUTILS_RESULTS_DIR, when set, override `profile` and `results_dir`, so that tools
    which cannot inject parameters (nbval) can still choose them.
    """
    chosen = get_profile(profile)
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
    if not isinstance(seed, int) or seed < 0:
        raise ValueError(f"SEED must be a non-negative integer, got {seed!r}.")
    torch_device = pick_device(device)
    generator = seed_everything(seed)
    context = {"profile": chosen.name, "dataset": dataset, "device": str(torch_device), "seed": seed,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    results_dir = os.environ.get(RESULTS_ENV_VAR) or results_dir
    recorder = Recorder(notebook, Path(results_dir), enforce_claims=chosen.claims, context=context)
    print(f"Profile {chosen.name}, dataset {dataset}, seed {seed}")
    print(f"Device: {describe_device(device)}")
    print(f"PyTorch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} CPU threads")
    print(f"Results: {recorder.path}")
    return Lab(notebook, chosen, dataset, torch_device, seed, recorder, generator)
