"""Checkpoint faults at the trainer level: the real `vim_core.cli` trainers, restarted after the newest
checkpoint was damaged, or stopped by a disk that filled during a checkpoint write.

Both must lose nothing: the run falls back to (or keeps) the previous complete checkpoint, and resuming
from it ends with weights bit-identical to an uninterrupted run's. One reference run and one killed run
per trainer are shared by every injection (each injection damages a fresh copy of the killed run's
checkpoints), which keeps the module to a few minutes.
"""

import functools
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

from tests.faults.points import fault_rng
from tests.vim_core.train.test_checkpoint import tmpfs
from tests.vim_core.train.test_trainer_run import TRAINERS, _cli, _params
from vim_core.errors import VimError
from vim_core.train.checkpoint import META_FILE, STATE_FILE, list_checkpoints, verify_checkpoint

pytestmark = pytest.mark.slow

KEEP = 4  # every checkpoint of the 16-step run stays, so the disk-full test knows each one's size
WAIT = 300  # seconds one trainer process may take, under CPU contention included
PAGE = 4096  # tmpfs allocates whole pages per file
DAMAGES = {
    # fault name -> what the trainer's "skipping broken checkpoint" line must say about the file
    "checkpoint_truncated": "the file is truncated or corrupt",
    "checkpoint_bit_flipped": "sha256 does not match meta.json",
    "checkpoint_meta_missing": "missing; the checkpoint is incomplete",
    "checkpoint_file_missing": "missing from the checkpoint",
    "checkpoint_meta_corrupt": "corrupt checkpoint metadata",
}


def _work(root: Path, stage2: Path, trainer: str) -> Path:
    root.mkdir(parents=True)
    (root / "params.yaml").write_text(yaml.safe_dump(_params(stage2, root, trainer, keep_checkpoints=KEEP)))
    return root


def _finish(proc: subprocess.Popen, deadline: float) -> tuple[int, str]:
    """(exit code, stderr) of a trainer process, killed at the deadline (then the code is -9)."""
    try:
        _, err = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        _, err = proc.communicate()
        err += "\n(killed at the test's deadline)"
    return proc.returncode, err


def _weights(work: Path, trainer: str) -> dict[str, torch.Tensor]:
    return load_file(str(work / TRAINERS[trainer][2]))


def _same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _run_dir(work: Path) -> Path:
    """ckpt/<fingerprint>: the one run directory under the work dir's checkpoint_dir."""
    (run,) = [p for p in (work / "ckpt").iterdir() if p.is_dir()]
    return run


def _complete(run: Path) -> list[int]:
    steps = []
    for step, path in list_checkpoints(run):
        try:
            verify_checkpoint(path)
        except VimError:
            continue
        steps.append(step)
    return steps


def _leftovers(run: Path) -> list[str]:
    return sorted(p.name for p in run.iterdir() if p.name.startswith((".tmp-step-", ".old-step-")))


