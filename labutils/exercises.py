"""Student copies of the course notebooks, and checks that give feedback on a learner's loss functions.

In the course notebooks an exercise's solution is a code cell tagged `solution` whose first line is `# Solution`.
An optional second line `# Hint: ...` gives the hint that the student copy shows. `build_student_notebooks`
writes a copy of every notebook in which

- each solution cell becomes a stub tagged `exercise` that raises NotImplementedError("Exercise: <hint>"),
- each later code cell that reads a name only a solution (or another skipped cell) defines is tagged
  `exercise-check` and wrapped, so that it prints a note and does nothing until the learner's cell defines
  those names,
- each markdown cell tagged `solution-discussion` (a discussion of the solution) is replaced by a short note.

A student copy therefore runs from top to bottom with no error other than the stubs' NotImplementedError.
Which names a cell reads and binds is found with Python's `symtable`, so comprehension variables and function
locals do not count.
"""

from __future__ import annotations

import ast
import copy
import io
import json
import math
import os
import re
import symtable
import tokenize
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import nbformat
import torch

from labutils.runner import NOTEBOOKS_DIR, find_notebooks

SOLUTION_TAG = "solution"
EXERCISE_TAG = "exercise"
CHECK_TAG = "exercise-check"
DISCUSSION_TAG = "solution-discussion"
SOLUTION_MARKER = "# Solution"
HINT_PREFIX = "# Hint:"
HINT_CONTINUATION = "#  "
EXERCISE_TITLE = re.compile(r"\*\*(Exercise\s+(\d+)[^*]*?)\.?\*\*")
DISCUSSION_NOTE = ("*The instructor's copy discusses the answer here. Run your solution and the check below, "
                   "and compare the result with what you expected.*")


# ---- building student copies --------------------------------------------------------------------------------

@dataclass
class BuildReport:
    """Files that `build_student_notebooks` wrote, and existing files that it left alone."""

    written: list[Path] = field(default_factory=list)
    kept: list[Path] = field(default_factory=list)


def build_student_notebooks(out_dir: str | os.PathLike[str],
                            notebooks_dir: str | os.PathLike[str] = NOTEBOOKS_DIR) -> BuildReport:
    """Write a student copy of every NN_name.ipynb notebook of `notebooks_dir` into `out_dir`.

    A file that already exists in `out_dir` is never overwritten, because it may hold a learner's work: it is
    listed in `BuildReport.kept`, and only the missing copies are written. Raises ValueError when
    `notebooks_dir` contains no course notebook or `out_dir` is a file.
    """
    sources = find_notebooks(notebooks_dir)
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise ValueError(f"The output path {str(out)!r} is a file: choose a folder for the student notebooks.")
    out.mkdir(parents=True, exist_ok=True)
    report = BuildReport()
    for source in sources:
        target = out / source.name
        student = make_student_notebook(nbformat.read(source, as_version=4), source.name)
        try:
            # Mode "x" fails if the file exists, even when it appeared after the check above.
            with open(target, "x", encoding="utf-8") as handle:
                nbformat.write(student, handle)
        except FileExistsError:
            report.kept.append(target)
            continue
        report.written.append(target)
    return report


def make_student_notebook(notebook: nbformat.NotebookNode, name: str = "notebook") -> nbformat.NotebookNode:
    """Return a copy of `notebook` with exercise stubs, guarded dependent cells and hidden discussions.

    `name` only appears in error messages. Raises ValueError for a solution cell that does not start with
    `# Solution` and SyntaxError for a code cell that is not valid IPython code.
    """
    student = copy.deepcopy(notebook)
    tracker = _PendingNames()
    stubs: dict[int, str] = {}  # solution cell index -> title of its exercise
    title = ""
    for index, cell in enumerate(student.cells):
        tags = list(cell.metadata.get("tags", []))
        if cell.cell_type == "markdown":
            title = _exercise_title(cell.source) or title
            if DISCUSSION_TAG in tags:
                cell.source = DISCUSSION_NOTE
            continue
        if cell.cell_type != "code":
            continue
        where = f"{name}, cell {index}"
        reads, binds = cell_names(cell.source, where)
        if SOLUTION_TAG in tags:
            _check_solution(cell.source, where)
            tracker.solution(index, _exercise_label(title), binds)
            stubs[index] = title
            cell.metadata["tags"] = [EXERCISE_TAG if tag == SOLUTION_TAG else tag for tag in tags]
            continue
        missing, exercises = tracker.cell(reads, binds)
        if missing:
            cell.source = guard_cell(cell.source, missing, exercises)
            cell.metadata["tags"] = tags + [CHECK_TAG]
    for index, exercise_title in stubs.items():
        cell = student.cells[index]
        cell.source = stub_source(cell.source, exercise_title, tracker.read_later(index))
        cell.outputs = []
        cell.execution_count = None
    return student


