"""Student copies of the notebooks, and the checks that give feedback on a learner's loss functions."""

import io
from contextlib import redirect_stdout
from itertools import product
from pathlib import Path

import nbformat
import pytest
import torch
from nbclient import NotebookClient

from labutils import __main__ as cli
from labutils import exercises, losses
from labutils.exercises import (CONTRASTIVE_MISTAKES, TRIPLET_MISTAKES, ExerciseCheckFailed, build_student_notebooks,
                                cell_names, check_contrastive_loss, check_triplet_loss, make_student_notebook)
from labutils.profiles import PROFILE_ENV_VAR
from labutils.session import RESULTS_ENV_VAR

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("[0-9][0-9]_*.ipynb"))
STUB_START = 'raise NotImplementedError("Exercise'


def notebook(*cells):
    """Build a notebook from (kind, source, tags) tuples, where kind is "code" or "markdown"."""
    built = nbformat.v4.new_notebook()
    for kind, source, tags in cells:
        make = nbformat.v4.new_code_cell if kind == "code" else nbformat.v4.new_markdown_cell
        built.cells.append(make(source, metadata={"tags": list(tags)} if tags else {}))
    return built


def run_cells(student):
    """Run the code cells in one namespace, as a kernel would, and return (printed text, errors)."""
    namespace, errors, printed = {}, [], io.StringIO()
    for cell in student.cells:
        if cell.cell_type != "code":
            continue
        try:
            with redirect_stdout(printed):
                exec(compile(cell.source, "<cell>", "exec"), namespace)
        except Exception as error:  # collect every error, as a notebook run with allow_errors does
            errors.append(error)
    return printed.getvalue(), errors


SMALL = notebook(
    ("code", "base = 2", ()),
    ("markdown", "**Exercise 1 · Squares.** Compute the square of `base` as `square`.", ()),
    ("code", "# Solution\n# Hint: multiply base by itself.\nsquare = base * base", ("solution",)),
    ("markdown", "Four, because 2 * 2 = 4.", ("solution-discussion",)),
    ("code", "# Check: the square is right.\nassert square == 4\ndoubled = square * 2", ()),
    ("code", "print('uses doubled', doubled)", ()),
    ("code", "print('independent', base)", ()),
)


# ---- building one student notebook -----------------------------------------------------------------------------

def test_solution_becomes_stub_with_hint():
    student = make_student_notebook(SMALL)
    stub = student.cells[2].source
    assert "square = base * base" not in stub
    assert 'raise NotImplementedError("Exercise: multiply base by itself.")' in stub


def test_stub_tagged_exercise_not_solution():
    tags = make_student_notebook(SMALL).cells[2].metadata["tags"]
    assert tags == ["exercise"]


def test_stub_lists_names_later_cells_use():
    stub = make_student_notebook(SMALL).cells[2].source
    assert "# The cells below use: square." in stub


def test_hint_falls_back_to_task_above():
    without_hint = notebook(
        ("markdown", "**Exercise 2 · Cubes.** Compute `cube`.", ()),
        ("code", "# Solution\ncube = 3 ** 3", ("solution",)),
    )
    stub = make_student_notebook(without_hint).cells[1].source
    assert "Exercise: write the code that the task above asks for (Exercise 2 · Cubes)" in stub


def test_hint_continues_on_indented_lines():
    source = "# Solution\n# Hint: first part,\n#   second part.\n# A comment of the solution.\nx = 1"
    assert exercises.solution_hint(source) == "first part, second part."


def test_dependent_cells_tagged_check():
    student = make_student_notebook(SMALL)
    assert student.cells[4].metadata["tags"] == ["exercise-check"]
    assert student.cells[5].metadata["tags"] == ["exercise-check"]


def test_independent_cell_untouched():
    student = make_student_notebook(SMALL)
    assert student.cells[6].source == SMALL.cells[6].source
    assert "tags" not in student.cells[6].metadata


def test_discussion_hidden():
    student = make_student_notebook(SMALL)
    assert "2 * 2 = 4" not in student.cells[3].source


def test_original_notebook_unchanged():
    before = nbformat.writes(SMALL)
    make_student_notebook(SMALL)
    assert nbformat.writes(SMALL) == before


def test_student_copy_is_valid_nbformat():
    nbformat.validate(make_student_notebook(SMALL))


