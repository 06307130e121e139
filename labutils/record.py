"""Headline metrics and checked claims, saved where the course runner reads them.

Each notebook owns one JSON file, `<results_dir>/<notebook>.json`, rewritten after every call so that a
notebook that fails halfway still leaves what it measured. The runner reads these files instead of parsing
notebook outputs.
"""

from __future__ import annotations

import json
import math
import operator
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

COMPARISONS: dict[str, Callable[[float, float], bool]] = {
    ">": operator.gt,
    ">=": operator.ge,
    "<": operator.lt,
    "<=": operator.le,
}


class ClaimFailed(AssertionError):
    """A claim a notebook makes no longer holds for the numbers it measured."""


@dataclass(frozen=True)
class CheckResult:
    """The outcome of one checked claim; true when the claim holds, shown as one readable line in a notebook."""

    name: str
    value: float
    op: str
    threshold: float
    holds: bool

    def __bool__(self) -> bool:
        return self.holds

    def __repr__(self) -> str:
        verdict = "holds" if self.holds else "does NOT hold"
        return f"Claim {self.name!r} {verdict}: {self.value:.4g} {self.op} {self.threshold:.4g}"


class Recorder:
    """Collects one notebook's metrics, claims and figures and writes them to `results_dir`.

    With `enforce_claims=False` (the smoke profile) a failing claim is recorded but does not raise, because tiny
    runs cannot support learning claims.
    """

    def __init__(self, notebook: str, results_dir: str | os.PathLike[str], *, enforce_claims: bool = True,
                 context: dict[str, Any] | None = None) -> None:
        self.notebook = notebook
        self.results_dir = Path(results_dir)
        self.enforce_claims = enforce_claims
        self.path = self.results_dir / f"{notebook}.json"
        self.data: dict[str, Any] = {
            "notebook": notebook,
            "context": dict(context or {}),
            "enforce_claims": enforce_claims,
            "metrics": [],
            "claims": [],
            "figures": [],
        }
        self._prepare_dir()
        self.save()

    def _prepare_dir(self) -> None:
        try:
            self.results_dir.mkdir(parents=True, exist_ok=True)
        except OSError as error:
            raise ValueError(f"Cannot create the results folder {str(self.results_dir)!r} ({error.strerror}): "
                             "set RESULTS_DIR in the parameters cell to a folder you can write to.") from None
        if not os.access(self.results_dir, os.W_OK):
            raise ValueError(f"The results folder {str(self.results_dir)!r} is not writable: "
                             "set RESULTS_DIR in the parameters cell to a folder you can write to.")

    def metric(self, name: str, value: float, claim: str = "", timing: bool = False,
               spread: float | None = None) -> float:
        """Record a headline metric, optionally with the sentence it supports, and return the value.

        Mark wall-clock measurements with `timing=True`: they vary between runs, so comparisons of two runs
        (determinism checks, regression runs) treat them apart from the metrics that must repeat exactly. For a
        mean over seeds, pass the standard deviation across seeds as `spread`, so a later run can tell a real
        change from seed noise.
        """
        value = _as_number(name, value)
        entry = {"name": name, "value": value, "claim": claim, "timing": timing}
        if spread is not None:
            entry["spread"] = _as_number(f"{name} spread", spread)
        self._replace("metrics", entry)
        return value

    def check(self, name: str, value: float, op: str, threshold: float, claim: str) -> CheckResult:
        """Record the claim `value op threshold` and raise `ClaimFailed` if it does not hold.

        `claim` is the sentence the notebook states in prose. Under a profile that does not enforce claims the
        result is recorded and returned without raising.
        """
        if op not in COMPARISONS:
            raise ValueError(f"Unknown comparison {op!r}: use one of {', '.join(COMPARISONS)}.")
        value = _as_number(name, value)
        holds = not math.isnan(value) and COMPARISONS[op](value, float(threshold))
        self._replace("claims", {"name": name, "value": value, "op": op, "threshold": float(threshold),
                                 "holds": bool(holds), "enforced": self.enforce_claims, "claim": claim})
        if not holds and self.enforce_claims:
            raise ClaimFailed(f"Claim {name!r} does not hold: {value:.4g} {op} {threshold:.4g} is false. "
                              f"The notebook states: {claim}")
        return CheckResult(name, value, op, float(threshold), bool(holds))

    def figure(self, fig: Any, name: str) -> Path:
        """Save a matplotlib figure as a PNG next to the results and list it for the report."""
        figures_dir = self.results_dir / "figures"
        figures_dir.mkdir(exist_ok=True)
        path = figures_dir / f"{self.notebook}_{name}.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        relative = str(path.relative_to(self.results_dir))
        if relative not in self.data["figures"]:
            self.data["figures"].append(relative)
        self.save()
        return path

    def save(self) -> None:
        """Write the results file atomically, so a reader never sees half a file."""
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2) + "\n")
        tmp.replace(self.path)

    def _replace(self, key: str, entry: dict[str, Any]) -> None:
        # Rerunning a cell in JupyterLab records the same name again: keep the latest value only.
        entries = [e for e in self.data[key] if e["name"] != entry["name"]]
        self.data[key] = entries + [entry]
        self.save()


def load_results(path: str | os.PathLike[str]) -> dict[str, Any]:
    """Read a results file written by `Recorder`."""
    return json.loads(Path(path).read_text())


def _as_number(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError):
        raise TypeError(f"Metric {name!r} must be a number, got {value!r} of type {type(value).__name__}.") from None
