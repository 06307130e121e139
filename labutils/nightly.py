"""The nightly regression run: execute the course, compare it with a reference, and report what changed.

The reference is a results.json of an earlier run: either a run folder, or the file kept in the repository as
reference/results-<profile>.json. `run_nightly` writes comparison.json, nightly.md and nightly.html into the
run folder next to the runner's own results.json and report. With `update_reference=True` it replaces the
reference file with this run's results.json, but only when every notebook passed. The comparison rules are in
`labutils.compare`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from labutils import compare, runner
from labutils.report import Block, Code, Heading, Link, Paragraph, Table, format_value, page_link, write_blocks

logger = logging.getLogger(__name__)

REFERENCE_DIR = runner.REPO_ROOT / "reference"
DEFAULT_PROFILE = "full"
DATASET = "digits"
SEED = 0
# Settings a reference must share with the run it is compared with: otherwise every metric differs by design.
MATCHED_SETTINGS = ("profile", "dataset", "seed")


@dataclass(frozen=True)
class NightlyOutcome:
    """Outcome of a nightly run. `comparison` is None when there was no reference to compare with."""

    results: dict[str, Any]
    comparison: dict[str, Any] | None
    reference_path: Path
    reference_updated: bool
    note: str

    @property
    def passed(self) -> bool:
        """Whether the run passed and, when compared, showed no regression."""
        compared = self.comparison is None or self.comparison["status"] == "passed"
        return self.results["status"] == "passed" and compared


def default_reference(profile: str) -> Path:
    """Return the repository's reference file for `profile`, reference/results-<profile>.json."""
    return REFERENCE_DIR / f"results-{profile}.json"


def load_reference(path: str | os.PathLike[str]) -> tuple[dict[str, Any], Path]:
    """Read a reference, given as a run folder or a results file; return its content and the file's path.

    Raises ValueError with the fix when the path does not exist or does not hold a course run's results.
    """
    path = Path(path).resolve()
    file = path / "results.json" if path.is_dir() else path
    if not file.is_file():
        raise ValueError(f"No reference results at {str(file)!r}: pass --reference with an earlier run folder or "
                         "results file, or create the reference with `python -m labutils nightly "
                         "--update-reference`.")
    try:
        reference = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as error:
        raise ValueError(f"Cannot read the reference {str(file)!r}: {error}.") from None
    if not isinstance(reference, dict) or not isinstance(reference.get("notebooks"), list):
        raise ValueError(f"The reference {str(file)!r} is not a results.json of the course runner: it has no "
                         "notebook list.")
    return reference, file


def check_reference_matches(reference: dict[str, Any], settings: dict[str, Any], reference_file: Path) -> None:
    """Raise ValueError when the reference was recorded with another profile, data set or seed."""
    for name in MATCHED_SETTINGS:
        if reference.get(name) != settings[name]:
            raise ValueError(f"The reference {str(reference_file)!r} was recorded with {name} "
                             f"{reference.get(name)!r}, this run uses {settings[name]!r}: compare runs of the same "
                             f"{name}, or pass --reference with a matching run.")


def run_nightly(reference: str | os.PathLike[str] | None = None, profile: str | None = None, jobs: int = 1,
                out: str | os.PathLike[str] | None = None, timeout: float | None = None,
                resume: str | os.PathLike[str] | None = None,
                notebooks_dir: str | os.PathLike[str] | None = None, notebooks: list[str] | None = None,
                update_reference: bool = False) -> NightlyOutcome:
    """Run the course, or finish the interrupted run `resume`, then compare it with the reference and report.

    `reference` defaults to reference/results-<profile>.json. Without `update_reference` the reference must
    exist and match the run's profile, data set and seed. Both are checked before any notebook runs, and a
    problem raises ValueError. `notebooks` (number prefixes) runs and compares only those notebooks. With
    `update_reference`, a missing or mismatched old reference is skipped, the comparison with a usable one is
    still written, and the reference file is replaced when the run passed and ran every notebook.
    """
    settings = _settings(profile, resume, out, notebooks_dir)
    if resume is not None and notebooks:
        raise ValueError("--resume runs the notebooks the run was started with: leave out --notebooks.")
    reference_path = Path(reference) if reference is not None else default_reference(settings["profile"])
    old_reference, reference_file = _reference_for(reference_path, settings, update_reference)

    if resume is not None:
        results = runner.resume_course(resume, jobs=jobs, timeout=timeout)
    else:
        results = runner.run_course(profile=settings["profile"], dataset=DATASET, seed=SEED, notebooks=notebooks,
                                    out=out, timeout=timeout, notebooks_dir=notebooks_dir, jobs=jobs)
    out_dir = Path(results["out_dir"])

    comparison = None
    if old_reference is not None:
        comparison = compare.compare_runs(old_reference, results)
        comparison["reference"] = _describe(old_reference, reference_file)
        comparison["run"] = _describe(results, out_dir / "results.json")
        write_comparison(comparison, out_dir)

    updated, note = False, ""
    if update_reference:
        updated, note = _update_reference(results, out_dir, reference_path)
    elif comparison is not None:
        note = f"{len(comparison['regressions'])} regressions against {reference_file}"
    return NightlyOutcome(results, comparison, reference_path.resolve(), updated, note)