def test_unsolved_copy_raises_only_stub():
    printed, errors = run_cells(make_student_notebook(SMALL))
    assert [type(error) for error in errors] == [NotImplementedError]
    assert printed.count("Skipped: solve Exercise 1 above first (it defines square)") == 1
    assert "Skipped: solve Exercise 1 above first (it defines doubled)" in printed
    assert "independent 2" in printed


def test_solved_copy_runs_checks():
    student = make_student_notebook(SMALL)
    student.cells[2].source = "square = base ** 2"  # the learner's solution
    printed, errors = run_cells(student)
    assert errors == []
    assert "uses doubled 8" in printed
    assert "Skipped" not in printed


def test_wrong_answer_fails_check():
    student = make_student_notebook(SMALL)
    student.cells[2].source = "square = base + base + 1"
    _, errors = run_cells(student)
    assert [type(error) for error in errors] == [AssertionError]


def test_guard_keeps_multiline_strings():
    source = 'text = f"""{square}\n  indented\nflush"""\nprint(text)'
    student = make_student_notebook(notebook(
        ("code", "# Solution\nsquare = 4", ("solution",)),
        ("code", source, ()),
    ))
    student.cells[0].source = "square = 4"
    printed, errors = run_cells(student)
    assert errors == []
    assert printed == "4\n  indented\nflush\n"


def test_rebinding_cell_ends_dependency():
    student = make_student_notebook(notebook(
        ("code", "# Solution\nvalue = 1", ("solution",)),
        ("code", "value = 2", ()),
        ("code", "print(value)", ()),
    ))
    assert "tags" not in student.cells[2].metadata


def test_solution_without_marker_rejected():
    with pytest.raises(ValueError, match="does not start with '# Solution'"):
        make_student_notebook(notebook(("code", "x = 1", ("solution",))), "demo.ipynb")


@pytest.mark.parametrize("source, reads, binds", [
    ("x = y + 1", {"y"}, {"x"}),
    ("x = 1\nprint(x)", {"print"}, {"x"}),
    ("total = [p for p in items]", {"items"}, {"total"}),
    ("def f(a):\n    return a + scale", {"scale"}, {"f"}),
    ("import numpy as np\nfrom math import pi", set(), {"np", "pi"}),
    ("for i, row in enumerate(rows):\n    acc = row", {"enumerate", "rows"}, {"i", "row", "acc"}),
    ("%matplotlib inline\ny = x * 2", {"x"}, {"y"}),
])
def test_cell_names(source, reads, binds):
    found_reads, found_binds = cell_names(source)
    assert found_reads >= reads
    assert found_binds == binds


def test_cell_names_excludes_locals():
    found_reads, _ = cell_names("def f(a):\n    local = a\n    return [p for p in local]")
    assert not {"a", "local", "p"} & found_reads


# ---- writing student copies ------------------------------------------------------------------------------------

def test_build_writes_every_notebook(tmp_path):
    report = build_student_notebooks(tmp_path / "student")
    assert [path.name for path in report.written] == [path.name for path in NOTEBOOKS]
    assert report.kept == []


def test_build_never_overwrites(tmp_path):
    edited = tmp_path / NOTEBOOKS[0].name
    edited.write_text("a learner's work")
    report = build_student_notebooks(tmp_path)
    assert edited.read_text() == "a learner's work"
    assert report.kept == [edited]
    assert len(report.written) == len(NOTEBOOKS) - 1


def test_build_rejects_file_as_out(tmp_path):
    target = tmp_path / "file.txt"
    target.write_text("")
    with pytest.raises(ValueError, match="is a file"):
        build_student_notebooks(target)


def test_cli_reports_kept_files(tmp_path, capsys):
    assert cli.main(["exercises", "--out", str(tmp_path)]) == 0
    assert cli.main(["exercises", "--out", str(tmp_path)]) == 0
    output = capsys.readouterr().out
    assert f"kept {tmp_path / NOTEBOOKS[0].name}: the file exists and is never overwritten" in output
    assert f"0 student notebooks written, {len(NOTEBOOKS)} existing ones kept" in output


def test_cli_rejects_empty_notebooks_dir(tmp_path, capsys):
    assert cli.main(["exercises", "--out", str(tmp_path / "out"), "--notebooks-dir", str(tmp_path)]) == 2
    assert "No notebooks named NN_name.ipynb" in capsys.readouterr().err


