"""Fault: the MLflow server stops before a stage and while it trains (issue #16).

A real stage process (`python -m flows.train_tokenizer` in a micro-params copy of the repo, on a real
Prefect server) tracks to a real `mlflow server` that the test SIGKILLs and restarts on the same port and
sqlite store. The policy (flows/outbox.py, flows/tracking.py, flows/mlflow_run.py): training never waits
on tracking; held calls are replayed when the server is back; a server still away at the end costs one
warning line, not the stage; a server away at the start is waited for (VIM_TRACKING_WAIT), and one that
never answers fails the stage in one line before it writes anything.
"""

import csv
import hashlib
import json
import os
import shutil
import subprocess
import sys
import time
import urllib.parse
from pathlib import Path

import pytest
import yaml

from tests import servers
from tests.conftest import git_commit
from tests.faults.points import fault_rng
from tests.integration.test_orchestration_pipeline import tiny_repo
from tests.mlflow_server import start_mlflow

pytestmark = pytest.mark.slow

STEPS = 120  # 3 s of micro training alone, 15-30 s on shared cores: room to kill the server part-way
LOG_EVERY = 5
STAGE_TIMEOUT = 300
DVC_OUTS = ("models/tokenizer", "metrics/tokenizer.json", "plots/tokenizer_*")  # as dvc.yaml declares
OUTPUTS = (*DVC_OUTS, "checkpoints")
TIMING = ("seconds", "_per_s")  # metrics that measure the machine, not the model


class Outage:
    """The repo copy, the stage's environment, and the one mlflow server (killed and restarted)."""

    def __init__(self, root: Path, prefect_url: str):
        self.root = root
        self.repo = tiny_repo(root / "repo")
        params = self.repo / "params.yaml"
        raw = yaml.safe_load(params.read_text())
        raw["tokenizer"]["train"].update(steps=STEPS, log_every=LOG_EVERY, checkpoint_every=100)
        params.write_text(yaml.safe_dump(raw, sort_keys=False))
        git_commit(self.repo, "longer tokenizer training")
        self.store = root / "mlflow"
        self.store.mkdir()
        server, self.proc = start_mlflow(self.store)
        self.url = server.url
        self.port = urllib.parse.urlsplit(self.url).port
        (root / "prefect-client").mkdir()
        self.env = {
            **os.environ,
            **servers.prefect_env(root / "prefect-client", api_url=f"{prefect_url}/api"),
            "MLFLOW_TRACKING_URI": self.url,
            "OMP_NUM_THREADS": "1",
            "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR": "false",
        }
        for key in ("VIM_PARENT_RUN_ID", "VIM_TRACKING", "MLFLOW_REGISTRY_URI", "PYTHONPATH"):
            self.env.pop(key, None)
        self._prepare_data()
        self.runs = 0

    def _prepare_data(self) -> None:
        code = (
            "from vim_core.config import load_params\n"
            "from vim_core.data.prepare import prepare\n"
            "prepare(load_params('params.yaml').data)\n"
        )
        subprocess.run([sys.executable, "-c", code], cwd=self.repo, env=self.env, check=True, timeout=300)

    # ---- the server

    def up(self) -> bool:
        return self.proc.poll() is None

    def kill(self) -> None:
        servers.kill(self.proc)

    def restart(self) -> None:
        self.proc = start_mlflow(self.store, port=self.port)[1]

    # ---- the stage

    def wipe(self) -> None:
        """The stage's outputs gone, as before a first `dvc repro` (a checkpoint would make it resume)."""
        for pattern in OUTPUTS:
            for path in self.repo.glob(pattern):
                shutil.rmtree(path) if path.is_dir() else path.unlink()

    def start(self, **env) -> tuple[subprocess.Popen, str]:
        """The stage process, in an MLflow experiment of its own; returns it and the experiment name."""
        self.runs += 1
        experiment = f"outage-{self.runs}"
        logs = self.root / f"stage-{self.runs}"
        env = {**self.env, "MLFLOW_EXPERIMENT_NAME": experiment, **env}
        with open(f"{logs}.out", "wb") as out, open(f"{logs}.err", "wb") as err:
            proc = subprocess.Popen(
                [sys.executable, "-m", "flows.train_tokenizer"],
                cwd=self.repo,
                env=env,
                stdout=out,
                stderr=err,
            )
        proc.logs = logs
        return proc, experiment

    def flush(self) -> subprocess.CompletedProcess:
        """`python -m flows.tracking flush` in the repo: replay the tracking calls stages kept."""
        cmd = [sys.executable, "-m", "flows.tracking", "flush"]
        return subprocess.run(cmd, cwd=self.repo, env=self.env, capture_output=True, text=True, timeout=300)

    def steps_logged(self) -> int:
        jsonl = self.repo / "models/tokenizer/log/metrics.jsonl"
        return len(jsonl.read_text().splitlines()) if jsonl.is_file() else 0

    def outputs(self) -> dict[str, str]:
        """sha256 of every output file of the stage."""
        return {rel: hashlib.sha256(f.read_bytes()).hexdigest() for rel, f in files(self.repo, OUTPUTS)}

    def metrics(self) -> dict:
        return json.loads((self.repo / "metrics/tokenizer.json").read_text())

    def run(self, experiment: str):
        """The stage's one run on the server, and its metric history as {key: [(step, value)]}."""
        from mlflow import MlflowClient

        c = MlflowClient(tracking_uri=self.url)
        [run] = c.search_runs([c.get_experiment_by_name(experiment).experiment_id])
        history = {
            key: sorted((m.step, m.value) for m in c.get_metric_history(run.info.run_id, key))
            for key in run.data.metrics
        }
        return run, history


