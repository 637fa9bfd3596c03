"""`python -m flows.pipeline` on the micro pipeline against a real `prefect server start`: one task run per
dvc.yaml stage, every stage up to date on a second run, and bad params failing with the stage's line."""

import pytest
import yaml

from tests.flows.test_pipeline import run_pipeline, task_runs
from tests.integration.test_orchestration_pipeline import tiny_repo

pytestmark = pytest.mark.slow  # the micro pipeline once (about a minute on 2 cores) and a Prefect server


def test_pipeline_flow_runs_each_stage_as_a_task(tmp_path, prefect_server):
    repo = tiny_repo(tmp_path / "repo")
    stages = list(yaml.safe_load((repo / "dvc.yaml").read_text())["stages"])
    home = tmp_path / "prefect-client"
    home.mkdir()

    first = run_pipeline(repo, prefect_server, home, tracking="off")
    assert first.returncode == 0, (first.stdout + first.stderr)[-3000:]
    runs, logs = task_runs(prefect_server)
    assert runs["flow"].state.is_completed()
    assert sorted(runs["tasks"]) == sorted(stages)
    assert all(t.state.is_completed() for t in runs["tasks"].values())
    assert "Running stage 'evaluate':" in logs  # DVC's output streamed into the task's log
    assert (repo / "metrics" / "eval.json").is_file()

    again = run_pipeline(repo, prefect_server, home, tracking="off")
    assert again.returncode == 0, (again.stdout + again.stderr)[-3000:]
    runs, logs = task_runs(prefect_server)
    assert sorted(runs["tasks"]) == sorted(stages)
    assert sorted(m for m in logs if m.endswith("is up to date")) == sorted(
        f"stage {s} is up to date" for s in stages
    )

    params = yaml.safe_load((repo / "params.yaml").read_text())
    params["data"]["image_size"] = "huge"
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    bad = run_pipeline(repo, prefect_server, home, tracking="off")
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert len(errors) == 1 and errors[0].startswith(
        "error: prepare_data: params.yaml: data.image_size = 'huge'"
    ), errors
    runs, _ = task_runs(prefect_server)
    assert runs["flow"].state.is_failed() and list(runs["tasks"]) == ["prepare_data"]
