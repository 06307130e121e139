"""Tests for the nightly regression run: a clean reference, an unchanged rerun and one run per injected fault.

The course written here has two notebooks. 00_train trains the small encoder on a few digits for 2 epochs over
2 seeds with a StepLR scheduler, and records means with their seed spread and three claims. 01_check scores
fixed distances. Each fault replaces a labutils function inside the notebook kernels, the way a bug would
arrive: an IPython startup file in a temporary IPYTHONDIR, which every kernel runs before the first cell. The
production code has no hook for this.

Every run starts real kernels (2-4 s each), so the runs happen once per module and the tests read what they
left behind.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import psutil
import pytest
import yaml

from labutils import __main__ as cli
from labutils import nightly, runner

REPO_ROOT = Path(runner.__file__).resolve().parent.parent
PROFILE = "quick"

PARAMETERS = 'PROFILE = "full"\nDATASET = "digits"\nDEVICE = "auto"\nSEED = 0\nRESULTS_DIR = "../runs/interactive"'

TRAIN = """import statistics

import torch
from labutils import augment, data, models, training
from labutils.record import Recorder

# One thread: the model is tiny, and idle threads spinning for work waste a shared CPU.
torch.set_num_threads(1)
recorder = Recorder("00_train", RESULTS_DIR)
course = data.make_course_data(DATASET, seed=SEED, max_images_per_class=30)


def step_lr(optimizer):
    return torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=0.1)


rows = []
for seed in (SEED, SEED + 1):
    torch.manual_seed(seed)
    config = training.TrainConfig(loss="contrastive", margin=2.0, epochs=2, pairs_per_epoch=256, batch_size=32,
                                  eval_pairs=200, seed=seed)
    history = training.fit(models.make_encoder("small"), course, config, progress=False, scheduler_fn=step_lr)
    images = course.val_unseen.images
    moved = augment.augment(images, augment.Augmentation(), torch.Generator().manual_seed(seed))
    row = {name: history.last(name) for name in ("train_loss", "train_auc", "val_seen_auc", "val_unseen_auc",
                                                  "val_unseen_pos_dist", "val_unseen_neg_dist")}
    row["last_lr"] = history.last("lr")
    row["augmentation_pixel_change"] = (moved - images).abs().mean().item()
    rows.append(row)

mean = {}
for name in rows[0]:
    values = [row[name] for row in rows]
    mean[name] = recorder.metric(name, statistics.mean(values), spread=statistics.stdev(values))
recorder.check("learns_seen_classes", mean["val_seen_auc"], ">=", 0.9,
               claim="Two epochs separate held-out images of the training digits (AUC >= 0.9).")
recorder.check("generalisation_gap", mean["train_auc"] - mean["val_unseen_auc"], ">=", 0.1,
               claim="Unseen digits score at least 0.1 AUC below the training digits.")
recorder.check("augmentation_changes_images", mean["augmentation_pixel_change"], ">", 0.05,
               claim="Augmentation moves the pixels of every image.")
"""

CHECK = """from labutils.profiles import get_profile
from labutils.record import Recorder

recorder = Recorder("01_check", RESULTS_DIR)
profile = get_profile(PROFILE)
recorder.metric("profile_epochs", profile.epochs)
recorder.check("profile_checks_claims", float(profile.claims), ">=", 1.0, claim="The profile checks claims.")
"""

# Runs first in every kernel of a faulty run. `_fault_replace` rebinds a function in every loaded labutils module
# that refers to it, including the copies that `from labutils.losses import contrastive_terms` makes. Modules
# imported later bind the replacement anyway.
FAULT_PRELUDE = """import os
import sys
from pathlib import Path


def _fault_replace(module, name, replacement):
    original = getattr(module, name)
    for loaded in list(sys.modules.values()):
        if getattr(loaded, "__name__", "").startswith("labutils") and getattr(loaded, name, None) is original:
            setattr(loaded, name, replacement)
    return original
"""


@dataclass(frozen=True)
class Fault:
    """A bug injected into the kernels, and the regressions (kind, notebook, item) the comparison must report.

    `notebooks` lists the number prefixes the faulty run executes; the others would only repeat the reference.
    """

    name: str
    code: str
    expected: tuple[tuple[str, str, str | None], ...]
    notebooks: tuple[str, ...] = ("00",)


FAULTS = (
    Fault("contrastive label flipped", """
import labutils.losses, labutils.training
_original_terms = labutils.losses.contrastive_terms
def _flipped_terms(distances, same, margin):
    return _original_terms(distances, 1 - same.to(distances.dtype), margin)