def _settings(profile: str | None, resume: str | os.PathLike[str] | None, out: str | os.PathLike[str] | None,
              notebooks_dir: str | os.PathLike[str] | None) -> dict[str, Any]:
    """Return the profile, data set and seed of the run, taken from the run folder when resuming."""
    if resume is None:
        return {"profile": profile or DEFAULT_PROFILE, "dataset": DATASET, "seed": SEED}
    if out is not None or notebooks_dir is not None:
        raise ValueError("--resume continues the run in its own folder with its own notebooks: leave out --out "
                         "and --notebooks-dir.")
    earlier = runner.read_results(resume)
    if profile is not None and profile != earlier["profile"]:
        raise ValueError(f"The run {str(resume)!r} uses profile {earlier['profile']!r}, not {profile!r}: leave out "
                         "--profile when resuming, or start a new run.")
    return {name: earlier[name] for name in MATCHED_SETTINGS}


def _reference_for(path: Path, settings: dict[str, Any],
                   update_reference: bool) -> tuple[dict[str, Any] | None, Path]:
    """Load the reference before the run starts, so that a missing or mismatched one costs no run time."""
    if update_reference:
        if path.is_dir():
            raise ValueError(f"--update-reference writes a results file, but {str(path)!r} is a folder: pass a "
                             "file path such as reference/results-full.json.")
        if not path.exists():
            return None, path
        try:
            reference, file = load_reference(path)
            check_reference_matches(reference, settings, file)
        except ValueError as error:
            logger.warning("Not comparing with the old reference: %s", error)
            return None, path
        return reference, file
    reference, file = load_reference(path)
    check_reference_matches(reference, settings, file)
    return reference, file


def _update_reference(results: dict[str, Any], out_dir: Path, reference_path: Path) -> tuple[bool, str]:
    """Replace the reference file with this run's results.json, unless a notebook did not pass or did not run."""
    if results["status"] != "passed":
        failed = [entry["notebook"] for entry in results["notebooks"] if entry["status"] != "passed"]
        return False, (f"Reference not updated: the run {results['status']} (notebooks not passed: "
                       f"{', '.join(failed) or 'none finished'}). Fix them, or resume the run, and try again.")
    if results.get("requested"):
        return False, ("Reference not updated: the run executed only the notebooks "
                       f"{', '.join(results['selected'])}. A reference needs every notebook: run without --notebooks.")
    reference_path.parent.mkdir(parents=True, exist_ok=True)
    partial = reference_path.with_name(reference_path.name + ".tmp")
    partial.write_bytes((out_dir / "results.json").read_bytes())
    partial.replace(reference_path)
    logger.info("Reference %s updated from %s", reference_path, out_dir)
    return True, f"Reference {reference_path} updated from {out_dir / 'results.json'}"


def _describe(results: dict[str, Any], file: Path) -> dict[str, Any]:
    return {"path": str(file), "started": results.get("started"), "status": results.get("status"),
            "profile": results.get("profile"), "dataset": results.get("dataset"), "seed": results.get("seed")}


def write_comparison(comparison: dict[str, Any], out_dir: Path) -> tuple[Path, Path, Path]:
    """Write comparison.json, nightly.md and nightly.html into the run folder; return their paths."""
    json_path = out_dir / "comparison.json"
    partial = json_path.with_name(json_path.name + ".tmp")
    partial.write_text(json.dumps(comparison, indent=2) + "\n", encoding="utf-8")
    partial.replace(json_path)
    title = f"Nightly comparison: {comparison['status']}"
    markdown_path, html_path = write_blocks(build_blocks(comparison), out_dir / "nightly", title=title)
    return json_path, markdown_path, html_path