def finish(proc: subprocess.Popen, timeout: float = STAGE_TIMEOUT) -> tuple[int, str]:
    rc = proc.wait(timeout)
    return rc, Path(f"{proc.logs}.err").read_text()


def steady(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not any(t in k for t in TIMING)}


def prefix_of(part: dict, whole: dict) -> bool:
    return all(whole.get(k, [])[: len(v)] == v for k, v in part.items())


@pytest.fixture(scope="module")
def outage(tmp_path_factory, prefect_server):
    o = Outage(tmp_path_factory.mktemp("mlflow-outage"), prefect_server)
    yield o
    if o.up():
        servers.stop(o.proc)


@pytest.fixture(scope="module")
def baseline(outage):
    """The stage with the server up throughout: outputs and the run's history to compare against."""
    if not outage.up():
        outage.restart()
    outage.wipe()
    proc, experiment = outage.start()
    rc, err = finish(proc)
    assert rc == 0, err[-3000:]
    run, history = outage.run(experiment)
    assert run.info.status == "FINISHED"
    steps = [s for s, _ in history["loss/total"]]
    assert steps == [*range(0, STEPS, LOG_EVERY), STEPS - 1], steps  # every log_every-th and the last
    return {"outputs": output_contents(outage.repo), "history": history}


def _same_outputs(outage, baseline) -> list[str]:
    """What differs from the run without an outage in the DVC outputs (checkpoints are none): weights,
    training log, curves, reconstructions, metrics JSON, all but for the timings they record."""
    problems = []
    now = output_contents(outage.repo)
    for path, content in baseline["outputs"].items():
        if now.get(path) != content:
            problems.append(f"{path} differs or is missing")
    if outage.metrics()["resumed_from"] != 0:
        problems.append("the stage resumed instead of training once")
    return problems


def output_contents(repo: Path) -> dict:
    """Each DVC output file of the stage as what a rerun must reproduce (see _content)."""
    return {rel: _content(f) for rel, f in files(repo, DVC_OUTS)}


def files(repo: Path, patterns) -> list[tuple[str, Path]]:
    """The files under the paths the glob patterns match, with their paths relative to the repo."""
    found = [p for pattern in patterns for p in repo.glob(pattern)]
    found = [f for p in found for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file()]
    return [(str(f.relative_to(repo)), f) for f in found]


def _content(path: Path):
    """A file's content less its timings: tensors and metadata of safetensors (the header's byte order
    may vary), rows of CSV/JSONL and the metrics JSON without timing fields, else the bytes."""
    if not path.is_file():
        return None
    if path.suffix == ".safetensors":
        from safetensors import safe_open

        with safe_open(str(path), "pt") as f:
            return f.metadata(), {k: f.get_tensor(k).numpy().tobytes() for k in sorted(f.keys())}
    if path.suffix == ".csv":
        rows = list(csv.DictReader(path.read_text().splitlines()))
        return [steady(row) for row in rows]
    if path.suffix == ".jsonl":
        return [steady(json.loads(line)) for line in path.read_text().splitlines()]
    if path.suffix == ".json":
        return steady(json.loads(path.read_text()))
    return hashlib.sha256(path.read_bytes()).hexdigest()


def steps(history: dict) -> dict:
    return {key: [step for step, _ in points] for key, points in history.items()}


