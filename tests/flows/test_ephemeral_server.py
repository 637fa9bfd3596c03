"""A SIGKILLed stage process leaves no Prefect ephemeral server behind (flows/ephemeral.py).

Real stage processes (`python -m flows.prepare_data`) in ephemeral mode, each killed with SIGKILL inside
its work: once its temporary API server answers *and* the stage has written a random number of dataset
shards into its temp folder. The server must be gone within a bounded wait (without the fix it is
re-parented to PID 1 and runs on, about 200 MB each), nothing may appear at the final output path, and
a rerun must give the bytes of an uninterrupted run (as the other faults compare).
"""

import contextlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml

from tests import servers

REPO = Path(__file__).resolve().parents[2]
INJECTIONS = 3
SERVER_UP_S = 300  # a fresh ephemeral database migrates first: 15-40 s on 2 cores, minutes when they are busy
GONE_WITHIN_S = 15


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of pid (R, S, Z, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _uvicorn_children(pid: int) -> list[tuple[int, list[str]]]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            cmd = (entry / "cmdline").read_text().split("\0")
        except (OSError, IndexError, ValueError):
            continue
        if ppid == pid and "uvicorn" in cmd and "prefect.server.api.server:create_app" in cmd:
            found.append((int(entry.name), cmd))
    return found


# Enough work to land a kill inside it: 4000 images in shards of 50 (80 shards, a few seconds).
WORK = {"max_images": 4000, "shard_size": 50}


def _start_stage(root: Path, prefect_home: Path, **data) -> subprocess.Popen:
    root.mkdir(parents=True)
    params = {"data": {"out_dir": str(root / "prepared"), "max_images": 200, **data}}
    (root / "params.yaml").write_text(yaml.safe_dump(params))
    env = {
        **os.environ,
        **servers.prefect_env(prefect_home),  # shared: its database migrates once, on the first start
        "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": str(SERVER_UP_S),
        "VIM_TRACKING": "off",
        "PYTHONPATH": str(REPO),
        "OMP_NUM_THREADS": "1",
    }
    env.pop("PREFECT_API_URL", None)  # ephemeral mode
    with open(root / "stage.log", "wb") as log:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [sys.executable, "-m", "flows.prepare_data", "--params", "params.yaml"],
            cwd=root,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )


def _wait_server(stage: subprocess.Popen, deadline: float) -> int:
    """The pid of the stage's ephemeral server, once its API answers."""
    while time.monotonic() < deadline:
        assert stage.poll() is None, f"the stage exited ({stage.returncode}) before its server was up"
        for pid, cmd in _uvicorn_children(stage.pid):
            port = cmd[cmd.index("--port") + 1]
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=2) as r:
                    if r.status == 200:
                        return pid
            except OSError:
                pass
        time.sleep(0.2)
    raise TimeoutError(f"no ephemeral server answered within {SERVER_UP_S} s")


def _half_written(root: Path) -> list[str]:
    """Partial outputs a killed prepare_data could leave: a temp dataset dir or temp files."""
    return sorted(
        str(p.relative_to(root)) for p in root.rglob("*") if ".tmp" in p.name and "prefect" not in p.parts
    )


def _shards_written(root: Path) -> int:
    """Shards the running stage has finished in its temp dataset folder (vim_core.io.atomic_dir)."""
    tmp = root / ".prepared.tmp"
    return len(list(tmp.glob("*-*.npz"))) if tmp.is_dir() else 0


def _prepare(root: Path) -> None:
    """The stage's work run to the end without Prefect (the reference, and the rerun after a kill)."""
    code = "from vim_core.config import load_params\nfrom vim_core.data.prepare import prepare\n"
    code += "prepare(load_params('params.yaml').data)\n"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    subprocess.run([sys.executable, "-c", code], cwd=root, env=env, check=True, timeout=600)


def _dataset(root: Path) -> dict[str, bytes]:
    folder = root / "prepared"
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir())} if folder.is_dir() else {}


