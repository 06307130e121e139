"""Structure every course notebook shares: the runner, nbval and learners rely on it."""

import ast
import re
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS = sorted((Path(__file__).resolve().parent.parent / "notebooks").glob("[0-9][0-9]_*.ipynb"))
PARAMETERS = {"PROFILE", "DATASET", "DEVICE", "SEED", "RESULTS_DIR"}


def read(path: Path) -> nbformat.NotebookNode:
    return nbformat.read(path, as_version=4)


def test_notebooks_found():
    assert [p.name[:2] for p in NOTEBOOKS][:3] == ["00", "01", "02"]


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_committed_without_outputs(path):
    code = [cell for cell in read(path).cells if cell.cell_type == "code"]
    assert all(not cell.outputs and cell.execution_count is None for cell in code)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_python_kernel_declared(path):
    # papermill refuses a notebook whose language it cannot find.
    assert read(path).metadata["kernelspec"]["language"] == "python"


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_one_parameters_cell_of_literals(path):
    cells = [cell for cell in read(path).cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(cells) == 1
    assignments = [node for node in ast.parse(cells[0].source).body if isinstance(node, ast.Assign)]
    assert {node.targets[0].id for node in assignments} >= PARAMETERS
    assert all(isinstance(node.value, ast.Constant) for node in assignments)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_opens_with_objectives_and_run_time(path):
    first = read(path).cells[0]
    assert first.cell_type == "markdown"
    assert "Objectives" in first.source
    assert "Estimated run time" in first.source


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_records_under_its_own_name(path):
    # The runner reads results/<stem>.json, so session.start must be given the file stem.
    source = "\n".join(cell.source for cell in read(path).cells if cell.cell_type == "code")
    assert re.search(rf'session\.start\(\s*"{re.escape(path.stem)}"', source)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_has_exercises_with_solutions(path):
    cells = read(path).cells
    solutions = [cell for cell in cells if "solution" in cell.metadata.get("tags", [])]
    assert solutions
    assert all(cell.source.startswith("# Solution") for cell in solutions)
