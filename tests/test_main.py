import os
from pathlib import Path

import pytest
import torch
import torchvision

from labutils import __main__ as cli
from labutils import data, manifest, runner, session
from labutils.history import History
from test_data import write_idx_dataset


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


@pytest.fixture
def fetched_mnist(monkeypatch, tmp_path, capsys):
    """Run `data fetch mnist` with a download that writes real IDX files instead of using the network."""
    def write_files(self):
        write_idx_dataset(Path(self.root), "MNIST")

    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(tmp_path))
    monkeypatch.setattr(torchvision.datasets.MNIST, "download", write_files)
    assert cli.main(["data", "fetch", "mnist"]) == 0
    capsys.readouterr()
    return tmp_path


def test_fetch_records_manifest(fetched_mnist):
    recorded = manifest.load_manifest(fetched_mnist)["datasets"]["mnist"]["files"]
    assert len(recorded) == 4


def test_verify_after_fetch_passes(fetched_mnist, capsys):
    assert cli.main(["data", "verify"]) == 0
    output = capsys.readouterr().out
    assert "mnist          4 files, " in output
    assert "all match the manifest" in output


def test_verify_reports_truncated_copy(fetched_mnist, capsys):
    images = fetched_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    assert cli.main(["data", "verify"]) == 1
    output = capsys.readouterr().out
    assert "  MNIST/raw/train-images-idx3-ubyte: truncated, 1,000 of 9,424 bytes. Fix: delete it" in output
    assert "1 problem found." in output


def test_verify_without_manifest(monkeypatch, tmp_path, capsys):
    monkeypatch.setenv(data.DATA_DIR_ENV_VAR, str(tmp_path))
    assert cli.main(["data", "verify"]) == 1
    assert "no MANIFEST.json in the data folder" in capsys.readouterr().err


def test_verify_rejects_unknown_name(capsys):
    assert cli.main(["data", "verify", "cifar"]) == 2
    assert "unknown data set cifar" in capsys.readouterr().err


def test_list_shows_size_on_disk(fetched_mnist, capsys):
    data.clear_cache()
    assert cli.main(["data", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    mnist = next(line for line in lines if line.startswith("mnist "))
    expected = manifest.format_bytes(manifest.disk_bytes("mnist", fetched_mnist))
    assert mnist.endswith(f"{expected} on disk")


def test_list_shows_damaged(fetched_mnist, capsys):
    data.clear_cache()
    images = fetched_mnist / "MNIST" / "raw" / "train-images-idx3-ubyte"
    images.write_bytes(images.read_bytes()[:1000])
    assert cli.main(["data", "list"]) == 0
    assert "mnist          damaged, " in capsys.readouterr().out


@pytest.fixture
def dead_run_history(tmp_path):
    """A saved history whose embeddings were all 0 from the first epoch, as a dead final ReLU gives."""
    history = History(config={"loss": "contrastive", "margin": 1.0, "initial_weight_norm": 21.0})
    for epoch in (1, 2, 3):
        history.append({"epoch": epoch, "train_loss": 0.5, "train_auc": 0.5, "val_unseen_auc": 0.5,
                        "val_unseen_pos_dist": 3e-5, "val_unseen_neg_dist": 3e-5, "val_unseen_emb_norm": 0.0,
                        "dead_units_layer_max": 1.0, "grad_norm": 0.0, "weight_norm": 21.0})
    return history.save(tmp_path / "history.json")


def test_diagnose_prints_report(dead_run_history, capsys):
    assert cli.main(["diagnose", str(dead_run_history)]) == 0
    assert "1. dead_units" in capsys.readouterr().out


def test_diagnose_writes_figure(dead_run_history, tmp_path):
    figure = tmp_path / "evidence.png"
    cli.main(["diagnose", str(dead_run_history), "--figure", str(figure)])
    assert figure.stat().st_size > 0


def test_diagnose_invalid_json(tmp_path, capsys):
    path = tmp_path / "history.json"
    path.write_text('{"rows": [')
    assert cli.main(["diagnose", str(path)]) == 2
    assert "is not valid JSON" in capsys.readouterr().err


def test_diagnose_json_that_is_not_history(tmp_path, capsys):
    path = tmp_path / "results.json"
    path.write_text('{"status": "passed"}')
    assert cli.main(["diagnose", str(path)]) == 2
    assert "is not a history" in capsys.readouterr().err


def test_diagnose_missing_file(tmp_path, capsys):
    assert cli.main(["diagnose", str(tmp_path / "missing.json")]) == 2
    assert "not found" in capsys.readouterr().err


def test_diagnose_unknown_figure_format(dead_run_history, tmp_path, capsys):
    assert cli.main(["diagnose", str(dead_run_history), "--figure", str(tmp_path / "evidence.xyz")]) == 2
    assert "could not be saved" in capsys.readouterr().err
