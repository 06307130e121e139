"""Tests for labutils.runner and the `python -m labutils run` command, on tiny notebooks written here.

Each notebook run starts a real Jupyter kernel (about 2-3 s), so the course runs happen once per module and the
tests inspect what they left behind.
"""

from __future__ import annotations

import json
import logging
import subprocess
import sys
from pathlib import Path
from typing import Any

import nbformat
import pytest

from labutils import runner

REPO_ROOT = Path(runner.__file__).resolve().parent.parent

PARAMETERS = 'PROFILE = "full"\nDATASET = "digits"\nDEVICE = "auto"\nSEED = 0\nRESULTS_DIR = "../runs/interactive"'

PASSING = """import os
from pathlib import Path
import matplotlib.pyplot as plt
from labutils.record import Recorder

recorder = Recorder("00_pass", RESULTS_DIR, context={"profile": PROFILE, "dataset": DATASET, "seed": SEED})
recorder.metric("marker_found", float(Path("marker.txt").exists()), claim="The kernel runs in the notebooks folder.")
recorder.metric("agg_backend", float(os.environ.get("MPLBACKEND") == "agg"))
recorder.check("accuracy", 0.9, ">=", 0.5, claim="Accuracy beats chance.")
fig, ax = plt.subplots()
ax.plot([0, 1], [0, 1])
recorder.figure(fig, "line")
"""

CLAIM_FAILS = """from labutils.record import Recorder

recorder = Recorder("01_claim", RESULTS_DIR)
recorder.metric("x", 0.3)
recorder.check("x_above_half", 0.3, ">=", 0.5, claim="x stays above one half.")
"""

RAISES = ["""from labutils.record import Recorder

recorder = Recorder("02_error", RESULTS_DIR)
recorder.metric("before_error", 1.0)
print("loaded 10 images")
""", 'raise RuntimeError("simulated failure in the second cell")']

SLOW = ["import time\ntime.sleep(1.5)", "time.sleep(1.5)"]


def write_notebook(path: Path, cells: list[str]) -> None:
    """Write a notebook whose first cell is the tagged parameters cell, followed by `cells`."""
    parameters = nbformat.v4.new_code_cell(PARAMETERS, metadata={"tags": ["parameters"]})
    notebook = nbformat.v4.new_notebook(cells=[parameters] + [nbformat.v4.new_code_cell(c) for c in cells])
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(notebook, path)


