import os

import pytest
import torch

from labutils import session
from labutils.profiles import PROFILE_ENV_VAR


@pytest.fixture(autouse=True)
def no_overrides(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV_VAR, raising=False)
    monkeypatch.delenv(session.RESULTS_ENV_VAR, raising=False)


def test_start_prints_choices(tmp_path, capsys):
    lab = session.start("00_demo", "quick", "digits", "cpu", 3, tmp_path)
    output = capsys.readouterr().out
    assert "Profile quick, dataset digits, seed 3" in output
    assert "Device: cpu (requested)" in output
    assert lab.recorder.path == tmp_path / "00_demo.json"


def test_smoke_does_not_enforce_claims(tmp_path):
    assert not session.start("00_demo", "smoke", "digits", "cpu", 0, tmp_path).recorder.enforce_claims


def test_claims_enforced_on_digits_only(tmp_path, capsys):
    assert session.start("00_demo", "quick", "digits", "cpu", 0, tmp_path).recorder.enforce_claims
    lab = session.start("00_demo", "quick", "omniglot", "cpu", 0, tmp_path)
    assert not lab.recorder.enforce_claims
    assert "Claims were measured on digits: on omniglot they are recorded" in capsys.readouterr().out
    lab.recorder.check("auc_above_chance", 0.4, ">", 0.5, claim="AUC beats chance.")  # recorded, no exception
    assert lab.recorder.data["claims"][-1]["holds"] is False


def test_env_overrides_profile_and_results(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV_VAR, "smoke")
    monkeypatch.setenv(session.RESULTS_ENV_VAR, str(tmp_path / "elsewhere"))
    lab = session.start("00_demo", "full", "digits", "cpu", 0, tmp_path)
    assert lab.profile.name == "smoke"
    assert lab.recorder.path.parent == tmp_path / "elsewhere"
    assert "Profile smoke, dataset digits, seed 0 ($LABUTILS_PROFILE overrides PROFILE = 'full')" in \
        capsys.readouterr().out


def test_env_same_profile_not_reported(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(PROFILE_ENV_VAR, "quick")
    session.start("00_demo", "quick", "digits", "cpu", 0, tmp_path)
    assert "overrides" not in capsys.readouterr().out


@pytest.mark.parametrize("arguments, message", [
    (("00_demo", "quick", "cifar10", "cpu", 0), "Unknown dataset 'cifar10'"),
    (("00_demo", "quick", "digits", "cpu", -1), "SEED must be a non-negative integer"),
    (("00_demo", "quick", "digits", "cpu", True), "SEED must be a non-negative integer"),
    (("00_demo", "fast", "digits", "cpu", 0), "Unknown profile 'fast'"),
    (("00_demo", "quick", "digits", "tpu", 0), "Unknown device 'tpu'"),
])
def test_start_rejects(arguments, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        session.start(*arguments, tmp_path)


@pytest.fixture
def fallback_unset():
    """Unset $PYTORCH_ENABLE_MPS_FALLBACK for one test and restore it afterwards, since session.start sets it."""
    saved = os.environ.pop(session.MPS_FALLBACK_ENV_VAR, None)
    yield
    os.environ.pop(session.MPS_FALLBACK_ENV_VAR, None)
    if saved is not None:
        os.environ[session.MPS_FALLBACK_ENV_VAR] = saved


@pytest.fixture
def on_mps(monkeypatch, fallback_unset):
    """Make session.start resolve every device to Apple MPS, as on a Mac without CUDA."""
    monkeypatch.setattr(session, "pick_device", lambda name: torch.device("mps"))
    monkeypatch.setattr(session, "describe_device", lambda name: "mps (auto: no CUDA, Apple MPS is available)")
    monkeypatch.setattr(session, "_fallback_set_here", False)


def test_mps_sets_fallback_when_unset(on_mps, tmp_path):
    session.start("00_demo", "quick", "digits", "auto", 0, tmp_path)
    assert os.environ[session.MPS_FALLBACK_ENV_VAR] == "1"


def test_mps_unset_fallback_reported_off(on_mps, tmp_path, capsys):
    session.start("00_demo", "quick", "digits", "auto", 0, tmp_path)
    session.start("00_demo", "quick", "digits", "auto", 0, tmp_path)  # a rerun of the cell
    lines = [line for line in capsys.readouterr().out.splitlines() if line.startswith("Device:")]
    assert len(lines) == 2
    for line in lines:
        assert line.startswith("Device: mps (auto: no CUDA, Apple MPS is available); CPU fallback")
        assert "is off in this kernel" in line
        assert "make lab" in line


def test_mps_fallback_preset_reported_on(on_mps, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(session.MPS_FALLBACK_ENV_VAR, "1")
    session.start("00_demo", "quick", "digits", "mps", 0, tmp_path)
    assert "operators MPS lacks run on the CPU (PYTORCH_ENABLE_MPS_FALLBACK=1)" in capsys.readouterr().out


def test_mps_fallback_zero_kept(on_mps, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv(session.MPS_FALLBACK_ENV_VAR, "0")
    session.start("00_demo", "quick", "digits", "mps", 0, tmp_path)
    assert os.environ[session.MPS_FALLBACK_ENV_VAR] == "0"
    assert "operators MPS lacks raise NotImplementedError" in capsys.readouterr().out


def test_cpu_leaves_fallback_unset(fallback_unset, tmp_path, capsys):
    session.start("00_demo", "quick", "digits", "cpu", 0, tmp_path)
    assert session.MPS_FALLBACK_ENV_VAR not in os.environ
    assert "operators MPS lacks" not in capsys.readouterr().out
