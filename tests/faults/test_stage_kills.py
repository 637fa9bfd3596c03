"""A preempted or OOM-killed machine, and two `dvc repro` at once, on the real micro-params pipeline.

SIGKILL lands on the whole process group of a `dvc repro <stage>` (dvc and the stage process under it,
plain Python: no Prefect process may appear in the group), 5 times per training stage, each after a random
number of checkpoints plus a random part of the next checkpoint interval. Each next `dvc repro` must
resume from a later checkpoint, and the run that finally completes must export the very bytes an
uninterrupted `dvc repro` exported in a second copy of the repository, leaving no process, DVC lock entry
or temp file behind. Then a second `dvc repro` started while one runs must refuse with DVC's lock message
and leave the first to finish.

Upstream outputs are made once in the reference copy and shared by copying it (copytree, .dvc/cache
included), so no stage is recomputed per run.
"""

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from tests.conftest import git_commit
from tests.faults.points import fault_rng
from tests.integration.test_orchestration_pipeline import BIN, tiny_repo
from vim_core.errors import VimError
from vim_core.train.checkpoint import list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.slow

KILLS = 5
EVERY = 20  # steps between checkpoints
STEPS = {"train_tokenizer": 200, "pretrain_transformer": 200}
PREFIX = {"train_tokenizer": "tokenizer", "pretrain_transformer": "transformer"}
WEIGHTS = {
    "train_tokenizer": "models/tokenizer/tokenizer.safetensors",
    "pretrain_transformer": "models/transformer/transformer.safetensors",
}
RUN_S = 600  # one dvc repro on 2 busy cores; the loops below also stop at it
GONE_WITHIN_S = 15
RESUMED = re.compile(r"resumed from \S+ \(step (\d+)\)")
LOCK_REFUSALS = ("Unable to acquire lock", "is busy, it is being blocked by")


def kill_params(raw: dict) -> dict:
    """tiny_params' micro models, trained long enough that kills land mid-training (10 checkpoints).

    No GAN (tiny_params'): it triples the tokenizer's step; tests/vim_core/train/test_trainer_run.py resumes through it.
    """
    for section, stage in (("tokenizer", "train_tokenizer"), ("transformer", "pretrain_transformer")):
        raw[section]["train"].update(steps=STEPS[stage], checkpoint_every=EVERY, log_every=10)
    return raw


@dataclass
class Refusal:
    """One `dvc repro` started while another ran in the same checkout, and how both ended."""

    stage: str  # what the first one ran
    while_running: bool  # the first was still running when the second started
    exit: int
    seconds: float
    output: str
    first_exit: int
    status: str  # `dvc status STAGE` once the first had finished
    left: list[str]  # rwlock entries and temp files left after both


@dataclass
class Lab:
    """The reference copy (uninterrupted runs) and the copies each fault injects into."""

    root: Path
    base: Path
    repos: dict[str, Path]  # stage -> a copy of base with that stage's inputs made and it not run yet
    env: dict[str, str]  # the stage commands' environment: tracking off, no Prefect
    refusals: list[Refusal]


def _env() -> dict:
    env = {
        **os.environ,
        "PATH": f"{BIN}{os.pathsep}{os.environ['PATH']}",
        "VIM_TRACKING": "off",
        "DVC_NO_ANALYTICS": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHONUNBUFFERED": "1",
    }
    for key in ("PREFECT_API_URL", "VIM_PARENT_RUN_ID", "MLFLOW_TRACKING_URI"):
        env.pop(key, None)
    return env


def dvc(repo: Path, env: dict, *args: str) -> str:
    out = subprocess.run(
        [str(BIN / "dvc"), *args], cwd=repo, env=env, capture_output=True, text=True, timeout=RUN_S
    )
    assert out.returncode == 0, f"dvc {' '.join(args)}: {(out.stdout + out.stderr)[-3000:]}"
    return out.stdout + out.stderr


