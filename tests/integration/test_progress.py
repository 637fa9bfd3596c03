"""Progress lines in logs: a stage run with stderr in a file says where it stands, as a terminal's bar would."""

import logging
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from vim_core.errors import VimError
from vim_core.progress import Progress, duration, interval_from_env

BIN = Path(sys.executable).parent
# docs/operations.md "Progress in logs": what, unit done/total (percent)[, field value...], rate,
# ETA or done in
STEP_LINE = re.compile(
    r"train_tokenizer: step (\d+)/(\d+) \(\d+%\), loss [\d.e+-]+, [\d.e+-]+ s/step, (ETA|done in) \w+$"
)


class FakeClock:
    def __init__(self):
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def lines(caplog):
    caplog.set_level(logging.DEBUG, logger="vim.progress")  # DEBUG: pytest -s on a terminal logs there
    return lambda: [r.getMessage() for r in caplog.records if r.name == "vim.progress"]


def test_lines_come_at_the_interval_with_rate_and_eta_and_always_at_the_end(lines):
    clock = FakeClock()
    p = Progress("train", 100, clock=clock, interval_s=30.0)
    for step in range(100):
        clock.now += 2.0  # 2 s a step: a line every 14 steps, as waiting for a 15th would pass 30 s
        p.update(1, loss=1.0 / (step + 1))
    got = lines()
    assert got[0] == "train: step 14/100 (14%), loss 0.07143, 2 s/step, ETA 2m52s"
    assert len(got) == 8 and got[-1] == "train: step 100/100 (100%), loss 0.01, 2 s/step, done in 3m20s"
    p.update(1)  # past the end: nothing more
    assert len(lines()) == 8


def test_slow_units_still_log_within_the_interval(lines):
    """A unit of 21 s against a 30 s interval: every unit logs, else the gap would reach 42 s."""
    clock = FakeClock()
    p = Progress("train_classifier", 4, unit="fit", clock=clock, interval_s=30.0)
    for _ in range(4):
        clock.now += 21.0
        p.update(1)
    assert lines() == [
        "train_classifier: fit 1/4 (25%), 21 s/fit, ETA 1m03s",
        "train_classifier: fit 2/4 (50%), 21 s/fit, ETA 42s",
        "train_classifier: fit 3/4 (75%), 21 s/fit, ETA 21s",
        "train_classifier: fit 4/4 (100%), 21 s/fit, done in 1m24s",
    ]


def test_rates_per_second_resumed_runs_and_silent_ranks(lines):
    clock = FakeClock()
    images = Progress("tokenize_dataset", 1000, unit="img", per_second=True, clock=clock, interval_s=0)
    clock.now += 0.5
    images.update(250)
    assert lines() == ["tokenize_dataset: img 250/1000 (25%), 500.0 img/s, ETA 2s"]
    resumed = Progress("train", 10, done=8, clock=clock, interval_s=0)  # steps before the resume: no rate
    clock.now += 3.0
    resumed.update(1, loss=None)  # None: not known yet, not shown
    assert lines()[-1] == "train: step 9/10 (90%), 3 s/step, ETA 3s"
    other_rank = Progress("train", 10, enabled=False, clock=clock, interval_s=0)
    other_rank.update(10)
    assert len(lines()) == 2
    assert (duration(59.6), duration(61), duration(3725)) == ("1m00s", "1m01s", "1h02m")


def test_a_terminal_gets_the_lines_at_debug_only(monkeypatch, caplog):
    class Terminal:
        def isatty(self) -> bool:
            return True

        def write(self, text: str) -> int:
            return len(text)

    caplog.set_level(logging.DEBUG, logger="vim.progress")
    monkeypatch.setattr(sys, "stderr", Terminal())
    Progress("train", 1, interval_s=0).update(1)
    monkeypatch.undo()
    Progress("train", 1, interval_s=0).update(1)  # pytest's captured stderr is no terminal
    assert [r.levelno for r in caplog.records if r.name == "vim.progress"] == [logging.DEBUG, logging.INFO]


def test_the_interval_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv("VIM_PROGRESS_EVERY", raising=False)
    assert interval_from_env() == 30.0
    monkeypatch.setenv("VIM_PROGRESS_EVERY", "0.5")
    assert interval_from_env() == 0.5 and Progress("x", 1).interval_s == 0.5
    for bad in ("soon", "-1", "nan"):
        monkeypatch.setenv("VIM_PROGRESS_EVERY", bad)
        with pytest.raises(VimError, match=r"^VIM_PROGRESS_EVERY=.*: expected seconds between progress"):
            interval_from_env()


def test_a_stage_with_stderr_in_a_file_logs_periodic_progress(repo_copy, tmp_path, monkeypatch, lines):
    """`python -m flows.train_tokenizer` (a plain stage process) as under `make demo > log`."""
    from tests.integration.test_orchestration_pipeline import tiny_params
    from vim_core.config import load_params
    from vim_core.data.prepare import prepare
    from vim_core.tokenizer.encode_dataset import tokenize_dataset

    raw = tiny_params(yaml.safe_load((repo_copy / "params.yaml").read_text()))
    raw["tokenizer"]["train"].update(steps=300, checkpoint_every=300)  # about 3 s of steps
    (repo_copy / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    monkeypatch.chdir(repo_copy)
    params = load_params("params.yaml")
    prepare(params.data)
    env = {
        **os.environ,
        "PATH": f"{BIN}:{os.environ['PATH']}",
        "PYTHONPATH": str(repo_copy),
        "VIM_TRACKING": "off",
        "VIM_PROGRESS_EVERY": "0.5",
        "OMP_NUM_THREADS": "1",
    }
    log = tmp_path / "stderr.log"
    with open(log, "w") as stderr:  # a file, not a terminal: tqdm's bar is off
        res = subprocess.run(
            [sys.executable, "-m", "flows.train_tokenizer"],
            cwd=repo_copy,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            timeout=300,
        )
    text = log.read_text()
    assert res.returncode == 0, text[-2000:]
    found = [STEP_LINE.search(line) for line in text.splitlines()]
    steps = [(int(m[1]), int(m[2]), m[3]) for m in found if m]
    assert len(steps) >= 3, text[-2000:]  # periodic lines, not only the last one
    assert all(total == 300 for _, total, _ in steps) and steps[-1] == (300, 300, "done in")
    assert all(kind == "ETA" for _, _, kind in steps[:-1]) and [s for s, _, _ in steps] == sorted(
        s for s, _, _ in steps
    )

    # tokenize_dataset, the next stage's work, counts images
    monkeypatch.setenv("VIM_PROGRESS_EVERY", "0")
    tokenize_dataset("models/tokenizer/tokenizer.safetensors", params.data.out_dir, tmp_path / "tokens")
    images = [m for m in lines() if m.startswith("tokenize_dataset: img ")]
    assert re.fullmatch(r"tokenize_dataset: img (\d+)/\1 \(100%\), [\d.]+ img/s, done in \w+", images[-1])
    assert len(images) >= 2, images
