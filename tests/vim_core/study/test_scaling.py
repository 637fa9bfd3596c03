"""The compute-scaling fit and report: a power law plus a floor recovered from its own points, a crossing
found where two curves cross, and the tokenizer-scaling study's report built from runs of the tokenizer
alone (the baseline's VIM metrics, which `dvc exp show` still lists, ignored)."""

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from vim_core.config.study import load_study
from vim_core.study.render import write_report
from vim_core.study.scaling import analyse, crossings, first_crossing, power_floor

REPO = Path(__file__).resolve().parents[3]
BUDGETS = [0.25, 0.5, 1.0, 2.0, 4.0]


def _series(a: float, b: float, floor: float, noise: float, rng, seeds=(1, 1, 2, 1, 2)) -> list[dict]:
    out = []
    for m, n in zip(BUDGETS, seeds, strict=True):
        x = [m * 1e13] * n
        y = [float(power_floor(m, a, b, floor, 1.0) + rng.normal(0, noise)) for _ in range(n)]
        out.append({"arm": f"x{m:g}", "x": x, "y": y})
    return out


def test_the_fit_recovers_a_power_law_with_a_floor():
    rng = np.random.default_rng(0)
    got = analyse({"a": _series(6.0, 0.7, 4.0, 0.05, rng), "b": _series(3.0, 0.7, 2.0, 0.05, rng)}, draws=200)
    fit = got["series"]["a"]["fit"]
    assert fit["b"] == pytest.approx(0.7, abs=0.15) and fit["floor"] == pytest.approx(4.0, abs=0.4)
    lo, hi = fit["ci95"]["floor"]
    assert lo <= fit["floor"] <= hi and hi - lo < 2.0
    # b leads (lower) everywhere; its lead shrinks from 5 at 0.25x to 2.4 at 4x, and the curves never cross.
    t = got["trend"]
    assert t["leader_at_x_min"] == "b" and t["lead_change"] < 0
    assert t["verdict"] == "the lead shrinks with compute"
    assert t["crossing"]["fitted_at"] is None and t["crossing"]["bootstrap_share"] < 0.05
    assert [g["ci"] is None for g in got["gap"]] == [True, True, False, True, False]
    # The fitted gap and ratio at each budget: a at 4x is 4 + 6 * 4**-0.7 = 6.27, b is 2 + 3 * 4**-0.7 = 3.14.
    at_4x = t["fitted_at_budgets"][-1]
    assert at_4x["x"] == pytest.approx(4e13) and at_4x["gap"] == pytest.approx(3.14, abs=0.2)
    assert at_4x["ratio"] == pytest.approx(2.0, abs=0.1) and at_4x["ratio_ci95"][0] > 1.5
    assert t["crossing"]["all_fitted"] == []


def test_curves_that_cross_give_where():
    grid = np.geomspace(1.0, 100.0, 400)
    gap = power_floor(grid, 10.0, 0.5, 1.0, 1.0) - power_floor(grid, 5.0, 0.5, 3.0, 1.0)  # equal at x = 6.25
    assert first_crossing(grid, gap) == pytest.approx(6.25, rel=0.02)
    assert first_crossing(grid, np.ones_like(grid)) is None
    # A curve that dips under the other and back above: both crossings are listed, in order.
    twice = (np.log(grid) - np.log(3.0)) * (np.log(grid) - np.log(30.0))
    got = crossings(grid, twice)
    assert (
        len(got) == 2 and got[0] == pytest.approx(3.0, rel=0.02) and got[1] == pytest.approx(30.0, rel=0.02)
    )


def _exps(spec, rng) -> dict:
    truth = {"vit": (8.0, 0.6, 5.0), "cnn": (6.0, 0.6, 2.0)}
    exps = {}
    for run in spec.runs():
        arch, tag = run.arm.split("-")[0], run.arm.rsplit("-", 1)[1]
        m = float(tag[1:].replace("_", "."))
        rfid = float(power_floor(m, *truth[arch], 1.0) + rng.normal(0, 0.1))
        exps[run.name] = {
            "params": {},
            "metrics": {
                "metrics/tokenizer.json": {
                    "train_flops": m * 1.15e13,
                    "steps": 600 * m,
                    "codebook_perplexity": 70,
                    "encode_images_per_s": 3000,
                    "decode_images_per_s": 3600,
                    "best_val_step": 600 * m,
                    "train_seconds": 120 * m,
                },
                "metrics/tokenizer_eval.json": {
                    "rfid_domain": rfid,
                    "psnr": 24.0,
                    "ssim": 0.86,
                    "codebook_usage": 0.99,
                },
                # the baseline's files, which a tokenizer-only run did not write
                "metrics/transformer.json": {"train_flops": 9.9e14, "steps": 1000},
                "metrics/eval.json": {"chosen_cfg_scale": 1.5, "rfid_domain": 7.1},
            },
        }
    return exps


def test_the_tokenizer_scaling_report(tmp_path: Path):
    spec = load_study(REPO / "studies" / "tokenizer_scaling.yaml", REPO / "params.yaml")
    assert len(spec.runs()) == 18 and all(
        r.stages == ["train_tokenizer", "evaluate_tokenizer"] for r in spec.runs()
    )
    report = write_report(
        spec, _exps(spec, np.random.default_rng(1)), "studies/tokenizer_scaling.yaml", tmp_path
    )
    vit = report["arms"]["vit-x4"]
    assert vit["seeds"] == [0, 1, 2] and vit["scaling_x"]["mean"] == pytest.approx(4 * 1.15e13)
    assert "transformer_train_flops" not in vit["budget"] and vit["sampling"]["per_seed"] == {}
    assert 7 < vit["metrics"]["rfid_domain"]["mean"] < 9  # from tokenizer_eval.json, not eval.json's 7.1
    sc = report["scaling"]
    assert set(sc["series"]) == {"vit", "cnn-remedies"}
    assert sc["trend"]["leader_at_x_min"] == "cnn-remedies" and sc["trend"]["crossing"]["fitted_at"] is None
    md = (tmp_path / "tokenizer_scaling.md").read_text()
    assert "**Verdict: " in md and "The fitted curves do not cross from" in md
    assert Image.open(tmp_path / "tokenizer_scaling.png").size[0] > 600
