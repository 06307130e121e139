"""Tests for labutils.compare on hand-built results, one rule per test."""

from __future__ import annotations

import copy
import math
from typing import Any

import pytest

from labutils import compare


def metric(name: str, value: float, spread: float | None = None, timing: bool = False) -> dict[str, Any]:
    entry: dict[str, Any] = {"name": name, "value": value, "claim": "", "timing": timing}
    if spread is not None:
        entry["spread"] = spread
    return entry


def claim(name: str, value: float, threshold: float, holds: bool, enforced: bool = True) -> dict[str, Any]:
    return {"name": name, "value": value, "op": ">=", "threshold": threshold, "holds": holds, "enforced": enforced,
            "claim": f"{name} stays at or above {threshold}."}


def notebook(name: str, metrics: list[dict[str, Any]], claims: list[dict[str, Any]], seconds: float = 60.0,
             cpu_seconds: float | None = 50.0, status: str = "passed", error: str | None = None) -> dict[str, Any]:
    return {"notebook": name, "status": status, "seconds": seconds, "cpu_seconds": cpu_seconds, "error": error,
            "metrics": metrics, "claims": claims, "figures": [], "executed": f"notebooks/{name}.ipynb",
            "html": f"html/{name}.html"}


def results(*entries: dict[str, Any]) -> dict[str, Any]:
    return {"profile": "full", "dataset": "digits", "device": "auto", "seed": 0, "timeout": None, "jobs": 1,
            "status": "passed", "selected": [entry["notebook"] for entry in entries],
            "environment": {"torch": "2.14.1", "cpu_count": 2, "load_average": [0.5, 0.5, 0.5]},
            "notebooks": list(entries)}


@pytest.fixture()
def reference() -> dict[str, Any]:
    return results(
        notebook("00_data", [metric("images", 1797.0)], [claim("balanced", 0.5, 0.5, True)], seconds=20.0,
                 cpu_seconds=15.0),
        notebook("02_losses", [metric("val_auc", 0.90, spread=0.02), metric("neg_dist", 1.5, spread=0.0),
                               metric("images_per_second", 3000.0, timing=True)],
                 [claim("learns", 0.96, 0.95, True), claim("beats_pixels", 0.1, 0.2, False, enforced=False)]),
    )


def entry_of(run: dict[str, Any], name: str) -> dict[str, Any]:
    return next(entry for entry in run["notebooks"] if entry["notebook"] == name)


def value_of(run: dict[str, Any], notebook_name: str, metric_name: str) -> dict[str, Any]:
    return next(m for m in entry_of(run, notebook_name)["metrics"] if m["name"] == metric_name)


def kinds(comparison: dict[str, Any], severity: str = "regressions") -> list[tuple[str, str, str | None]]:
    return [(f["kind"], f["notebook"], f["name"]) for f in comparison[severity]]


def test_identical_runs_pass(reference):
    comparison = compare.compare_runs(reference, copy.deepcopy(reference))
    assert comparison["status"] == "passed"
    assert comparison["regressions"] == []
    assert comparison["changes"] == []
    assert comparison["compared"] == {"notebooks": 2, "metrics": 4, "claims": 3}


def test_metric_within_spread_tolerance(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "val_auc")["value"] = 0.90 - 0.059  # tolerance is 3 x 0.02
    assert compare.compare_runs(reference, current)["regressions"] == []


def test_metric_beyond_spread_tolerance(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "val_auc")["value"] = 0.90 - 0.061
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert (finding["kind"], finding["notebook"], finding["name"]) == ("metric-changed", "02_losses", "val_auc")
    assert finding["tolerance"] == pytest.approx(0.06)
    assert "'val_auc' changed from 0.9 to 0.839" in finding["reason"]
    assert "3 x seed spread 0.02" in finding["reason"]


def test_zero_spread_uses_relative_floor(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "neg_dist")["value"] = 1.5 * 1.019
    assert compare.compare_runs(reference, current)["regressions"] == []
    value_of(current, "02_losses", "neg_dist")["value"] = 1.5 * 1.021
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert finding["name"] == "neg_dist"
    assert finding["tolerance"] == pytest.approx(0.03)