def _pages(path: Path) -> int:
    """Bytes a checkpoint directory takes on a tmpfs."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in path.iterdir())


@pytest.fixture(scope="module")
def reference(stage2, tmp_path_factory):
    """trainer -> the work dir of its uninterrupted 16-step run (made on first use)."""

    def make(trainer: str) -> Path:
        work = _work(tmp_path_factory.mktemp("reference") / trainer, stage2, trainer)
        code, err = _finish(_cli(trainer, work), time.monotonic() + WAIT)
        assert code == 0, err
        assert [s for s, _ in list_checkpoints(_run_dir(work))] == [4, 8, 12, 16]
        return work

    return functools.cache(make)


@pytest.fixture(scope="module")
def killed(stage2, tmp_path_factory):
    """trainer -> the checkpoint_dir of a run SIGKILLed once it had >= 2 complete checkpoints, the newest >= 8."""

    def make(trainer: str) -> Path:
        work = _work(tmp_path_factory.mktemp("killed") / trainer, stage2, trainer)
        proc = _cli(trainer, work)
        deadline = time.monotonic() + WAIT
        while time.monotonic() < deadline and proc.poll() is None:
            if any(int(m.parent.name.split("-")[1]) >= 8 for m in work.glob(f"ckpt/*/step-*/{META_FILE}")):
                break
            time.sleep(0.05)
        assert proc.poll() is None, "the run finished (or stalled) before it could be killed"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        assert len(_complete(_run_dir(work))) >= 2 and not (work / "metrics.json").exists()
        return work / "ckpt"

    return functools.cache(make)


def _damage(kind: str, rng, newest: Path) -> Path:
    """Damage one file of the checkpoint at a random point; returns the file the log must name."""
    if kind == "checkpoint_meta_missing":
        print(f"{kind}: {newest / META_FILE} removed")
        (newest / META_FILE).unlink()
        return newest / META_FILE
    if kind == "checkpoint_meta_corrupt":  # cut inside its JSON: a half-written metadata file
        text = (newest / META_FILE).read_bytes()
        keep = rng.randrange(1, len(text.rstrip()) - 1)
        print(f"{kind}: {newest / META_FILE} cut from {len(text)} to {keep} bytes")
        (newest / META_FILE).write_bytes(text[:keep])
        return newest / META_FILE
    target = rng.choice(sorted(newest.glob("*.safetensors")) + [newest / STATE_FILE])
    if kind == "checkpoint_file_missing":
        print(f"{kind}: {target} removed")
        target.unlink()
        return target
    data = bytearray(target.read_bytes())
    if kind == "checkpoint_truncated":
        keep = rng.randrange(len(data))
        print(f"{kind}: {target} cut from {len(data)} to {keep} bytes")
        target.write_bytes(data[:keep])
    else:
        offset, bit = rng.randrange(len(data)), rng.randrange(8)
        print(f"{kind}: {target} bit {bit} of byte {offset} flipped")
        data[offset] ^= 1 << bit
        target.write_bytes(data)
    return target


def _damaged_restart(kind, rng, trainer, stage2, base: Path, ref: Path, work: Path) -> tuple[bool, bool, str]:
    """One injection: (survived, data_lost, what went wrong)."""
    work = _work(work, stage2, trainer)
    shutil.copytree(base, work / "ckpt")
    run = _run_dir(work)
    *_, previous, newest = _complete(run)
    target = _damage(kind, rng, run / f"step-{newest:08d}")
    code, err = _finish(_cli(trainer, work), time.monotonic() + WAIT)
    if code != 0:
        return False, True, f"exit {code}: {err[-2000:]}"
    metrics = json.loads((work / "metrics.json").read_text())
    lost = metrics["resumed_from"] != previous or not _same(_weights(work, trainer), _weights(ref, trainer))
    if lost:
        return False, True, f"resumed_from {metrics['resumed_from']} (want {previous}) or weights differ"
    said = [line for line in err.splitlines() if line.startswith("skipping broken checkpoint")]
    if not any(str(target) in line and DAMAGES[kind] in line for line in said):
        return False, False, f"no log line names {target} and why; stderr: {err[-2000:]}"
    return True, False, ""


@pytest.mark.parametrize("kind", sorted(DAMAGES))
def test_a_damaged_newest_checkpoint_falls_back_to_the_previous(
    kind, stage2, reference, killed, tmp_path, record_fault
):
    rng = fault_rng(kind)
    order = sorted(TRAINERS)
    rng.shuffle(order)  # alternate the trainers, starting with either
    survived = lost = 0
    problems = []
    for i in range(3):
        trainer = order[i % 2]
        ok, gone, why = _damaged_restart(
            kind, rng, trainer, stage2, killed(trainer), reference(trainer), tmp_path / f"{i}-{trainer}"
        )
        survived += ok
        lost += gone
        if why:
            problems.append(f"{trainer}: {why}")
    record_fault(kind, injected=3, survived=survived, data_lost=lost)
    assert survived == 3 and lost == 0, problems


def _disk_full_then_resume(rng, trainer, stage2, ref: Path, work: Path) -> tuple[bool, bool, str]:
    """One injection: a tmpfs checkpoint_dir pre-filled so the first checkpoint fits and a later one does not."""
    sizes = [_pages(path) for _, path in list_checkpoints(_run_dir(ref))]
    total = [sum(sizes[: k + 1]) for k in range(len(sizes))]
    margin = 4 * PAGE
    room = rng.randrange(total[0] + margin, total[-1] - margin)  # the space the checkpoints get
    size = total[-1] + 64 * PAGE
    work = _work(work, stage2, trainer)
    with tmpfs(work / "ckpt", size):
        filler = work / "ckpt" / "filler"
        with open(filler, "wb") as f:
            f.write(b"\0" * (size - room))
        print(f"disk_full_checkpoint_write: {trainer}, {room} bytes free for checkpoints of {sizes}")
        code, err = _finish(_cli(trainer, work), time.monotonic() + WAIT)
        run = _run_dir(work)
        kept = [s for s, _ in list_checkpoints(run)]
        intact = _complete(run)
        lost = kept != intact or bool(_leftovers(run)) or not kept
        if lost:
            return False, True, f"checkpoints {kept}, intact {intact}, leftovers {_leftovers(run)}"
        failed = kept[-1] + 4
        want = (
            f"error: {run}: checkpoint write failed, no space left on device (step {failed} not saved; "
            "the previous checkpoints are intact: free space and rerun to resume from the newest)"
        )
        if code == 0 or err.strip().splitlines() != [want] or (work / "metrics.json").exists():
            return False, False, f"exit {code}, stderr {err[-2000:]!r}, wanted one line {want!r}"
        filler.unlink()
        code, err = _finish(_cli(trainer, work), time.monotonic() + WAIT)
        if code != 0:
            return False, True, f"resume after freeing space: exit {code}: {err[-2000:]}"
        metrics = json.loads((work / "metrics.json").read_text())
        if metrics["resumed_from"] != kept[-1] or not _same(_weights(work, trainer), _weights(ref, trainer)):
            return False, True, f"resumed_from {metrics['resumed_from']} (want {kept[-1]}) or weights differ"
    return True, False, ""


def test_disk_full_during_a_checkpoint_write(reference, stage2, tmp_path, record_fault):
    rng = fault_rng("disk_full_checkpoint_write")
    order = sorted(TRAINERS)
    rng.shuffle(order)
    survived = lost = 0
    problems = []
    for i in range(3):
        trainer = order[i % 2]
        ok, gone, why = _disk_full_then_resume(
            rng, trainer, stage2, reference(trainer), tmp_path / f"{i}-{trainer}"
        )
        survived += ok
        lost += gone
        if why:
            problems.append(f"{trainer}: {why}")
    record_fault("disk_full_checkpoint_write", injected=3, survived=survived, data_lost=lost)
    assert survived == 3 and lost == 0, problems