_fault_replace(labutils.losses, "contrastive_terms", _flipped_terms)
""", (("notebook-failed", "00_train", None), ("claim-flipped", "00_train", "learns_seen_classes"),
      ("metric-changed", "00_train", "val_seen_auc"))),
    Fault("scheduler never stepped", """
import labutils.training
_fault_replace(labutils.training, "_step_scheduler", lambda scheduler, row: None)
""", (("metric-changed", "00_train", "last_lr"),)),
    Fault("validation metrics on training pairs", """
import labutils.training
_original_evaluate = labutils.training.evaluate
def _evaluate_on_training_pairs(model, images, eval_sets, *args, **kwargs):
    images = {split: images["train"] for split in images}
    eval_sets = {split: eval_sets["train"] for split in eval_sets}
    return _original_evaluate(model, images, eval_sets, *args, **kwargs)
_fault_replace(labutils.training, "evaluate", _evaluate_on_training_pairs)
""", (("claim-flipped", "00_train", "generalisation_gap"), ("metric-changed", "00_train", "val_unseen_neg_dist"))),
    Fault("margin ignored", """
import labutils.losses, labutils.training
_original_loss = labutils.losses.contrastive_loss
def _loss_with_default_margin(emb1, emb2, same, margin=1.0, reduction="mean"):
    return _original_loss(emb1, emb2, same, reduction=reduction)
_fault_replace(labutils.losses, "contrastive_loss", _loss_with_default_margin)
""", (("metric-changed", "00_train", "val_unseen_neg_dist"),)),
    Fault("augmentation disabled", """
import labutils.augment
_fault_replace(labutils.augment, "augment", lambda images, settings, generator: images.clone())
""", (("claim-flipped", "00_train", "augmentation_changes_images"),
      ("metric-changed", "00_train", "augmentation_pixel_change"))),
    Fault("notebook raises", """
import labutils.data
def _unreadable_data(*args, **kwargs):
    raise RuntimeError("injected fault: the data folder cannot be read")
_fault_replace(labutils.data, "make_course_data", _unreadable_data)
""", (("notebook-failed", "00_train", None), ("claim-missing", "00_train", "learns_seen_classes")), ("00", "01")),
    Fault("kernel killed", """
import signal
import labutils.training
_fault_replace(labutils.training, "fit", lambda *args, **kwargs: os.kill(os.getpid(), signal.SIGKILL))
""", (("notebook-failed", "00_train", None),), ("00", "01")),
    Fault("much slower", """
import time
import labutils.profiles
_original_get_profile = labutils.profiles.get_profile
def _slow_get_profile(*args, **kwargs):
    # Busy for 6 s of processor time, so the kernel's CPU time grows as a real slowdown's would.
    started = time.process_time()
    while time.process_time() - started < 6.0:
        pass
    return _original_get_profile(*args, **kwargs)