def test_single_value_tolerance(reference):
    current = copy.deepcopy(reference)
    value_of(current, "00_data", "images")["value"] = 1797.0 * 1.0009
    assert compare.compare_runs(reference, current)["regressions"] == []
    value_of(current, "00_data", "images")["value"] = 1790.0
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert finding["name"] == "images"
    assert "0.1% of a single value without seed spread" in finding["reason"]


def test_metric_becoming_nan(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "val_auc")["value"] = math.nan
    assert kinds(compare.compare_runs(reference, current)) == [("metric-not-finite", "02_losses", "val_auc")]


def test_metric_missing_and_new(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "neg_dist")["name"] = "negative_distance"
    comparison = compare.compare_runs(reference, current)
    assert kinds(comparison) == [("metric-missing", "02_losses", "neg_dist")]
    assert kinds(comparison, "changes") == [("metric-new", "02_losses", "negative_distance")]


def test_claim_flipped(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses")["claims"][0].update(value=0.9, holds=False)
    entry_of(current, "02_losses")["status"] = "claim-failed"
    comparison = compare.compare_runs(reference, current)
    assert kinds(comparison) == [("notebook-failed", "02_losses", None), ("claim-flipped", "02_losses", "learns")]
    assert "claim 'learns' no longer holds: 0.9 >= 0.95 is false" in comparison["regressions"][1]["reason"]
    assert "stopped at a claim that does not hold: learns (it passed" in comparison["regressions"][0]["reason"]


def test_claim_missing(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses")["claims"] = []
    comparison = compare.compare_runs(reference, current)
    # The claim that failed in the reference too is not a regression when it disappears.
    assert kinds(comparison) == [("claim-missing", "02_losses", "learns")]
    assert "claim 'learns' is missing (it was not recorded in this run)" in comparison["regressions"][0]["reason"]


def test_claim_now_holding_is_a_change(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses")["claims"][1].update(value=0.3, holds=True)
    comparison = compare.compare_runs(reference, current)
    assert comparison["status"] == "passed"
    assert kinds(comparison, "changes") == [("claim-now-holds", "02_losses", "beats_pixels")]


def test_notebook_failed(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "00_data").update(status="failed", error="RuntimeError: data folder unreadable\nline 2")
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert finding["reason"] == ("Notebook 00_data failed with RuntimeError: data folder unreadable "
                                 "(it passed in the reference).")


def test_notebook_missing(reference):
    current = copy.deepcopy(reference)
    current["notebooks"] = current["notebooks"][:1]
    current["selected"] = ["00_data"]
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert (finding["kind"], finding["notebook"]) == ("notebook-missing", "02_losses")
    assert "its file is not in the notebooks folder" in finding["reason"]


def test_notebook_missing_after_interruption(reference):
    current = copy.deepcopy(reference)
    current["notebooks"] = current["notebooks"][:1]
    current["status"] = "incomplete"
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert "the run stopped before it finished" in finding["reason"]


def test_requested_notebooks_only(reference):
    current = copy.deepcopy(reference)
    current["notebooks"] = current["notebooks"][1:]
    current.update(selected=["02_losses"], requested=["02"])
    comparison = compare.compare_runs(reference, current)
    assert comparison["status"] == "passed"
    assert comparison["compared"] == {"notebooks": 1, "metrics": 3, "claims": 2}


def test_new_notebook_is_a_change(reference):
    current = copy.deepcopy(reference)
    current["notebooks"].append(notebook("03_plateau", [metric("x", 1.0)], []))
    comparison = compare.compare_runs(reference, current)
    assert comparison["status"] == "passed"
    assert kinds(comparison, "changes") == [("notebook-new", "03_plateau", None)]


def test_slower_notebook(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses").update(seconds=130.0, cpu_seconds=110.0)
    [finding] = compare.compare_runs(reference, current)["regressions"]
    assert (finding["kind"], finding["notebook"]) == ("slower", "02_losses")
    assert "used 2.2 times the kernel CPU time of the reference (CPU 50.0 s -> 110.0 s" in finding["reason"]


def test_slower_in_cpu_time_on_busy_reference(reference):
    # The reference shared the machine, so its wall-clock time was already long; CPU time still shows the change.
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses").update(seconds=80.0, cpu_seconds=120.0)
    assert kinds(compare.compare_runs(reference, current)) == [("slower", "02_losses", None)]


def test_more_cpu_but_shorter_not_slower(reference):
    # More threads spend more CPU time in less wall-clock time.
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses").update(seconds=40.0, cpu_seconds=150.0)
    assert compare.compare_runs(reference, current)["regressions"] == []


def test_slower_wall_clock_only_is_a_change(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses").update(seconds=200.0, cpu_seconds=60.0)
    comparison = compare.compare_runs(reference, current)
    assert comparison["regressions"] == []
    assert kinds(comparison, "changes") == [("slower-wall-clock-only", "02_losses", None)]


def test_slower_without_cpu_time(reference):
    for entry in reference["notebooks"]:
        entry["cpu_seconds"] = None
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses")["seconds"] = 130.0
    assert kinds(compare.compare_runs(reference, current)) == [("slower", "02_losses", None)]


def test_short_notebook_below_floor(reference):
    current = copy.deepcopy(reference)
    # Three times as long, but only 4 s more than the 2 s of the reference.
    entry_of(reference, "00_data").update(seconds=2.0, cpu_seconds=1.5)
    entry_of(current, "00_data").update(seconds=6.0, cpu_seconds=5.0)
    assert compare.compare_runs(reference, current)["regressions"] == []


def test_faster_notebook_is_a_change(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses").update(seconds=20.0, cpu_seconds=15.0)
    comparison = compare.compare_runs(reference, current)
    assert comparison["regressions"] == []
    assert kinds(comparison, "changes") == [("faster", "02_losses", None)]


def test_faster_wall_clock_only_not_listed(reference):
    current = copy.deepcopy(reference)
    entry_of(current, "02_losses").update(seconds=20.0, cpu_seconds=45.0)
    assert compare.compare_runs(reference, current)["changes"] == []


def test_timing_metric_ratio(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "images_per_second")["value"] = 1100.0  # 2.7 times lower
    assert compare.compare_runs(reference, current)["changes"] == []
    value_of(current, "02_losses", "images_per_second")["value"] = 900.0  # 3.3 times lower
    comparison = compare.compare_runs(reference, current)
    # A short wall-clock measurement is listed, not failed: a busy machine moves it several-fold.
    assert comparison["regressions"] == []
    [finding] = comparison["changes"]
    assert (finding["kind"], finding["name"]) == ("timing-changed", "images_per_second")
    assert "3.3 times lower" in finding["reason"]


def test_worst_first_order(reference):
    current = copy.deepcopy(reference)
    value_of(current, "02_losses", "neg_dist")["value"] = 3.0  # 50 tolerances away
    value_of(current, "02_losses", "val_auc")["value"] = 0.5  # 6.7 tolerances away
    entry_of(current, "02_losses")["claims"][0].update(value=0.5, holds=False)
    entry_of(current, "02_losses").update(seconds=200.0, cpu_seconds=200.0)
    entry_of(current, "00_data").update(status="failed", error="RuntimeError: boom")
    assert kinds(compare.compare_runs(reference, current)) == [
        ("notebook-failed", "00_data", None),
        ("claim-flipped", "02_losses", "learns"),
        ("metric-changed", "02_losses", "neg_dist"),
        ("metric-changed", "02_losses", "val_auc"),
        ("slower", "02_losses", None),
    ]


def test_environment_differences(reference):
    current = copy.deepcopy(reference)
    current["environment"].update(torch="2.15.0", load_average=[9.0, 9.0, 9.0])
    current["jobs"] = 2
    differences = compare.compare_runs(reference, current)["environment"]
    assert differences == [{"name": "jobs", "reference": 1, "current": 2},
                           {"name": "torch", "reference": "2.14.1", "current": "2.15.0"}]
