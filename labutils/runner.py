"""Headless course run: execute the numbered notebooks with papermill and collect what they recorded.

Each notebook runs in its own Jupyter kernel with the parameters PROFILE, DATASET, DEVICE, SEED and RESULTS_DIR
injected. Its `Recorder` writes `<out>/results/<stem>.json`, which the runner reads instead of parsing cell
outputs. A run folder contains `notebooks/` (executed copies, partial output kept on failure), `html/` (the
same notebooks rendered by nbconvert for browsing), `results/`, `results.json`, `report.md` and `report.html`.

results.json is rewritten after every notebook, so a run that is interrupted or killed keeps the entries of the
notebooks that finished, and `resume_course` later runs only the notebooks without an entry. With `jobs` above 1
the notebooks run in parallel, each in its own worker process and kernel; a notebook marked in its metadata as a
reader of the others' results (`{"labutils": {"reads_results": true}}`) starts after all of them.
"""

from __future__ import annotations

import json
import logging
import math
import multiprocessing
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from datetime import datetime
from importlib import metadata
from pathlib import Path
from typing import Any, Iterator, Sequence

from labutils import report

try:
    import resource
except ImportError:  # Windows has no resource module, so kernel CPU time is not measured there.
    resource = None  # type: ignore[assignment]
from labutils.profiles import PROFILE_ENV_VAR, PROFILES

logger = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
NOTEBOOKS_DIR = REPO_ROOT / "notebooks"
RUNS_DIR = REPO_ROOT / "runs"
KERNEL_NAME = "python3"
NOTEBOOK_NAME = re.compile(r"^(\d+)_.+\.ipynb$")
ERROR_LINES = 6  # maximum lines of an exception message that results.json and the report keep
KERNEL_START_ATTEMPTS = 3  # executions of a notebook whose kernel stops before its first cell (see `_execute`)


def run_course(profile: str = "full", dataset: str = "digits", device: str = "auto", seed: int = 0,
               notebooks: Sequence[str] | None = None, out: str | os.PathLike[str] | None = None,
               timeout: float | None = None, notebooks_dir: str | os.PathLike[str] | None = None,
               jobs: int = 1) -> dict[str, Any]:
    """Execute the selected notebooks and write results.json, report.md and report.html into the run folder.

    `notebooks` lists number prefixes ("00", "2"); None runs all. `out` must be missing or empty, and by
    default is runs/<YYYYmmdd-HHMMSS> in the repository. `timeout` limits the execution time of each notebook
    in seconds. `jobs` is the number of notebooks that run at the same time. Invalid arguments raise ValueError
    before anything runs. Returns the content of results.json, whose "status" is "passed" only when every
    notebook passed.
    """
    _check_arguments(profile, dataset, device, seed, timeout)
    _check_jobs(jobs)
    folder = Path(notebooks_dir or NOTEBOOKS_DIR).resolve()
    selected = select_notebooks(find_notebooks(folder), notebooks)
    out_dir = prepare_out_dir(out)
    results: dict[str, Any] = {
        "profile": profile, "dataset": dataset, "device": device, "seed": seed, "timeout": timeout, "jobs": jobs,
        "out_dir": str(out_dir), "notebooks_dir": str(folder), "selected": [path.stem for path in selected],
        "requested": list(notebooks) if notebooks else None,
        "started": _now(), "finished": None, "seconds": 0.0, "status": "incomplete",
        "environment": environment_info(), "notebooks": [],
    }
    _warn_if_other_kernel(results["environment"]["kernel_command"])
    return _run_selected(results, selected, out_dir)


def resume_course(run_dir: str | os.PathLike[str], jobs: int = 1, timeout: float | None = None) -> dict[str, Any]:
    """Finish an interrupted run in its own folder: execute only the notebooks that have no entry in results.json.

    The profile, data set, device, seed and notebook selection come from the run's results.json. Entries already
    there, failed ones included, are kept as they are. A notebook that was cut off mid-way is executed again
    from the start, replacing its partial executed copy. `timeout` replaces the run's per-notebook limit when
    given. Returns the updated content of results.json.
    """
    _check_jobs(jobs)
    out_dir = Path(run_dir).resolve()
    results = read_results(out_dir)
    if timeout is not None:
        _check_arguments(results["profile"], results["dataset"], results["device"], results["seed"], timeout)
        results["timeout"] = timeout
    folder = Path(results.get("notebooks_dir") or NOTEBOOKS_DIR)
    available = {path.stem: path for path in find_notebooks(folder)}
    # Runs written before the selection was recorded ran every notebook of the folder.
    selection = results.get("selected") or list(available)
    missing = [stem for stem in selection if stem not in available]
    if missing:
        raise ValueError(f"Cannot resume {str(out_dir)!r}: the notebooks {', '.join(missing)} are no longer in "
                         f"{str(folder)!r}. Start a new run instead.")
    results["selected"] = selection
    # The folder may have been moved or copied since the run started, for example as a CI artifact.
    results["out_dir"] = str(out_dir)
    finished = {entry["notebook"] for entry in results["notebooks"]}
    pending = [available[stem] for stem in selection if stem not in finished]
    if not pending and results["status"] != "incomplete":
        logger.info("Nothing to resume in %s: every notebook has an entry and the run is %s.", out_dir,
                    results["status"])
        return results
    logger.info("Resuming %s: %d of %d notebooks left to run", out_dir, len(pending), len(selection))
    results["jobs"] = jobs
    results["resumed"] = [*results.get("resumed", []), _now()]
    return _run_selected(results, pending, out_dir)


