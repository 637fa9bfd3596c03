"""The study report on given experiment results: mean and sd per arm, intervals and verdicts, "-" for an
unconditional arm's class-conditional rows, each run's sampling choice, curves, and the old reports kept."""

import json
from pathlib import Path

import pytest
from PIL import Image

from vim_core.config.study import StudySpec
from vim_core.errors import VimError
from vim_core.study.render import check_replaceable, curves, render_curves, render_markdown, write_report
from vim_core.study.report import build_report, flat_metrics

REPO = Path(__file__).resolve().parents[3]

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
    report = build_report(SPEC, exps, "studies/curvy.yaml", partial=True)
    assert report["missing_runs"] == ["curvy-b-s1"]
    a1 = report["arms"]["a"]["metrics"]["acc_by_block.1"]
    assert a1["mean"] == pytest.approx(0.75) and a1["sd"] == pytest.approx(0.0707, abs=1e-4)
    assert a1["values"] == [0.7, 0.8]
    # b has one seed: a difference, but no interval, so no arm is called better.
    row = report["comparison"]["pairs"][0]["metrics"]["probe_accuracy"]
    assert row["ci95"] is None and row["verdict"] == "not distinguishable at 2 (a) and 1 (b) seeds"
    md = render_markdown(report, SPEC)
    assert "| acc_by_block.2 (higher is better) | 0.600 ± 0.000 (n=2) | 0.900 (n=1) |" in md
    assert "| probe_accuracy | -0.150 | n/a (1 seed) | not distinguishable at 2 (a) and 1 (b) seeds |" in md

    out = tmp_path / "curvy_curves.png"
    assert render_curves(report, SPEC, out)
    assert Image.open(out).size[0] > 300 and not list(tmp_path.glob("*.tmp.png"))


def test_no_curve_without_indexed_metrics(tmp_path: Path):
    flat = SPEC.model_copy(update={"metrics": SPEC.metrics[:1]})
    report = build_report(flat, {"curvy-a-s0": _exp([0.5])}, "x.yaml", partial=True)
    assert not render_curves(report, flat, tmp_path / "none.png")
    assert not (tmp_path / "none.png").exists()


GEN = StudySpec.model_validate(
    {
        "name": "gen",
        "title": "Generation",
        "compare": ["vit", "cnn", "vanilla"],
        "arms": {
            "vit": {"seeds": [0, 1, 2, 3]},
            "cnn": {"seeds": [0, 1, 2, 3]},
            "vanilla": {"seeds": [0, 1]},
            "uncond": {"seeds": [0]},
        },
        "metrics": [
            {"key": "fid_domain", "source": "eval", "better": "lower", "conditional": True},
            {"key": "class_accuracy", "source": "eval", "better": "higher", "conditional": True},
            {"key": "fid_domain_uncond", "source": "eval", "better": "lower"},
            {"key": "chosen_cfg_scale", "source": "eval", "label": "chosen cfg scale", "conditional": True},
        ],
    }
)
COND = {"transformer": {"model": "tiny"}}  # the tiny preset: 10 classes
UNCOND = {"transformer": {"model": {"layers": 4, "heads": 4, "dim": 192, "mlp_dim": 768, "num_classes": 0}}}


def _gen(fid: float, acc: float, uncond: float, cfg: float, params: dict) -> dict:
    # An unconditional VIM's evaluate fills fid_domain with its unconditional samples: not a class-cond. number.
    eval_json = {
        "fid_domain": fid,
        "class_accuracy": acc,
        "fid_domain_uncond": uncond,
        "chosen_cfg_scale": cfg,
        "chosen_temperature": 1.0,
        "definitions": {"generation": {"settings": "picked on the val split"}},
    }
    return {"params": params, "metrics": {"metrics/eval.json": eval_json}}


def _gen_exps() -> dict:
    vit = [
        (20.0, 0.97, 150.0, 1.5),
        (22.0, 0.96, 160.0, 1.5),
        (21.0, 0.97, 155.0, 2.0),
        (23.0, 0.98, 158.0, 1.5),
    ]
    cnn = [
        (30.0, 0.95, 152.0, 2.0),
        (29.0, 0.96, 149.0, 2.0),
        (31.0, 0.95, 161.0, 3.0),
        (32.0, 0.94, 150.0, 2.0),
    ]
    exps = {f"gen-vit-s{i}": _gen(*v, COND) for i, v in enumerate(vit)}
    exps |= {f"gen-cnn-s{i}": _gen(*v, COND) for i, v in enumerate(cnn)}
    exps |= {f"gen-vanilla-s{i}": _gen(40.0 + i, 0.9, 170.0, 3.0, COND) for i in range(2)}
    exps["gen-uncond-s0"] = _gen(140.0, 0.3, 140.0, 1.0, UNCOND)
    return exps


def test_three_compared_arms_get_intervals_and_verdicts_against_the_first(tmp_path: Path):
    report = build_report(GEN, _gen_exps(), "studies/gen.yaml")
    assert [(p["a"], p["b"]) for p in report["comparison"]["pairs"]] == [("vit", "cnn"), ("vit", "vanilla")]
    assert report["comparison"]["method"].startswith("Welch")
    vit_cnn = report["comparison"]["pairs"][0]["metrics"]
    assert vit_cnn["fid_domain"]["verdict"] == "vit better" and vit_cnn["fid_domain"]["ci95"][1] < 0
    assert vit_cnn["fid_domain_uncond"]["verdict"] == "not distinguishable at 4 seeds"
    assert vit_cnn["chosen_cfg_scale"]["verdict"] is None  # no direction, no verdict
    vit_vanilla = report["comparison"]["pairs"][1]["metrics"]["fid_domain"]
    assert vit_vanilla["n_b"] == 2 and vit_vanilla["verdict"] == "vit better"
    assert report["arms"]["vit"]["sampling"]["per_seed"]["chosen_cfg_scale"] == [1.5, 1.5, 2.0, 1.5]
    assert report["arms"]["vit"]["sampling"]["chosen_on"] == ["picked on the val split"]
    md = render_markdown(report, GEN)
    assert "`vit` against `vanilla`:" in md and "| fid_domain (lower is better) |" in md
    assert "| vit | [0, 1, 2, 3] | 1.5, 1.5, 2, 1.5 | 1, 1, 1, 1 | picked on the val split |" in md
    assert "overlap" not in md and "**" not in md