class _PendingNames:
    """Names that a student copy may leave undefined: those bound by stubs and by the cells skipped for them."""

    def __init__(self) -> None:
        self.exercises: dict[str, set[str]] = {}  # pending name -> exercises that must be solved to define it
        self.solution_of: dict[str, int] = {}  # name -> index of the last solution cell that binds it
        self.read: dict[int, set[str]] = {}  # solution cell index -> its names that later cells read

    def solution(self, index: int, exercise: str, binds: set[str]) -> None:
        """Record a solution cell, whose names stay undefined until the learner writes the code."""
        self.read[index] = set()
        for name in binds:
            self.exercises[name] = {exercise}
            self.solution_of[name] = index

    def cell(self, reads: set[str], binds: set[str]) -> tuple[list[str], list[str]]:
        """Record an ordinary code cell and return the pending names it reads and their exercises.

        A cell that reads no pending name always runs, so the names it binds are defined from then on. A cell
        that reads some is skipped until they exist, so the names it binds become pending too.
        """
        missing = sorted(reads & self.exercises.keys())
        if not missing:
            for name in binds:
                self.exercises.pop(name, None)
                self.solution_of.pop(name, None)
            return [], []
        exercises = set().union(*(self.exercises[name] for name in missing))
        for name in missing:
            if name in self.solution_of:
                self.read[self.solution_of[name]].add(name)
        for name in binds:
            self.exercises[name] = self.exercises.get(name, set()) | exercises
            self.solution_of.pop(name, None)
        return missing, sorted(exercises)

    def read_later(self, index: int) -> list[str]:
        """Return the names of solution cell `index` that later cells read."""
        return sorted(self.read.get(index, ()))


def stub_source(solution: str, title: str, names: Iterable[str]) -> str:
    """Return the code of the stub that replaces `solution`, the source of a solution cell.

    The stub raises NotImplementedError("Exercise: <hint>"), where the hint is the solution's `# Hint:` line or,
    without one, points to the task above. `names` are the names that later cells read from the solution.
    """
    hint = solution_hint(solution) or f"write the code that the task above asks for ({title or 'the exercise'})"
    label = _exercise_label(title)
    lines = [f"# {label[0].upper()}{label[1:]}: write your code here, in place of the line below."]
    names = list(names)
    if names:
        lines.append(f"# The cells below use: {', '.join(names)}.")
    lines.append(f"raise NotImplementedError({_literal('Exercise: ' + hint)})")
    return "\n".join(lines)


def solution_hint(solution: str) -> str:
    """Return the hint that follows `# Solution`, or "" when there is none.

    The hint starts on the second line with `# Hint:` and continues on the lines right after it that start
    with `#` and at least two spaces.
    """
    lines = solution.splitlines()
    if len(lines) < 2 or not lines[1].startswith(HINT_PREFIX):
        return ""
    parts = [lines[1][len(HINT_PREFIX):].strip()]
    for line in lines[2:]:
        if not line.startswith(HINT_CONTINUATION):
            break
        parts.append(line[1:].strip())
    return " ".join(part for part in parts if part)


