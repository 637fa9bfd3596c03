"""Sweep the entries a killed `dvc repro` left in DVC's stage lock file, from the next stage DVC runs.

While a stage runs, DVC lists its deps (read) and outs (write) with its pid in .dvc/tmp/rwlock and removes
them when the stage ends. A `dvc repro` killed with SIGKILL (the OOM killer, a preempted machine) never
does. DVC drops a dead pid's entry only when a later command wants the same path in a conflicting mode,
so the read entries of a killed stage (its code and data deps) stay for good, one set per kill, and once
the kernel hands such a pid to a live process, a `dvc repro` that writes one of those paths refuses,
"blocked by" a process that has nothing to do with DVC. Every stage command sweeps them at its start.
"""

import logging
import os
from pathlib import Path

log = logging.getLogger("vim")

DVC_ROOT_ENV = "DVC_ROOT"  # DVC sets it for every stage command it runs


def sweep_stale_rwlock(repo_root: str | Path) -> int:
    """Drop the rwlock entries of processes that no longer exist; return how many were dropped.

    Edits the file under DVC's own guard (rwlock.lock, as dvc.rwlock does), so it never races a live DVC
    command's edit; live pids, the running `dvc repro`'s included, are kept.
    """
    import psutil
    from dvc.config import Config
    from dvc.fs import localfs
    from dvc.rwlock import RWLOCK_FILE, _edit_rwlock

    dvc_dir = Path(repo_root) / ".dvc"
    tmp_dir = dvc_dir / "tmp"
    if not (tmp_dir / RWLOCK_FILE).is_file():
        return 0
    hardlink = Config(dvc_dir=str(dvc_dir))["core"].get("hardlink_lock", False)
    dropped = 0
    with _edit_rwlock(str(tmp_dir), localfs, hardlink) as lock:
        for path, info in list(lock["write"].items()):
            if not psutil.pid_exists(info["pid"]):
                del lock["write"][path]
                dropped += 1
        for path, infos in list(lock["read"].items()):
            alive = [i for i in infos if psutil.pid_exists(i["pid"])]
            dropped += len(infos) - len(alive)
            if alive:
                lock["read"][path] = alive
            else:
                del lock["read"][path]
        for mode in ("read", "write"):  # the shape DVC leaves when nothing is locked: {}
            if not lock[mode]:
                del lock[mode]
    return dropped


def sweep_if_under_dvc() -> None:
    """In a stage command run by DVC, sweep its repo's stale rwlock entries; never fail the stage over it."""
    root = os.environ.get(DVC_ROOT_ENV)
    if not root:
        return
    try:
        dropped = sweep_stale_rwlock(root)
    except Exception as err:  # a busy guard, an odd file: DVC itself reports those to whoever needs it
        log.warning("left .dvc/tmp/rwlock as it is: %s", " ".join(str(err).split())[:200])
        return
    if dropped:
        log.warning("dropped %d stale .dvc/tmp/rwlock entries of killed DVC processes", dropped)