def read_results(run_dir: str | os.PathLike[str]) -> dict[str, Any]:
    """Read `run_dir`/results.json, raising ValueError with the reason when it is missing or unreadable."""
    path = Path(run_dir) / "results.json"
    try:
        results = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ValueError(f"{str(path)!r} not found: point at a run folder written by `python -m labutils run`.") \
            from None
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read {str(path)!r}: {error}. Start a new run instead.") from None
    if not isinstance(results, dict) or not isinstance(results.get("notebooks"), list):
        raise ValueError(f"{str(path)!r} is not a results file of the course runner: it has no notebook list.")
    return results


def _run_selected(results: dict[str, Any], notebooks: list[Path], out_dir: Path) -> dict[str, Any]:
    """Execute `notebooks`, adding their entries to `results` in course order, and finish the run."""
    parameters = {"PROFILE": results["profile"], "DATASET": results["dataset"], "DEVICE": results["device"],
                  "SEED": results["seed"], "RESULTS_DIR": str(out_dir / "results")}
    position = {stem: index for index, stem in enumerate(results["selected"])}
    earlier_seconds = results["seconds"]
    started = time.perf_counter()
    with _kernel_environment(results["profile"]) as environment:
        entries = _execute_notebooks(notebooks, out_dir, parameters, results["timeout"], results["jobs"],
                                     environment)
        for entry in entries:
            results["notebooks"].append(entry)
            results["notebooks"].sort(key=lambda item: position.get(item["notebook"], len(position)))
            results["seconds"] = round(earlier_seconds + time.perf_counter() - started, 2)
            # Written after every notebook so that an interrupted run still leaves results and a report.
            _write_results(results, out_dir)
    results["finished"] = _now()
    finished = {entry["notebook"] for entry in results["notebooks"]}
    passed = all(stem in finished for stem in results["selected"]) and \
        all(entry["status"] == "passed" for entry in results["notebooks"])
    results["status"] = "passed" if passed else "failed"
    _write_results(results, out_dir)
    return results


def _execute_notebooks(notebooks: list[Path], out_dir: Path, parameters: dict[str, Any], timeout: float | None,
                       jobs: int, environment: dict[str, str]) -> Iterator[dict[str, Any]]:
    """Yield the results.json entry of each notebook as it finishes, running up to `jobs` at a time.

    Parallel notebooks run in worker processes, not threads: papermill's execute_notebook changes the working
    directory of the whole process while a notebook runs (papermill 2.7, `papermill.utils.chdir`), so two
    threads would change it under each other.
    """
    if jobs == 1 or len(notebooks) <= 1:
        for index, notebook in enumerate(notebooks, start=1):
            logger.info("Running %s (%d of %d)", notebook.name, index, len(notebooks))
            yield run_notebook(notebook, out_dir, parameters, timeout)
        return
    workers = min(jobs, len(notebooks))
    logger.info("Running %d notebooks, %d at a time", len(notebooks), workers)
    # spawn, not fork: forking a process that already holds PyTorch and ZeroMQ threads can deadlock the child.
    executor = ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_start_worker,
                                   initargs=(environment, logging.getLogger().getEffectiveLevel()))
    # A notebook that reads the results of other notebooks starts once every other notebook has finished, so a
    # parallel run records the same results as a sequential one.
    later = [notebook for notebook in notebooks if reads_other_results(notebook)]
    first = [notebook for notebook in notebooks if notebook not in later]
    try:
        for wave in (first, later):
            futures = {}
            for notebook in wave:
                try:
                    futures[executor.submit(run_notebook, notebook, out_dir, parameters, timeout)] = notebook
                except BrokenProcessPool as error:  # a worker of the first wave was killed
                    yield _stopped_worker_entry(notebook, out_dir, error)
            for future in as_completed(futures):
                try:
                    yield future.result()
                except BrokenProcessPool as error:
                    yield _stopped_worker_entry(futures[future], out_dir, error)
    finally:
        executor.shutdown(wait=True, cancel_futures=True)