def guard_cell(source: str, names: Iterable[str], exercises: Iterable[str]) -> str:
    """Wrap `source` so that it runs only when every name in `names` is defined, and prints a note otherwise.

    Lines inside multi-line strings keep their indentation, so the strings keep their values.
    """
    names = list(names)
    listed = ", ".join(names)
    solved = " and ".join(exercises)
    note = f"Skipped: solve {solved} above first (it defines {listed}), then run this cell again."
    return (f"# Exercise check: runs once {solved} above defines {listed}.\n"
            f"if all(name in globals() for name in [{', '.join(_literal(name) for name in names)}]):\n"
            f"{_indent_code(source)}\n"
            f"else:\n"
            f"    print({_literal(note)})")


def cell_names(source: str, where: str = "cell") -> tuple[set[str], set[str]]:
    """Return (reads, binds): the global names a cell reads before binding them, and the names it binds.

    IPython syntax (magics, shell escapes) is translated first. Function bodies count for the globals they
    read, and comprehension variables and function locals do not count. `where` names the cell in errors.
    NOTE: code inside a line magic, such as `%time y = f(x)`, becomes a string, so its names are not seen.
    """
    from IPython.core.inputtransformer2 import TransformerManager

    code = TransformerManager().transform_cell(source)
    try:
        statements = ast.parse(code).body
    except SyntaxError as error:
        raise SyntaxError(f"{where} is not valid Python ({error.msg}, line {error.lineno}): fix the "
                          "notebook before building student copies.") from None
    reads: set[str] = set()
    binds: set[str] = set()
    for statement in statements:
        table = symtable.symtable(ast.unparse(statement), "<cell>", "exec")
        statement_reads, statement_binds = _table_names(table)
        reads |= statement_reads - binds
        binds |= statement_binds
    return reads, binds


def _table_names(table: symtable.SymbolTable) -> tuple[set[str], set[str]]:
    """Return the module-level names that `table` and its nested scopes read and bind."""
    reads, binds = set(), set()
    for symbol in table.get_symbols():
        if symbol.is_referenced():
            reads.add(symbol.get_name())
        if symbol.is_assigned() or symbol.is_imported():
            binds.add(symbol.get_name())
    for child in table.get_children():
        _collect_nested(child, reads, binds)
    return reads, binds


def _collect_nested(table: symtable.SymbolTable, reads: set[str], binds: set[str]) -> None:
    for symbol in table.get_symbols():
        if not symbol.is_global():
            continue
        if symbol.is_referenced():
            reads.add(symbol.get_name())
        if symbol.is_declared_global() and symbol.is_assigned():
            binds.add(symbol.get_name())
    for child in table.get_children():
        _collect_nested(child, reads, binds)


def _indent_code(source: str) -> str:
    inside_string = set()
    try:
        for token in tokenize.generate_tokens(io.StringIO(source).readline):
            inside_string.update(range(token.start[0] + 1, token.end[0] + 1))
    except (tokenize.TokenError, SyntaxError):
        inside_string = set()  # an unfinished token: indent every line, as a plain editor would
    lines = source.splitlines() or ["pass"]
    return "\n".join(line if number in inside_string or not line.strip() else "    " + line
                     for number, line in enumerate(lines, start=1))


def _literal(text: str) -> str:
    """Return `text` as a double-quoted Python string literal, the quote style of the course notebooks."""
    return json.dumps(text, ensure_ascii=False)


def _check_solution(source: str, where: str) -> None:
    if not source.startswith(SOLUTION_MARKER):
        raise ValueError(f"{where} is tagged {SOLUTION_TAG!r} but does not start with {SOLUTION_MARKER!r}: "
                         "start every solution cell with that line.")


def _exercise_title(markdown: str) -> str:
    match = EXERCISE_TITLE.search(markdown)
    return match.group(1).strip() if match else ""


def _exercise_label(title: str) -> str:
    match = re.match(r"Exercise\s+\d+", title)
    return match.group(0) if match else "the exercise"


# ---- checking a learner's loss functions --------------------------------------------------------------------

class ExerciseCheckFailed(AssertionError):
    """A learner's function gives values that differ from the definition it implements."""


