"""Headless course run: execute the numbered notebooks with papermill and collect what they recorded.

Each notebook runs in its own Jupyter kernel with the parameters PROFILE, DATASET, DEVICE, SEED and RESULTS_DIR
injected. Its `Recorder` writes `<out>/results/<stem>.json`, which the runner reads instead of parsing cell
outputs. A run folder contains `notebooks/` (executed copies, partial output kept on failure), `results/`,
`results.json`, `report.md` and `report.html`.
"""

from __future__ import annotations

import json
import logging
import math
import os
import platform
import re
import sys
import time
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from labutils import report
from labutils.data import DATASETS
from labutils.profiles import PROFILE_ENV_VAR, PROFILES
from labutils.training import DEVICES

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
RUNS_DIR = REPO_ROOT / "runs"
KERNEL_NAME = "python3"
NOTEBOOK_NAME = re.compile(r"^(\d+)_.+\.ipynb$")
ERROR_LINES = 6  # maximum lines of an exception message that results.json and the report keep


def run_course(profile: str = "full", dataset: str = "digits", device: str = "auto", seed: int = 0,
               notebooks: Sequence[str] | None = None, out: str | os.PathLike[str] | None = None,
               timeout: float | None = None, notebooks_dir: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """Execute the selected notebooks and write results.json, report.md and report.html into the run folder.

    `notebooks` lists number prefixes ("00", "2"); None runs all. `out` must be missing or empty, and by
    default is runs/<YYYYmmdd-HHMMSS> in the repository. `timeout` limits the execution time of each notebook
    in seconds. Invalid arguments raise ValueError before anything runs. Returns the content of results.json,
    whose "status" is "passed" only when every notebook passed.
    """
    _check_arguments(profile, dataset, device, seed, timeout)
    selected = select_notebooks(find_notebooks(notebooks_dir or NOTEBOOKS_DIR), notebooks)
    out_dir = prepare_out_dir(out)
    results: dict[str, Any] = {
        "profile": profile, "dataset": dataset, "device": device, "seed": seed, "timeout": timeout,
        "out_dir": str(out_dir), "started": _now(), "finished": None, "seconds": 0.0, "status": "incomplete",
        "environment": environment_info(), "notebooks": [],
    }
    _warn_if_other_kernel(results["environment"]["kernel_command"])
    parameters = {"PROFILE": profile, "DATASET": dataset, "DEVICE": device, "SEED": seed,
                  "RESULTS_DIR": str(out_dir / "results")}
    started = time.perf_counter()
    with _kernel_environment(profile):
        for index, notebook in enumerate(selected, start=1):
            logger.info("Running %s (%d of %d)", notebook.name, index, len(selected))
            results["notebooks"].append(run_notebook(notebook, out_dir, parameters, timeout))
            results["seconds"] = round(time.perf_counter() - started, 2)
            # Written after every notebook so that an interrupted run still leaves results and a report.
            _write_results(results, out_dir)
    results["finished"] = _now()
    passed = all(entry["status"] == "passed" for entry in results["notebooks"])
    results["status"] = "passed" if passed else "failed"
    _write_results(results, out_dir)
    return results


def _check_arguments(profile: str, dataset: str, device: str, seed: int, timeout: float | None) -> None:
    if profile not in PROFILES:
        raise ValueError(f"Unknown profile {profile!r}: use one of {', '.join(PROFILES)}.")
    if dataset not in DATASETS:
        raise ValueError(f"Unknown dataset {dataset!r}: use one of {', '.join(DATASETS)}.")
    if device not in DEVICES:
        raise ValueError(f"Unknown device {device!r}: use one of {', '.join(DEVICES)}.")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"Invalid seed {seed!r}: use a non-negative integer.")
    if timeout is not None and not timeout > 0:
        raise ValueError(f"Invalid timeout {timeout!r}: use a positive number of seconds, or None for no limit.")


def find_notebooks(notebooks_dir: str | os.PathLike[str]) -> list[Path]:
    """Return the `NN_name.ipynb` notebooks in `notebooks_dir`, in course order."""
    folder = Path(notebooks_dir).resolve()
    found = [path for path in folder.glob("*.ipynb") if NOTEBOOK_NAME.match(path.name)]
    if not found:
        raise ValueError(f"No notebooks named NN_name.ipynb found in {str(folder)!r}: "
                         "point the notebooks folder at the course's notebooks/ folder.")
    return sorted(found, key=lambda path: (_number(path), path.name))


