"""Faults around retraining and serving, on 127.0.0.1 (issue #16).

- prefect_stop_during_retrain: the real `prefect server start` that `python -m flows.retrain` reports to
  is SIGKILLed at a random point, once in each phase: during the first run's `dvc repro` (a random stage,
  a random delay after it starts), during a later run's publish (log_model or register), during its
  promote. Each run must end within a bound, with exit 0 or a one-line `error:`, and leave the registry
  coherent: the new version of `vim` as challenger, or nothing new. A retrain with the server
  back (same database, new port) then completes.
- publish_kill_during_promotion: `python -m flows.publish` in the trained tiny repository is SIGKILLed at a
  random moment of its second half (where it registers and promotes), 3 times. After each kill, champion
  and challenger of `vim` must each be a complete version (its weights load, its tags carry the metrics
  and the eval-config hash), and a rerun of publish must succeed.
- served_generator_load: `mlflow models serve` of the champion generator under 8 client threads x 25
  small requests, with oversized requests (over VIM_MAX_IMAGES_PER_REQUEST) sent during the load: every
  normal request gets its images, every oversized one a prompt HTTP 400, and the server answers after.
  p50/p95 latencies and the oversized requests go to reports/serving_load.json (they are load, not faults:
  nothing of them goes to reliability.json).

The module runs its own mlflow and prefect servers, overriding the session fixtures of those names: the
Prefect one gets killed, and the orch fixture (tests/integration/test_orchestration_pipeline.py) needs an empty
registry for its tiny repository.
"""

import concurrent.futures
import json
import os
import signal
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from flows import registry
from flows.pyfunc_models import MAX_IMAGES_ENV, decode_png
from tests import servers
from tests.faults.points import fault_rng
from tests.integration.test_orchestration_pipeline import (
    NAMES,
    _client,
    _pipeline_runs,
    _post,
    orch,  # noqa: F401  (the fixture, on this module's servers)
    retrain,
)
from tests.mlflow_server import start_mlflow
from tests.reliability import REPORT, write_run_report

pytestmark = pytest.mark.slow

MLFLOW_EXPERIMENT = "faults-registry"  # tracking_env's experiment, for the registry test
# The client's retries when the server is gone: the default 5 take about a minute per call, and a flow
# makes two or three such calls after the kill (its end state, the log flush). 2 keep it near 15 s.
FAULT_ENV = {"PREFECT_CLIENT_MAX_RETRIES": "2"}
ENDS_WITHIN_S = 120.0  # after the kill
STAGES = (
    "prepare_data",
    "train_classifier",
    "train_tokenizer",
    "evaluate_tokenizer",
    "tokenize_dataset",
    "pretrain_transformer",
    "evaluate",
)
SERVING_REPORT = REPORT.with_name("serving_load.json")
CAP = 16  # VIM_MAX_IMAGES_PER_REQUEST of the served generator


# ---- servers of this module


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """This module's own tracking server, so the tiny repository registers version 1 of each name."""
    server, proc = start_mlflow(tmp_path_factory.mktemp("mlflow-faults"))
    yield server
    servers.stop(proc)


class KillablePrefect:
    """A `prefect server start` to kill: each start() is a new process and port on the same database."""

    def __init__(self, home: Path):
        self.home, self.url, self.proc = home, None, None

    def start(self) -> str:
        self.url, self.proc = servers.start_prefect(self.home)
        return self.url

    def kill(self) -> None:
        os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def env(self) -> dict[str, str]:
        return {"PREFECT_API_URL": f"{self.url}/api"}


@pytest.fixture(scope="module")
def prefect_box(tmp_path_factory):
    box = KillablePrefect(tmp_path_factory.mktemp("prefect-faults"))
    box.start()
    yield box
    servers.stop(box.proc, timeout=20)


@pytest.fixture(scope="module")
def prefect_server(prefect_box) -> str:
    """The URL orch's environment starts with; a run after a restart gets prefect_box.env() on top."""
    return prefect_box.url


@pytest.fixture(scope="module")
def tiny(orch):  # noqa: F811  (the imported fixture)
    """orch's tiny repository and environment, on this module's servers."""
    return orch


# ---- one retrain with the Prefect server killed under it


@dataclass
class Outcome:
    phase: str
    point: str
    rc: int | None  # None: still running at the bound, then killed
    after_kill_s: float
    landed: bool  # the kill came while the retrain was running
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)


