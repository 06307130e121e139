import torch

from labutils import __main__ as cli
from labutils import data


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