def select_notebooks(available: list[Path], numbers: Sequence[str] | None) -> list[Path]:
    """Keep the notebooks whose number prefix is in `numbers` ("2" matches 02_*), in course order."""
    if not numbers:
        return available
    listing = ", ".join(path.name for path in available)
    requested = set()
    for number in numbers:
        if not number.isdigit():
            raise ValueError(f"Invalid notebook number {number!r}: use number prefixes such as 00 02. "
                             f"Available notebooks: {listing}.")
        if not any(_number(path) == int(number) for path in available):
            raise ValueError(f"Notebook number {number!r} not found. Available notebooks: {listing}.")
        requested.add(int(number))
    return [path for path in available if _number(path) in requested]


def _number(path: Path) -> int:
    return int(path.name.split("_", 1)[0])


def prepare_out_dir(out: str | os.PathLike[str] | None) -> Path:
    """Create the run folder and return its absolute path, never reusing a folder that contains files.

    Without `out`, picks runs/<YYYYmmdd-HHMMSS> in the repository, with a -2, -3... suffix when that exists.
    """
    if out is None:
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        out_dir = RUNS_DIR / stamp
        suffix = 2
        while out_dir.exists():
            out_dir = RUNS_DIR / f"{stamp}-{suffix}"
            suffix += 1
    else:
        out_dir = Path(out).resolve()
        if out_dir.exists() and not out_dir.is_dir():
            raise ValueError(f"The output path {str(out_dir)!r} is a file: choose a folder for the run.")
        if out_dir.is_dir() and any(out_dir.iterdir()):
            raise ValueError(f"The output folder {str(out_dir)!r} already exists and is not empty: choose "
                             "another folder, so that an earlier run is not overwritten.")
    (out_dir / "notebooks").mkdir(parents=True, exist_ok=True)
    (out_dir / "results").mkdir(exist_ok=True)
    return out_dir


