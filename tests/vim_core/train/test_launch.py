"""vim_core.train.launch: the rendezvous read from torchrun's environment names, `processes: auto`, and a
SIGKILLed stage that leaves no rank behind."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest
import yaml

from vim_core.config import parse_params
from vim_core.errors import ConfigError, VimError
from vim_core.train import launch

REPO = Path(__file__).resolve().parents[3]


def _clear_pet(monkeypatch):
    for key in [k for k in os.environ if k.startswith("PET_")]:
        monkeypatch.delenv(key)


def test_one_machine_by_default(monkeypatch):
    _clear_pet(monkeypatch)
    rdzv = launch.rendezvous_from_env()
    assert (rdzv.nnodes, rdzv.node_rank) == (1, 0)
    assert rdzv.endpoint.startswith("127.0.0.1:")
    assert not launch.distributed_requested(1) and launch.distributed_requested(2)


def test_several_machines_from_torchrun_names(monkeypatch):
    _clear_pet(monkeypatch)
    monkeypatch.setenv("PET_NNODES", "4")
    monkeypatch.setenv("PET_NODE_RANK", "3")
    monkeypatch.setenv("PET_MASTER_ADDR", "10.1.2.3")
    monkeypatch.setenv("PET_MASTER_PORT", "29400")
    rdzv = launch.rendezvous_from_env()
    assert (rdzv.nnodes, rdzv.node_rank, rdzv.endpoint) == (4, 3, "10.1.2.3:29400")
    assert launch.distributed_requested(1)
    monkeypatch.setenv("PET_RDZV_ENDPOINT", "head:1234")
    assert launch.rendezvous_from_env().endpoint == "head:1234"


@pytest.mark.parametrize(
    "env, message",
    [
        ({"PET_NNODES": "2"}, "needs PET_RDZV_ENDPOINT"),
        ({"PET_NNODES": "2", "PET_NODE_RANK": "2", "PET_MASTER_ADDR": "h"}, "must lie in [0, PET_NNODES=2)"),
        ({"PET_NNODES": "two"}, "PET_NNODES='two' is not an integer"),
    ],
)
def test_bad_rendezvous_is_one_line(monkeypatch, env, message):
    _clear_pet(monkeypatch)
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    with pytest.raises(VimError, match=message.replace("[", r"\[").replace("(", r"\(").replace(")", r"\)")):
        launch.rendezvous_from_env()


def test_processes_setting():
    assert launch.resolve_processes(3) == 3
    import torch

    expected = max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    assert launch.resolve_processes("auto") == expected
    raw = yaml.safe_load((REPO / "params.yaml").read_text())
    raw["tokenizer"]["train"]["processes"] = "auto"
    raw["transformer"]["train"]["processes"] = 2
    p = parse_params(raw)
    assert (p.tokenizer.train.processes, p.transformer.train.processes) == ("auto", 2)
    raw["tokenizer"]["train"]["processes"] = 0
    with pytest.raises(ConfigError, match="tokenizer.train.processes"):
        parse_params(raw)


# A stand-in stage: the real launcher starting 2 ranks that would run for minutes.
STAGE = textwrap.dedent(
    """
    import os
    import signal
    import time
    from pathlib import Path
    from vim_core.train.launch import launch

    def rank_work():
        # As a rank inside a native collective: Python's SIGINT handler (torch's own death signal for
        # its spawned children) would only run once the call returns, which may be never.
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        Path(f"working-{os.getpid()}").touch()
        time.sleep(600)

    if __name__ == "__main__":
        launch(rank_work, (), 2)
    """
)


def _ranks_of(stage: psutil.Process) -> list[psutil.Process]:
    """The stage's spawned ranks; a short-lived helper that exits (or is a zombie) while listed is skipped."""
    ranks = []
    for p in stage.children(recursive=True):
        try:
            if "spawn_main" in " ".join(p.cmdline()):
                ranks.append(p)
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return ranks


def test_killed_stage_leaves_no_rank(tmp_path):
    script = tmp_path / "stage.py"
    script.write_text(STAGE)
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([sys.executable, str(script)], env=env, cwd=tmp_path)
    stage = psutil.Process(proc.pid)
    deadline = time.monotonic() + 60
    ranks: list[psutil.Process] = []
    while len(ranks) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)
        ranks = _ranks_of(stage)
    assert len(ranks) == 2, "the ranks never started"
    while len(list(tmp_path.glob("working-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.2)  # each rank asks for its death signal before its work starts
    assert len(list(tmp_path.glob("working-*"))) == 2, "the ranks never reached their work"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=10)
    gone, alive = psutil.wait_procs(ranks, timeout=15)
    for p in alive:
        p.kill()
    assert not alive, f"{len(alive)} rank(s) outlived the killed stage"