def _repro_with_a_second(repo: Path, env: dict, stage: str, delay: float, log: Path) -> Refusal:
    """`dvc repro -s STAGE`, and `delay` seconds after its stage process starts a second `dvc repro STAGE`.

    The delay counts from the stage's own process, not from dvc's start: a short stage (tokenize on the
    micro data) can end within a few seconds of that. The second names the stage, so one that arrives
    late finds it up to date instead of running the downstream stages in the reference copy.
    """
    first = _start(repo, env, ["repro", "-s", stage], log)
    try:
        deadline = time.monotonic() + RUN_S
        while first.poll() is None and _stage_pid(first.pid, stage) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(delay)
        running = first.poll() is None
        started = time.monotonic()
        second = subprocess.run(
            [str(BIN / "dvc"), "repro", stage], cwd=repo, env=env, capture_output=True, text=True,
            timeout=RUN_S,
        )  # fmt: skip
        seconds = time.monotonic() - started
        first_exit = first.wait(RUN_S)
    finally:
        _killpg(first)
    assert first_exit == 0, f"dvc repro -s {stage} beside a second one: {log.read_text()[-3000:]}"
    output = (second.stdout + second.stderr).strip()
    print(f"{stage}: second dvc repro {delay:.1f}s in exited {second.returncode} after {seconds:.1f}s")
    status = dvc(repo, env, "status", stage)
    left = [*map(str, _rwlock_entries(repo).items()), *_temp_files(repo)]
    return Refusal(stage, running, second.returncode, seconds, output, first_exit, status, left)


@pytest.fixture(scope="module")
def lab(tmp_path_factory) -> Lab:
    """The reference runs, each also fault (2): a second `dvc repro` starts a random moment into it."""
    rng = fault_rng("two_dvc_repro_at_once")
    root = tmp_path_factory.mktemp("stage-kills")
    base = tiny_repo(root / "base")
    params = base / "params.yaml"
    params.write_text(yaml.safe_dump(kill_params(yaml.safe_load(params.read_text())), sort_keys=False))
    git_commit(base, "kill params")
    env = _env()
    repos, refusals = {}, []
    dvc(base, env, "repro", "train_classifier")  # with prepare_data: what the second repro would run first
    repos["train_tokenizer"] = shutil.copytree(base, root / "tok", symlinks=True)
    for stage in ("train_tokenizer", "tokenize_dataset"):
        # the stage process imports torch and opens its run first: 0.1-1.5 s into it, the second lands inside
        refusals.append(_repro_with_a_second(base, env, stage, rng.uniform(0.1, 1.5), root / f"{stage}.log"))
    repos["pretrain_transformer"] = shutil.copytree(base, root / "vim", symlinks=True)
    stage = "pretrain_transformer"
    refusals.append(_repro_with_a_second(base, env, stage, rng.uniform(0.1, 1.5), root / f"{stage}.log"))
    return Lab(root, base, repos, env, refusals)


# ---- what a run leaves


def _checkpoints(repo: Path, stage: str) -> list[int]:
    """Steps of the stage's final-named checkpoints (atomic: complete once named), oldest first."""
    root = repo / "checkpoints" / PREFIX[stage]
    return sorted(step for fp in root.glob("*") for step, _ in list_checkpoints(fp))


def _broken_checkpoints(repo: Path, stage: str) -> list[str]:
    broken = []
    for fp in (repo / "checkpoints" / PREFIX[stage]).glob("*"):
        for _, path in list_checkpoints(fp):
            try:
                verify_checkpoint(path)
            except VimError as err:
                broken.append(str(err))
    return broken


def _group(pgid: int) -> list[int]:
    """Live (not zombie) members of process group pgid."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) == pgid and fields[0] != "Z":
            found.append(int(entry.name))
    return found


def _stage_pid(pgid: int, stage: str) -> int | None:
    for pid in _group(pgid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text().split("\0")
        except OSError:
            continue
        if f"flows.{stage}" in cmd:
            return pid
    return None


def _proc_state(pid: int) -> str | None:
    """The /proc state letter of pid (R, S, Z, ...), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return None


def _prefect_members(pgid: int) -> list[str]:
    """Command lines in the group that run Prefect (a server, a client): a stage must start none."""
    found = []
    for pid in _group(pgid):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_text().replace("\0", " ")
        except OSError:
            continue
        if "prefect" in cmd or "uvicorn" in cmd:
            found.append(cmd)
    return found


def _temp_files(repo: Path) -> list[str]:
    """Temp files and dirs: checkpoint saves (.tmp-step-*, .old-step-*), atomic writes, DVC's own (*.tmp)."""
    found = []
    for path in repo.rglob("*"):
        rel = path.relative_to(repo)
        if rel.parts[0] == ".git":
            continue
        if path.name.startswith((".tmp-", ".old-")) or path.name.endswith(".tmp"):
            found.append(str(rel))
    return sorted(found)