@contextmanager
def _kernel_environment(profile: str) -> Iterator[None]:
    """Set the environment variables that kernels inherit, and restore the previous values afterwards.

    PYTHONPATH lets the kernels import this labutils even when it is not installed. LABUTILS_PROFILE is set
    because `get_profile` prefers it over the injected PROFILE parameter.
    """
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    changes = {"MPLBACKEND": "agg", "PYTHONPATH": pythonpath, PROFILE_ENV_VAR: profile}
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_notebook(notebook: Path, out_dir: Path, parameters: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Execute one notebook into `out_dir`/notebooks and return its entry for results.json."""
    executed = out_dir / "notebooks" / notebook.name
    started = time.perf_counter()
    error = _execute(notebook, executed, parameters, timeout)
    seconds = round(time.perf_counter() - started, 2)
    recorded = _read_recorded(out_dir / "results" / f"{notebook.stem}.json")
    failed_claims = [claim for claim in recorded["claims"] if claim["enforced"] and not claim["holds"]]
    if failed_claims:
        status = "claim-failed"
    elif error:
        status = "failed"
    else:
        status = "passed"
    logger.info("%s %s in %.1f s", notebook.stem, status, seconds)
    return {
        "notebook": notebook.stem, "status": status, "seconds": seconds, "error": error,
        "metrics": recorded["metrics"], "claims": recorded["claims"],
        "figures": [f"results/{figure}" for figure in recorded["figures"]],
        "executed": executed.relative_to(out_dir).as_posix(),
    }


def _execute(notebook: Path, executed: Path, parameters: dict[str, Any], timeout: float | None) -> str | None:
    """Run papermill and return None, or the first lines of the error that stopped the notebook."""
    import papermill
    from papermill.exceptions import PapermillExecutionError

    try:
        papermill.execute_notebook(
            notebook, executed, parameters=parameters, kernel_name=KERNEL_NAME, cwd=notebook.parent,
            progress_bar=False, log_output=False, timeout_func=_NotebookDeadline(timeout))
    except PapermillExecutionError as error:
        message = f"{error.ename}: {error.evalue}"
    except TimeoutError as error:
        # nbclient's own message gives the last cell's share of the limit, which reads as a per-cell limit.
        reason = f"the notebook ran longer than its limit of {timeout:g} s" if timeout else str(error)
        message = f"{type(error).__name__}: {reason}"
    except Exception as error:  # noqa: BLE001 - one notebook that cannot run must not stop the others
        logger.exception("%s could not be executed", notebook.name)
        message = f"{type(error).__name__}: {error}"
    else:
        return None
    message = _first_lines(message)
    logger.warning("%s failed: %s", notebook.name, message)
    return message


class _NotebookDeadline:
    """Timeout for each cell so that all cells together stay within one limit for the notebook.

    nbclient calls this before each cell to get that cell's timeout. The clock starts at the first cell, so
    kernel start-up (limited separately by papermill's start_timeout) does not count.
    """

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.deadline: float | None = None

    def __call__(self, cell: Any) -> int | None:
        if self.seconds is None:
            return None
        now = time.monotonic()
        if self.deadline is None:
            self.deadline = now + self.seconds
        # nbclient documents the timeout as whole seconds and treats 0 as no limit, hence at least 1.
        return max(1, math.ceil(self.deadline - now))


def _first_lines(message: str) -> str:
    without_colour = re.sub(r"\x1b\[[0-9;]*m", "", message).strip()
    lines = without_colour.splitlines()
    first = "\n".join(lines[:ERROR_LINES])
    return first + "\n..." if len(lines) > ERROR_LINES else first


def _read_recorded(path: Path) -> dict[str, list[Any]]:
    """Return the metrics, claims and figures a notebook recorded, empty when it recorded nothing."""
    empty: dict[str, list[Any]] = {"metrics": [], "claims": [], "figures": []}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return empty
    except (OSError, json.JSONDecodeError) as error:
        logger.warning("Ignoring the unreadable results file %s: %s", path, error)
        return empty
    return {key: list(data.get(key, [])) for key in empty}


def _write_results(results: dict[str, Any], out_dir: Path) -> None:
    (out_dir / "results.json").write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    report.write_reports(results, out_dir)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def environment_info() -> dict[str, Any]:
    """Describe the software and hardware of this process, which the notebook kernels share.

    `torch_threads` is this process's torch.get_num_threads(). A kernel starts with the same value unless a
    notebook changes it.
    """
    import torch

    cuda_available = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "executable": sys.executable,
        "platform": platform.platform(),
        "torch": _version("torch"),
        "torchvision": _version("torchvision"),
        "numpy": _version("numpy"),
        "sklearn": _version("scikit-learn"),
        "papermill": _version("papermill"),
        "torch_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
        "cuda_available": cuda_available,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_available else None,
        "kernel_command": kernel_command(),
    }


def _warn_if_other_kernel(command: list[str]) -> None:
    if not command:
        logger.warning("No %r kernel spec found: install ipykernel in this environment.", KERNEL_NAME)
    elif Path(command[0]).parent != Path(sys.executable).parent:
        logger.warning("The %r kernel runs %s, not this environment's %s, so the notebooks may import other "
                       "package versions. Check `jupyter kernelspec list`.", KERNEL_NAME, command[0], sys.executable)


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def kernel_command() -> list[str]:
    """Return the command line that starts the "python3" kernel, as jupyter_client will run it.

    jupyter_client 8 replaces a bare `python`/`python3` with the interpreter running the runner, so the kernel
    spec that ipykernel installs in a venv runs in that venv. A spec that names an absolute interpreter and
    comes earlier on the Jupyter path (see `jupyter --paths`) runs that interpreter instead.
    """
    from jupyter_client.kernelspec import KernelSpecManager, NoSuchKernel

    try:
        argv = list(KernelSpecManager().get_kernel_spec(KERNEL_NAME).argv)
    except NoSuchKernel:
        return []
    bare_names = {"python", f"python{sys.version_info[0]}", "python{}.{}".format(*sys.version_info[:2])}
    if argv and argv[0] in bare_names:
        argv[0] = sys.executable
    return argv