@dataclass(frozen=True)
class _Case:
    """Crafted 2-D inputs for one loss, with its margin and the call that the learner's function receives."""

    loss: str
    call: str
    inputs: tuple[torch.Tensor, ...]
    num_embeddings: int  # the leading inputs that are embeddings, and so carry gradients
    margin: float
    describe: Callable[[int], str]


# Each mistake is a flag of the reference formula. The crafted inputs give a distinct set of per-item values for
# every combination of flags (a test checks this), so the combination that reproduces a learner's values is
# the diagnosis.
CONTRASTIVE_MISTAKES = {
    "flipped": "label convention flipped: the function treats same = 0 as the positive pair. In this course "
               "same = 1 marks a positive pair (the original paper writes Y = 0 for similar pairs)",
    "pull_not_squared": "distance not squared in the positive-pair term: use same * d**2, not same * d",
    "push_not_squared": "hinge not squared in the negative-pair term: use clamp(margin - d, min=0)**2",
    "not_clamped": "hinge not clamped at 0: a negative pair farther apart than the margin must add nothing, "
                   "so use torch.clamp(margin - d, min=0)",
    "no_sqrt": "the distance is the squared distance: take the square root of the sum of squares "
               "(d**2 is then d**4)",
    "halved": "every term is halved, as in the paper: this course drops the factor 1/2",
}
TRIPLET_MISTAKES = {
    "swapped": "positive and negative swapped: the loss must grow with the anchor-positive distance, "
               "max(0, d(a, p) - d(a, n) + margin)",
    "squared": "squared distances: this course uses the Euclidean distance itself, as torch.nn.TripletMarginLoss "
               "does (FaceNet squares it, on L2-normalised embeddings)",
    "not_clamped": "hinge not clamped at 0: a triplet whose negative is already a margin farther away than the "
                   "positive must add nothing, so use torch.clamp(..., min=0)",
    "margin_subtracted": "margin subtracted instead of added: use d(a, p) - d(a, n) + margin",
}
TOLERANCE = 1e-4  # absolute and relative, which allows an eps inside the square root


def _contrastive_case() -> _Case:
    emb1 = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 1.0], [-1.0, 2.0], [2.0, 0.0]])
    emb2 = torch.tensor([[3.0, 4.0], [0.3, 0.4], [2.8, 3.4], [-0.7, 2.4], [2.9, 1.2]])
    same = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.0])

    def describe(i: int) -> str:
        return (f"emb1 {_point(emb1[i])}, emb2 {_point(emb2[i])}, distance {_distance(emb1[i], emb2[i]):g}, "
                f"same = {int(same[i])}")

    return _Case("contrastive loss", "fn(emb1, emb2, same, margin)", (emb1, emb2, same), 2, 2.0, describe)


def _triplet_case() -> _Case:
    anchor = torch.tensor([[0.0, 0.0], [0.0, 0.0], [1.0, 0.0], [0.0, 2.0], [-1.0, -1.0], [2.0, 2.0]])
    positive = torch.tensor([[3.0, 4.0], [0.0, 1.0], [1.6, 0.8], [0.0, 4.0], [-1.3, -1.4], [3.8, 4.4]])
    negative = torch.tensor([[6.0, 8.0], [1.0, 0.0], [1.0, 0.5], [3.0, 6.0], [-2.5, -3.0], [2.6, 2.8]])

    def describe(i: int) -> str:
        return (f"anchor {_point(anchor[i])}, positive {_point(positive[i])}, negative {_point(negative[i])}, "
                f"d(a, p) {_distance(anchor[i], positive[i]):g}, d(a, n) {_distance(anchor[i], negative[i]):g}")

    return _Case("triplet loss", "fn(anchor, positive, negative, margin)", (anchor, positive, negative), 3, 1.0,
                 describe)


