import pytest

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


def test_env_overrides_profile_and_results(tmp_path, monkeypatch):
    monkeypatch.setenv(PROFILE_ENV_VAR, "smoke")
    monkeypatch.setenv(session.RESULTS_ENV_VAR, str(tmp_path / "elsewhere"))
    lab = session.start("00_demo", "full", "digits", "cpu", 0, tmp_path)
    assert lab.profile.name == "smoke"
    assert lab.recorder.path.parent == tmp_path / "elsewhere"


@pytest.mark.parametrize("arguments, message", [
    (("00_demo", "quick", "cifar10", "cpu", 0), "Unknown dataset 'cifar10'"),
    (("00_demo", "quick", "digits", "cpu", -1), "SEED must be a non-negative integer"),
    (("00_demo", "fast", "digits", "cpu", 0), "Unknown profile 'fast'"),
    (("00_demo", "quick", "digits", "tpu", 0), "Unknown device 'tpu'"),
])
def test_start_rejects(arguments, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        session.start(*arguments, tmp_path)
