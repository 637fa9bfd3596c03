"""Running git and dvc: one place that finds the executables, streams their output, and turns a failure
into a one-line VimError."""

import contextlib
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path

from vim_core.errors import VimError
from vim_core.redact import redact_text

BIN = Path(sys.executable).parent


def dvc_executable() -> str:
    """The dvc next to this interpreter (the venv's), else the one on PATH."""
    return str(BIN / "dvc") if (BIN / "dvc").exists() else "dvc"


def child_env(extra: dict | None = None) -> dict[str, str]:
    """This environment plus `extra`, with its tools first on PATH, and no DVC analytics."""
    path = f"{BIN}{os.pathsep}{os.environ.get('PATH', '')}"
    return {**os.environ, "PATH": path, "DVC_NO_ANALYTICS": "1", **(extra or {})}


def stream(cmd: list[str], cwd, logger, env: dict | None = None, pidfile: Path | None = None):
    """Run cmd (env: child_env(env)), each output line, redacted, into `logger` as it comes; returns its
    exit code and last lines. With `pidfile`, cmd runs in a process group of its own, whose id the file
    holds while it runs (so a runner killed outright can stop it later), and an interrupt (Ctrl-C, a
    cancelled flow) kills the whole group."""
    tail: deque[str] = deque(maxlen=200)
    logger.info("$ %s", " ".join(cmd))
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=child_env(env),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        start_new_session=pidfile is not None,
    )
    if pidfile is not None:
        pidfile.parent.mkdir(parents=True, exist_ok=True)
        pidfile.write_text(str(proc.pid))
    try:
        for raw in proc.stdout:
            if line := redact_text(raw.rstrip()):
                tail.append(line)
                logger.info(line)
        proc.wait()
    except BaseException:
        if pidfile is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        proc.stdout.close()
        if pidfile is not None:
            pidfile.unlink(missing_ok=True)
    return proc.returncode, list(tail)


def cause(lines: list[str], default: str = "no output") -> str:
    """The one-line cause in a failed command's last lines: its own `error:` lines, else DVC's last
    ERROR line, else its last line."""
    own = [line.removeprefix("error: ") for line in lines if line.startswith("error: ")]
    theirs = [line for line in lines if line.startswith("ERROR")]
    return "; ".join(own) or (theirs or lines or [default])[-1]


def run(cmd: list[str], cwd=None, env=None, timeout: float | None = None) -> str:
    """stdout of cmd; not found, a timeout or a non-zero exit is a VimError with stderr's last line."""
    name = " ".join([Path(cmd[0]).name, *cmd[1:3]])  # "dvc exp show": the command, not its arguments
    try:
        out = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise VimError(f"{name}: no answer within {timeout:g} s") from None
    except OSError as err:
        raise VimError(redact_text(f"{name}: cannot run it ({err})")) from None
    if out.returncode != 0:
        cause = ((out.stderr or out.stdout).strip().splitlines() or ["no output"])[-1]
        raise VimError(redact_text(f"{name} failed (exit {out.returncode}): {cause}"))
    return out.stdout


def dvc(*args: str, cwd=None, env=None, timeout: float | None = None) -> str:
    return run([dvc_executable(), *args], cwd=cwd, env=env, timeout=timeout)


def git(*args: str, cwd=None, env=None, timeout: float | None = 30) -> str:
    return run(["git", *args], cwd=cwd, env=env, timeout=timeout)
