"""The study report on given experiment results: mean and spread per arm, curves over an index, files."""

from pathlib import Path

import pytest
from PIL import Image

from flows.study import StudySpec, build_report, curves, render_curves, render_markdown

SPEC = StudySpec.model_validate(
    {
        "name": "curvy",
        "title": "Curves",
        "seeds": [0, 1],
        "compare": ["a", "b"],
        "arms": {"a": {}, "b": {}},
        "metrics": [
            {"key": "probe_accuracy", "source": "eval", "better": "higher"},
            *({"key": f"acc_by_block.{i}", "source": "eval", "better": "higher"} for i in (0, 1, 2)),
        ],
    }
)


def _exp(by_block: list[float]) -> dict:
    eval_json = {
        "probe_accuracy": max(by_block),
        "acc_by_block": {str(i): v for i, v in enumerate(by_block)},
    }  # as JSON has it
    return {"metrics": {"metrics/eval.json": eval_json}}


def test_report_groups_indexed_metrics_into_curves(tmp_path: Path):
    exps = {
        "curvy-a-s0": _exp([0.5, 0.7, 0.6]),
        "curvy-a-s1": _exp([0.5, 0.8, 0.6]),
        "curvy-b-s0": _exp([0.4, 0.5, 0.9]),
    }
    assert list(curves(SPEC)) == ["acc_by_block"]
    assert [i for i, _ in curves(SPEC)["acc_by_block"]] == [0, 1, 2]
    report = build_report(SPEC, exps, "studies/curvy.yaml", partial=True, cwd=tmp_path)
    assert report["missing_runs"] == ["curvy-b-s1"]
    a1 = report["arms"]["a"]["metrics"]["acc_by_block.1"]
    assert a1["mean"] == pytest.approx(0.75) and a1["std"] == pytest.approx(0.0707, abs=1e-4)
    assert a1["values"] == [0.7, 0.8]
    assert report["comparison"]["probe_accuracy"]["better_mean"] == "b"
    assert "| acc_by_block.2 (higher is better) | 0.600 ± 0.000 (n=2) | 0.900 (n=1) |" in render_markdown(
        report, SPEC
    )

    out = tmp_path / "curvy_curves.png"
    assert render_curves(report, SPEC, out)
    assert Image.open(out).size[0] > 300 and not list(tmp_path.glob("*.tmp.png"))


def test_no_curve_without_indexed_metrics(tmp_path: Path):
    flat = SPEC.model_copy(update={"metrics": SPEC.metrics[:1]})
    report = build_report(flat, {"curvy-a-s0": _exp([0.5])}, "x.yaml", partial=True, cwd=tmp_path)
    assert not render_curves(report, flat, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()