def test_an_unconditional_arm_shows_dash_in_class_conditional_rows(tmp_path: Path):
    report = build_report(GEN, _gen_exps(), "studies/gen.yaml")
    uncond = report["arms"]["uncond"]
    assert uncond["conditional"] is False and report["arms"]["vit"]["conditional"] is True
    assert set(uncond["metrics"]) == {"fid_domain_uncond"}
    rows = {line.split(" | ")[0]: line for line in render_markdown(report, GEN).splitlines()}
    # columns: vit, cnn, vanilla, uncond
    assert rows["| fid_domain (lower is better)"].endswith("| 40.500 ± 0.707 (n=2) | - |")
    assert rows["| class_accuracy (higher is better)"].endswith(" | - |")
    assert rows["| chosen cfg scale"].endswith(" | - |")
    assert rows["| fid_domain_uncond (lower is better)"].endswith("| 170.0 ± 0.0 (n=2) | 140.0 (n=1) |")


def test_old_protocol_reports_are_not_overwritten_unless_asked(tmp_path: Path):
    old = {"study": "generation", "protocol": "old (pinned cfg 3, 2 seeds, range overlap)"}
    (tmp_path / "reports").mkdir()
    (tmp_path / "reports" / "gen.json").write_text(json.dumps(old))
    with pytest.raises(VimError, match="old protocol.*--replace-old"):
        check_replaceable(tmp_path / "reports", "gen", replace_old=False)
    check_replaceable(tmp_path / "reports", "gen", replace_old=True)
    check_replaceable(tmp_path / "reports", "other", replace_old=False)  # nothing there yet
    (tmp_path / "reports" / "new.json").write_text(json.dumps({"protocol": "val-tuned"}))
    check_replaceable(tmp_path / "reports", "new", replace_old=False)
    # Every committed study report is the new protocol's rerun, with no old-protocol banner.
    for study in ("generation", "tokenizer_scaling", "representation"):
        rerun = json.loads((REPO / "reports" / f"{study}.json").read_text())
        assert not rerun["protocol"].startswith("old"), study
        assert not (REPO / "reports" / f"{study}.md").read_text().startswith("> **Old protocol"), study


def test_the_generation_study_tunes_every_arm_and_compares_vit_with_both_cnns():
    import yaml

    raw = yaml.safe_load((REPO / "studies" / "generation.yaml").read_text())
    spec = StudySpec.model_validate(raw)  # load_study also checks the overrides against params.yaml
    assert list(spec.arms) == ["vit", "cnn-remedies", "vqgan-vanilla", "vit-uncond"]
    assert spec.compare == ["vit", "cnn-remedies", "vqgan-vanilla"]
    seeds = {r.arm: [] for r in spec.runs()}
    for r in spec.runs():
        seeds[r.arm].append(r.seed)
    assert seeds == {
        "vit": [0, 1, 2, 3],
        "cnn-remedies": [0, 1, 2, 3],
        "vqgan-vanilla": [0, 1],
        "vit-uncond": [0, 1],
    }
    pinned = {"evaluate.cfg_scale", "evaluate.sampling_search", "transformer.sampling.batch_size"}
    assert not any(pinned & set(r.overrides) for r in spec.runs())
    assert spec.overrides["evaluate.probes"] is False
    assert not any(k.startswith("transformer.train") for r in spec.runs() for k in r.overrides)  # default VIM
    conditional = {m.key for m in spec.metrics if m.conditional}
    assert {"fid_domain", "fid_domain_rejection", "class_accuracy", "chosen_cfg_scale"} <= conditional
    assert all("cfg 3" not in (m.label or "") for m in spec.metrics)
    rep = StudySpec.model_validate(yaml.safe_load((REPO / "studies" / "representation.yaml").read_text()))
    assert rep.overrides["evaluate.sampling"] is False and "evaluate.cfg_scale" not in rep.overrides
    budgets = {r.arm: r.overrides.get("transformer.train.flops") for r in rep.runs()}
    assert budgets["vim"] == budgets["igpt"] > 0 and sum(r.arm == "igpt" for r in rep.runs()) >= 4


def test_a_partial_report_before_any_run_finished_is_written(tmp_path: Path):
    report = write_report(GEN, {}, "studies/gen.yaml", tmp_path, partial=True)
    assert report["arms"] == {} and report["comparison"] == {} and len(report["missing_runs"]) == 11
    assert "Partial report" in (tmp_path / "gen.md").read_text() and not (tmp_path / "gen.png").exists()


def test_flat_metrics_prefixes_every_file_but_eval_json():
    got = flat_metrics(
        {
            "metrics/eval.json": {"fid_domain": 10.9, "definitions": {"seed": 0}, "ok": True},
            "metrics/tokenizer_eval.json": {"rfid_domain": 7.1, "psnr": float("nan")},
            "metrics/transformer.json": {"val_bits_per_token": 1.6, "steps": 1000},
        }
    )
    assert got == {
        "fid_domain": 10.9,
        "tokenizer_eval/rfid_domain": 7.1,
        "transformer/val_bits_per_token": 1.6,
        "transformer/steps": 1000.0,
    }
