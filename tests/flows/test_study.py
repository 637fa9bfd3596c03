"""flows.study end to end on a micro pipeline: arms as DVC experiments, a SIGKILL mid-study and a resume
that skips the finished run, MLflow runs tagged by study and arm on a real server, and the report; and the
acceptance micro study of issue #23 (3 seeds per arm, intervals and verdicts, sampling chosen on val)."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests import servers
from tests.conftest import copy_repo, git_commit
from tests.integration.test_orchestration_pipeline import tiny_params

pytestmark = pytest.mark.slow

BIN = Path(sys.executable).parent

STUDY = {
    "name": "micro",
    "title": "Micro study",
    "seeds": [0],
    "compare": ["base", "budget"],
    "arms": {
        "base": {"description": "the micro params", "overrides": {}},
        # the same tokenizer on a FLOP budget, with 2 seeds: the report's spread
        "budget": {
            "description": "tokenizer trained on a FLOP budget",
            "overrides": {"tokenizer.train.steps": None, "tokenizer.train.flops": 6.0e9},
            "seeds": [0, 1],
        },
    },
    "metrics": [
        {"key": "psnr", "source": "eval", "better": "higher"},
        {"key": "fid_domain_uncond", "source": "eval", "better": "lower"},
        {"key": "val_bits_per_token", "source": "transformer"},
    ],
    "paper": {"base": {"source": "nowhere", "psnr": "n/a"}},
}


def _exps(repo: Path) -> set[str]:
    from flows.study import experiments

    return set(experiments(repo))


def test_study_runs_arms_as_experiments_and_resumes_after_sigkill(tmp_path, mlflow_server, prefect_server):
    repo = copy_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(yaml.safe_load(params.read_text())), sort_keys=False))
    (repo / "studies" / "micro.yaml").write_text(yaml.safe_dump(STUDY, sort_keys=False))
    git_commit(repo, "micro study")
    (tmp_path / "prefect").mkdir()
    env = {
        **os.environ,
        **servers.prefect_env(tmp_path / "prefect", api_url=f"{prefect_server}/api"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": "study-test",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "flows.study", "studies/micro.yaml"]

    # A bad study file is one line and exit 2, before anything runs.
    bad = repo / "studies" / "bad.yaml"
    arms = {**STUDY["arms"], "base": {"overrides": {"tokenizer.train.stepz": 3}}}
    bad.write_text(yaml.safe_dump({**STUDY, "arms": arms}))
    out = subprocess.run([*cmd[:-1], str(bad)], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "stepz" in out.stderr, out.stderr
    bad.unlink()

    runner = subprocess.Popen(cmd, cwd=repo, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    pgid_file = repo / ".dvc" / "tmp" / "study-micro.pgid"
    deadline = time.monotonic() + 900
    while time.monotonic() < deadline and runner.poll() is None:
        # the first run is finished and the second one has started: kill the runner alone
        if "micro-base-s0" in _exps(repo) and pgid_file.exists():
            break
        time.sleep(1)
    assert runner.poll() is None, "the study ended before it could be killed"
    runner.send_signal(signal.SIGKILL)
    runner.wait()
    orphan = int(pgid_file.read_text())
    os.killpg(orphan, 0)  # its experiment is still running, as after any SIGKILL of a parent

    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "micro-base-s0: done already with these params, skipped" in done.stdout + done.stderr
    with pytest.raises(ProcessLookupError):
        os.killpg(orphan, 0)  # the resumed study stopped the leftover before rerunning that arm
    assert {"micro-base-s0", "micro-budget-s0", "micro-budget-s1"} <= _exps(repo)

    report = json.loads((repo / "reports" / "micro.json").read_text())
    assert report["study"] == "micro" and set(report["arms"]) == {"base", "budget"}
    budget = report["arms"]["budget"]
    assert budget["seeds"] == [0, 1] and budget["metrics"]["psnr"]["n"] == 2
    assert budget["tokenizer_train_flops"] <= 6.0e9 < report["arms"]["base"]["tokenizer_train_flops"]
    assert report["arms"]["base"]["transformer_train_flops"] == pytest.approx(
        budget["transformer_train_flops"]
    )
    pair = report["comparison"]["pairs"][0]
    assert (pair["a"], pair["b"]) == ("base", "budget")
    assert set(pair["metrics"]) == {"psnr", "fid_domain_uncond", "val_bits_per_token"}
    assert pair["metrics"]["psnr"]["ci95"] is None  # base has one seed
    assert pair["metrics"]["psnr"]["verdict"] == "not distinguishable at 1 (base) and 2 (budget) seeds"
    md = (repo / "reports" / "micro.md").read_text()
    assert "| psnr (higher is better) |" in md and "paper: base" in md
    assert (repo / "reports" / "micro.png").stat().st_size > 1000

    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("study-test")
    runs = client.search_runs([exp.experiment_id], "tags.`vim.study` = 'micro'")
    arms = {(r.data.tags["vim.arm"], r.data.tags.get("vim.kind")) for r in runs}
    assert {("base", "pipeline"), ("budget", "pipeline"), ("budget", "stage")} <= arms
    piped = [r for r in runs if r.data.tags.get("vim.kind") == "pipeline" and r.info.status == "FINISHED"]
    assert all("psnr" in r.data.metrics for r in piped)

    # Nothing left behind: no process group of ours, an unchanged workspace.
    assert not pgid_file.exists()
    assert yaml.safe_load(params.read_text())["tokenizer"]["train"]["steps"] == 60


# Issue #23's acceptance study: 3 seeds per arm, each run tuning its own sampling on val. Needs eval.json's
# *_val and chosen_* keys and the evaluate.probes switch (the protocol-eval half of the issue).
STUDY3 = {
    "name": "micro3",
    "title": "Micro study, three seeds",
    "seeds": [0, 1, 2],
    "compare": ["long", "short"],
    "overrides": {"evaluate.probes": False, "tokenizer.train.steps": 20, "transformer.train.steps": 12},
    "arms": {
        "long": {"description": "12 VIM steps"},
        "short": {"description": "6 VIM steps", "overrides": {"transformer.train.steps": 6}},
    },
    "metrics": [
        {"key": "fid_domain", "source": "eval", "better": "lower", "conditional": True},
        {"key": "fid_domain_val", "source": "eval", "better": "lower", "conditional": True},
        {"key": "class_accuracy", "source": "eval", "better": "higher", "conditional": True},
        {"key": "chosen_cfg_scale", "source": "eval", "conditional": True},
        {"key": "psnr", "source": "eval", "better": "higher"},
    ],
}


def test_micro_study_with_three_seeds_reports_intervals_verdicts_and_val_choices(
    tmp_path, mlflow_server, prefect_server
):
    repo = copy_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(yaml.safe_load(params.read_text())), sort_keys=False))
    (repo / "studies" / "micro3.yaml").write_text(yaml.safe_dump(STUDY3, sort_keys=False))
    git_commit(repo, "micro study, three seeds")
    (tmp_path / "prefect").mkdir()
    env = {
        **os.environ,
        **servers.prefect_env(tmp_path / "prefect", api_url=f"{prefect_server}/api"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": "study-test-3",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "flows.study", "studies/micro3.yaml"]
    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=3000)
    assert done.returncode == 0, done.stderr[-3000:]

    report = json.loads((repo / "reports" / "micro3.json").read_text())
    assert report["protocol"].startswith("val-tuned") and report["comparison"]["method"].startswith("Welch")
    for arm in ("long", "short"):
        data = report["arms"][arm]
        assert data["seeds"] == [0, 1, 2] and data["conditional"] is True
        for key in ("fid_domain", "fid_domain_val", "class_accuracy", "psnr"):
            stat = data["metrics"][key]
            assert stat["n"] == 3 and stat["sd"] is not None and len(stat["values"]) == 3
        chosen = data["sampling"]["per_seed"]["chosen_cfg_scale"]
        assert len(chosen) == 3 and all(c in (1.0, 3.0) for c in chosen)  # tiny_params' grid
        assert data["sampling"]["chosen_on"] and all("val" in s for s in data["sampling"]["chosen_on"])
    rows = report["comparison"]["pairs"][0]["metrics"]
    for key in ("fid_domain", "fid_domain_val", "class_accuracy", "psnr"):
        row = rows[key]
        assert row["n_a"] == row["n_b"] == 3 and row["ci95"][0] <= row["diff"] <= row["ci95"][1]
        assert row["df"] > 0
        assert row["verdict"] in ("long better", "short better", "not distinguishable at 3 seeds")
    assert rows["chosen_cfg_scale"]["verdict"] is None
    md = (repo / "reports" / "micro3.md").read_text()
    assert "`long` against `short`:" in md and "| metric | long − short | 95% CI | verdict |" in md
    assert "chosen_cfg_scale" in md and "overlap" not in md


# Issue #27's tokenizer-only study: the runs stop at the tokenizer's stages, and the report fits the curve.
STUDY_SCALING = {
    "name": "microscale",
    "title": "Micro scaling",
    "seeds": [0],
    "stages": ["train_tokenizer", "evaluate_tokenizer"],
    "compare": ["vit-s20", "cnn-s20"],
    "arms": {
        f"{arch}-s{steps}": {"overrides": {"tokenizer.train.steps": steps, **extra}}
        for arch, extra in (("vit", {}), ("cnn", {"tokenizer.model.arch": "cnn"}))
        for steps in (10, 20, 40)
    },
    "scaling": {
        "x": {"key": "train_flops", "source": "tokenizer"},
        "fit": "rfid_domain",
        "series": {"vit": ["vit-s10", "vit-s20", "vit-s40"], "cnn": ["cnn-s10", "cnn-s20", "cnn-s40"]},
    },
    "metrics": [
        {"key": "rfid_domain", "source": "tokenizer_eval", "better": "lower"},
        {"key": "psnr", "source": "tokenizer_eval", "better": "higher"},
    ],
}


def test_a_tokenizer_only_study_stops_at_its_stages_and_fits_the_curve(
    tmp_path, mlflow_server, prefect_server
):
    repo = copy_repo(tmp_path / "repo")
    params = repo / "params.yaml"
    params.write_text(yaml.safe_dump(tiny_params(yaml.safe_load(params.read_text())), sort_keys=False))
    (repo / "studies" / "microscale.yaml").write_text(yaml.safe_dump(STUDY_SCALING, sort_keys=False))
    git_commit(repo, "micro scaling study")
    (tmp_path / "prefect").mkdir()
    env = {
        **os.environ,
        **servers.prefect_env(tmp_path / "prefect", api_url=f"{prefect_server}/api"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "MLFLOW_TRACKING_URI": mlflow_server.url,
        "MLFLOW_EXPERIMENT_NAME": "study-test-scaling",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
    }
    cmd = [sys.executable, "-m", "flows.study", "studies/microscale.yaml"]
    bad = repo / "studies" / "bad.yaml"
    bad.write_text(yaml.safe_dump({**STUDY_SCALING, "stages": ["train_tokenizer", "evaluate_tokeniser"]}))
    out = subprocess.run([*cmd[:-1], str(bad)], cwd=repo, env=env, capture_output=True, text=True)
    assert out.returncode == 2 and "evaluate_tokeniser" in out.stderr and out.stderr.count("\n") == 1
    bad.unlink()

    done = subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads((repo / "reports" / "microscale.json").read_text())
    assert len(report["arms"]) == 6
    for data in report["arms"].values():
        assert "transformer_train_flops" not in data["budget"] and data["metrics"]["rfid_domain"]["mean"] > 0
    flops = [report["arms"][f"vit-s{s}"]["scaling_x"]["mean"] for s in (10, 20, 40)]
    assert flops[0] < flops[1] < flops[2]
    assert set(report["scaling"]["series"]) == {"vit", "cnn"} and "verdict" in report["scaling"]["trend"]
    assert (repo / "reports" / "microscale.png").stat().st_size > 1000

    # No VIM was trained or evaluated: the study's MLflow stage runs are the tokenizer's and upstream's.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(mlflow_server.url)
    exp = client.get_experiment_by_name("study-test-scaling")
    runs = client.search_runs([exp.experiment_id], "tags.`vim.kind` = 'stage'")
    stages = {r.data.tags["vim.stage"] for r in runs}
    assert {"train_tokenizer", "evaluate_tokenizer"} <= stages
    assert not stages & {"tokenize_dataset", "pretrain_transformer", "evaluate"}, stages
    # Each arm's pipeline run holds the metrics of the stages it ran; not eval.json, which its experiment
    # carries over unchanged from the baseline commit.
    pipelines = client.search_runs([exp.experiment_id], "tags.`vim.kind` = 'pipeline'")
    assert len(pipelines) == 6
    for r in pipelines:
        assert r.data.metrics["tokenizer_eval/rfid_domain"] > 0, r.data.metrics
        assert not {"rfid_domain", "fid_domain", "class_accuracy"} & set(r.data.metrics), r.data.metrics