def _kill_once(root: Path, prefect_home: Path, shards: int) -> tuple[bool | None, list[str], int]:
    """Start a stage, SIGKILL it once its server answers and it has written `shards` shards; (did the
    server outlive the wait, or None if no kill landed inside the work; problems; shards at the kill)."""
    stage = _start_stage(root, prefect_home, **WORK)
    server, problems = None, []
    try:
        deadline = time.monotonic() + SERVER_UP_S
        server = _wait_server(stage, deadline)
        while _shards_written(root) < shards and stage.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        at = _shards_written(root)
        if stage.poll() is not None or at < shards:
            return None, [f"the stage ended (or stalled) before {shards} shards: no kill inside the work"], at
        stage.send_signal(signal.SIGKILL)
        stage.wait(10)
        gone_by = time.monotonic() + GONE_WITHIN_S
        while time.monotonic() < gone_by and _proc_state(server) not in (None, "Z"):
            time.sleep(0.1)
        survived = _proc_state(server) not in (None, "Z")  # a zombie holds no memory
        if (root / "prepared").exists():
            problems.append("a killed run left something at the final output path")
        return survived, problems, at
    finally:
        if stage.poll() is None:
            stage.kill()
            stage.wait(10)
        for pid in [server] if server else [pid for pid, _ in _uvicorn_children(stage.pid)]:
            with contextlib.suppress(ProcessLookupError):  # never leak a server from the test either
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # a fault injection (~2 min): it runs with the fault suite in CI's slow step
def test_sigkilled_stage_leaves_no_ephemeral_server(tmp_path, record_fault):
    """INJECTIONS stage processes, one after another, each SIGKILLed inside its work (after a random
    number of shards) with its ephemeral server up; then rerun to the end and compared with a run that
    was never killed: same shards, same manifest, no temp files left."""
    from tests.faults.points import fault_rng

    rng = fault_rng("sigkill_stage_ephemeral_prefect_server")
    reference = tmp_path / "reference"
    reference.mkdir()
    (reference / "params.yaml").write_text(
        yaml.safe_dump({"data": {"out_dir": str(reference / "prepared"), "max_images": 200, **WORK}})
    )
    _prepare(reference)
    expected = _dataset(reference)
    assert len(expected) > 40  # 80 shards and a manifest
    survived = lost = 0
    problems = []
    for i in range(INJECTIONS):
        root = tmp_path / f"run{i}"
        shards = rng.randint(2, 30)
        server_left, mine, at = _kill_once(root, tmp_path / "prefect", shards)
        print(f"injection {i}: killed after {at} shards (aimed at {shards}), server left: {server_left}")
        if server_left:
            mine.append(f"the ephemeral server still runs {GONE_WITHIN_S} s after SIGKILL")
        if server_left is not None:
            _prepare(root)  # the rerun: what the kill interrupted, done again
            got = _dataset(root)
            # the rerun ran in root, where paths differ; the dataset bytes must not
            manifest = {k: v for k, v in got.items() if k != "manifest.json"}
            if manifest != {k: v for k, v in expected.items() if k != "manifest.json"}:
                mine.append("the rerun's shards differ from the uninterrupted run's")
                lost += 1
            elif got.get("manifest.json", b"").replace(str(root).encode(), b"") != expected[
                "manifest.json"
            ].replace(str(reference).encode(), b""):
                mine.append("the rerun's manifest differs from the uninterrupted run's")
                lost += 1
            if leftovers := _half_written(root):
                mine.append(f"temp files left after the rerun: {leftovers}")
        survived += not mine
        problems += [f"{i}: {p}" for p in mine]
    record_fault(  # survived: killed inside the work, no server left, the rerun equal to the reference
        "sigkill_stage_ephemeral_prefect_server", injected=INJECTIONS, survived=survived, data_lost=lost
    )
    assert not problems, problems


def test_no_server_started_when_an_api_url_is_set():
    from prefect.settings import PREFECT_API_URL, temporary_settings

    from flows.ephemeral import start_ephemeral_api

    with temporary_settings({PREFECT_API_URL: "http://127.0.0.1:9/api"}):
        assert start_ephemeral_api() is None


def test_a_server_that_does_not_start_in_time_is_one_line(tmp_path):
    """An ephemeral server slower than its start-up timeout: the stage exits 1 with one `error:` line and
    stops the server it started (before the fix: a RuntimeError traceback with the server's output)."""
    root = tmp_path / "run"
    env = {"PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "1"}
    stage = _start_stage(root, tmp_path / "prefect")
    stage.kill()  # only the helper's files are wanted; start again with the short timeout
    stage.wait(10)
    res = subprocess.run(
        [sys.executable, "-m", "flows.prepare_data", "--params", "params.yaml"],
        cwd=root,
        env={**os.environ, **servers.prefect_env(tmp_path / "prefect"), **env, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    errors = [line for line in res.stderr.splitlines() if line.startswith("error: ")]
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr[-2000:]
    assert len(errors) == 1 and "did not answer within 1" in errors[0], errors
    assert not _half_written(root)
