"""Stages as declarations: run_stage runs a body as a plain CLI under MLflow (a local sqlite store in tmp),
with no Prefect, and writes the metrics file dvc.yaml names; every dvc.yaml stage has its module."""

import importlib
import json
from pathlib import Path

import pytest
import yaml

from flows import mlflow_run
from flows.common import EXIT_TRANSIENT, run_stage
from flows.stages import CHECKOUT_DVC_YAML, all_declared, declared
from vim_core.errors import TransientError, VimError

BODIES = {
    "prepare_data": "write_dataset",
    "train_classifier": "fit",
    "train_tokenizer": "train",
    "evaluate_tokenizer": "score",
    "tokenize_dataset": "encode",
    "pretrain_transformer": "train",
    "evaluate": "score",
}
TOY = {
    "cmd": "python -m toy",
    "params": ["seed", {"other.yaml": ["x"]}],
    "metrics": [{"metrics/toy.json": {"cache": False}}],
    "plots": [{"plots/toy_loss.csv": {"x": "step"}}, "plots/toy.png"],
}


@pytest.fixture
def toy_repo(tmp_path, monkeypatch):
    """A folder with a dvc.yaml declaring the stage `toy`, a params.yaml, and MLflow on sqlite in tmp."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", "stage-flows")
    monkeypatch.delenv(mlflow_run.PARENT_ENV, raising=False)
    monkeypatch.delenv(mlflow_run.SWITCH_ENV, raising=False)
    monkeypatch.setattr(mlflow_run, "REPO", tmp_path)  # artifacts under tmp_path/mlartifacts
    Path("dvc.yaml").write_text(yaml.safe_dump({"stages": {"toy": TOY, "bare": {"cmd": "true"}}}))
    Path("params.yaml").write_text("seed: 7\n")
    return tmp_path


def toy_body(params, stage, run_id):
    """Make a loss curve."""
    if params.seed == 13:
        raise VimError("seed 13 is unlucky")
    if params.seed == 75:
        raise TransientError("the store did not answer")
    Path(stage.plots_dir).mkdir(exist_ok=True)
    Path(stage.plots_dir, "toy_loss.csv").write_text("step,total\n0,1.0\n")
    return {"loss": 0.5, "run_id": run_id, "definitions": {"samples": 4}}


def _errors(capsys) -> list[str]:
    return [line for line in capsys.readouterr().err.splitlines() if line.startswith("error: ")]


def test_every_dvc_stage_has_a_plain_module_with_a_body():
    assert [s.name for s in all_declared(CHECKOUT_DVC_YAML)] == list(BODIES)
    for stage, attr in BODIES.items():
        body = getattr(importlib.import_module(f"flows.{stage}"), attr)
        assert callable(body) and body.__doc__
    evaluate = declared("evaluate", CHECKOUT_DVC_YAML)
    assert (evaluate.metrics_file, evaluate.plots_dir) == ("metrics/eval.json", "plots")


def test_declared_reads_paths_and_params_from_dvc_yaml(toy_repo):
    toy = declared("toy")
    assert toy.params == ("seed",) and toy.metrics_file == "metrics/toy.json" and toy.plots_dir == "plots"
    with pytest.raises(VimError, match="bare declares 0 metrics files"):
        _ = declared("bare").metrics_file


def test_run_stage_tracks_the_body_and_writes_the_declared_metrics(toy_repo, capsys):
    assert run_stage("toy", toy_body, []) == 0
    metrics = json.loads(Path("metrics/toy.json").read_text())
    run = mlflow_run.client().get_run(metrics["run_id"])
    assert run.info.run_name == "toy" and run.info.status == "FINISHED"
    assert run.data.tags["vim.stage"] == "toy"
    assert run.data.params == {"seed": "7"}
    assert run.data.metrics == {"loss": 0.5}
    c = mlflow_run.client()
    arts = {a.path for d in ("metrics", "plots") for a in c.list_artifacts(run.info.run_id, d)}
    assert arts == {"metrics/toy.json", "plots/toy_loss.csv"}

    # bad input: one line, exit 1, the metrics file of the last good run stays
    Path("params.yaml").write_text("seed: 13\n")
    assert run_stage("toy", toy_body, []) == 1
    assert _errors(capsys) == ["error: seed 13 is unlucky"]
    assert json.loads(Path("metrics/toy.json").read_text()) == metrics
    # worth a retry: its own exit code, which flows.pipeline retries
    Path("params.yaml").write_text("seed: 75\n")
    assert run_stage("toy", toy_body, []) == EXIT_TRANSIENT
    assert _errors(capsys) == ["error: the store did not answer"]
    # bad params: exit 2 before any work
    Path("params.yaml").write_text("seed: lucky\n")
    assert run_stage("toy", toy_body, []) == 2
    [line] = _errors(capsys)
    assert "seed" in line


def test_stage_without_a_metrics_file_fails_before_its_body(toy_repo, capsys):
    assert run_stage("bare", toy_body, ["--params", "params.yaml"]) == 1
    assert _errors(capsys) == ["error: dvc.yaml: stage bare declares 0 metrics files, not one"]
    assert not Path("plots").exists() and not Path("mlflow.db").exists()
