"""Compare a course run with a reference run: which notebooks, claims, metrics and timings changed.

Both runs are the content of a results.json. Each difference becomes a finding with a reason that names the
notebook and the metric or claim. A finding is either a regression, which fails the nightly run, or a change,
which the report lists for context. The rules and their constants:

- A notebook that did not pass, or that the reference has and this run lacks, is a regression.
- A claim that held in the reference and now does not hold, or was not recorded, is a regression.
- A metric that moved by more than its tolerance, became NaN or infinite, or was not recorded while the
  reference has it, is a regression. The tolerance of a mean over seeds (a metric with `spread`) is
  max(SPREAD_FACTOR * spread, SEED_MEAN_RTOL * |reference|, ABSOLUTE_FLOOR), using the reference's spread.
  A metric without spread is a single deterministic value, with tolerance
  max(SINGLE_VALUE_RTOL * |reference|, ABSOLUTE_FLOOR).
- A notebook that passed in both runs is slower when the CPU time its kernel used grew by more than
  TIMING_RATIO and by at least TIMING_FLOOR_SECONDS, and its wall-clock time grew too. Kernel CPU time is the
  main measure because other programs on a busy machine stretch wall-clock times several-fold but leave it
  nearly unchanged. Without CPU times the same ratio and floor apply to wall-clock time. A notebook whose
  wall-clock time alone grew that much is listed as a change: the machine was busy or the notebook waited.
- When the run executed only some notebooks (`requested`), the reference's other notebooks are not compared.
- A timing metric (`timing=True`) that changed by more than a factor of TIMING_METRIC_RATIO in either
  direction is listed as a change, never a regression. It is a fraction of a second of wall-clock time, which
  any other process on the machine moves several-fold, and a notebook that really got slower shows in its
  kernel CPU time above.
- Differences in the environment (package versions, CPU count, device, threads, jobs) are listed as context.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any, Iterable

from labutils.report import format_value

# The difference of two means over the same n seeds, each seed redrawn, has a standard deviation of
# sqrt(2 / n) times the seed spread: 1.0 for the 2 seeds of the quick profile, 0.82 for the 3 of full. Three
# spreads therefore put a false alarm from seed noise alone at about 3 standard deviations or more.
SPREAD_FACTOR = 3.0
# A spread estimated from 2 or 3 seeds can come out near zero by chance. 2% of the value stays below the
# smallest effect a notebook claims (an AUC gain of 0.05 on about 0.9 is 5.5%).
SEED_MEAN_RTOL = 0.02
# The same seed on the same CPU repeats bit for bit, so a single value only moves when the code or the
# software changes. 0.1% absorbs last-digit changes from another PyTorch version or thread count.
SINGLE_VALUE_RTOL = 1e-3
# Lets a reference value of exactly 0 move by float rounding alone.
ABSOLUTE_FLOOR = 1e-6
# A notebook must use more than twice the kernel CPU time (or wall-clock time, where CPU time is unknown).
TIMING_RATIO = 2.0
# Kernel start-up and imports alone vary by a few seconds, for example when more modules are imported, which
# can double the time of a short notebook.
TIMING_FLOOR_SECONDS = 5.0
# A timing metric is one short measurement inside a notebook (notebook 01 times about a second of forward
# passes, notebook 07 a step of a few milliseconds). Two back-to-back runs of notebook 07 on the same 2-core CPU,
# with a short job started beside the second, moved one such metric 6.2-fold.
TIMING_METRIC_RATIO = 3.0

REGRESSION = "regression"
CHANGE = "change"

# Order of the regressions in the report: a failed notebook first, then lost claims, moved metrics, timings.
KIND_RANK = {
    "notebook-failed": 0, "notebook-missing": 0,
    "claim-flipped": 1, "claim-missing": 1,
    "metric-not-finite": 2, "metric-changed": 2, "metric-missing": 2,
    "slower": 3,
}
# Top-level run settings that are listed with the environment.
SETTINGS = ("device", "timeout", "jobs")
# Environment fields that differ between any two runs and explain nothing on their own.
IGNORED_ENVIRONMENT = ("load_average",)


@dataclass(frozen=True)
class Finding:
    """One difference between the reference and this run.

    `score` orders findings of the same kind. For a metric it is the change divided by the tolerance, and for a
    timing the ratio divided by the allowed ratio. It is None for findings about notebooks and claims.
    """

    severity: str
    kind: str
    notebook: str
    name: str | None  # the metric or claim, None for a finding about the whole notebook
    reason: str
    reference: float | str | None = None
    current: float | str | None = None
    tolerance: float | None = None
    score: float | None = None


def rules() -> dict[str, float]:
    """Return the constants of the comparison, as the report and comparison.json state them."""
    return {"spread_factor": SPREAD_FACTOR, "seed_mean_rtol": SEED_MEAN_RTOL, "single_value_rtol": SINGLE_VALUE_RTOL,
            "absolute_floor": ABSOLUTE_FLOOR, "timing_ratio": TIMING_RATIO,
            "timing_floor_seconds": TIMING_FLOOR_SECONDS, "timing_metric_ratio": TIMING_METRIC_RATIO}


def compare_runs(reference: dict[str, Any], current: dict[str, Any]) -> dict[str, Any]:
    """Compare two results.json contents and return the comparison that comparison.json stores.

    "status" is "passed" when there is no regression and "regressed" otherwise. "regressions" are sorted worst
    first, "changes" follow course order, and "environment" lists the settings and software that differ.
    """
    findings: list[Finding] = []
    reference_entries = {entry["notebook"]: entry for entry in reference["notebooks"]}
    if current.get("requested"):
        reference_entries = {name: entry for name, entry in reference_entries.items()
                             if name in current["selected"]}
    current_entries = {entry["notebook"]: entry for entry in current["notebooks"]}
    order = _course_order(reference_entries, current)
    counts = {"notebooks": 0, "metrics": 0, "claims": 0}
    for notebook in order:
        before, after = reference_entries.get(notebook), current_entries.get(notebook)
        if after is None:
            findings.append(_missing_notebook(notebook, before, current))
            continue
        findings += _notebook_status(notebook, before, after)
        if before is None:
            continue
        counts["notebooks"] += 1
        counts["claims"] += len(before["claims"])
        counts["metrics"] += len(before["metrics"])
        stopped = after["status"] != "passed"
        findings += compare_claims(notebook, before["claims"], after["claims"], stopped)
        findings += compare_metrics(notebook, before["metrics"], after["metrics"], stopped)
        findings += compare_seconds(notebook, before, after)
    position = {notebook: index for index, notebook in enumerate(order)}
    regressions = sorted((f for f in findings if f.severity == REGRESSION),
                         key=lambda f: (KIND_RANK[f.kind], -(f.score or math.inf), position[f.notebook]))
    changes = [f for f in findings if f.severity == CHANGE]
    return {
        "status": "regressed" if regressions else "passed",
        "rules": rules(),
        "compared": counts,
        "regressions": [asdict(f) for f in regressions],
        "changes": [asdict(f) for f in changes],
        "environment": environment_differences(reference, current),
        "notebooks": [_notebook_row(notebook, reference_entries.get(notebook), current_entries.get(notebook))
                      for notebook in order],
    }


def _course_order(reference: dict[str, Any], current: dict[str, Any]) -> list[str]:
    # `reference` maps the compared reference notebooks to their entries.
    """Return every notebook of either run in course order (NN_ prefix), each once."""
    names = set(reference) | {entry["notebook"] for entry in current["notebooks"]}
    return sorted(names, key=lambda name: (_number(name), name))


def _number(notebook: str) -> int:
    prefix = notebook.split("_", 1)[0]
    return int(prefix) if prefix.isdigit() else -1


def _missing_notebook(notebook: str, before: dict[str, Any], current: dict[str, Any]) -> Finding:
    if notebook in current.get("selected", []) and current.get("status") == "incomplete":
        why = "the run stopped before it finished"
    elif "selected" in current and notebook not in current["selected"]:
        why = "its file is not in the notebooks folder, or the run did not select it"
    else:
        why = "the run has no entry for it"
    return Finding(REGRESSION, "notebook-missing", notebook, None,
                   f"Notebook {notebook} is missing from this run: {why}. The reference ran it "
                   f"({before['status']}) with {len(before['metrics'])} metrics and {len(before['claims'])} claims.",
                   reference=before["status"], current=None)


def _notebook_status(notebook: str, before: dict[str, Any] | None, after: dict[str, Any]) -> list[Finding]:
    findings = []
    if before is None:
        findings.append(Finding(CHANGE, "notebook-new", notebook, None,
                                f"Notebook {notebook} is new: the reference has no values for it, so its metrics and "
                                "claims are not compared until the reference is refreshed.",
                                current=after["status"]))
    if after["status"] == "passed":
        return findings
    if after["status"] == "claim-failed":
        failing = [claim["name"] for claim in after["claims"] if claim["enforced"] and not claim["holds"]]
        what = f"stopped at a claim that does not hold: {', '.join(failing)}"
    else:
        error = (after.get("error") or "no error message").splitlines()[0]
        what = f"failed with {error}"
    earlier = f"it {before['status']} in the reference too" if before and before["status"] != "passed" else \
        "it passed in the reference" if before else "it is new"
    findings.append(Finding(REGRESSION, "notebook-failed", notebook, None, f"Notebook {notebook} {what} ({earlier}).",
                            reference=before["status"] if before else None, current=after["status"]))
    return findings


def compare_claims(notebook: str, before: list[dict[str, Any]], after: list[dict[str, Any]],
                   stopped: bool = False) -> list[Finding]:
    """Flag claims that held in the reference and now fail or are missing; list claims that now hold or are new.

    `stopped` is True when the notebook did not run to its end, and the reason of a missing claim then states it.
    """
    now = {claim["name"]: claim for claim in after}
    not_recorded = "the notebook stopped before recording it" if stopped else "it was not recorded in this run"
    findings = []
    for claim in before:
        name, current = claim["name"], now.get(claim["name"])
        if current is None:
            if claim["holds"]:
                findings.append(Finding(REGRESSION, "claim-missing", notebook, name,
                                        f"{notebook}: claim {name!r} is missing ({not_recorded}); it held in the "
                                        f"reference ({_claim_test(claim)}). It states: {claim['claim']}",
                                        reference=claim["value"]))
        elif claim["holds"] and not current["holds"]:
            findings.append(Finding(REGRESSION, "claim-flipped", notebook, name,
                                    f"{notebook}: claim {name!r} no longer holds: {_claim_test(current)} is false, "
                                    f"while the reference had {_claim_test(claim)}. It states: {current['claim']}",
                                    reference=claim["value"], current=current["value"]))
        elif not claim["holds"] and current["holds"]:
            findings.append(Finding(CHANGE, "claim-now-holds", notebook, name,
                                    f"{notebook}: claim {name!r} now holds ({_claim_test(current)}); it did not in "
                                    "the reference.", reference=claim["value"], current=current["value"]))
    known = {claim["name"] for claim in before}
    for claim in after:
        if claim["name"] not in known:
            findings.append(Finding(CHANGE, "claim-new", notebook, claim["name"],
                                    f"{notebook}: claim {claim['name']!r} is new ({_claim_test(claim)}).",
                                    current=claim["value"]))
    return findings


def _claim_test(claim: dict[str, Any]) -> str:
    return f"{format_value(claim['value'])} {claim['op']} {format_value(claim['threshold'])}"


def compare_metrics(notebook: str, before: list[dict[str, Any]], after: list[dict[str, Any]],
                    stopped: bool = False) -> list[Finding]:
    """Flag metrics that moved beyond their tolerance, became non-finite or disappeared; list new ones."""
    now = {metric["name"]: metric for metric in after}
    not_recorded = "the notebook stopped before recording it" if stopped else "it was not recorded in this run"
    findings = []
    for metric in before:
        current = now.get(metric["name"])
        if current is None:
            findings.append(Finding(REGRESSION, "metric-missing", notebook, metric["name"],
                                    f"{notebook}: metric {metric['name']!r} is missing ({not_recorded}); the "
                                    f"reference has {format_value(metric['value'])}.", reference=metric["value"]))
        elif metric.get("timing") or current.get("timing"):
            findings += _compare_timing_metric(notebook, metric, current)
        else:
            findings += _compare_value(notebook, metric, current)
    known = {metric["name"] for metric in before}
    for metric in after:
        if metric["name"] not in known:
            findings.append(Finding(CHANGE, "metric-new", notebook, metric["name"],
                                    f"{notebook}: metric {metric['name']!r} is new ({format_value(metric['value'])}).",
                                    current=metric["value"]))
    return findings


def metric_tolerance(metric: dict[str, Any], current: dict[str, Any] | None = None) -> tuple[float, str]:
    """Return how far a metric may move from its reference value, and how that tolerance was derived.

    The reference's spread is used, or this run's when only this run recorded one.
    """
    scale = abs(metric["value"])
    spread = metric.get("spread", (current or {}).get("spread"))
    if spread is not None and math.isfinite(spread):
        tolerance = max(SPREAD_FACTOR * spread, SEED_MEAN_RTOL * scale, ABSOLUTE_FLOOR)
        if tolerance == SPREAD_FACTOR * spread:
            return tolerance, f"{SPREAD_FACTOR:g} x seed spread {format_value(spread)}"
        return tolerance, f"floor of {SEED_MEAN_RTOL:.0%} of the value, above {SPREAD_FACTOR:g} x seed spread " \
                          f"{format_value(spread)}"
    tolerance = max(SINGLE_VALUE_RTOL * scale, ABSOLUTE_FLOOR)
    return tolerance, f"{SINGLE_VALUE_RTOL:.1%} of a single value without seed spread"


def _compare_value(notebook: str, metric: dict[str, Any], current: dict[str, Any]) -> list[Finding]:
    name, before, after = metric["name"], metric["value"], current["value"]
    if not (math.isfinite(before) and math.isfinite(after)):
        if before == after or (math.isnan(before) and math.isnan(after)):
            return []
        if math.isfinite(after):
            return [Finding(CHANGE, "metric-now-finite", notebook, name,
                            f"{notebook}: metric {name!r} is {format_value(after)} now; the reference has "
                            f"{format_value(before)}.", reference=before, current=after)]
        return [Finding(REGRESSION, "metric-not-finite", notebook, name,
                        f"{notebook}: metric {name!r} became {format_value(after)}; the reference has "
                        f"{format_value(before)}.", reference=before, current=after)]
    tolerance, derivation = metric_tolerance(metric, current)
    change = after - before
    if abs(change) <= tolerance:
        return []
    return [Finding(REGRESSION, "metric-changed", notebook, name,
                    f"{notebook}: metric {name!r} changed from {format_value(before)} to {format_value(after)} "
                    f"({change:+.4g}), more than its tolerance {format_value(tolerance)} ({derivation}).",
                    reference=before, current=after, tolerance=tolerance, score=abs(change) / tolerance)]


def _compare_timing_metric(notebook: str, metric: dict[str, Any], current: dict[str, Any]) -> list[Finding]:
    name, before, after = metric["name"], metric["value"], current["value"]
    if not (before > 0 and after > 0 and math.isfinite(before) and math.isfinite(after)):
        return [Finding(CHANGE, "timing-not-comparable", notebook, name,
                        f"{notebook}: timing metric {name!r} is {format_value(after)}, the reference "
                        f"{format_value(before)}; a ratio needs two positive values.", reference=before, current=after)]
    factor = max(after / before, before / after)
    if factor <= TIMING_METRIC_RATIO:
        return []
    direction = "higher" if after > before else "lower"
    return [Finding(CHANGE, "timing-changed", notebook, name,
                    f"{notebook}: timing metric {name!r} is {factor:.1f} times {direction} than in the reference "
                    f"({format_value(before)} -> {format_value(after)}), beyond a factor of "
                    f"{TIMING_METRIC_RATIO:g}: another program may have shared the CPU, so compare the notebook's "
                    "kernel CPU time.", reference=before, current=after, score=factor / TIMING_METRIC_RATIO)]


def compare_seconds(notebook: str, before: dict[str, Any], after: dict[str, Any]) -> list[Finding]:
    """Flag a notebook that became much slower; list large wall-clock-only slowdowns and large speed-ups.

    A notebook that got much faster is listed as a change, because skipped work also looks like that.
    NOTE: several PyTorch threads that wait for each other on a busy machine spin and inflate CPU time too. That
    matters most for notebooks of many small operations, which the floor of TIMING_FLOOR_SECONDS mostly covers.
    """
    if before["status"] != "passed" or after["status"] != "passed" or not before["seconds"] > 0:
        return []
    wall_ratio = after["seconds"] / before["seconds"]
    cpu_before, cpu_after = before.get("cpu_seconds"), after.get("cpu_seconds")
    if cpu_before and cpu_after is not None:
        ratio, added, measure = cpu_after / cpu_before, cpu_after - cpu_before, "kernel CPU time"
        times = f"CPU {cpu_before:.1f} s -> {cpu_after:.1f} s, wall-clock {before['seconds']:.1f} s -> " \
                f"{after['seconds']:.1f} s"
    else:
        ratio, added, measure = wall_ratio, after["seconds"] - before["seconds"], "wall-clock time"
        times = f"wall-clock {before['seconds']:.1f} s -> {after['seconds']:.1f} s"
    limit = f"the allowed ratio is {TIMING_RATIO:g} with at least {TIMING_FLOOR_SECONDS:g} s more"
    if ratio > TIMING_RATIO and added >= TIMING_FLOOR_SECONDS and wall_ratio > 1:
        return [Finding(REGRESSION, "slower", notebook, None,
                        f"Notebook {notebook} used {ratio:.1f} times the {measure} of the reference ({times}); "
                        f"{limit}.", reference=before["seconds"], current=after["seconds"],
                        score=ratio / TIMING_RATIO)]
    if wall_ratio > TIMING_RATIO and after["seconds"] - before["seconds"] >= TIMING_FLOOR_SECONDS:
        return [Finding(CHANGE, "slower-wall-clock-only", notebook, None,
                        f"Notebook {notebook} took {wall_ratio:.1f} times as long as in the reference ({times}), "
                        f"but its {measure} grew only {ratio:.1f} times: the machine was busy or the notebook "
                        "waited.", reference=before["seconds"], current=after["seconds"])]
    if ratio < 1 / TIMING_RATIO and -added >= TIMING_FLOOR_SECONDS:
        return [Finding(CHANGE, "faster", notebook, None,
                        f"Notebook {notebook} used {ratio:.2f} times the {measure} of the reference ({times}): "
                        "check that it still does all its work.",
                        reference=before["seconds"], current=after["seconds"])]
    return []


def environment_differences(reference: dict[str, Any], current: dict[str, Any]) -> list[dict[str, Any]]:
    """List the run settings and environment fields whose values differ, as {"name", "reference", "current"}."""
    differences = [{"name": name, "reference": reference.get(name), "current": current.get(name)}
                   for name in SETTINGS if reference.get(name) != current.get(name)]
    before, after = reference.get("environment", {}), current.get("environment", {})
    for name in _ordered_union(before, after):
        if name not in IGNORED_ENVIRONMENT and before.get(name) != after.get(name):
            differences.append({"name": name, "reference": before.get(name), "current": after.get(name)})
    return differences


def _ordered_union(first: dict[str, Any], second: dict[str, Any]) -> Iterable[str]:
    return list(first) + [name for name in second if name not in first]


def _notebook_row(notebook: str, before: dict[str, Any] | None, after: dict[str, Any] | None) -> dict[str, Any]:
    def field(entry: dict[str, Any] | None, key: str) -> Any:
        return entry.get(key) if entry else None

    return {"notebook": notebook,
            "reference_status": field(before, "status"), "status": field(after, "status"),
            "reference_seconds": field(before, "seconds"), "seconds": field(after, "seconds"),
            "reference_cpu_seconds": field(before, "cpu_seconds"), "cpu_seconds": field(after, "cpu_seconds"),
            "executed": field(after, "executed"), "html": field(after, "html")}
