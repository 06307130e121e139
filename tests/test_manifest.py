import hashlib
import json

import pytest

from labutils import manifest
from test_data import write_idx_dataset, write_omniglot


@pytest.fixture
def recorded_mnist(tmp_path):
    """A data folder with MNIST files in the real IDX format and a manifest that records them."""
    write_idx_dataset(tmp_path, "MNIST")
    manifest.record(["mnist"], root=tmp_path)
    return tmp_path


def raw(root, name="train-images-idx3-ubyte"):
    return root / "MNIST" / "raw" / name


def test_record_lists_every_file(recorded_mnist):
    entries = manifest.load_manifest(recorded_mnist)["datasets"]["mnist"]["files"]
    assert [entry["path"] for entry in entries] == [
        "MNIST/raw/t10k-images-idx3-ubyte", "MNIST/raw/t10k-labels-idx1-ubyte",
        "MNIST/raw/train-images-idx3-ubyte", "MNIST/raw/train-labels-idx1-ubyte"]


def test_record_stores_size_and_hash(recorded_mnist):
    entry = manifest.load_manifest(recorded_mnist)["datasets"]["mnist"]["files"][2]
    content = raw(recorded_mnist).read_bytes()
    assert entry["size"] == len(content)
    assert entry["sha256"] == hashlib.sha256(content).hexdigest()


def test_record_keeps_other_datasets(recorded_mnist):
    write_idx_dataset(recorded_mnist, "KMNIST")
    manifest.record(["kmnist"], root=recorded_mnist)
    assert set(manifest.load_manifest(recorded_mnist)["datasets"]) == {"mnist", "kmnist"}


def test_record_skips_hidden_files(tmp_path):
    write_omniglot(tmp_path)
    (tmp_path / "omniglot-py" / ".DS_Store").write_text("finder")
    manifest.record(["omniglot"], root=tmp_path)
    paths = [entry["path"] for entry in manifest.load_manifest(tmp_path)["datasets"]["omniglot"]["files"]]
    assert len(paths) == 10
    assert not [path for path in paths if ".DS_Store" in path]


def test_verify_clean_copy(recorded_mnist):
    assert manifest.verify(recorded_mnist) == []


def test_verify_reports_missing(recorded_mnist):
    raw(recorded_mnist).unlink()
    problems = manifest.verify(recorded_mnist)
    assert [(problem.kind, problem.path) for problem in problems] == [("missing", "MNIST/raw/train-images-idx3-ubyte")]


def test_verify_reports_truncated(recorded_mnist):
    content = raw(recorded_mnist).read_bytes()
    raw(recorded_mnist).write_bytes(content[:1000])
    [problem] = manifest.verify(recorded_mnist)
    assert problem.kind == "truncated"
    assert problem.detail == f"truncated, 1,000 of {len(content):,} bytes"


def test_verify_reports_corrupted(recorded_mnist):
    content = bytearray(raw(recorded_mnist).read_bytes())
    content[500] ^= 0xFF  # one flipped byte keeps the size
    raw(recorded_mnist).write_bytes(bytes(content))
    [problem] = manifest.verify(recorded_mnist)
    assert problem.kind == "corrupted"


def test_verify_reports_grown_file(recorded_mnist):
    with raw(recorded_mnist).open("ab") as handle:
        handle.write(b"extra")
    [problem] = manifest.verify(recorded_mnist)
    assert problem.kind == "size"


def test_verify_reports_unrecorded(recorded_mnist):
    write_idx_dataset(recorded_mnist, "KMNIST")
    [problem] = manifest.verify(recorded_mnist)
    assert (problem.dataset, problem.kind, problem.path) == ("kmnist", "unrecorded", "KMNIST")


def test_verify_selected_names_only(recorded_mnist):
    raw(recorded_mnist).unlink()
    write_idx_dataset(recorded_mnist, "KMNIST")
    assert [problem.dataset for problem in manifest.verify(recorded_mnist, names=["kmnist"])] == ["kmnist"]


def test_invalid_manifest_rejected(recorded_mnist):
    manifest.manifest_path(recorded_mnist).write_text('{"datasets": {"mnist": ')  # an interrupted copy
    with pytest.raises(ValueError, match="MANIFEST.json is not valid JSON"):
        manifest.verify(recorded_mnist)


def test_foreign_manifest_rejected(tmp_path):
    manifest.manifest_path(tmp_path).write_text(json.dumps(["not", "a", "manifest"]))
    with pytest.raises(ValueError, match="not a labutils manifest"):
        manifest.load_manifest(tmp_path)


def test_idx_fix_fetches_again(recorded_mnist):
    raw(recorded_mnist).write_bytes(b"")
    [problem] = manifest.verify(recorded_mnist)
    line = problem.describe()
    assert line.startswith("MNIST/raw/train-images-idx3-ubyte: truncated, 0 of ")
    assert "delete it if present and run `python -m labutils data fetch mnist` while online" in line
    assert "copy it again from the instructor's machine" in line


def test_omniglot_fix_names_set_folder(tmp_path):
    write_omniglot(tmp_path)
    manifest.record(["omniglot"], root=tmp_path)
    drawing = sorted((tmp_path / "omniglot-py" / "images_evaluation").rglob("*.png"))[0]
    drawing.write_bytes(drawing.read_bytes()[:40])
    [problem] = manifest.verify(tmp_path)
    assert "delete the folder omniglot-py/images_evaluation and run `python -m labutils data fetch omniglot`" \
           in problem.describe()


def test_disk_bytes_sums_files(recorded_mnist):
    expected = sum(path.stat().st_size for path in (recorded_mnist / "MNIST" / "raw").iterdir())
    assert manifest.disk_bytes("mnist", recorded_mnist) == expected


def test_disk_bytes_zero_when_absent(tmp_path):
    assert manifest.disk_bytes("kmnist", tmp_path) == 0


@pytest.mark.parametrize("size, text", [(0, "0 B"), (999, "999 B"), (1500, "1.5 kB"), (55_123_456, "55.1 MB"),
                                        (2_000_000_000, "2.0 GB")])
def test_format_bytes(size, text):
    assert manifest.format_bytes(size) == text
