"""The outbox (flows/outbox.py) against a real `mlflow server` that is killed and restarted on its port:
tracking calls made while it is away wait, in order, and arrive when it is back; a stage whose server
stays away ends without them, in one warning line."""

import os
import subprocess
import sys
import time
import urllib.parse
import uuid
from pathlib import Path

import numpy as np
import pytest
from mlflow.exceptions import MlflowException

from flows import mlflow_run, outbox, tracking
from flows.tracking import stage_run
from tests import servers
from tests.mlflow_server import start_mlflow

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def own_server(tmp_path_factory):
    """A server of this module's own, to kill; `holder["proc"]` is its current process."""
    root = tmp_path_factory.mktemp("mlflow-own")
    server, proc = start_mlflow(root)
    holder = {"server": server, "proc": proc, "port": urllib.parse.urlsplit(server.url).port}
    yield holder
    servers.stop(holder["proc"])


@pytest.fixture
def live(own_server, monkeypatch, tmp_path):
    """The own server, up (restarted if a test left it down), as this test's tracking URI; undelivered
    calls are kept in this test's tmp."""
    monkeypatch.setenv(outbox.DIR_ENV, str(tmp_path / "outbox"))
    if own_server["proc"].poll() is not None:
        own_server["proc"] = start_mlflow(own_server["server"].root, port=own_server["port"])[1]
    monkeypatch.setenv("MLFLOW_TRACKING_URI", own_server["server"].url)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", f"outbox-{uuid.uuid4().hex[:8]}")
    monkeypatch.delenv(mlflow_run.PARENT_ENV, raising=False)
    monkeypatch.delenv(mlflow_run.SWITCH_ENV, raising=False)
    return own_server


def test_calls_held_while_the_server_is_away_arrive_in_order_when_it_is_back(live, tmp_path):
    note = tmp_path / "note.txt"
    note.write_text("as logged")
    with stage_run("train_tokenizer", {"seed": 1}) as t:
        t.log_metrics({"loss/total": 1.0}, step=0)
        servers.kill(live["proc"])
        started = time.monotonic()
        for step in (1, 2, 3):
            t.log_metrics({"loss/total": 1.0 - step / 10}, step=step)
        t.log_artifact(note, "notes/note.txt")
        note.write_text("rewritten later")  # the held call sends the file as it was when logged
        t.log_image(np.full((4, 4), 7, np.uint8), "grid")
        assert time.monotonic() - started < 10  # no MLflow retry loops on the caller's thread
        assert t.outbox.pending == 5
        live["proc"] = start_mlflow(live["server"].root, port=live["port"])[1]
        time.sleep(outbox.PROBE_EVERY)
        t.log_metrics({"loss/total": 0.5}, step=4)  # probes, replays the held calls, then sends this
        assert t.outbox.pending == 0
        c = mlflow_run.client()
        history = [(m.step, m.value) for m in c.get_metric_history(t.run_id, "loss/total")]
        assert sorted(history) == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7), (4, 0.5)]
        # bad input is refused at once and never held: MLflow params are write-once
        with pytest.raises(MlflowException, match="(?i)param"):
            t.outbox.send("param", ("log_batch", {"params": [["seed", "2"]]}))
        assert t.outbox.pending == 0
    run = c.get_run(t.run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "1"}
    got = Path(c.download_artifacts(t.run_id, "notes/note.txt", str(tmp_path / "down")))
    assert got.read_text() == "as logged"
    assert [a.path for a in c.list_artifacts(t.run_id, "images")] == ["images/grid.png"]


def test_a_stage_whose_server_stays_away_ends_with_one_warning_line(live, monkeypatch, capsys):
    monkeypatch.setenv(outbox.FLUSH_ENV, "2")
    started = time.monotonic()
    with stage_run("train_tokenizer") as t:
        t.log_metrics({"loss/total": 1.0}, step=0)
        servers.kill(live["proc"])
        t.log_metrics({"loss/total": 0.9}, step=1)
        t.log_metrics({"loss/total": 0.8}, step=2)
    assert time.monotonic() - started < 20  # the 2 s flush, not MLflow's minutes of retries
    warnings = [line for line in capsys.readouterr().err.splitlines() if line.startswith("warning:")]
    assert len(warnings) == 1, warnings
    assert live["server"].url in warnings[0] and "3 tracking calls" in warnings[0]  # 2 metrics, the end
    assert t.run_id in warnings[0] and "RUNNING" in warnings[0]
    assert t.run_id not in outbox._open  # closed and forgotten: nothing left to flush at exit
    kept = outbox.outbox_dir() / t.run_id
    assert str(kept) in warnings[0] and len((kept / "calls.jsonl").read_text().splitlines()) == 3