_fault_replace(labutils.profiles, "get_profile", _slow_get_profile)
""", (("slower", "01_check", None),), ("01",)),
)


def write_notebook(path: Path, source: str) -> None:
    """Write a notebook whose first cell is the tagged parameters cell, followed by one cell of `source`."""
    parameters = nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})
    notebook = nbformat.v4.new_notebook(cells=[parameters, nbformat.v4.new_code_cell(source)])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


def write_fault(ipython_dir: Path, fault: Fault) -> Path:
    """Write the startup file of `fault`; it leaves a marker file once the replacement is in place."""
    startup = ipython_dir / "profile_default" / "startup"
    startup.mkdir(parents=True)
    marker = ipython_dir / "fault-applied"
    code = FAULT_PRELUDE + textwrap.dedent(fault.code) + f"\nPath({str(marker)!r}).write_text({fault.name!r})\n"
    (startup / "00-fault.py").write_text(code)
    return marker


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("course")
    write_notebook(folder / "00_train.ipynb", TRAIN)
    write_notebook(folder / "01_check.ipynb", CHECK)
    return folder


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("runs")


@pytest.fixture(scope="module")
def reference_run(course: Path, runs_dir: Path) -> dict[str, Any]:
    return runner.run_course(profile=PROFILE, notebooks_dir=course, out=runs_dir / "reference", jobs=2)


@pytest.fixture(scope="module")
def unchanged(course: Path, runs_dir: Path, reference_run: dict[str, Any]) -> nightly.NightlyOutcome:
    return nightly.run_nightly(reference=reference_run["out_dir"], profile=PROFILE, notebooks_dir=course,
                               out=runs_dir / "unchanged", jobs=1)


@pytest.fixture(scope="module")
def faulty(course: Path, runs_dir: Path, reference_run: dict[str, Any],
           tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[nightly.NightlyOutcome, Path]]:
    """Run the course once per fault; return each outcome with the marker file its startup code writes."""
    outcomes = {}
    for index, fault in enumerate(FAULTS):
        ipython_dir = tmp_path_factory.mktemp("ipython")
        marker = write_fault(ipython_dir, fault)
        with pytest.MonkeyPatch.context() as patch:
            patch.setenv("IPYTHONDIR", str(ipython_dir))
            outcome = nightly.run_nightly(reference=reference_run["out_dir"], profile=PROFILE, notebooks_dir=course,
                                          notebooks=list(fault.notebooks), out=runs_dir / f"fault-{index}")
        outcomes[fault.name] = (outcome, marker)
    return outcomes


def regressions_of(outcome: nightly.NightlyOutcome) -> list[dict[str, Any]]:
    assert outcome.comparison is not None
    return outcome.comparison["regressions"]


def missed_expectations(fault: Fault, outcome: nightly.NightlyOutcome) -> list[tuple[str, str, str | None]]:
    """Return the expected regressions of `fault` that the comparison did not report with a reason naming them.

    A reason must name the notebook, and the metric or claim when the expected regression has one.
    """
    reported = regressions_of(outcome)
    missed = []
    for kind, notebook, item in fault.expected:
        if not any(f["kind"] == kind and f["notebook"] == notebook and f["name"] == item and notebook in f["reason"]
                   and (item is None or item in f["reason"]) for f in reported):
            missed.append((kind, notebook, item))
    return missed


def deterministic_part(results: dict[str, Any]) -> list[Any]:
    return [(entry["notebook"], entry["status"],
             [(m["name"], m["value"], m.get("spread")) for m in entry["metrics"] if not m["timing"]],
             [(c["name"], c["value"], c["holds"]) for c in entry["claims"]]) for entry in results["notebooks"]]


def test_reference_run_passes(reference_run: dict[str, Any]) -> None:
    assert [(e["notebook"], e["status"]) for e in reference_run["notebooks"]] == [("00_train", "passed"),
                                                                                   ("01_check", "passed")]
    assert len(reference_run["notebooks"][0]["metrics"]) == 8


def test_unchanged_run_passes(unchanged: nightly.NightlyOutcome) -> None:
    assert unchanged.comparison is not None
    assert unchanged.comparison["regressions"] == []
    assert unchanged.comparison["status"] == "passed"
    assert unchanged.passed


def test_jobs_match_sequential(reference_run: dict[str, Any], unchanged: nightly.NightlyOutcome) -> None:
    # The reference ran with --jobs 2 and the unchanged run with --jobs 1.
    assert reference_run["jobs"] == 2
    assert unchanged.results["jobs"] == 1
    assert deterministic_part(reference_run) == deterministic_part(unchanged.results)


def test_every_fault_caught(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    # 8 faults tried: label convention, scheduler, validation pairs, margin, augmentation, an exception, a killed
    # kernel and a slowdown.
    assert len(FAULTS) == 8
    not_applied = [fault.name for fault in FAULTS if not faulty[fault.name][1].exists()]
    assert not_applied == []
    missed = {fault.name: missed_expectations(fault, faulty[fault.name][0]) for fault in FAULTS}
    assert {name: found for name, found in missed.items() if found} == {}
    assert all(not faulty[fault.name][0].passed for fault in FAULTS)


@pytest.mark.parametrize("fault", FAULTS, ids=lambda fault: fault.name.replace(" ", "-"))
def test_fault_regressions_named(fault: Fault, faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    outcome, _ = faulty[fault.name]
    assert missed_expectations(fault, outcome) == []


def test_raised_error_in_reason(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    first = regressions_of(faulty["notebook raises"][0])[0]
    assert first["reason"].startswith("Notebook 00_train failed with RuntimeError: injected fault")


def test_killed_kernel_in_reason(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    first = regressions_of(faulty["kernel killed"][0])[0]
    assert "DeadKernelError" in first["reason"]


@pytest.mark.parametrize("fault_name", ["notebook raises", "kernel killed"])
def test_failure_keeps_other_notebooks(fault_name: str,
                                       faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    results = faulty[fault_name][0].results
    check = results["notebooks"][1]
    assert (check["notebook"], check["status"]) == ("01_check", "passed")
    assert [m["name"] for m in check["metrics"]] == ["profile_epochs"]
    written = json.loads((Path(results["out_dir"]) / "results.json").read_text())
    assert written["notebooks"][1] == check


def test_nightly_report_worst_first(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    out_dir = Path(faulty["contrastive label flipped"][0].results["out_dir"])
    text = (out_dir / "nightly.md").read_text()
    assert "# Nightly comparison: regressed," in text
    assert "| 1 | 00_train |  | notebook-failed | Notebook 00_train stopped at a claim that does not hold" in text
    assert "| 2 | 00_train | learns_seen_classes | claim-flipped |" in text
    assert text.index("learns_seen_classes | claim-flipped") < text.index("val_seen_auc | metric-changed")
    assert "claim 'generalisation_gap' is missing (the notebook stopped before recording it)" in text


def test_nightly_report_links_pages(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    out_dir = Path(faulty["margin ignored"][0].results["out_dir"])
    html = (out_dir / "nightly.html").read_text()
    assert '<a href="html/00_train.html">html/00_train.html</a>' in html
    assert '<a href="report.html">report.html</a>' in html
    assert "val_unseen_neg_dist" in html


def test_comparison_json_written(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]]) -> None:
    outcome = faulty["scheduler never stepped"][0]
    written = json.loads((Path(outcome.results["out_dir"]) / "comparison.json").read_text())
    assert written == outcome.comparison
    assert written["rules"]["spread_factor"] == 3.0
    assert written["reference"]["path"].endswith("reference/results.json")


def test_executed_notebooks_rendered(unchanged: nightly.NightlyOutcome) -> None:
    out_dir = Path(unchanged.results["out_dir"])
    pages = [entry["html"] for entry in unchanged.results["notebooks"]]
    assert pages == ["html/00_train.html", "html/01_check.html"]
    assert "learns_seen_classes" in (out_dir / pages[0]).read_text()


def test_update_reference_from_run(unchanged: nightly.NightlyOutcome, tmp_path: Path,
                                   capsys: pytest.CaptureFixture[str]) -> None:
    run_copy = shutil.copytree(unchanged.results["out_dir"], tmp_path / "run")
    reference_file = tmp_path / "reference" / f"results-{PROFILE}.json"
    status = cli.main(["nightly", "--update-reference", "--resume", str(run_copy), "--reference",
                       str(reference_file)])
    assert status == 0
    assert reference_file.read_bytes() == (run_copy / "results.json").read_bytes()
    assert f"Reference {reference_file} updated" in capsys.readouterr().out


def test_update_reference_refused_after_failure(faulty: dict[str, tuple[nightly.NightlyOutcome, Path]],
                                                tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run_copy = shutil.copytree(faulty["notebook raises"][0].results["out_dir"], tmp_path / "run")
    reference_file = tmp_path / f"results-{PROFILE}.json"
    status = cli.main(["nightly", "--update-reference", "--resume", str(run_copy), "--reference",
                       str(reference_file)])
    assert status == 1
    assert not reference_file.exists()
    assert "Reference not updated: the run failed (notebooks not passed: 00_train)" in capsys.readouterr().out


def test_cli_compares_with_reference_file(unchanged: nightly.NightlyOutcome,
                                          faulty: dict[str, tuple[nightly.NightlyOutcome, Path]], tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    reference_file = tmp_path / "results.json"
    shutil.copyfile(Path(unchanged.results["out_dir"]) / "results.json", reference_file)
    run_copy = shutil.copytree(faulty["augmentation disabled"][0].results["out_dir"], tmp_path / "run")
    status = cli.main(["nightly", "--resume", str(run_copy), "--reference", str(reference_file)])
    output = capsys.readouterr().out
    assert status == 1
    assert "REGRESSION 00_train: claim 'augmentation_changes_images' no longer holds" in output
    assert (run_copy / "nightly.md").is_file()


def test_missing_reference_rejected_before_run(course: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="No reference results at .*--update-reference"):
        nightly.run_nightly(reference=tmp_path / "missing.json", profile=PROFILE, notebooks_dir=course,
                            out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_reference_profile_mismatch_rejected(course: Path, reference_run: dict[str, Any], tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="recorded with profile 'quick', this run uses 'full'"):
        nightly.run_nightly(reference=reference_run["out_dir"], profile="full", notebooks_dir=course,
                            out=tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_cli_missing_reference_status(course: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    status = cli.main(["nightly", "--profile", PROFILE, "--notebooks-dir", str(course), "--reference",
                       str(tmp_path / "missing.json"), "--out", str(tmp_path / "run")])
    assert status == 2
    assert "No reference results at" in capsys.readouterr().err


def test_rerun_never_overwrites(course: Path, reference_run: dict[str, Any]) -> None:
    before = (Path(reference_run["out_dir"]) / "results.json").read_bytes()
    with pytest.raises(ValueError, match="already exists and is not empty"):
        nightly.run_nightly(reference=reference_run["out_dir"], profile=PROFILE, notebooks_dir=course,
                            out=reference_run["out_dir"])
    assert (Path(reference_run["out_dir"]) / "results.json").read_bytes() == before


def test_workflow_runs_make_nightly() -> None:
    workflow = yaml.safe_load((REPO_ROOT / ".github" / "workflows" / "nightly.yml").read_text())
    # YAML 1.1, which PyYAML reads, turns the key `on` into True.
    assert workflow[True]["schedule"] == [{"cron": "30 2 * * *"}]
    steps = workflow["jobs"]["nightly"]["steps"]
    [command] = [step["run"] for step in steps if "run" in step]
    assert command.startswith("make nightly ")
    assert 'NIGHTLY_ARGS="--out runs/nightly' in command
    [upload] = [step for step in steps if step.get("uses", "").startswith("actions/upload-artifact")]
    assert upload["if"] == "always()"
    assert upload["with"]["path"] == "runs/nightly/"


@pytest.mark.skipif(shutil.which("make") is None, reason="make is not installed")
def test_make_nightly_command() -> None:
    # Under `make test` this make is a sub-make: drop the parent's settings so it prints only the commands.
    environment = {key: value for key, value in os.environ.items()
                   if key not in ("MAKELEVEL", "MAKEFLAGS", "MFLAGS")}
    completed = subprocess.run(["make", "-n", "--no-print-directory", "nightly", "JOBS=2",
                                "NIGHTLY_ARGS=--out runs/nightly"], cwd=REPO_ROOT, env=environment,
                               capture_output=True, text=True, timeout=60)
    assert completed.returncode == 0, completed.stderr
    last = completed.stdout.strip().splitlines()[-1]
    assert last == ".venv/bin/python -m labutils nightly --profile full --jobs 2 --out runs/nightly"


WAITS = """import time
from pathlib import Path
from labutils.record import Recorder