def test_mlflow_stop_during_stage(outage, baseline, record_fault):
    """Killed at a random step; back after a random delay, twice while the stage still runs, once never
    while it runs: the outputs match the run without an outage every time; a run whose server came back
    has every step and is FINISHED; the one whose server never came back warns once and exits 0."""
    rng = fault_rng("mlflow_stop_during_stage")
    plans = ["back", "back", "never"]
    rng.shuffle(plans)
    problems: dict[int, list[str]] = {}
    lost: dict[int, bool] = {}
    away: dict[int, str] = {}  # injection -> experiment whose run the server never heard the end of
    for i, plan in enumerate(plans):
        if not outage.up():
            outage.restart()
        outage.wipe()
        kill_at = rng.randrange(2, STEPS // LOG_EVERY // 2)  # a logged step in the first half
        delay = rng.uniform(0, 4)
        env = {"VIM_TRACKING_FLUSH": "6"} if plan == "never" else {}
        proc, experiment = outage.start(**env)
        deadline = time.monotonic() + STAGE_TIMEOUT
        while outage.steps_logged() < kill_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        training = proc.poll() is None
        outage.kill()
        print(f"injection {i}: {plan}, killed after {outage.steps_logged()} logged steps, delay {delay:.1f}s")
        mine = [] if training else ["the stage ended before the server was killed"]
        if plan == "back":
            time.sleep(delay)
            outage.restart()
            if proc.poll() is not None:
                mine.append("the server came back only after the stage ended")
        rc, err = finish(proc)
        mine += _check_stage(rc, err, outage, plan)
        differ = _same_outputs(outage, baseline)
        mine += differ
        lost[i] = bool(differ)
        if plan == "back":
            run, history = outage.run(experiment)
            if run.info.status != "FINISHED":
                mine.append(f"run {run.info.status}, not FINISHED")
            if steps(history) != steps(baseline["history"]):
                mine.append("the run's metric history has gaps or extra points")
            elif history["loss/total"] != baseline["history"]["loss/total"]:
                mine.append("the run's losses differ from the run without an outage")
        else:
            away[i] = experiment
        problems[i] = [f"{i} ({plan}): {p}" for p in mine]
    # the runs the server never heard the end of: RUNNING with a gapless start of the history until the
    # calls the stage kept (flows/outbox.py) are replayed (a later injection's stage may have done it
    # already), then FINISHED with every step; anything short is lost data
    if not outage.up():
        outage.restart()
    for i, experiment in away.items():
        run, history = outage.run(experiment)
        if run.info.status not in ("RUNNING", "FINISHED") or not prefix_of(
            steps(history), steps(baseline["history"])
        ):
            problems[i].append(f"{i}: run {run.info.status}, or its history is not a gapless start")
    if away:
        flushed = outage.flush()
        if flushed.returncode != 0:
            problems[next(iter(away))].append(f"flush: {flushed.stdout}{flushed.stderr[-1500:]}")
    for i, experiment in away.items():
        run, history = outage.run(experiment)
        if run.info.status != "FINISHED" or not _complete(history, baseline):
            problems[i].append(f"{i}: after the replay, run {run.info.status} or its history is incomplete")
            lost[i] = True
    survived = sum(not p for p in problems.values())
    data_lost = sum(lost.values())
    record_fault("mlflow_stop_during_stage", injected=len(plans), survived=survived, data_lost=data_lost)
    assert not [p for ps in problems.values() for p in ps]
    assert survived == len(plans) and data_lost == 0


def test_mlflow_gone_past_the_stage(outage, baseline, record_fault):
    """Killed at a random step and kept away until the stage has ended (three times): the stage exits 0
    with its outputs and keeps the calls the server did not take beside them; a flush while the server is
    still away keeps them all (exit 1); after the server is back (a random delay) the flush delivers them:
    the run is FINISHED with every step and loss of the run without an outage. Anything short is a loss."""
    rng = fault_rng("mlflow_gone_past_stage")
    survived = data_lost = 0
    problems = []
    for i in range(3):
        if not outage.up():
            outage.restart()
        outage.wipe()
        kill_at = rng.randrange(2, STEPS // LOG_EVERY // 2)
        proc, experiment = outage.start(VIM_TRACKING_FLUSH=str(rng.randint(2, 5)))
        deadline = time.monotonic() + STAGE_TIMEOUT
        while outage.steps_logged() < kill_at and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        mine = [] if proc.poll() is None else ["the stage ended before the server was killed"]
        outage.kill()
        rc, err = finish(proc)
        mine += _check_stage(rc, err, outage, "never")
        kept = list((outage.repo / ".vim" / "outbox").glob("*/calls.jsonl"))
        if len(kept) != 1:
            mine.append(f"want the calls of one run kept, found {kept}")
        early = outage.flush()
        if early.returncode != 1 or kept and not kept[0].is_file():
            mine.append(
                f"a flush with the server away: exit {early.returncode}, or it dropped the kept calls"
            )
        time.sleep(rng.uniform(0, 3))
        outage.restart()
        flushed = outage.flush()
        if flushed.returncode != 0:
            mine.append(f"flush exit {flushed.returncode}: {flushed.stdout}{flushed.stderr[-1500:]}")
        run, history = outage.run(experiment)
        lost = run.info.status != "FINISHED" or not _complete(history, baseline)
        if lost:
            mine.append(f"after the replay: run {run.info.status}, history complete: {not lost}")
        differ = _same_outputs(outage, baseline)
        mine += differ
        survived += not mine
        data_lost += lost or bool(differ)
        problems += [f"{i}: {p}" for p in mine]
    record_fault("mlflow_gone_past_stage", injected=3, survived=survived, data_lost=data_lost)
    assert not problems, problems


def _complete(history: dict, baseline: dict) -> bool:
    """Every step of every metric, and the losses, of the run without an outage (timings differ)."""
    return steps(history) == steps(baseline["history"]) and (
        history["loss/total"] == baseline["history"]["loss/total"]
    )


def _check_stage(rc: int, err: str, outage, plan: str) -> list[str]:
    """Exit 0 and no error; one warning line naming the server and a count when it never came back."""
    problems = []
    if rc != 0:
        problems.append(f"exit {rc}: {err[-1500:]}")
    warnings = [line for line in err.splitlines() if line.startswith("warning:")]
    if plan == "never":
        if len(warnings) != 1 or outage.url not in warnings[0] or "tracking calls" not in warnings[0]:
            problems.append(f"want one warning line naming {outage.url}, got {warnings}")
    elif warnings:
        problems.append(f"unexpected warnings {warnings}")
    return problems


def test_mlflow_stop_before_stage(outage, baseline, record_fault):
    """The server down when the stage starts: gone for good (twice, random waits): one-line error, exit
    non-zero, nothing written, the previous outputs intact; back after a random delay within the wait:
    the stage completes, tracked, with the outputs of the run without an outage."""
    rng = fault_rng("mlflow_stop_before_stage")
    plans = ["gone", "gone", "back"]  # "back" last: it leaves the server up
    survived = data_lost = 0
    problems: list[str] = []
    if outage.up():
        outage.kill()
    for i, plan in enumerate(plans):
        mine, lost = [], False
        if plan == "gone":
            wait = rng.uniform(2, 6)
            before = outage.outputs()
            started = time.monotonic()
            proc, _ = outage.start(VIM_TRACKING_WAIT=f"{wait:.1f}")
            rc, err = finish(proc)
            took = time.monotonic() - started
            errors = [line for line in err.splitlines() if line.startswith("error:")]
            if rc == 0 or len(errors) != 1 or outage.url not in errors[0] or "within" not in errors[0]:
                mine.append(f"{i} (gone): exit {rc}, errors {errors}: {err[-1500:]}")
            if took < wait:
                mine.append(f"{i} (gone): failed after {took:.1f}s, before its {wait:.1f}s wait")
            if outage.outputs() != before:
                lost = True
                mine.append(f"{i} (gone): the outputs changed")
        else:
            delay = rng.uniform(0, 5)
            outage.wipe()
            proc, experiment = outage.start(VIM_TRACKING_WAIT="90")
            time.sleep(delay)
            outage.restart()
            rc, err = finish(proc)
            if rc != 0:
                mine.append(f"{i} (back): exit {rc}: {err[-1500:]}")
            lost_now = _same_outputs(outage, baseline)
            lost = bool(lost_now)
            mine += [f"{i} (back): {p}" for p in lost_now]
            run, history = outage.run(experiment)
            if run.info.status != "FINISHED" or steps(history) != steps(baseline["history"]):
                mine.append(f"{i} (back): run {run.info.status}, or its history differs")
        print(f"injection {i}: {plan}: {mine or 'ok'}")
        survived += not mine
        data_lost += lost
        problems += mine
    record_fault("mlflow_stop_before_stage", injected=len(plans), survived=survived, data_lost=data_lost)
    assert not problems, problems
    assert survived == len(plans) and data_lost == 0