def _restart(live) -> None:
    live["proc"] = start_mlflow(live["server"].root, port=live["port"])[1]


def _stage_outlived_by_an_outage(live, tmp_path) -> str:
    """A stage that logs 2 steps, a file and an image while up, and 3 steps and a file with the server
    gone until after it ends; returns its run id."""
    note = tmp_path / "note.txt"
    note.write_text("before")
    with stage_run("train_tokenizer", {"seed": 3}) as t:
        t.log_metrics({"loss/total": 1.0}, step=0)
        t.log_metrics({"loss/total": 0.95}, step=1)
        servers.kill(live["proc"])
        for step in (2, 3, 4):
            t.log_metrics({"loss/total": 1.0 - step / 10}, step=step)
        t.log_artifact(note, "notes/note.txt")
        note.write_text("after")  # the kept copy is the file as logged
        t.log_image(np.full((4, 4), 9, np.uint8), "grid")
        run_id = t.run_id
    return run_id


def _complete(run_id: str, tmp_path) -> None:
    c = mlflow_run.client()
    run = c.get_run(run_id)
    assert run.info.status == "FINISHED" and run.data.params == {"seed": "3"}
    history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "loss/total"))
    assert history == [(0, 1.0), (1, 0.95), (2, 0.8), (3, 0.7), (4, 0.6)]
    got = Path(c.download_artifacts(run_id, "notes/note.txt", str(tmp_path / "down")))
    assert got.read_text() == "before"
    assert [a.path for a in c.list_artifacts(run_id, "images")] == ["images/grid.png"]
    assert not (outbox.outbox_dir() / run_id).exists()


@pytest.mark.slow  # two CLI processes
def test_calls_kept_past_the_stage_are_replayed_by_the_flush_command(live, monkeypatch, tmp_path):
    monkeypatch.setenv(outbox.FLUSH_ENV, "1")
    run_id = _stage_outlived_by_an_outage(live, tmp_path)
    assert (outbox.outbox_dir() / run_id / "calls.jsonl").is_file()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    cmd = [sys.executable, "-m", "flows.tracking", "flush"]
    away = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert away.returncode == 1 and away.stderr.startswith("error: "), away.stderr[-2000:]
    _restart(live)
    back = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert back.returncode == 0 and "delivered 6 kept tracking calls" in back.stdout, (
        back.stdout + back.stderr
    )
    _complete(run_id, tmp_path)


def test_calls_kept_past_the_stage_are_replayed_by_the_next_stage(live, monkeypatch, tmp_path):
    monkeypatch.setenv(outbox.FLUSH_ENV, "1")
    run_id = _stage_outlived_by_an_outage(live, tmp_path)
    _restart(live)
    with stage_run("tokenize_dataset"):
        pass
    _complete(run_id, tmp_path)


_HOLDER = """
import sys, time
from flows.tracking import stage_run
with stage_run("train_tokenizer", {"seed": 5}) as t:
    t.log_metrics({"loss/total": 1.0}, step=0)
    print(t.run_id, flush=True)
    sys.stdin.readline()  # the server is killed meanwhile
    for step in (1, 2, 3):
        t.log_metrics({"loss/total": 1.0 - step / 10}, step=step)
    print("held", t.outbox.pending, flush=True)
    time.sleep(600)  # killed here, its calls never flushed
"""


@pytest.mark.slow  # a stage process of its own
def test_a_stage_killed_during_an_outage_keeps_its_held_calls_for_the_next_stage(live, tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    child = subprocess.Popen(
        [sys.executable, "-c", _HOLDER], env=env, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )
    try:
        run_id = child.stdout.readline().strip()
        servers.kill(live["proc"])
        child.stdin.write("go\n")
        child.stdin.flush()
        assert child.stdout.readline().split() == ["held", "3"]
        journal = outbox.outbox_dir() / run_id
        assert len((journal / "calls.jsonl").read_text().splitlines()) == 3  # on disk before any close
        _restart(live)
        # the holder is alive (and would replay it itself): no one else replays its journal, and a flush
        # says its calls are still kept
        counts = outbox.replay_persisted()
        assert (counts["delivered"], counts["live"], counts["left"]) == (0, 1, 3) and journal.is_dir()
        assert tracking.flush_main(["flush"]) == 1
    finally:
        child.kill()
        child.wait()
    with stage_run("tokenize_dataset"):  # the next stage replays what the killed one held
        pass
    c = mlflow_run.client()
    history = sorted((m.step, m.value) for m in c.get_metric_history(run_id, "loss/total"))
    assert history == [(0, 1.0), (1, 0.9), (2, 0.8), (3, 0.7)]
    assert c.get_run(run_id).info.status == "RUNNING"  # its end was never sent: the run says so
    assert not journal.exists()
