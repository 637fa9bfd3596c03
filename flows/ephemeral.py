"""Prefect's ephemeral API server, tied to the life of the process that starts it.

With no PREFECT_API_URL, Prefect 3 starts a temporary API server (`python -m uvicorn ...`, about 200 MB)
as a child process the first time a client is needed, and stops it from an atexit hook. A process killed
with SIGKILL runs no atexit hook: the server is re-parented to PID 1 and keeps running, one per killed
stage. start_ephemeral_api() starts that same server (Prefect's SubprocessASGIServer, a singleton that
every later client reuses) from the main thread, with the Linux parent-death signal set in the child:
the kernel sends the server SIGTERM when its parent dies, however it dies. The signal follows the thread
that forked the child, hence the main thread, which lives as long as the process.
"""

import ctypes
import ctypes.util
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from vim_core.errors import TransientError

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _die_with_parent() -> Callable[[], None]:
    """A preexec_fn for Popen: the child gets SIGTERM when this process dies, or exits if it already has."""
    parent = os.getpid()
    prctl = ctypes.CDLL(ctypes.util.find_library("c") or None, use_errno=True).prctl  # resolved before fork

    def preexec() -> None:
        prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
        if os.getppid() != parent:  # the parent died between fork and prctl: nobody will signal us
            os._exit(1)

    return preexec


class _PopenWithPreexec:
    """The subprocess module as Prefect's server module sees it, with a preexec_fn added to Popen."""

    def __init__(self, preexec: Callable[[], None]):
        self._preexec = preexec

    def Popen(self, *args, **kwargs):  # noqa: N802 (subprocess's own name)
        return subprocess.Popen(*args, preexec_fn=self._preexec, **kwargs)

    def __getattr__(self, name: str):
        return getattr(subprocess, name)


def start_ephemeral_api() -> str | None:
    """Start Prefect's ephemeral API server now, so that it dies with this process; return its API URL.

    Does nothing (returns None) when PREFECT_API_URL names a server, off Linux, or off the main thread;
    Prefect then starts its server itself when needed, as before. Safe to call more than once. A server
    that does not answer in time is a one-line TransientError.
    """
    from prefect.settings import PREFECT_API_URL

    if PREFECT_API_URL.value() or sys.platform != "linux":
        return None
    if threading.current_thread() is not threading.main_thread():
        return None
    from prefect.server.api import server as server_module

    server = server_module.SubprocessASGIServer()  # the instance Prefect's own clients use
    if not server.running:
        run_uvicorn = server._run_uvicorn_command  # Prefect also calls it again when the port was taken
        shim = _PopenWithPreexec(_die_with_parent())

        def run_with_pdeathsig():
            original, server_module.subprocess = server_module.subprocess, shim
            try:
                return run_uvicorn()
            finally:
                server_module.subprocess = original

        server._run_uvicorn_command = run_with_pdeathsig
        try:
            server.start()
        except RuntimeError as err:  # Prefect's "Timed out while attempting to connect ..." and its output
            from prefect.settings import PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS as TIMEOUT

            server.stop()
            raise TransientError(
                f"Prefect's ephemeral API server did not answer within {TIMEOUT.value()} s "
                f"({str(err).splitlines()[0][:120]}); raise PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS "
                "or point PREFECT_API_URL at a running server"
            ) from None
    return server.api_url