def build_blocks(comparison: dict[str, Any]) -> list[Block]:
    """Lay out the nightly report: verdict, regressions worst first, other changes, notebooks, environment."""
    regressions, changes = comparison["regressions"], comparison["changes"]
    verdict = f"{len(regressions)} regressions" if regressions else "no regressions"
    run, reference = comparison["run"], comparison["reference"]
    blocks: list[Block] = [
        Heading(f"Nightly comparison: {comparison['status']}, {verdict}", 1),
        Paragraph((f"This run ({run['profile']} profile, {run['dataset']}, seed {run['seed']}, started "
                   f"{run['started']}, {run['status']}) compared with the reference {reference['path']} (started "
                   f"{reference['started']}, {reference['status']}). Compared: {_count(comparison['compared'])}. "
                   "The run's own report: ", Link("report.html", "report.html"), " and ",
                   Link("report.md", "report.md"), "; machine-readable: ",
                   Link("comparison.json", "comparison.json"), ".")),
        Heading("Regressions, worst first", 2),
    ]
    if regressions:
        rows = tuple((str(index), finding["notebook"], finding["name"] or "", finding["kind"], finding["reason"])
                     for index, finding in enumerate(regressions, start=1))
        blocks.append(Table(("#", "Notebook", "Item", "Kind", "Reason"), rows))
    else:
        blocks.append(Paragraph(("None: every notebook passed and nothing moved beyond its tolerance.",)))
    if changes:
        blocks.append(Heading("Other changes (not failing)", 2))
        rows = tuple((finding["notebook"], finding["name"] or "", finding["kind"], finding["reason"])
                     for finding in changes)
        blocks.append(Table(("Notebook", "Item", "Kind", "Reason"), rows))
    blocks += _notebook_blocks(comparison["notebooks"])
    blocks += _environment_blocks(comparison["environment"])
    blocks += _rules_blocks(comparison["rules"])
    return blocks


def _count(compared: dict[str, int]) -> str:
    return ", ".join(f"{number} {kind[:-1] if number == 1 else kind}" for kind, number in compared.items())


def _notebook_blocks(notebooks: list[dict[str, Any]]) -> list[Block]:
    rows = []
    for row in notebooks:
        page: str | Link = page_link(row) if row["executed"] else "not run"
        rows.append((row["notebook"], row["reference_status"] or "not in reference", row["status"] or "missing",
                     _seconds(row["reference_seconds"], row["reference_cpu_seconds"]),
                     _seconds(row["seconds"], row["cpu_seconds"]), page))
    return [Heading("Notebooks", 2),
            Table(("Notebook", "Reference status", "Status", "Reference time", "Time", "Executed notebook"),
                  tuple(rows))]


def _seconds(wall: float | None, cpu: float | None) -> str:
    if wall is None:
        return ""
    return f"{wall:.1f} s" + (f" (CPU {cpu:.1f} s)" if cpu is not None else "")


def _environment_blocks(differences: list[dict[str, Any]]) -> list[Block]:
    blocks: list[Block] = [Heading("Environment differences (context)", 2)]
    if not differences:
        return blocks + [Paragraph(("None: same settings, package versions and hardware description.",))]
    rows = tuple((item["name"], _plain(item["reference"]), _plain(item["current"])) for item in differences)
    return blocks + [Table(("Setting", "Reference", "This run"), rows)]


def _plain(value: Any) -> str:
    if isinstance(value, float):
        return format_value(value)
    if isinstance(value, list):
        return " ".join(str(item) for item in value)
    return "" if value is None else str(value)


def _rules_blocks(rules: dict[str, float]) -> list[Block]:
    text = (f"A metric with seed spread may move by max({rules['spread_factor']:g} x spread, "
            f"{rules['seed_mean_rtol']:.0%} of its value, {rules['absolute_floor']:g}); a metric without spread by "
            f"max({rules['single_value_rtol']:.1%} of its value, {rules['absolute_floor']:g}). A notebook is slower "
            f"when its kernel CPU time (its wall-clock time where CPU time is unknown) grew more than "
            f"{rules['timing_ratio']:g} times and by at least {rules['timing_floor_seconds']:g} s, and its "
            "wall-clock time grew too; a longer wall-clock time alone is listed, not failed. A timing metric that "
            f"changed by more than a factor of {rules['timing_metric_ratio']:g} either way is listed, not failed. "
            "Claims that held must still hold, and every notebook must pass.")
    return [Heading("Comparison rules", 2), Paragraph((text,)),
            Code("\n".join(f"{name} = {value:g}" for name, value in rules.items()))]
