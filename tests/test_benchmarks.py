"""Arithmetic the benchmark scripts report (their runs are measurements, not tests)."""

from benchmarks.pipeline_e2e import items_for_ratio


def test_items_for_ratio_is_the_smallest_archive_reaching_the_target():
    alone, steady, startup = 12_600.0, 11_000.0, 26.0
    n = items_for_ratio(0.8, alone, steady, startup)

    def e2e(items):
        return items / (startup + items / steady) / alone

    assert e2e(n) >= 0.8 > e2e(n - 1)
    assert items_for_ratio(0.8, alone, 0.8 * alone, startup) is None  # steady rate too low
    assert items_for_ratio(0.8, alone, steady, 0.0) == 0


def test_model_step_bench_runs_every_variant():
    """The GPU run's `--pipeline-steps` part, on the CPU with the tiny models: each variant
    gives a rate (a crash here would cost a GPU session its measurement)."""
    from benchmarks.model_throughput import STEP_VARIANTS, bench_step

    for bucket, passes, ragged in STEP_VARIANTS:
        r = bench_step("deepheme-tiny", 8, 2, bucket, passes, ragged)
        assert r["rows_per_s"] > 0 and r["passes_per_call"] == passes
    assert bench_step("dinov2-tiny", 4, 1, 32, 4)["rows_per_s"] > 0