def contrastive_terms_with(case: _Case, mistakes: Iterable[str] = ()) -> list[float]:
    """Return the per-pair contrastive terms of `case`, computed with the named mistakes of CONTRASTIVE_MISTAKES."""
    mistakes = set(mistakes)
    emb1, emb2, same = case.inputs
    terms = []
    for a, b, label in zip(emb1.tolist(), emb2.tolist(), same.tolist()):
        distance = math.dist(a, b) ** (2 if "no_sqrt" in mistakes else 1)
        positive = 1 - label if "flipped" in mistakes else label
        hinge = case.margin - distance
        if "not_clamped" not in mistakes:
            hinge = max(0.0, hinge)
        pull = distance if "pull_not_squared" in mistakes else distance ** 2
        push = hinge if "push_not_squared" in mistakes else hinge ** 2
        terms.append((positive * pull + (1 - positive) * push) * (0.5 if "halved" in mistakes else 1.0))
    return terms


def triplet_terms_with(case: _Case, mistakes: Iterable[str] = ()) -> list[float]:
    """Return the per-triplet losses of `case`, computed with the named mistakes of TRIPLET_MISTAKES."""
    mistakes = set(mistakes)
    terms = []
    for a, p, n in zip(*(tensor.tolist() for tensor in case.inputs)):
        to_positive, to_negative = math.dist(a, p), math.dist(a, n)
        if "swapped" in mistakes:
            to_positive, to_negative = to_negative, to_positive
        if "squared" in mistakes:
            to_positive, to_negative = to_positive ** 2, to_negative ** 2
        value = to_positive - to_negative + (-case.margin if "margin_subtracted" in mistakes else case.margin)
        terms.append(value if "not_clamped" in mistakes else max(0.0, value))
    return terms