# ---- the course notebooks --------------------------------------------------------------------------------------

@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_course_notebook_has_no_stubs(path):
    cells = nbformat.read(path, as_version=4).cells
    assert not [cell for cell in cells if {"exercise", "exercise-check"} & set(cell.metadata.get("tags", []))]
    assert not [cell for cell in cells if STUB_START in cell.source or "NotImplementedError('Exercise" in cell.source]


@pytest.mark.parametrize("path", [p for p in NOTEBOOKS if p.name[:2] in ("00", "01")], ids=lambda p: p.stem)
def test_course_solutions_have_hints(path):
    cells = nbformat.read(path, as_version=4).cells
    solutions = [cell for cell in cells if "solution" in cell.metadata.get("tags", [])]
    assert all(exercises.solution_hint(cell.source) for cell in solutions)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_student_copy_runs_with_only_stub_errors(path, tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_ENV_VAR, "smoke")
    monkeypatch.setenv(RESULTS_ENV_VAR, str(tmp_path / "results"))
    monkeypatch.setenv("MPLBACKEND", "agg")
    build_student_notebooks(tmp_path / "student")
    student = nbformat.read(tmp_path / "student" / path.name, as_version=4)
    NotebookClient(student, timeout=300, kernel_name="python3", allow_errors=True,
                   resources={"metadata": {"path": str(tmp_path / "student")}}).execute()

    code = [cell for cell in student.cells if cell.cell_type == "code"]
    errors = [(output.ename, output.evalue) for cell in code for output in cell.outputs
              if output.output_type == "error"]
    stubs = [cell for cell in code if "exercise" in cell.metadata.get("tags", [])]
    assert [name for name, _ in errors if name != "NotImplementedError"] == [], errors
    assert len(errors) == len(stubs)
    assert all(message.startswith("Exercise: ") for _, message in errors)
    for cell in code:
        if "exercise-check" in cell.metadata.get("tags", []):
            printed = "".join(output.get("text", "") for output in cell.outputs)
            assert "Skipped: solve" in printed


# ---- check helpers for the losses ------------------------------------------------------------------------------

def contrastive_reference(emb1, emb2, same, margin):
    return losses.contrastive_loss(emb1, emb2, same, margin=margin)


def triplet_reference(anchor, positive, negative, margin):
    return losses.triplet_loss(anchor, positive, negative, margin=margin)


def distance(a, b):
    return (a - b).pow(2).sum(dim=1).sqrt()


def contrastive_flipped(emb1, emb2, same, margin):
    d = distance(emb1, emb2)
    return ((1 - same) * d ** 2 + same * torch.clamp(margin - d, min=0) ** 2).mean()


def contrastive_not_squared(emb1, emb2, same, margin):
    d = distance(emb1, emb2)
    return (same * d + (1 - same) * torch.clamp(margin - d, min=0)).mean()


def contrastive_not_clamped(emb1, emb2, same, margin):
    d = distance(emb1, emb2)
    return (same * d ** 2 + (1 - same) * (margin - d) ** 2).mean()


def contrastive_summed(emb1, emb2, same, margin):
    return losses.contrastive_loss(emb1, emb2, same, margin=margin, reduction="sum")


def contrastive_per_pair(emb1, emb2, same, margin):
    return losses.contrastive_loss(emb1, emb2, same, margin=margin, reduction="none")


def contrastive_float(emb1, emb2, same, margin):
    return losses.contrastive_loss(emb1, emb2, same, margin=margin).item()


def contrastive_crashes(emb1, emb2, same, margin):
    return torch.cat([emb1, same]).sum()  # (B, 2) and (B,) cannot be concatenated


def test_reference_contrastive_passes(capsys):
    check_contrastive_loss(contrastive_reference)
    assert "match the definition" in capsys.readouterr().out


def test_reference_triplet_passes(capsys):
    check_triplet_loss(triplet_reference)
    assert "match the definition" in capsys.readouterr().out


def test_torch_triplet_passes():
    check_triplet_loss(lambda a, p, n, margin: torch.nn.TripletMarginLoss(margin=margin)(a, p, n))