recorder = Recorder("01_wait", RESULTS_DIR)
while Path({wait_file!r}).exists():
    time.sleep(0.1)
recorder.metric("waited", 1.0)
"""

QUICK = """from labutils.record import Recorder

Recorder("00_quick", RESULTS_DIR).metric("answer", 42.0)
"""


def test_killed_run_resumes(tmp_path: Path) -> None:
    wait_file = tmp_path / "hold"
    wait_file.write_text("01_wait loops while this file exists\n")
    folder = tmp_path / "course"
    folder.mkdir()
    write_notebook(folder / "00_quick.ipynb", QUICK)
    write_notebook(folder / "01_wait.ipynb", WAITS.format(wait_file=str(wait_file)))
    out = tmp_path / "run"
    command = [sys.executable, "-m", "labutils", "run", "--profile", PROFILE, "--notebooks-dir", str(folder),
               "--out", str(out)]
    process = subprocess.Popen(command, cwd=REPO_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        partial = wait_for_entries(out / "results.json", 1, timeout=120)
        # Kill the runner and the kernel it started, as an out-of-memory kill or a closed session would.
        doomed = [process.pid] + [child.pid for child in psutil.Process(process.pid).children(recursive=True)]
        for pid in doomed:
            os.kill(pid, signal.SIGKILL)
    finally:
        process.kill()
        process.wait(timeout=30)

    assert partial["status"] == "incomplete"
    assert [(e["notebook"], e["status"]) for e in partial["notebooks"]] == [("00_quick", "passed")]
    assert "| 00_quick | passed |" in (out / "report.md").read_text()

    wait_file.unlink()
    resumed = runner.resume_course(out)
    assert resumed["notebooks"][0] == partial["notebooks"][0]
    assert [(e["notebook"], e["status"]) for e in resumed["notebooks"]] == [("00_quick", "passed"),
                                                                             ("01_wait", "passed")]
    assert resumed["status"] == "passed"
    assert len(resumed["resumed"]) == 1


def wait_for_entries(path: Path, count: int, timeout: float) -> dict[str, Any]:
    """Poll a results.json until it lists `count` notebooks, and return its content."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.exists():
            results = json.loads(path.read_text())
            if len(results["notebooks"]) >= count:
                return results
        time.sleep(0.2)
    raise AssertionError(f"{path} did not list {count} notebooks within {timeout} s")
