"""The per-epoch record of a training run, as returned by `fit` and saved as JSON."""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any


@dataclass
class History:
    """Per-epoch rows (`epoch`, `train_loss`, `val_unseen_auc`, ...) plus the run's settings.

    `stopped` is the reason when training ended early (for example a NaN loss), otherwise None.
    """

    config: dict[str, Any] = field(default_factory=dict)
    rows: list[dict[str, float]] = field(default_factory=list)
    stopped: str | None = None

    def append(self, row: dict[str, float]) -> None:
        self.rows.append(dict(row))

    def __getitem__(self, key: str) -> list[float]:
        """Return the column `key` over epochs, for example `history["val_unseen_auc"]`."""
        if not self.rows:
            raise KeyError(f"The history has no epochs yet, so it has no column {key!r}.")
        if key not in self.rows[0]:
            raise KeyError(f"Unknown history column {key!r}: the columns are {', '.join(self.rows[0])}.")
        return [row[key] for row in self.rows]

    def __len__(self) -> int:
        return len(self.rows)

    def last(self, key: str) -> float:
        """Return the value of `key` after the last epoch."""
        return self[key][-1]

    def best(self, key: str, mode: str = "max") -> float:
        """Return the best value of `key` over epochs (`mode` is "max" or "min"), ignoring NaN."""
        values = [v for v in self[key] if not math.isnan(v)]
        return max(values) if mode == "max" else min(values)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config, "rows": self.rows, "stopped": self.stopped}

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the history as JSON (NaN is written as null) and return the path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        rows = [{k: (None if isinstance(v, float) and not math.isfinite(v) else v) for k, v in row.items()}
                for row in self.rows]
        path.write_text(json.dumps({**self.to_dict(), "rows": rows}, indent=2) + "\n")
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> History:
        """Read a history written by `save`."""
        try:
            data = json.loads(Path(path).read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"{str(path)!r} is not valid JSON ({error.msg} at line {error.lineno}): pass a "
                             "history file written by History.save.") from None
        rows = [{k: (math.nan if v is None else v) for k, v in row.items()} for row in data.get("rows", [])]
        return cls(config=data.get("config", {}), rows=rows, stopped=data.get("stopped"))
