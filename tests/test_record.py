import json

import pytest

from labutils.record import ClaimFailed, Recorder, load_results


def test_metric_saved(tmp_path):
    recorder = Recorder("00_demo", tmp_path)
    recorder.metric("auc", 0.91, claim="the encoder separates digits")
    saved = load_results(tmp_path / "00_demo.json")
    assert saved["metrics"] == [{"name": "auc", "value": 0.91, "claim": "the encoder separates digits",
                                 "timing": False}]


def test_passing_claim_recorded(tmp_path):
    recorder = Recorder("00_demo", tmp_path)
    assert recorder.check("auc", 0.9, ">=", 0.8, claim="AUC is high")
    claim = load_results(recorder.path)["claims"][0]
    assert claim["holds"] is True


def test_failing_claim_raises_and_is_saved(tmp_path):
    recorder = Recorder("00_demo", tmp_path)
    with pytest.raises(ClaimFailed, match="AUC is high"):
        recorder.check("auc", 0.6, ">=", 0.8, claim="AUC is high")
    assert load_results(recorder.path)["claims"][0]["holds"] is False


def test_unenforced_claim_does_not_raise(tmp_path):
    recorder = Recorder("00_demo", tmp_path, enforce_claims=False)
    assert not recorder.check("auc", 0.6, ">=", 0.8, claim="AUC is high")


def test_nan_claim_does_not_hold(tmp_path):
    recorder = Recorder("00_demo", tmp_path, enforce_claims=False)
    assert not recorder.check("loss", float("nan"), "<", 1.0, claim="loss is small")


def test_rerun_keeps_latest_value(tmp_path):
    recorder = Recorder("00_demo", tmp_path)
    recorder.metric("auc", 0.5)
    recorder.metric("auc", 0.7)
    assert [m["value"] for m in load_results(recorder.path)["metrics"]] == [0.7]


def test_unknown_comparison(tmp_path):
    with pytest.raises(ValueError, match="Unknown comparison"):
        Recorder("00_demo", tmp_path).check("x", 1, "=>", 0, claim="")


def test_non_numeric_metric(tmp_path):
    with pytest.raises(TypeError, match="'auc' must be a number"):
        Recorder("00_demo", tmp_path).metric("auc", "high")


def test_results_dir_not_writable(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(ValueError, match="RESULTS_DIR"):
        Recorder("00_demo", blocker / "results")


def test_figure_listed(tmp_path):
    import matplotlib

    matplotlib.use("agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots()
    ax.plot([0, 1])
    recorder = Recorder("00_demo", tmp_path)
    path = recorder.figure(fig, "curve")
    assert path.exists()
    assert json.loads(recorder.path.read_text())["figures"] == ["figures/00_demo_curve.png"]


def test_metric_spread_saved(tmp_path):
    recorder = Recorder("00_demo", tmp_path)
    recorder.metric("auc", 0.8, spread=0.02)
    assert load_results(recorder.path)["metrics"][0]["spread"] == 0.02


def test_check_result_reads_as_sentence(tmp_path):
    result = Recorder("00_demo", tmp_path).check("auc", 0.9, ">=", 0.8, claim="AUC is high")
    assert repr(result) == "Claim 'auc' holds: 0.9 >= 0.8"
