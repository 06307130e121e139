"""The benchmark's plumbing on a tiny job; its figures are measured by hand on a quiet machine, never asserted."""

import pytest

from labutils import bench
from labutils.__main__ import main


@pytest.fixture(scope="module")
def figures():
    return bench.benchmark(pairs_per_epoch=128, epochs=1, capacity="small")


def test_both_variants_train_the_same_job(figures):
    jobs = [(figures[v]["capacity"], figures[v]["pairs_per_epoch"], figures[v]["job"]) for v in ("naive", "fast")]
    assert jobs == [("small", 128, "augmented")] * 2


def test_speedup_is_ratio_of_throughputs(figures):
    ratio = figures["fast"]["images_per_second"] / figures["naive"]["images_per_second"]
    assert figures["speedup"] == pytest.approx(ratio)


def test_fraction_of_peak_is_consistent(figures):
    assert figures["fraction_of_peak"] == pytest.approx(figures["fast_gflops"] / figures["matmul_peak_gflops"])


def test_report_names_encoder_and_ratio(figures):
    report = bench.format_benchmark(figures)
    assert "small encoder, 128 pairs per epoch, job augmented" in report
    assert "fast / naive:" in report


def test_flops_grow_with_capacity():
    assert bench.training_flops_per_image("classic") > 5 * bench.training_flops_per_image("small")


def test_cli_rejects_fewer_pairs_than_a_batch(capsys):
    assert main(["bench", "--pairs", "10"]) == 2
    assert "--pairs must be at least 128" in capsys.readouterr().err


def test_naive_variant_encodes_every_image(figures):
    assert figures["naive"]["encoder_images_per_second"] == pytest.approx(figures["naive"]["images_per_second"])


def test_few_images_job_embeds_distinct_images():
    result = bench.run_fast(pairs_per_epoch=256, epochs=1, job="few-images")
    # 35 training images fill the 256 rows of a batch, so the encoder embeds at most 35 images per step.
    assert result.job == "few-images"
    assert result.encoder_images_per_second / result.images_per_second <= 35 / 256 + 1e-9


def test_unknown_job_is_named():
    with pytest.raises(ValueError, match="'tiny'.*augmented, few-images"):
        bench.benchmark(pairs_per_epoch=128, epochs=1, job="tiny")
