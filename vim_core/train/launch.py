"""Start a training stage's ranks from inside the stage, through torch's own elastic launcher.

`train.processes` > 1 (or a rendezvous in the environment, for several machines) makes the stage process
the torchrun agent of its machine: it starts the local ranks with `torch.distributed.launcher.api`, waits
for them and returns what each rank's entry point returned. The ranks are children of the stage, and each
asks the kernel to kill it when the stage dies, so a SIGKILLed stage leaves no rank behind.

The rendezvous comes from the environment under torchrun's own names (`PET_NNODES`, `PET_NODE_RANK`,
`PET_MASTER_ADDR`, `PET_MASTER_PORT`, `PET_RDZV_ENDPOINT`, `PET_RDZV_ID`), so the same command that runs on
one machine runs on several; nothing here schedules machines.
"""

import ctypes
import os
import signal
import socket
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.distributed.elastic.multiprocessing.errors import record

from vim_core.errors import VimError

_PR_SET_PDEATHSIG = 1


@dataclass(frozen=True)
class Rendezvous:
    """Where this machine's ranks meet the others': torchrun's --nnodes/--node-rank/--rdzv-* in env form."""

    nnodes: int
    node_rank: int
    endpoint: str  # host:port of node 0
    run_id: str

    @property
    def backend(self) -> str:
        return "static"  # node ranks are given, as with torchrun --node-rank; no rendezvous server


def resolve_processes(processes: int | str) -> int:
    """`auto`: one process per visible GPU, else 1 (CPU ranks only split the same cores)."""
    if processes == "auto":
        return max(torch.cuda.device_count(), 1) if torch.cuda.is_available() else 1
    return int(processes)


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value in (None, ""):
        return default
    try:
        return int(value)
    except ValueError:
        raise VimError(f"environment variable {name}={value!r} is not an integer") from None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rendezvous_from_env() -> Rendezvous:
    """Several machines when PET_NNODES > 1 (each machine sets its PET_NODE_RANK); else this one alone."""
    nnodes = _env_int("PET_NNODES", 1)
    node_rank = _env_int("PET_NODE_RANK", 0)
    if nnodes < 1 or not 0 <= node_rank < nnodes:
        raise VimError(f"PET_NODE_RANK={node_rank} must lie in [0, PET_NNODES={nnodes})")
    endpoint = os.environ.get("PET_RDZV_ENDPOINT")
    if not endpoint and "PET_MASTER_ADDR" in os.environ:
        endpoint = f"{os.environ['PET_MASTER_ADDR']}:{_env_int('PET_MASTER_PORT', 29500)}"
    if nnodes > 1 and not endpoint:
        raise VimError("PET_NNODES > 1 needs PET_RDZV_ENDPOINT (host:port of node 0) or PET_MASTER_ADDR")
    if not endpoint:
        endpoint = f"127.0.0.1:{_free_port()}"
    return Rendezvous(nnodes, node_rank, endpoint, os.environ.get("PET_RDZV_ID", "vim"))


def distributed_requested(processes: int) -> bool:
    """Launch ranks when there is more than one process here, or more than one machine."""
    return processes > 1 or _env_int("PET_NNODES", 1) > 1


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent (the stage) dies; exit if it is already gone."""
    parent = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    except (OSError, AttributeError):  # not Linux: the agent's own signal handling is what is left
        return
    if os.getppid() != parent:  # the parent died before prctl took effect
        os._exit(1)


def _threads_per_rank(nproc: int) -> int:
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    return max(cores // nproc, 1)


@record  # writes the rank's error where the agent reads it, so the stage can name the cause
def _rank_main(entrypoint: Callable[..., object], threads: int, *args) -> object:
    """One rank: die with the stage, take its share of the cores (as torchrun does), run the entry point."""
    die_with_parent()
    if "OMP_NUM_THREADS" not in os.environ:
        torch.set_num_threads(threads)
    return entrypoint(*args)


def launch(entrypoint: Callable[..., object], args: tuple, processes: int) -> dict[int, object]:
    """Run `entrypoint(*args)` on `processes` local ranks (and the other machines' ranks, per the env).

    Returns {global rank: return value} for this machine's ranks. A rank's failure ends every rank and
    raises a one-line VimError naming the rank and its error.
    """
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    rdzv = rendezvous_from_env()
    configs: dict = {"timeout": 900}
    if rdzv.backend == "static":
        configs["rank"] = rdzv.node_rank
    config = LaunchConfig(
        min_nodes=rdzv.nnodes,
        max_nodes=rdzv.nnodes,
        nproc_per_node=processes,
        run_id=rdzv.run_id,
        rdzv_endpoint=rdzv.endpoint,
        rdzv_backend=rdzv.backend,
        rdzv_configs=configs,
        max_restarts=0,  # a failed rank fails the stage; DVC or Prefect decides whether to run it again
        start_method="spawn",
    )
    try:
        return elastic_launch(config, _rank_main)(entrypoint, _threads_per_rank(processes), *args)
    except ChildFailedError as err:
        rank, failure = err.get_first_failure()
        message = failure.message.get("message", "") if isinstance(failure.message, dict) else failure.message
        lines = str(message or "").strip().splitlines()
        cause = lines[0] if lines else f"exit code {failure.exitcode}"
        raise VimError(f"rank {rank} failed: {cause.removeprefix('VimError: ')}") from None
