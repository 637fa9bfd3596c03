"""Progress lines for logs: what a long stage says when no terminal shows tqdm's bar.

tqdm draws its bar only on a terminal, so under CI, `make demo > log` or Prefect a training run printed
nothing for minutes. A Progress logs one line through `logging` at most every `interval_s` seconds (the
stage CLIs send `logging` to stderr, which `dvc repro`, CI and the retrain flow's log all carry), early
enough that the next line is due within the interval, and always at the end:

    train_tokenizer: step 120/600 (20%), loss 0.0421, 0.31 s/step, ETA 2m29s
    tokenize_dataset: img 4096/10000 (41%), 812.4 img/s, ETA 7s
    train_tokenizer: step 600/600 (100%), loss 0.0301, 0.31 s/step, done in 3m06s

On a terminal the lines go out at DEBUG (the bar is there); VIM_PROGRESS_EVERY sets the interval.
"""

import logging
import math
import os
import sys
import time
from collections.abc import Callable

from vim_core.errors import VimError

ENV = "VIM_PROGRESS_EVERY"
DEFAULT_INTERVAL_S = 30.0

log = logging.getLogger("vim.progress")


def interval_from_env() -> float:
    """Seconds between lines: VIM_PROGRESS_EVERY, or 30; one line if it is not a number >= 0."""
    raw = os.environ.get(ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL_S
    try:
        value = float(raw)
    except ValueError:
        value = -1.0
    if not math.isfinite(value) or value < 0:
        raise VimError(f"{ENV}={raw!r}: expected seconds between progress lines, a number >= 0")
    return value


def duration(seconds: float) -> str:
    """12s, 3m05s, 1h02m."""
    s = max(0, round(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    return f"{s // 3600}h{s % 3600 // 60:02d}m"


def phase(what: str, name: str, detail: str = "") -> None:
    """One line as a phase of a long stage begins; at INFO even on a terminal, as no bar shows phases."""
    log.info("%s: phase %s%s", what, name, f" ({detail})" if detail else "")


class Progress:
    """Counts units of work towards `total` and logs where it stands: done/total, the latest `fields`
    (e.g. loss), the rate since it started and the ETA.

    `done`: units already done (a resumed run), left out of the rate. `per_second`: show units per
    second (images) instead of seconds per unit (steps). `enabled=False` (other DDP ranks) logs nothing.
    """

    def __init__(
        self,
        what: str,
        total: int,
        unit: str = "step",
        *,
        done: int = 0,
        per_second: bool = False,
        enabled: bool = True,
        interval_s: float | None = None,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.what, self.total, self.unit, self.done = what, total, unit, done
        self.per_second, self.enabled, self.clock = per_second, enabled, clock
        self.interval_s = interval_from_env() if interval_s is None else interval_s
        self.level = logging.DEBUG if sys.stderr.isatty() else logging.INFO
        self.fields: dict = {}
        self.started = self.last_line = clock()
        self.first = done
        self.finished = False

    def update(self, n: int = 1, **fields) -> None:
        """n more units done; fields (name=value) replace the ones shown, None ones are not shown."""
        self.done += n
        self.fields.update(fields)
        if not self.enabled or self.finished:
            return
        now = self.clock()
        per_unit = (now - self.started) / max(self.done - self.first, 1)
        # Log now if waiting one more unit would pass the interval, so slow units still log on time.
        if self.done >= self.total or now - self.last_line + per_unit >= self.interval_s:
            self.last_line = now
            self.finished = self.done >= self.total
            log.log(self.level, self.line(now))

    def line(self, now: float) -> str:
        elapsed = now - self.started
        counted = self.done - self.first
        parts = [f"{self.what}: {self.unit} {self.done}/{self.total} ({self.done / max(self.total, 1):.0%})"]
        for k, v in self.fields.items():  # None: not known yet (the loss before the first logged step)
            if v is not None:
                parts.append(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}")
        if counted > 0:
            if self.per_second:
                parts.append(f"{counted / max(elapsed, 1e-9):.1f} {self.unit}/s")
            else:
                parts.append(f"{elapsed / counted:.3g} s/{self.unit}")
        if self.done >= self.total:
            parts.append(f"done in {duration(elapsed)}")
        elif counted > 0:
            parts.append(f"ETA {duration(elapsed / counted * (self.total - self.done))}")
        return ", ".join(parts)
