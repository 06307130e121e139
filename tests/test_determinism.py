"""Same seed, profile, data set and device on the CPU: the recorded results repeat bit for bit."""

from labutils.runner import run_course


def deterministic_part(results: dict) -> list:
    entry = results["notebooks"][0]
    metrics = [(m["name"], m["value"]) for m in entry["metrics"] if not m.get("timing")]
    claims = [(c["name"], c["value"], c["holds"]) for c in entry["claims"]]
    return [entry["status"], metrics, claims]


def test_training_notebook_repeats(tmp_path):
    runs = [run_course(profile="smoke", device="cpu", seed=0, notebooks=["02"], out=tmp_path / f"run{i}")
            for i in range(2)]
    first, second = (deterministic_part(results) for results in runs)
    assert first[0] == "passed"
    assert len(first[1]) > 10
    assert first == second
