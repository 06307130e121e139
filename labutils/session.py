"""The set-up every notebook runs first: profile, seed, device, data set name and the results recorder."""

from __future__ import annotations

import os
import platform
from dataclasses import dataclass
from pathlib import Path

import torch

from labutils.allocator import reuse_freed_memory
from labutils.data import DATASETS
from labutils.profiles import PROFILE_ENV_VAR, Profile, get_profile
from labutils.record import Recorder
from labutils.training import describe_device, pick_device, seed_everything

RESULTS_ENV_VAR = "LABUTILS_RESULTS_DIR"
MPS_FALLBACK_ENV_VAR = "PYTORCH_ENABLE_MPS_FALLBACK"

# True once `prepare_mps_fallback` has set the variable itself, too late for the PyTorch already imported here.
_fallback_set_here = False


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


# The data set on which every notebook's claims were measured and on which they stop a notebook that breaks them.
CLAIMS_DATASET = "digits"


def start(notebook: str, profile: str, dataset: str, device: str, seed: int,
          results_dir: str | os.PathLike[str]) -> Lab:
    """Check the parameters, seed everything, pick the device, keep freed memory for reuse, open the recorder and
    print a summary.

    $LABUTILS_PROFILE and $LABUTILS_RESULTS_DIR, when set, override `profile` and `results_dir`, so that tools
    which cannot inject parameters (nbval) can still choose them.
    """
    chosen = get_profile(profile)
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"SEED must be a non-negative integer, got {seed!r}.")
    torch_device = pick_device(device)
    # Kept freed memory made CPU training steps up to twice as fast, with the same results (labutils.allocator).
    reuse_freed_memory()
    generator = seed_everything(seed)
    context = {"profile": chosen.name, "dataset": dataset, "device": str(torch_device), "seed": seed,
               "torch": torch.__version__, "threads": torch.get_num_threads()}
    results_dir = os.environ.get(RESULTS_ENV_VAR) or results_dir
    # The claims' thresholds were measured on digits. On other data a failing claim is a finding to read, so it
    # is recorded without stopping the notebook.
    enforce_claims = chosen.claims and dataset == CLAIMS_DATASET
    recorder = Recorder(notebook, Path(results_dir), enforce_claims=enforce_claims, context=context)
    overridden = f" (${PROFILE_ENV_VAR} overrides PROFILE = {profile!r})" if chosen.name != profile else ""
    print(f"Profile {chosen.name}, dataset {dataset}, seed {seed}{overridden}")
    if chosen.claims and not enforce_claims:
        print(f"Claims were measured on {CLAIMS_DATASET}: on {dataset} they are recorded, and one that does not hold "
              "is printed without stopping the notebook.")
    device_line = describe_device(device)
    if torch_device.type == "mps":
        device_line += f"; {prepare_mps_fallback()}"
    print(f"Device: {device_line}")
    print(f"PyTorch {torch.__version__}, Python {platform.python_version()}, {torch.get_num_threads()} CPU threads")
    print(f"Results: {recorder.path}")
    return Lab(notebook, chosen, dataset, torch_device, seed, recorder, generator)


def prepare_mps_fallback() -> str:
    """Set $PYTORCH_ENABLE_MPS_FALLBACK to 1 when it is unset, and describe whether this process uses the fallback.

    With the fallback, operators that Apple MPS does not implement run on the CPU instead of raising
    NotImplementedError. PyTorch reads the variable once, when `import torch` registers its MPS kernels
    (aten/src/ATen/mps/MPSFallback.mm in PyTorch 2.x), so setting it here only reaches processes started
    later. `make lab`, `make course` and `python -m labutils run` set it before any kernel starts.
    """
    global _fallback_set_here
    value = os.environ.get(MPS_FALLBACK_ENV_VAR)
    if value is None:
        os.environ[MPS_FALLBACK_ENV_VAR] = "1"
        _fallback_set_here = True
    if value is None or _fallback_set_here:
        return (f"CPU fallback for operators MPS lacks is off in this kernel, because PyTorch reads "
                f"{MPS_FALLBACK_ENV_VAR} at import and it was unset then. Start JupyterLab with `make lab`, or "
                f"export {MPS_FALLBACK_ENV_VAR}=1 before starting it, to turn the fallback on.")
    try:
        enabled = int(value) != 0
    except ValueError:
        return (f"{MPS_FALLBACK_ENV_VAR}={value!r} is not a number, which PyTorch does not accept: set it to 1 "
                "to run operators MPS lacks on the CPU.")
    if enabled:
        return f"operators MPS lacks run on the CPU ({MPS_FALLBACK_ENV_VAR}={value})"
    return f"operators MPS lacks raise NotImplementedError ({MPS_FALLBACK_ENV_VAR}={value})"