def check_contrastive_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check a learner's contrastive loss `fn(emb1, emb2, same, margin)` on crafted 2-D pairs.

    The definition is mean(same * d**2 + (1 - same) * max(0, margin - d)**2) with Euclidean d and same = 1 for a
    positive pair. Prints a confirmation when `fn` matches, and raises ExerciseCheckFailed naming each pair
    that differs, its expected loss and the likely mistake otherwise.
    """
    _check_loss(fn, _contrastive_case(), contrastive_terms_with, CONTRASTIVE_MISTAKES, "pair")


def check_triplet_loss(fn: Callable[..., torch.Tensor]) -> None:
    """Check a learner's triplet loss `fn(anchor, positive, negative, margin)` on crafted 2-D triplets.

    The definition is mean(max(0, d(a, p) - d(a, n) + margin)) with Euclidean distances. Prints a confirmation
    when `fn` matches, and raises ExerciseCheckFailed naming each triplet that differs, its expected loss and
    the likely mistake otherwise.
    """
    _check_loss(fn, _triplet_case(), triplet_terms_with, TRIPLET_MISTAKES, "triplet")


def _check_loss(fn: Callable[..., torch.Tensor], case: _Case,
                terms_with: Callable[[_Case, Iterable[str]], list[float]], mistakes: dict[str, str],
                item: str) -> None:
    expected = terms_with(case, ())
    got = [_call_scalar(fn, case, [tensor[i:i + 1] for tensor in case.inputs], f"{item} {i + 1}")
           for i in range(len(expected))]
    wrong = [i for i, (value, right) in enumerate(zip(got, expected)) if not _close(value, right)]
    if wrong:
        lines = [f"Your {case.loss} differs from the definition on {len(wrong)} of {len(expected)} {item}s "
                 f"(margin {case.margin:g}), each passed alone as a batch of one:"]
        lines += [f"  {item} {i + 1}: {case.describe(i)}: your loss {got[i]:.6g}, expected {expected[i]:.6g}"
                  for i in wrong]
        lines.append(_diagnose(got, case, terms_with, mistakes))
        raise ExerciseCheckFailed("\n".join(lines))
    _check_batch(fn, case, expected, item)
    print(f"{case.loss}: all {len(expected)} {item}s and their batch mean match the definition "
          f"(margin {case.margin:g}).")


def _check_batch(fn: Callable[..., torch.Tensor], case: _Case, expected: list[float], item: str) -> None:
    inputs = [tensor.clone().requires_grad_(position < case.num_embeddings)
              for position, tensor in enumerate(case.inputs)]
    result = _call(fn, case, inputs, f"the batch of {len(expected)} {item}s")
    mean, total = sum(expected) / len(expected), sum(expected)
    if not isinstance(result, torch.Tensor):
        raise ExerciseCheckFailed(f"Your {case.loss} returns a {type(result).__name__}, not a torch.Tensor: "
                                  "training calls .backward() on the loss, so keep it a tensor (no .item(), no "
                                  "NumPy) until the end.")
    if result.numel() == len(expected) and result.numel() > 1:
        raise ExerciseCheckFailed(f"Your {case.loss} returns one value per {item}, shape {tuple(result.shape)}: "
                                  "average them with .mean() to get one loss for the batch.")
    if result.numel() != 1:
        raise ExerciseCheckFailed(f"Your {case.loss} returns shape {tuple(result.shape)} for a batch of "
                                  f"{len(expected)} {item}s: return one number, the mean over the batch.")
    value = float(result.detach())
    if _close(value, total) and not _close(value, mean):
        raise ExerciseCheckFailed(f"Your {case.loss} returns {value:.6g} for the batch of {len(expected)} {item}s, "
                                  f"the sum of the {item} losses; expected their mean {mean:.6g}. Likely mistake: "
                                  "sum instead of mean. Use .mean(), so that the loss does not grow with the "
                                  "batch size.")
    if not _close(value, mean):
        raise ExerciseCheckFailed(f"Your {case.loss} is right for each {item} alone but returns {value:.6g} for "
                                  f"the batch of {len(expected)}; expected the mean {mean:.6g}. Check that every "
                                  "sum runs over dim=1 (the coordinates), not over the whole batch.")
    if result.grad_fn is None:
        raise ExerciseCheckFailed(f"Your {case.loss} is detached from its inputs, so no gradient reaches the "
                                  "encoder: compute it with torch operations only (no .item(), .detach() or NumPy).")


def _diagnose(got: list[float], case: _Case, terms_with: Callable[[_Case, Iterable[str]], list[float]],
              mistakes: dict[str, str]) -> str:
    # Fewest mistakes first, so the simplest explanation wins.
    combinations = sorted((combo for combo in product([False, True], repeat=len(mistakes))), key=sum)
    for combo in combinations:
        names = [name for name, present in zip(mistakes, combo) if present]
        if names and all(_close(a, b) for a, b in zip(got, terms_with(case, names))):
            return "Likely mistake" + ("s" if len(names) > 1 else "") + ":\n" + "\n".join(
                f"  - {mistakes[name]}." for name in names)
    return ("No single known mistake explains these values: compare each term of your function with the "
            "definition, one pair at a time.")


def _call(fn: Callable[..., torch.Tensor], case: _Case, inputs: list[torch.Tensor], call_label: str) -> object:
    try:
        return fn(*inputs, case.margin)
    except Exception as error:  # the learner's code may raise anything: report it with the call that failed
        raise ExerciseCheckFailed(f"Your {case.loss} raised {type(error).__name__}: {error} when called as "
                                  f"{case.call} on {call_label} (margin {case.margin:g}).") from error


def _call_scalar(fn: Callable[..., torch.Tensor], case: _Case, inputs: list[torch.Tensor], call_label: str) -> float:
    result = _call(fn, case, inputs, call_label)
    try:
        return float(result.detach()) if isinstance(result, torch.Tensor) else float(result)
    except (TypeError, ValueError, RuntimeError) as error:
        raise ExerciseCheckFailed(f"Your {case.loss} returned {result!r} for {call_label}, which is not one number "
                                  f"({error}).") from None


def _close(value: float, expected: float) -> bool:
    return math.isclose(value, expected, rel_tol=TOLERANCE, abs_tol=TOLERANCE)


def _point(row: torch.Tensor) -> str:
    return "(" + ", ".join(f"{v:g}" for v in row.tolist()) + ")"


def _distance(a: torch.Tensor, b: torch.Tensor) -> float:
    return round(math.dist(a.tolist(), b.tolist()), 6)
