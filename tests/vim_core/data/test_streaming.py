import pytest

from benchmarks.prepare_memory import measure


@pytest.mark.slow
def test_prepare_memory_stays_flat_at_10x(tmp_path):
    one = measure(500, tmp_path)
    ten = measure(5000, tmp_path)
    assert ten["images"] == 10 * one["images"]
    assert ten["peak_rss_mb"] < 1.5 * one["peak_rss_mb"]