@pytest.fixture(scope="module")
def course(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("notebooks")
    write_notebook(folder / "00_pass.ipynb", [PASSING])
    write_notebook(folder / "01_claim.ipynb", [CLAIM_FAILS])
    write_notebook(folder / "02_error.ipynb", RAISES)
    write_notebook(folder / "03_slow.ipynb", SLOW)
    (folder / "marker.txt").write_text("read through a relative path\n")
    return folder


@pytest.fixture(scope="module")
def run(course: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("runs") / "function"
    return runner.run_course(profile="smoke", seed=3, notebooks=["0", "1", "2"], out=out, notebooks_dir=course)


@pytest.fixture(scope="module")
def cli(course: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[subprocess.CompletedProcess[str], Path]:
    out = tmp_path_factory.mktemp("runs") / "cli"
    # Two jobs: the notebooks run in parallel worker processes, and results.json keeps course order.
    return run_cli("--notebooks", "00", "01", "--notebooks-dir", str(course), "--out", str(out), "--jobs", "2"), out


def run_cli(*arguments: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "labutils", "run", "--profile", "smoke", *arguments]
    return subprocess.run(command, cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)


def entry(results: dict[str, Any], notebook: str) -> dict[str, Any]:
    return next(e for e in results["notebooks"] if e["notebook"] == notebook)


def test_run_statuses(run: dict[str, Any]) -> None:
    statuses = {e["notebook"]: e["status"] for e in run["notebooks"]}
    assert statuses == {"00_pass": "passed", "01_claim": "claim-failed", "02_error": "failed"}


def test_run_status_failed(run: dict[str, Any]) -> None:
    assert run["status"] == "failed"


def test_run_parameters_injected(run: dict[str, Any]) -> None:
    recorded = json.loads((Path(run["out_dir"]) / "results" / "00_pass.json").read_text())
    assert recorded["context"] == {"profile": "smoke", "dataset": "digits", "seed": 3}


def test_run_kernel_environment(run: dict[str, Any]) -> None:
    values = {m["name"]: m["value"] for m in entry(run, "00_pass")["metrics"]}
    assert values["marker_found"] == 1.0
    assert values["agg_backend"] == 1.0


def test_run_results_json_matches(run: dict[str, Any]) -> None:
    written = json.loads((Path(run["out_dir"]) / "results.json").read_text())
    assert written == run


def test_run_results_json_fields(run: dict[str, Any]) -> None:
    for key, expected in [("profile", "smoke"), ("dataset", "digits"), ("device", "auto"), ("seed", 3)]:
        assert run[key] == expected
    assert run["finished"] is not None
    # Each time is rounded to 0.01 s, so the sum may exceed the total by that much per notebook.
    assert run["seconds"] >= sum(e["seconds"] for e in run["notebooks"]) - 0.01 * len(run["notebooks"])
    assert run["environment"]["cpu_count"] >= 1
    assert run["environment"]["cpu_vector_units"] is None or isinstance(run["environment"]["cpu_vector_units"], list)
    assert run["environment"]["papermill"] is not None


def test_run_passing_metrics_kept(run: dict[str, Any]) -> None:
    passing = entry(run, "00_pass")
    assert [m["name"] for m in passing["metrics"]] == ["marker_found", "agg_backend"]
    assert passing["claims"][0]["holds"] is True
    assert passing["error"] is None


def test_run_figure_saved(run: dict[str, Any]) -> None:
    figures = entry(run, "00_pass")["figures"]
    assert figures == ["results/figures/00_pass_line.png"]
    assert (Path(run["out_dir"]) / figures[0]).is_file()


def test_run_claim_failure_recorded(run: dict[str, Any]) -> None:
    failed = entry(run, "01_claim")
    assert failed["claims"][0]["holds"] is False
    assert failed["error"].startswith("ClaimFailed: ")


def test_run_error_message(run: dict[str, Any]) -> None:
    assert entry(run, "02_error")["error"] == "RuntimeError: simulated failure in the second cell"


def test_run_error_keeps_partial_output(run: dict[str, Any]) -> None:
    executed = nbformat.read(Path(run["out_dir"]) / entry(run, "02_error")["executed"], as_version=4)
    outputs = [output for cell in executed.cells if cell.cell_type == "code" for output in cell.get("outputs", [])]
    assert any(output.get("text") == "loaded 10 images\n" for output in outputs)
    assert any(output.get("ename") == "RuntimeError" for output in outputs)


def test_run_error_keeps_recorded_metric(run: dict[str, Any]) -> None:
    assert entry(run, "02_error")["metrics"][0]["name"] == "before_error"


def test_report_markdown_content(run: dict[str, Any]) -> None:
    text = (Path(run["out_dir"]) / "report.md").read_text()
    assert "| 01_claim | claim-failed |" in text
    assert "| Metric | Value | Description |" in text
    assert "| x_above_half | x stays above one half. | 0.3 | >= | 0.5 | no |" in text
    assert "RuntimeError: simulated failure in the second cell" in text
    assert "![00_pass_line](<results/figures/00_pass_line.png>)" in text


def test_report_html_content(run: dict[str, Any]) -> None:
    text = (Path(run["out_dir"]) / "report.html").read_text()
    assert "<td>x_above_half</td>" in text
    assert "<td>x stays above one half.</td>" in text
    assert "RuntimeError: simulated failure in the second cell" in text
    assert '<img src="results/figures/00_pass_line.png"' in text


def test_run_records_cpu_seconds(run: dict[str, Any]) -> None:
    # The kernel imports matplotlib and saves a figure, which takes well over 0.1 s of processor time.
    assert entry(run, "00_pass")["cpu_seconds"] > 0.1


def test_run_renders_html_pages(run: dict[str, Any]) -> None:
    pages = [e["html"] for e in run["notebooks"]]
    assert pages == ["html/00_pass.html", "html/01_claim.html", "html/02_error.html"]
    page = (Path(run["out_dir"]) / pages[2]).read_text()
    assert "simulated failure in the second cell" in page
    assert "[html/02_error.html](<html/02_error.html>)" in (Path(run["out_dir"]) / "report.md").read_text()


def test_resume_finished_run_unchanged(run: dict[str, Any]) -> None:
    results_file = Path(run["out_dir"]) / "results.json"
    before = results_file.read_bytes()
    assert runner.resume_course(run["out_dir"]) == run
    assert results_file.read_bytes() == before


def test_resume_without_results_rejected(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="results.json' not found"):
        runner.resume_course(tmp_path)


def test_invalid_jobs_rejected(course: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Invalid jobs 0"):
        runner.run_course(profile="smoke", out=tmp_path / "run", notebooks_dir=course, jobs=0)
    assert not (tmp_path / "run").exists()


DIES_AT_FIRST_START = """import os
from pathlib import Path

if not Path({marker!r}).exists():
    Path({marker!r}).write_text("the first kernel stopped here")
    os._exit(1)
"""


def test_kernel_start_failure_retried(course: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      caplog: pytest.LogCaptureFixture) -> None:
    # An IPython startup file stops the first kernel before it replies to the client, as a port clash does.
    startup = tmp_path / "ipython" / "profile_default" / "startup"
    startup.mkdir(parents=True)
    marker = tmp_path / "first-start"
    (startup / "00-stop-once.py").write_text(DIES_AT_FIRST_START.format(marker=str(marker)))
    monkeypatch.setenv("IPYTHONDIR", str(tmp_path / "ipython"))
    caplog.set_level(logging.WARNING, logger="labutils.runner")
    results = runner.run_course(profile="smoke", notebooks=["00"], out=tmp_path / "run", notebooks_dir=course)
    assert marker.exists()
    assert entry(results, "00_pass")["status"] == "passed"
    assert "stopped before running a cell" in caplog.text
    assert "attempt 2 of 3" in caplog.text


def test_timeout_whole_notebook(course: Path, tmp_path: Path) -> None:
    # Each cell sleeps 1.5 s, within the 2 s limit, but both together exceed it.
    results = runner.run_course(profile="smoke", notebooks=["03"], out=tmp_path / "run", timeout=2,
                                notebooks_dir=course)
    slow = entry(results, "03_slow")
    assert slow["status"] == "failed"
    assert "limit of 2 s" in slow["error"]


def test_out_dir_not_empty_rejected(course: Path, tmp_path: Path) -> None:
    (tmp_path / "earlier.txt").write_text("an earlier run\n")
    with pytest.raises(ValueError, match="not empty"):
        runner.run_course(profile="smoke", out=tmp_path, notebooks_dir=course)
    assert (tmp_path / "earlier.txt").read_text() == "an earlier run\n"


def test_unknown_number_rejected(course: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Available notebooks: 00_pass.ipynb, 01_claim.ipynb"):
        runner.run_course(profile="smoke", notebooks=["7"], out=tmp_path / "run", notebooks_dir=course)
    assert not (tmp_path / "run").exists()


def test_select_notebooks_by_number(course: Path) -> None:
    selected = runner.select_notebooks(runner.find_notebooks(course), ["2", "00"])
    assert [path.name for path in selected] == ["00_pass.ipynb", "02_error.ipynb"]


def test_unknown_dataset_rejected(course: Path, tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="Unknown dataset 'mnsit'"):
        runner.run_course(profile="smoke", dataset="mnsit", out=tmp_path / "run", notebooks_dir=course)


def test_cli_exit_status_failed(cli: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, _ = cli
    assert completed.returncode == 1, completed.stderr


def test_cli_runs_selected_notebooks(cli: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = cli
    results = json.loads((out / "results.json").read_text())
    assert [(e["notebook"], e["status"]) for e in results["notebooks"]] == [("00_pass", "passed"),
                                                                              ("01_claim", "claim-failed")]


def test_cli_writes_executed_notebooks(cli: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    _, out = cli
    assert sorted(path.name for path in (out / "notebooks").iterdir()) == ["00_pass.ipynb", "01_claim.ipynb"]


def test_cli_prints_summary(cli: tuple[subprocess.CompletedProcess[str], Path]) -> None:
    completed, out = cli
    assert f"Report: {out / 'report.md'}" in completed.stdout
    assert "01_claim  claim-failed" in completed.stdout


def test_cli_out_dir_not_empty(course: Path, tmp_path: Path) -> None:
    (tmp_path / "earlier.txt").write_text("an earlier run\n")
    completed = run_cli("--notebooks-dir", str(course), "--out", str(tmp_path))
    assert completed.returncode == 2
    assert "already exists and is not empty" in completed.stderr


def test_cli_unknown_number(course: Path, tmp_path: Path) -> None:
    completed = run_cli("--notebooks", "9", "--notebooks-dir", str(course), "--out", str(tmp_path / "run"))
    assert completed.returncode == 2
    assert "Notebook number '9' not found" in completed.stderr


WRITER = """import time
from labutils.record import Recorder

time.sleep(2)
Recorder("00_writer", RESULTS_DIR).metric("written", 1.0)
"""

READER = """from pathlib import Path
from labutils.record import Recorder

found = (Path(RESULTS_DIR) / "00_writer.json").exists()
Recorder("01_reader", RESULTS_DIR).metric("writer_results_found", float(found))
"""


def test_parallel_run_starts_a_results_reader_last(tmp_path: Path) -> None:
    folder = tmp_path / "notebooks"
    folder.mkdir()
    write_notebook(folder / "00_writer.ipynb", [WRITER])
    write_notebook(folder / "01_reader.ipynb", [READER])
    reader = nbformat.read(folder / "01_reader.ipynb", as_version=4)
    reader.metadata["labutils"] = {"reads_results": True}
    nbformat.write(reader, folder / "01_reader.ipynb")
    assert runner.reads_other_results(folder / "01_reader.ipynb")
    assert not runner.reads_other_results(folder / "00_writer.ipynb")

    results = runner.run_course(profile="smoke", out=tmp_path / "run", notebooks_dir=folder, jobs=2)

    recorded = json.loads((tmp_path / "run" / "results" / "01_reader.json").read_text())
    assert results["status"] == "passed"
    assert [metric["value"] for metric in recorded["metrics"]] == [1.0]