def retrain_killing_prefect(tiny, box, phase: str, marker: str, delay: float, log: Path) -> Outcome:
    """`python -m flows.retrain` with the Prefect server SIGKILLed `delay` s after a line with `marker`.

    The next server (same database, new port) starts at once in the background, while the run ends.
    """
    cmd = [sys.executable, "-m", "flows.retrain"]
    env = {**tiny.env, **box.env(), **FAULT_ENV}
    proc = subprocess.Popen(
        cmd, cwd=tiny.repo, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    out: dict[str, list[str]] = {"stdout": [], "stderr": []}
    seen = threading.Event()

    def pump(stream, lines):
        for line in stream:
            lines.append(line.rstrip("\n"))
            if marker in line:
                seen.set()

    pumps = [threading.Thread(target=pump, args=(getattr(proc, k), v), daemon=True) for k, v in out.items()]
    for t in pumps:
        t.start()
    deadline = time.monotonic() + 600
    while not seen.wait(0.2) and proc.poll() is None and time.monotonic() < deadline:
        pass
    time.sleep(delay)
    landed = proc.poll() is None
    box.kill()
    killed = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(1) as pool:
        restarted = pool.submit(box.start)
        try:
            rc = proc.wait(timeout=ENDS_WITHIN_S)
        except subprocess.TimeoutExpired:
            rc = None
            proc.kill()
            proc.wait()
        after = time.monotonic() - killed
        restarted.result()
    for t in pumps:
        t.join(10)
    log.write_text("\n".join(out["stdout"] + ["---- stderr"] + out["stderr"]) + "\n")
    point = f"{delay:.2f}s after {marker!r}"
    print(f"prefect killed {point} ({phase}): exit {rc}, {after:.1f}s after the kill")
    return Outcome(phase, point, rc, after, landed, out["stdout"], out["stderr"])


def aliases(c) -> dict[str, dict[str, tuple[str, str] | None]]:
    """{alias: {name: (version, bundle) or None}} for champion and challenger."""
    out = {}
    for alias in (registry.CHAMPION, registry.CHALLENGER):
        out[alias] = {}
        for name in NAMES:
            mv = registry.by_alias(c, name, alias)
            out[alias][name] = None if mv is None else (str(mv.version), mv.tags.get(registry.PIPELINE_TAG))
    return out


def versions(c) -> dict[str, set[str]]:
    return {n: {mv.version for mv in c.search_model_versions(f"name = '{n}'")} for n in NAMES}


def problems(outcome: Outcome, before: dict, after: dict, bundle: str) -> list[str]:
    """What is wrong with a run's end and the registry it left (empty: a clear end, a coherent registry)."""
    found = []
    if not outcome.landed:
        found.append("the run ended before the kill")
    if outcome.rc is None:
        found.append(f"still running {ENDS_WITHIN_S:.0f}s after the kill")
    elif outcome.rc != 0:
        last = outcome.stderr[-1] if outcome.stderr else ""
        if not last.startswith("error: ") or "Traceback" in last:
            found.append(f"exit {outcome.rc} without a one-line error: {last!r}")
    for alias, sets in after.items():
        if len({None if s is None else s[1] for s in sets.values()}) > 1:
            found.append(f"{alias} is split: {sets}")
    new = after[registry.CHALLENGER] != before[registry.CHALLENGER]
    if new and {s and s[1] for s in after[registry.CHALLENGER].values()} != {bundle}:
        found.append(f"the new challengers are not all of this run's bundle {bundle}: {after}")
    if after[registry.CHAMPION] not in (before[registry.CHAMPION], after[registry.CHALLENGER]):
        found.append(f"champion is neither the old one nor the new challenger: {after}")
    said_published = outcome.rc == 0 or any("published first" in line for line in outcome.stderr[-1:])
    if outcome.rc is not None and said_published != new:
        found.append(f"said published={said_published} but the registry says {new}: {outcome.stderr[-1:]}")
    return found


def lost(before_versions: dict, after_versions: dict, before: dict, after: dict) -> bool:
    """A version or an alias that existed before is gone."""
    gone_version = any(before_versions[n] - after_versions[n] for n in NAMES)
    gone_alias = any(before[a][n] is not None and after[a][n] is None for a in before for n in NAMES)
    return gone_version or gone_alias


def test_prefect_stop_during_retrain(tiny, prefect_box, record_fault, tmp_path):
    rng = fault_rng("prefect_stop_during_retrain")
    c = _client(tiny)
    stage = rng.choice(STAGES)
    # The three phases, each as (marker line, delay range): the markers are Prefect's and the pipeline's
    # log lines (the last stage's task says it was up to date: the pipeline subflow is done).
    plan = [
        ("repro", f"Running stage '{stage}'", (0.0, 6.0)),  # the first run: every stage does work
        ("publish", "stage evaluate is up to date", (0.0, 3.0)),  # log_model (~3 s), register
        ("promote", "Task run 'register-", (0.0, 0.5)),  # promote (~0.5 s), then the comparison
    ]
    outcomes, lost_count = [], 0
    for i, (phase, marker, (lo, hi)) in enumerate(plan):
        before, before_versions = aliases(c), versions(c)
        outcome = retrain_killing_prefect(
            tiny, prefect_box, phase, marker, rng.uniform(lo, hi), tmp_path / f"retrain-{i}.log"
        )
        bundle = _pipeline_runs(c)[-1].info.run_id
        after = aliases(c)
        found = problems(outcome, before, after, bundle)
        lost_count += lost(before_versions, versions(c), before, after)
        outcomes.append((outcome, found))
        if phase == "repro":  # the server is back: the next run completes from DVC's cache
            done = retrain(tiny, env=prefect_box.env())
            assert done["promotion"] == "promoted", done
    done = retrain(tiny, env=prefect_box.env())  # and after the last one too
    assert done["versions"] == {n: v for n, (v, _) in aliases(c)[registry.CHALLENGER].items()}
    survived = sum(not found for _, found in outcomes)
    record_fault(
        "prefect_stop_during_retrain", injected=len(outcomes), survived=survived, data_lost=lost_count
    )
    report = [(o.phase, o.point, o.rc, round(o.after_kill_s, 1), found) for o, found in outcomes]
    print(json.dumps(report, indent=1))
    assert survived == len(outcomes) and lost_count == 0, report
    assert all(o.rc is None or o.rc == 0 or "lost the Prefect API" in o.stderr[-1] for o, _ in outcomes)


# ---- publish killed while it promotes: the one model's aliases never point at half a registration


def publish(tiny, box) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "-m", "flows.publish"],
        cwd=tiny.repo,
        env={**tiny.env, **box.env()},
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )


