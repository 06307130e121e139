import pytest

from labutils.profiles import PROFILE_ENV_VAR, PROFILES, get_profile


def test_profiles_grow():
    smoke, quick, full = (PROFILES[name] for name in ("smoke", "quick", "full"))
    assert smoke.epochs <= quick.epochs <= full.epochs
    assert smoke.pairs_per_epoch <= quick.pairs_per_epoch <= full.pairs_per_epoch


def test_smoke_makes_no_claims():
    assert not PROFILES["smoke"].claims


def test_env_overrides_name(monkeypatch):
    monkeypatch.setenv(PROFILE_ENV_VAR, "smoke")
    assert get_profile("full").name == "smoke"


def test_unknown_profile(monkeypatch):
    monkeypatch.delenv(PROFILE_ENV_VAR, raising=False)
    with pytest.raises(ValueError, match="smoke, quick, full"):
        get_profile("fast")


def test_seeds_consecutive():
    assert PROFILES["full"].seeds(5) == [5, 6, 7]
