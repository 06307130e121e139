import os

import torch

from labutils import __main__ as cli
from labutils import data, runner, session


def test_fetch_reports_failure(monkeypatch, capsys):
    def unavailable(name, download=False):
        raise data.DatasetUnavailableError(f"Dataset {name!r} is not available: no network.")

    monkeypatch.setattr(data, "load_dataset", unavailable)
    assert cli.main(["data", "fetch", "kmnist"]) == 1
    assert "'kmnist' is not available" in capsys.readouterr().err


def test_fetch_downloads_each_name(monkeypatch, capsys):
    requested = []

    def fake_download(name, download=False):
        requested.append((name, download))
        return torch.zeros(3, 1, 28, 28), torch.zeros(3, dtype=torch.long)

    monkeypatch.setattr(data, "load_dataset", fake_download)
    assert cli.main(["data", "fetch", "mnist", "omniglot"]) == 0
    assert requested == [("mnist", True), ("omniglot", True)]


def test_list_shows_digits(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(tmp_path))
    assert cli.main(["data", "list"]) == 0
    output = capsys.readouterr().out
    assert "digits           1797 images" in output
    assert "mnist          not downloaded" in output


def record_fallback(seen, out_dir):
    """Return a stand-in for runner.run_course that stores the fallback variable its kernels would inherit."""
    def fake_run_course(**arguments):
        seen["fallback"] = os.environ.get(session.MPS_FALLBACK_ENV_VAR)
        entry = {"notebook": "00_demo", "status": "passed", "seconds": 0.0, "claims": [], "error": None}
        return {"out_dir": str(out_dir), "notebooks": [entry], "status": "passed", "seconds": 0.0}

    return fake_run_course


def test_run_enables_mps_fallback_for_kernels(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setenv(session.MPS_FALLBACK_ENV_VAR, "1")  # so that monkeypatch restores the variable afterwards
    monkeypatch.delenv(session.MPS_FALLBACK_ENV_VAR)
    monkeypatch.setattr(runner, "run_course", record_fallback(seen, tmp_path))
    assert cli.main(["run", "--profile", "smoke"]) == 0
    assert seen["fallback"] == "1"


def test_run_keeps_mps_fallback_choice(monkeypatch, tmp_path):
    seen = {}
    monkeypatch.setenv(session.MPS_FALLBACK_ENV_VAR, "0")
    monkeypatch.setattr(runner, "run_course", record_fallback(seen, tmp_path))
    assert cli.main(["run", "--profile", "smoke"]) == 0
    assert seen["fallback"] == "0"
