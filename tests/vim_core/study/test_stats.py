"""The study's statistics on hand-computed examples: Welch's interval, verdicts, 1-seed arms, arm pairs."""

import math

import pytest

from vim_core.study.stats import compare_arms, pairs, summarize, t_quantile, verdict, welch_interval


def test_welch_interval_against_a_hand_computed_example():
    # a = [1, 2, 3], b = [4, 5, 6]: sd 1 each, se^2 = 1/3 + 1/3, df = (2/3)^2 / (2 (1/3)^2 / 2) = 4,
    # t(0.975, 4) = 2.776445 (printed tables), half-width 2.776445 * sqrt(2/3) = 2.266951.
    out = welch_interval([1.0, 2.0, 3.0], [4.0, 5.0, 6.0])
    assert out["diff"] == -3.0 and out["df"] == pytest.approx(4.0)
    assert out["ci"] == pytest.approx([-3 - 2.266951, -3 + 2.266951], abs=1e-5)
    assert t_quantile(0.975, 4) == pytest.approx(2.776445, abs=1e-6)


def test_welch_df_with_unequal_variances_and_counts():
    # a = [1, 2, 3, 4] (var 5/3), b = [2, 6] (var 8): va = 5/12, vb = 4,
    # df = (5/12 + 4)^2 / ((5/12)^2 / 3 + 4^2 / 1) = 19.5069 / 16.0579 = 1.21479.
    out = welch_interval([1.0, 2.0, 3.0, 4.0], [2.0, 6.0])
    assert out["df"] == pytest.approx(1.21479, abs=1e-4)
    assert out["se"] == pytest.approx(math.sqrt(5 / 12 + 4))
    half = (out["ci"][1] - out["ci"][0]) / 2
    assert half == pytest.approx(t_quantile(0.975, out["df"]) * out["se"])
    assert out["ci"][0] < 0 < out["ci"][1]


def test_summary_uses_the_sample_sd_and_none_for_one_seed():
    s = summarize([1.0, 2.0, 3.0, 4.0])
    assert s["mean"] == 2.5 and s["sd"] == pytest.approx(math.sqrt(5 / 3)) and s["n"] == 4
    assert summarize([7.0]) == {"mean": 7.0, "sd": None, "n": 1, "values": [7.0]}


def test_verdicts_follow_the_interval_and_the_direction():
    apart = welch_interval([10.0, 11.0, 12.0, 11.0], [20.0, 21.0, 22.0, 21.0])  # a lower, CI < 0
    assert verdict("vit", "cnn", apart, "lower") == "vit better"
    assert verdict("vit", "cnn", apart, "higher") == "cnn better"
    assert verdict("vit", "cnn", apart, None) is None
    close = welch_interval([10.0, 14.0, 12.0, 11.0], [12.0, 9.0, 13.0, 11.0])
    assert close["ci"][0] < 0 < close["ci"][1]
    assert verdict("vit", "cnn", close, "lower") == "not distinguishable at 4 seeds"
    uneven = welch_interval([10.0, 14.0, 12.0, 11.0], [12.0, 9.0])
    assert verdict("vit", "v", uneven, "lower") == "not distinguishable at 4 (vit) and 2 (v) seeds"
    # No spread in either arm: the interval is the difference itself, and it decides.
    flat = welch_interval([1.0, 1.0], [2.0, 2.0])
    assert flat["ci"] == [-1.0, -1.0] and verdict("a", "b", flat, "higher") == "b better"


def test_an_arm_with_one_seed_has_no_interval():
    one = welch_interval([3.0], [1.0, 2.0, 3.0])
    assert one["ci"] is None and one["diff"] == 1.0
    assert verdict("a", "b", one, "lower") == "not distinguishable at 1 (a) and 3 (b) seeds"
    row = compare_arms("a", "b", {"fid": [3.0]}, {"fid": [1.0, 2.0, 3.0]}, {"fid": "lower"})["fid"]
    assert row["ci95"] is None and row["ci_note"] == "n/a (1 seed)" and row["n_a"] == 1


def test_more_than_two_compared_arms_pair_the_first_with_each_other():
    assert pairs(["vit", "cnn-remedies", "vqgan-vanilla"]) == [
        ("vit", "cnn-remedies"),
        ("vit", "vqgan-vanilla"),
    ]
    assert pairs(["a", "b"]) == [("a", "b")] and pairs(["a"]) == []


def test_compare_arms_skips_metrics_an_arm_lacks():
    out = compare_arms(
        "a", "b", {"x": [1.0, 2.0], "y": [1.0, 1.5]}, {"x": [5.0, 6.0]}, {"x": "higher", "y": "lower"}
    )
    assert set(out) == {"x"} and out["x"]["verdict"] == "b better" and out["x"]["diff"] == -4.0