def _rwlock_entries(repo: Path) -> dict:
    path = repo / ".dvc" / "tmp" / "rwlock"
    lock = json.loads(path.read_text()) if path.exists() else {}
    return {mode: paths for mode, paths in lock.items() if paths}


def _start(repo: Path, env: dict, args: list[str], log: Path) -> subprocess.Popen:
    with open(log, "wb") as f:  # the child keeps its own copy of the descriptor
        return subprocess.Popen(
            [str(BIN / "dvc"), *args], cwd=repo, env=env, stdout=f, stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group: dvc and the stage
        )  # fmt: skip


def _killpg(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


# ---- (1) SIGKILL during training, 5 times, then a run that completes


@dataclass
class Kill:
    at_checkpoint: int  # the newest checkpoint when the kill landed
    resumed_from: int  # where the run that was killed had resumed
    left_running: list[int]
    prefect: list[str]  # Prefect processes seen in the group while it ran
    broken: list[str]


def _kill_once(lab: Lab, stage: str, k: int, target: int, delay: float) -> Kill:
    """`dvc repro STAGE` until checkpoint `target` exists plus `delay` of the next interval, then SIGKILL."""
    repo = lab.repos[stage]
    log = lab.root / f"{stage}-{k}.log"
    started = time.monotonic()
    proc = _start(repo, lab.env, ["repro", "-s", stage], log)
    prefect: set[str] = set()
    try:
        deadline = time.monotonic() + RUN_S
        seen: dict[int, float] = dict.fromkeys(_checkpoints(repo, stage), 0.0)  # not this run's: untimed
        while time.monotonic() < deadline:
            assert proc.poll() is None, f"run {k} exited ({proc.returncode}): {log.read_text()[-3000:]}"
            now = time.monotonic()
            for step in _checkpoints(repo, stage):
                seen.setdefault(step, now)
            prefect.update(_prefect_members(proc.pid))
            if max(seen, default=0) >= target * EVERY:
                break
            time.sleep(0.02)
        else:
            raise TimeoutError(f"run {k} of {stage} wrote no checkpoint {target * EVERY} in {RUN_S} s")
        times = sorted(t for t in seen.values() if t)
        interval = times[-1] - times[-2] if len(times) > 1 else 0.3  # this run's checkpoint interval
        time.sleep(delay * interval)
        assert proc.poll() is None, f"run {k} finished before the kill"
        members = _group(proc.pid)
        _killpg(proc)
        at = max(_checkpoints(repo, stage))
        assert at < STEPS[stage], f"run {k} had trained to the end before the kill"
        gone_by = time.monotonic() + GONE_WITHIN_S
        while time.monotonic() < gone_by and any(_proc_state(p) not in (None, "Z") for p in members):
            time.sleep(0.1)
        left = [p for p in members if _proc_state(p) not in (None, "Z")]
        resumed = [int(m) for m in RESUMED.findall(log.read_text())]
        print(f"run {k} of {stage} killed after {time.monotonic() - started:.1f} s")
        return Kill(
            at, resumed[-1] if resumed else 0, left, sorted(prefect), _broken_checkpoints(repo, stage)
        )
    finally:
        _killpg(proc)


def _kill_chain(lab: Lab, stage: str) -> tuple[list[Kill], str]:
    """KILLS runs of `dvc repro STAGE`, each SIGKILLed at the fault's next random point, then one that
    completes; the kills and the last run's output."""
    rng = fault_rng(f"sigkill_{stage}")
    n = STEPS[stage] // EVERY
    targets = sorted(rng.sample(range(1, n - 1), KILLS))  # checkpoints 1..n-2: room left to kill in
    print(f"{stage}: kill after checkpoints {targets}")
    kills = []
    for k, target in enumerate(targets):
        newest = max(_checkpoints(lab.repos[stage], stage), default=0) // EVERY
        kill = _kill_once(lab, stage, k, max(target, newest + 1), rng.uniform(0.0, 0.9))
        print(f"{stage} kill {k}: resumed from {kill.resumed_from}, killed after {kill.at_checkpoint}")
        kills.append(kill)
    return kills, dvc(lab.repos[stage], lab.env, "repro", "-s", stage)


def _verdict(lab: Lab, stage: str, kills: list[Kill], final_log: str, record_fault) -> list[str]:
    """Record the stage's row; what went wrong, if anything."""
    repo = lab.repos[stage]
    metrics = json.loads((repo / "metrics" / f"{PREFIX[stage]}.json").read_text())
    # each run resumed from the newest checkpoint the previous one left, later every time
    resumes = [k.resumed_from for k in kills[1:]] + [metrics["resumed_from"]]
    lost = sum(r < k.at_checkpoint for r, k in zip(resumes, kills, strict=True))
    lost += sum(bool(k.broken) for k in kills)
    same = (repo / WEIGHTS[stage]).read_bytes() == (lab.base / WEIGHTS[stage]).read_bytes()
    survived = sum(
        r >= k.at_checkpoint > k.resumed_from and not k.left_running and not k.prefect and not k.broken
        for r, k in zip(resumes, kills, strict=True)
    )
    leftovers = _temp_files(repo)
    stale = _rwlock_entries(repo)
    curves = [f"plots/{PREFIX[stage]}_{kind}.csv" for kind in ("loss", "train")]
    status = dvc(repo, lab.env, "status", stage)  # works: no lock held; clean: outputs recorded
    checks = {
        "a run did not resume from the newest checkpoint": resumes == [k.at_checkpoint for k in kills],
        "the last run's log does not say where it resumed": RESUMED.findall(final_log)
        == [str(metrics["resumed_from"])],
        f"resumes not later each time: {resumes}": all(
            b > a for a, b in zip([0, *resumes], resumes, strict=False)
        ),
        "processes outlived the SIGKILL": not any(k.left_running for k in kills),
        "a Prefect process ran under a stage": not any(k.prefect for k in kills),
        "a checkpoint was left broken": not any(k.broken for k in kills),
        "resumed weights differ from the uninterrupted run's": same,
        # the curves too: each step once, the same values
        "curves differ from the uninterrupted run's": all(
            (repo / c).read_text() == (lab.base / c).read_text() for c in curves
        ),
        f"temp files left: {leftovers}": not leftovers,
        f".dvc/tmp/rwlock still holds {stale}": not stale,
        f"dvc status: {status}": "up to date" in status.lower(),
        ".dvc/tmp has files the reference lacks": {p.name for p in (repo / ".dvc" / "tmp").iterdir()}
        <= {p.name for p in (lab.base / ".dvc" / "tmp").iterdir()},
    }
    problems = [f"{stage}: {what}" for what, ok in checks.items() if not ok]
    # Everything checked counts: a wrong curve or a dirty `dvc status` means no kill of this stage survived.
    record_fault(
        f"sigkill_{stage}", injected=KILLS, survived=0 if problems else survived, data_lost=lost + (not same)
    )
    return problems


def test_sigkilled_training_resumes_to_the_uninterrupted_bytes(lab, record_fault):
    """Both stages' kill chains at once (each in its own copy), so the module fits its time."""
    with ThreadPoolExecutor(len(lab.repos)) as pool:
        chains = {stage: pool.submit(_kill_chain, lab, stage) for stage in lab.repos}
        results = {stage: future.result() for stage, future in chains.items()}
    problems = [
        p for stage, (kills, log) in results.items() for p in _verdict(lab, stage, kills, log, record_fault)
    ]
    assert not problems, problems


# ---- (2) a second dvc repro while one runs


def test_second_dvc_repro_refuses_while_one_runs(lab, record_fault):
    """The reference runs had a second `dvc repro` started beside them (the lab fixture): it must refuse at
    once with DVC's lock message, and the first finish clean. The kill tests then check the first's bytes
    against 6 resumed runs."""
    injected = [r for r in lab.refusals if r.while_running]
    refused = [
        r
        for r in injected
        if r.exit != 0 and any(m in r.output for m in LOCK_REFUSALS) and r.seconds < 30 and not r.left
    ]
    unclean = [r for r in injected if "up to date" not in r.status.lower()]
    record_fault(
        "two_dvc_repro_at_once",
        injected=len(injected),
        survived=len([r for r in refused if r not in unclean]),
        data_lost=len(unclean),
    )
    assert len(injected) == 3, [(r.stage, r.while_running) for r in lab.refusals]
    assert refused == injected, [
        (r.stage, r.exit, round(r.seconds, 1), r.output[-800:], r.left) for r in injected
    ]
    assert not unclean, [r.status for r in unclean]