def complete(c, url: str, alias: str) -> str | None:
    """What is wrong with the version `alias` points at (None: a complete version)."""
    import mlflow

    from vim_core.tokenizer.export import load_tokenizer
    from vim_core.transformer.export import load_transformer

    mv = registry.by_alias(c, registry.MODEL_NAME, alias)
    if mv is None:
        return f"{alias} points at nothing"
    if registry.EVAL_HASH_TAG not in mv.tags or not any(k.startswith(registry.METRIC_TAG) for k in mv.tags):
        return f"{alias} v{mv.version} lacks its metric tags: {mv.tags}"
    # the version's logged model, fetched through this server alone: mlflow.set_tracking_uri and
    # set_registry_uri would also set MLFLOW_*_URI in os.environ, which later subprocesses inherit
    model = c.get_logged_model(mv.source.removeprefix("models:/"))
    root = mlflow.artifacts.download_artifacts(artifact_uri=model.artifact_location, tracking_uri=url)
    try:
        load_tokenizer(root + "/artifacts/tokenizer.safetensors")
        load_transformer(root + "/artifacts/transformer.safetensors")
    except Exception as err:  # noqa: BLE001  (any failure to load is the finding)
        return f"{alias} v{mv.version}: weights do not load: {err!r}"
    return None


def test_publish_kill_during_promotion(tiny, champion, prefect_box, record_fault):
    rng = fault_rng("publish_kill_during_promotion")
    c = _client(tiny)
    started = time.monotonic()
    clean = publish(tiny, prefect_box)
    assert clean.wait(600) == 0, clean.stderr.read()[-3000:]
    took = time.monotonic() - started
    injected = survived = 0
    for _ in range(8):  # until 3 kills land: a publish that ends before its kill is no injection
        if injected == 3:
            break
        proc = publish(tiny, prefect_box)
        time.sleep(rng.uniform(0.5, 0.9) * took)  # its second half: register, promote, compare
        if proc.poll() is not None:
            proc.wait(60)
            continue
        proc.send_signal(signal.SIGKILL)
        injected += 1
        proc.wait(60)
        found = [
            f
            for f in (
                complete(c, tiny.mlflow, registry.CHAMPION),
                complete(c, tiny.mlflow, registry.CHALLENGER),
            )
            if f
        ]
        rerun = publish(tiny, prefect_box)
        rc = rerun.wait(600)
        if rc != 0:
            found.append(f"rerun exit {rc}: {rerun.stderr.read()[-2000:]}")
        found += [
            f
            for f in (
                complete(c, tiny.mlflow, registry.CHAMPION),
                complete(c, tiny.mlflow, registry.CHALLENGER),
            )
            if f
        ]
        survived += not found
        assert not found, found
    record_fault("publish_kill_during_promotion", injected=injected, survived=survived, data_lost=0)
    assert injected == 3, f"{injected} of 8 publishes were killed before they ended; want 3"


# ---- serving under load


@pytest.fixture(scope="module")
def champion(tiny, prefect_box):
    """A champion bundle: the one the Prefect test left, or a clean retrain when this runs alone."""
    if registry.by_alias(_client(tiny), "vim", registry.CHAMPION) is None:
        retrain(tiny, env=prefect_box.env())


