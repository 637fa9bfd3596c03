"""Running git and dvc: one place that finds the executables and turns a failure into a one-line VimError."""

import subprocess
import sys
from pathlib import Path

from vim_core.errors import VimError
from vim_core.redact import redact_text


def dvc_executable() -> str:
    """The dvc next to this interpreter (the venv's), else the one on PATH."""
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


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