@pytest.mark.parametrize("fn, message", [
    (contrastive_flipped, "label convention flipped"),
    (contrastive_not_squared, "distance not squared in the positive-pair term"),
    (contrastive_not_clamped, "hinge not clamped at 0"),
    (contrastive_summed, "sum instead of mean"),
    (contrastive_per_pair, "returns one value per pair"),
    (contrastive_float, "not a torch.Tensor"),
    (contrastive_crashes, "raised RuntimeError"),
])
def test_contrastive_mistake_named(fn, message):
    with pytest.raises(ExerciseCheckFailed, match=message):
        check_contrastive_loss(fn)


def test_contrastive_report_names_pair():
    with pytest.raises(ExerciseCheckFailed) as info:
        check_contrastive_loss(contrastive_flipped)
    report = str(info.value)
    assert "pair 1: emb1 (0, 0), emb2 (3, 4), distance 5, same = 1: your loss 0, expected 25" in report
    assert "pair 2: emb1 (0, 0), emb2 (0.3, 0.4), distance 0.5, same = 0: your loss 0.25, expected 2.25" in report


def test_contrastive_two_mistakes_named():
    def flipped_not_squared(emb1, emb2, same, margin):
        d = distance(emb1, emb2)
        return ((1 - same) * d + same * torch.clamp(margin - d, min=0)).mean()

    with pytest.raises(ExerciseCheckFailed) as info:
        check_contrastive_loss(flipped_not_squared)
    report = str(info.value)
    assert "Likely mistakes:" in report
    assert "label convention flipped" in report
    assert "hinge not squared" in report


def test_contrastive_unknown_mistake():
    with pytest.raises(ExerciseCheckFailed, match="No single known mistake"):
        check_contrastive_loss(lambda emb1, emb2, same, margin: distance(emb1, emb2).mean() + 7)


def test_detached_loss_rejected():
    def detached(emb1, emb2, same, margin):
        return losses.contrastive_loss(emb1, emb2, same, margin=margin).detach()

    with pytest.raises(ExerciseCheckFailed, match="detached"):
        check_contrastive_loss(detached)


def test_triplet_swapped_named():
    def swapped(anchor, positive, negative, margin):
        return torch.clamp(distance(anchor, negative) - distance(anchor, positive) + margin, min=0).mean()

    with pytest.raises(ExerciseCheckFailed) as info:
        check_triplet_loss(swapped)
    report = str(info.value)
    assert "positive and negative swapped" in report
    assert "triplet 1: anchor (0, 0), positive (3, 4), negative (6, 8), d(a, p) 5, d(a, n) 10: your loss 6, " \
           "expected 0" in report


@pytest.mark.parametrize("fn, message", [
    (lambda a, p, n, m: torch.clamp(distance(a, p) ** 2 - distance(a, n) ** 2 + m, min=0).mean(), "squared distances"),
    (lambda a, p, n, m: (distance(a, p) - distance(a, n) + m).mean(), "hinge not clamped at 0"),
    (lambda a, p, n, m: torch.clamp(distance(a, p) - distance(a, n) + m, min=0).sum(), "sum instead of mean"),
])
def test_triplet_mistake_named(fn, message):
    with pytest.raises(ExerciseCheckFailed, match=message):
        check_triplet_loss(fn)


def test_contrastive_mistakes_distinguishable():
    case = exercises._contrastive_case()
    values = {tuple(round(v, 6) for v in exercises.contrastive_terms_with(case, [m for m, on in zip(
        CONTRASTIVE_MISTAKES, flags) if on])) for flags in product([False, True], repeat=len(CONTRASTIVE_MISTAKES))}
    assert len(values) == 2 ** len(CONTRASTIVE_MISTAKES)


def test_triplet_mistakes_distinguishable():
    case = exercises._triplet_case()
    values = {tuple(round(v, 6) for v in exercises.triplet_terms_with(case, [m for m, on in zip(
        TRIPLET_MISTAKES, flags) if on])) for flags in product([False, True], repeat=len(TRIPLET_MISTAKES))}
    assert len(values) == 2 ** len(TRIPLET_MISTAKES)


def test_reference_terms_match_library():
    case = exercises._contrastive_case()
    expected = losses.contrastive_loss(*case.inputs, margin=case.margin, reduction="none").tolist()
    assert exercises.contrastive_terms_with(case) == pytest.approx(expected, abs=1e-5)