def _stopped_worker_entry(notebook: Path, out_dir: Path, error: BrokenProcessPool) -> dict[str, Any]:
    logger.error("The worker process running %s stopped: %s", notebook.name, error)
    return _entry_without_execution(notebook, out_dir, f"{type(error).__name__}: the worker process running this "
                                    "notebook stopped (killed, or out of memory)")


def reads_other_results(notebook: Path) -> bool:
    """Return True when the metadata of `notebook` sets `labutils.reads_results`: it reads what others recorded."""
    try:
        metadata = json.loads(notebook.read_text(encoding="utf-8")).get("metadata", {})
    except (OSError, json.JSONDecodeError):
        return False  # papermill reports an unreadable notebook when it runs it
    return bool(metadata.get("labutils", {}).get("reads_results"))


def _start_worker(environment: dict[str, str], log_level: int) -> None:
    """Give a worker process the kernels' environment variables and the parent's logging level."""
    os.environ.update(environment)
    logging.basicConfig(level=log_level, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("papermill").setLevel(max(log_level, logging.WARNING))


def _check_jobs(jobs: int) -> None:
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise ValueError(f"Invalid jobs {jobs!r}: use a positive integer, the number of notebooks run at once.")


def _check_arguments(profile: str, dataset: str, device: str, seed: int, timeout: float | None) -> None:
    # Imported here so that worker processes, which only execute notebooks, do not load PyTorch.
    from labutils.data import DATASETS
    from labutils.training import DEVICES

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
def _kernel_environment(profile: str) -> Iterator[dict[str, str]]:
    """Set the environment variables that kernels inherit, yield them, and restore the previous values afterwards.

    PYTHONPATH lets the kernels import this labutils even when it is not installed. LABUTILS_PROFILE is set
    because `get_profile` prefers it over the injected PROFILE parameter.
    """
    pythonpath = os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")]))
    changes = {"MPLBACKEND": "agg", "PYTHONPATH": pythonpath, PROFILE_ENV_VAR: profile}
    saved = {name: os.environ.get(name) for name in changes}
    os.environ.update(changes)
    try:
        yield changes
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


def run_notebook(notebook: Path, out_dir: Path, parameters: dict[str, Any], timeout: float | None) -> dict[str, Any]:
    """Execute one notebook into `out_dir`/notebooks, render it to HTML and return its entry for results.json.

    `seconds` is the wall-clock time of the execution, kernel start-up included. `cpu_seconds` is the processor
    time the kernel used, all its threads together. Other programs on a busy machine barely change it, unless
    the kernel's own threads spin while they wait for each other. It is None where the platform cannot measure it.
    """
    executed = out_dir / "notebooks" / notebook.name
    recorded_path = out_dir / "results" / f"{notebook.stem}.json"
    # A notebook executed again (resume) must not report what an interrupted attempt recorded.
    recorded_path.unlink(missing_ok=True)
    started = time.perf_counter()
    cpu_started = _children_cpu_seconds()
    error = _execute(notebook, executed, parameters, timeout)
    seconds = round(time.perf_counter() - started, 2)
    cpu_seconds = _children_cpu_seconds()
    cpu_seconds = None if cpu_seconds is None or cpu_started is None else round(cpu_seconds - cpu_started, 2)
    entry = _entry(notebook, out_dir, error, seconds, cpu_seconds)
    logger.info("%s %s in %.1f s", notebook.stem, entry["status"], seconds)
    entry["html"] = render_html(executed, out_dir / "html" / f"{notebook.stem}.html", out_dir)
    return entry


def _entry_without_execution(notebook: Path, out_dir: Path, error: str) -> dict[str, Any]:
    """Build the failed entry of a notebook whose execution never returned, keeping anything it recorded."""
    executed = out_dir / "notebooks" / notebook.name
    entry = _entry(notebook, out_dir, error, 0.0, None)
    entry["status"] = "failed"
    entry["html"] = render_html(executed, out_dir / "html" / f"{notebook.stem}.html", out_dir)
    return entry


def _entry(notebook: Path, out_dir: Path, error: str | None, seconds: float,
           cpu_seconds: float | None) -> dict[str, Any]:
    recorded = _read_recorded(out_dir / "results" / f"{notebook.stem}.json")
    failed_claims = [claim for claim in recorded["claims"] if claim["enforced"] and not claim["holds"]]
    if failed_claims:
        status = "claim-failed"
    elif error:
        status = "failed"
    else:
        status = "passed"
    return {
        "notebook": notebook.stem, "status": status, "seconds": seconds, "cpu_seconds": cpu_seconds,
        "error": error, "metrics": recorded["metrics"], "claims": recorded["claims"],
        "figures": [f"results/{figure}" for figure in recorded["figures"]],
        "executed": (out_dir / "notebooks" / notebook.name).relative_to(out_dir).as_posix(),
    }


def _children_cpu_seconds() -> float | None:
    """Return the user plus system time of this process's finished child processes, the kernels among them.

    The kernel is a child process that jupyter_client waits for at shutdown, so its time counts once it ends.
    Each runner or worker process executes one notebook at a time, so the difference around one execution is
    that notebook's kernel.
    """
    if resource is None:
        return None
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def render_html(executed: Path, target: Path, out_dir: Path) -> str | None:
    """Render an executed notebook to a standalone HTML page with nbconvert; return its path relative to `out_dir`.

    Returns None, with a warning, when the executed notebook is missing or nbconvert fails: the page is for
    browsing, so a failure here must not fail the run.
    """
    if not executed.is_file():
        return None
    try:
        import nbformat
        from nbconvert import HTMLExporter

        body, _ = HTMLExporter().from_notebook_node(nbformat.read(executed, as_version=4))
        target.parent.mkdir(exist_ok=True)
        target.write_text(body, encoding="utf-8")
    except Exception as error:  # noqa: BLE001 - nbconvert raises many types, and the page is optional
        logger.warning("Could not render %s to HTML: %s", executed.name, error)
        return None
    return target.relative_to(out_dir).as_posix()


def _execute(notebook: Path, executed: Path, parameters: dict[str, Any], timeout: float | None) -> str | None:
    """Run papermill, starting the kernel again when it failed before any cell ran; return None or the error.

    jupyter_client picks a kernel's TCP ports by binding and releasing them. A kernel started at the same moment
    by another process (a parallel notebook, or another Jupyter user of the machine) can take a port first. The
    new kernel then dies with "ZMQError: Address already in use" before it runs a cell. No notebook code has run
    then, so starting again is safe.
    """
    for attempt in range(1, KERNEL_START_ATTEMPTS + 1):
        error = _execute_once(notebook, executed, parameters, timeout)
        if error is None or attempt == KERNEL_START_ATTEMPTS or not _kernel_never_ran(executed):
            return error
        logger.warning("The kernel of %s stopped before running a cell (%s): starting it again, attempt %d of %d",
                       notebook.name, error.splitlines()[0], attempt + 1, KERNEL_START_ATTEMPTS)
    return error


def _kernel_never_ran(executed: Path) -> bool:
    """Return whether papermill wrote `executed` but started none of its cells, as when the kernel fails to start."""
    import nbformat

    try:
        cells = nbformat.read(executed, as_version=4).cells
    except (OSError, ValueError):
        return False
    return not any(cell.metadata.get("papermill", {}).get("start_time") for cell in cells)


def _execute_once(notebook: Path, executed: Path, parameters: dict[str, Any], timeout: float | None) -> str | None:
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
    # Written beside the target and renamed over it, so a run killed mid-write leaves the previous version.
    partial = out_dir / "results.json.tmp"
    partial.write_text(json.dumps(results, indent=2) + "\n", encoding="utf-8")
    partial.replace(out_dir / "results.json")
    report.write_reports(results, out_dir)


def _now() -> str:
    return datetime.now().astimezone().isoformat(timespec="seconds")


def environment_info() -> dict[str, Any]:
    """Describe the software and hardware of this process, which the notebook kernels share.

    `torch_threads` is this process's torch.get_num_threads(). A kernel starts with the same value unless a
    notebook changes it. `load_average` is the 1, 5 and 15 minute load average when the run started (None where
    the platform has none), which explains slow wall-clock times on a shared machine.
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
        "cpu_vector_units": _cpu_vector_units(),
        "cuda_available": cuda_available,
        "cuda_device": torch.cuda.get_device_name(0) if cuda_available else None,
        "kernel_command": kernel_command(),
        "load_average": _load_average(),
    }


def _cpu_vector_units() -> list[str] | None:
    """Return the CPU's AVX and AMX feature flags on Linux, None elsewhere.

    Kernels for different vector units round differently, so the same run on another CPU generation gives
    slightly different metrics. This field lets a comparison name that cause.
    """
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text(encoding="utf-8")
    except OSError:
        return None
    flags = next((line.split(":", 1)[1].split() for line in cpuinfo.splitlines() if line.startswith("flags")), [])
    return sorted(flag for flag in set(flags) if flag.startswith(("avx", "amx")))


def _load_average() -> list[float] | None:
    try:
        return [round(value, 2) for value in os.getloadavg()]
    except (AttributeError, OSError):
        return None


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