def _timed_post(url: str, body: dict) -> tuple[float, int, dict]:
    """(seconds, HTTP status, JSON answer); status 0 for no answer or one that is not JSON."""
    started = time.monotonic()
    try:
        status, answer = _post(url, body)  # bounded: a 120 s timeout
    except (OSError, ValueError) as err:
        status, answer = 0, {"message": repr(err)}
    return time.monotonic() - started, status, answer


def _valid(answer: dict, body: dict, reference: dict) -> bool:
    rows = answer.get("predictions", [])
    ids = [r["class_id"] for r in body["dataframe_records"]]
    return (
        [r["class_id"] for r in rows] == ids
        and all(decode_png(r["image_png"]).shape == (32, 32) for r in rows)
        and rows == reference["predictions"]  # same request, same pixels, however many run at once
    )


def test_served_generator_load(tiny, champion, tmp_path):
    rng = fault_rng("served_generator_load")
    threads, per_thread = 8, 25
    port = servers.free_port()
    cmd = [
        str(servers.BIN / "mlflow"), "models", "serve", "-m", "models:/vim@champion",
        "--env-manager", "local", "-h", "127.0.0.1", "-p", str(port), "-w", "1",
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    env = {**tiny.env, MAX_IMAGES_ENV: str(CAP)}
    proc = servers.start(cmd, f"{url}/ping", tmp_path / "serve.log", env=env, timeout=180)
    try:
        # Six distinct small requests; each answered once alone first, as the reference for the load.
        bodies = [
            {
                "dataframe_records": [{"class_id": rng.randrange(10)} for _ in range(rng.randint(1, 4))],
                "params": {"seed": rng.randrange(1000)},
            }
            for _ in range(6)
        ]
        references = []
        for body in bodies:
            _, status, answer = _timed_post(f"{url}/invocations", body)
            assert status == 200, answer
            references.append(answer)
        plans = [[rng.randrange(len(bodies)) for _ in range(per_thread)] for _ in range(threads)]
        total = threads * per_thread
        # Oversized requests go out once the load has answered a random number of requests.
        oversized_plan = [
            (at, rng.randint(CAP + 1, 4 * CAP)) for at in sorted(rng.sample(range(10, total - 20), 4))
        ]
        done, lock = [0], threading.Lock()

        def load(plan):
            results = []
            for k in plan:
                latency, status, answer = _timed_post(f"{url}/invocations", bodies[k])
                results.append((latency, status == 200 and _valid(answer, bodies[k], references[k])))
                with lock:
                    done[0] += 1
            return results

        def oversized():
            results, deadline = [], time.monotonic() + 600
            for at, n in oversized_plan:
                while done[0] < at and time.monotonic() < deadline:
                    time.sleep(0.02)
                body = {"dataframe_records": [{"class_id": i % 10} for i in range(n)]}
                latency, status, answer = _timed_post(f"{url}/invocations", body)
                results.append((latency, status, answer.get("message", ""), done[0]))
            return results

        with concurrent.futures.ThreadPoolExecutor(threads + 1) as pool:
            refused = pool.submit(oversized)
            loads = [pool.submit(load, plan) for plan in plans]
            normal = [r for f in loads for r in f.result(timeout=600)]
            refusals = refused.result(timeout=60)
        # Afterwards the worker still answers, with the same images.
        latency, status, answer = _timed_post(f"{url}/invocations", bodies[0])
        after_ok = status == 200 and _valid(answer, bodies[0], references[0])
    finally:
        servers.stop(proc)

    latencies = sorted(lat for lat, _ in normal)
    p50 = statistics.median(latencies)
    p95 = latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))]
    prompt_s = max(5.0, 2 * p95)  # a refusal waits for a free thread at most, never for the images
    ok_refusals = [r for r in refusals if 400 <= r[1] < 500 and f"at most {CAP}" in r[2] and r[0] <= prompt_s]
    failed = sum(not ok for _, ok in normal)
    figures = {
        "threads": threads,
        "requests_per_thread": per_thread,
        "images_per_request": "1-4",
        "max_images_per_request": CAP,
        "ok": total - failed,
        "failed": failed,
        "p50_s": round(p50, 4),
        "p95_s": round(p95, 4),
        "max_s": round(latencies[-1], 4),
        "oversized": [
            {"latency_s": round(r[0], 4), "status": r[1], "after_requests": r[3]} for r in refusals
        ],
        "answers_after": after_ok,
    }
    # Oversized requests are load, not faults: they are reported here, beside the latencies.
    figures["oversized_refused_promptly"] = len(ok_refusals)
    write_run_report(SERVING_REPORT, figures)
    print(json.dumps(figures, indent=1))
    assert failed == 0 and after_ok, figures
    assert len(refusals) >= 3 and len(ok_refusals) == len(refusals), (figures, refusals)
