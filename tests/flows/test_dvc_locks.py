"""flows.dvc_locks: a stage command drops the .dvc/tmp/rwlock entries of DVC processes that were killed.

The whole path (a SIGKILLed `dvc repro`, then the next one) runs in tests/faults/test_stage_kills.py.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

from flows.dvc_locks import sweep_if_under_dvc, sweep_stale_rwlock

BIN = Path(sys.executable).parent


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def _repo(tmp_path: Path, lock: dict) -> Path:
    subprocess.run([str(BIN / "dvc"), "init", "--no-scm", "-q"], cwd=tmp_path, check=True)
    (tmp_path / ".dvc" / "tmp").mkdir(exist_ok=True)
    (tmp_path / ".dvc" / "tmp" / "rwlock").write_text(json.dumps(lock))
    return tmp_path


def _lock(repo: Path) -> dict:
    return json.loads((repo / ".dvc" / "tmp" / "rwlock").read_text())


def test_entries_of_dead_processes_go_and_live_ones_stay(tmp_path):
    dead = {"pid": _dead_pid(), "cmd": "dvc repro -s train_tokenizer"}
    live = {"pid": os.getpid(), "cmd": "dvc repro"}
    repo = _repo(
        tmp_path,
        {
            "read": {"/r/data/prepared": [dead, live], "/r/flows/common.py": [dead]},
            "write": {"/r/models/tokenizer": dead, "/r/models/transformer": live},
        },
    )
    assert sweep_stale_rwlock(repo) == 3
    assert _lock(repo) == {"read": {"/r/data/prepared": [live]}, "write": {"/r/models/transformer": live}}
    assert sweep_stale_rwlock(repo) == 0


def test_a_stage_under_dvc_leaves_the_empty_lock_dvc_itself_leaves(tmp_path, monkeypatch):
    dead = {"pid": _dead_pid(), "cmd": "dvc repro"}
    repo = _repo(tmp_path, {"read": {"/r/params.yaml": [dead]}, "write": {"/r/models/tokenizer": dead}})
    monkeypatch.delenv("DVC_ROOT", raising=False)
    sweep_if_under_dvc()  # not run by DVC: nothing touched
    assert _lock(repo)["write"]
    monkeypatch.setenv("DVC_ROOT", str(repo))
    sweep_if_under_dvc()
    assert _lock(repo) == {}


def test_no_lock_file_is_nothing_to_do(tmp_path):
    assert sweep_stale_rwlock(tmp_path) == 0
    assert not (tmp_path / ".dvc").exists()
