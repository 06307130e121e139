import math

import pytest

from labutils.history import History


def make_history() -> History:
    history = History(config={"lr": 0.001})
    history.append({"epoch": 1, "train_loss": 0.5, "val_unseen_auc": 0.7})
    history.append({"epoch": 2, "train_loss": math.nan, "val_unseen_auc": 0.8})
    return history


def test_column_access():
    assert make_history()["val_unseen_auc"] == [0.7, 0.8]


def test_unknown_column_lists_columns():
    with pytest.raises(KeyError, match="train_loss"):
        make_history()["val_auc"]


def test_best_ignores_nan():
    assert make_history().best("train_loss", mode="min") == 0.5


def test_save_load_round_trip(tmp_path):
    history = make_history()
    history.stopped = "loss became nan"
    loaded = History.load(history.save(tmp_path / "history.json"))
    assert loaded.config == {"lr": 0.001}
    assert loaded.stopped == "loss became nan"
    assert math.isnan(loaded.rows[1]["train_loss"])


def test_load_invalid_json(tmp_path):
    path = tmp_path / "history.json"
    path.write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        History.load(path)
