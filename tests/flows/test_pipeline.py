"""flows.pipeline on a toy DVC repository against a real `prefect server start`: one task per dvc.yaml stage
in the order of DVC's graph, DVC deciding what is up to date, transient failures retried, any other
failure ending the flow with the stage's one-line error before the later stages."""

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from flows.common import EXIT_TRANSIENT
from flows.pipeline import failure, stage_order
from tests import servers
from vim_core.errors import TransientError, VimError

BIN = Path(sys.executable).parent
REPO = Path(__file__).resolve().parents[2]
STAGE = """import sys
from pathlib import Path

import yaml

name, mode = sys.argv[1], yaml.safe_load(Path("params.yaml").read_text())["mode"]
if mode == f"{name}-bad":
    print("error: bad input in", name, file=sys.stderr)
    sys.exit(1)
if mode == f"{name}-flaky" and not Path(f"{name}.tried").exists():
    Path(f"{name}.tried").touch()
    print("error: the store did not answer", file=sys.stderr)
    sys.exit(75)
Path("out").mkdir(exist_ok=True)
Path("out", name).write_text(mode)
print("stage", name, "ran, from http://vimuser:s3cret@127.0.0.1:9/x")
"""
# declared out of order: the pipeline takes its order from DVC's graph, not from the file
DVC_YAML = {
    "stages": {
        "second": {
            "cmd": "python stage.py second",
            "deps": ["stage.py", "out/first"],
            "params": ["mode"],
            "outs": ["out/second"],
        },
        "first": {
            "cmd": "python stage.py first",
            "deps": ["stage.py"],
            "params": ["mode"],
            "outs": ["out/first"],
        },
    }
}


@pytest.fixture
def toy(tmp_path) -> Path:
    repo = tmp_path / "toy"
    repo.mkdir()
    (repo / "stage.py").write_text(STAGE)
    (repo / "dvc.yaml").write_text(yaml.safe_dump(DVC_YAML, sort_keys=False))
    (repo / "params.yaml").write_text("mode: plain\n")
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=repo, check=True)
    return repo


def run_pipeline(repo: Path, prefect_server: str, home: Path, **extra: str) -> subprocess.CompletedProcess:
    """`python -m flows.pipeline --repo REPO` against the server; `extra`: VIM_<KEY> variables."""
    home.mkdir(exist_ok=True)
    env = {
        **os.environ,
        **servers.prefect_env(home, api_url=f"{prefect_server}/api"),
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "PYTHONPATH": str(REPO),
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        **{f"VIM_{k.upper()}": v for k, v in extra.items()},
    }
    cmd = [sys.executable, "-m", "flows.pipeline", "--repo", str(repo)]
    return subprocess.run(cmd, cwd=repo, env=env, capture_output=True, text=True, timeout=300)


def task_runs(prefect_server: str) -> tuple[dict, list[str]]:
    """The newest `pipeline` flow run's task runs by name, and its log messages."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowFilter, FlowRunFilter, LogFilter
    from prefect.client.schemas.sorting import FlowRunSort
    from prefect.settings import PREFECT_API_URL, temporary_settings

    with temporary_settings({PREFECT_API_URL: f"{prefect_server}/api"}), get_client(sync_client=True) as c:
        [run] = c.read_flow_runs(
            flow_filter=FlowFilter(name={"any_": ["pipeline"]}), sort=FlowRunSort.START_TIME_DESC, limit=1
        )
        only = FlowRunFilter(id={"any_": [run.id]})
        tasks = {t.name: t for t in c.read_task_runs(flow_run_filter=only)}
        time.sleep(2)  # logs reach the API in batches
        logs = [log.message for log in c.read_logs(log_filter=LogFilter(flow_run_id={"any_": [run.id]}))]
    return {"flow": run, "tasks": tasks}, logs


def test_failure_is_transient_only_when_the_stage_exited_so():
    dvc_line = "ERROR: failed to reproduce 's': failed to run: python -m flows.s, exited with {}"
    err = failure("s", 255, ["error: the store did not answer", dvc_line.format(EXIT_TRANSIENT)])
    assert isinstance(err, TransientError) and str(err) == "s: the store did not answer"
    err = failure("s", 255, ["error: a", "error: b", dvc_line.format(2)])
    assert type(err) is VimError and str(err) == "s: a; b"
    assert str(failure("s", 255, ["ERROR: lock busy"])) == "s: ERROR: lock busy"


def test_stage_order_follows_dvc_graph(toy):
    assert stage_order(toy) == ["first", "second"]


@pytest.mark.slow  # a real Prefect server (about 30 s to start) and four flow runs
def test_pipeline_runs_one_task_per_stage_retries_transient_and_stops_on_failure(
    toy, prefect_server, tmp_path
):
    home = tmp_path / "prefect-client"
    first = run_pipeline(toy, prefect_server, home)
    assert first.returncode == 0, first.stdout + first.stderr
    runs, logs = task_runs(prefect_server)
    assert runs["flow"].state.is_completed()
    assert sorted(runs["tasks"]) == sorted(DVC_YAML["stages"])
    ran = [m for m in logs if m.startswith("stage ") and " ran, from " in m]  # the stage's output, streamed
    assert len(ran) == 2 and not [m for m in logs if "s3cret" in m]  # and redacted

    again = run_pipeline(toy, prefect_server, home)
    assert again.returncode == 0, again.stdout + again.stderr
    runs, logs = task_runs(prefect_server)
    assert sorted(runs["tasks"]) == ["first", "second"]
    assert [m for m in logs if m.endswith("is up to date")] == [
        f"stage {s} is up to date" for s in ("first", "second")
    ]

    # a transient failure is retried by Prefect, once, and the run goes on
    (toy / "params.yaml").write_text("mode: first-flaky\n")
    flaky = run_pipeline(toy, prefect_server, home)
    assert flaky.returncode == 0, flaky.stdout + flaky.stderr
    runs, _ = task_runs(prefect_server)
    assert runs["tasks"]["first"].run_count == 2 and runs["tasks"]["second"].run_count == 1

    # bad input: not retried; the flow fails with the stage's line; the later stage does not run
    (toy / "params.yaml").write_text("mode: first-bad\n")
    bad = run_pipeline(toy, prefect_server, home)
    assert bad.returncode == 1
    errors = [line for line in bad.stderr.splitlines() if line.startswith("error: ")]
    assert errors == ["error: first: bad input in first"], bad.stderr[-3000:]
    runs, _ = task_runs(prefect_server)
    assert runs["flow"].state.is_failed() and list(runs["tasks"]) == ["first"]
    assert runs["tasks"]["first"].run_count == 1
