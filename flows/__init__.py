"""The stage entry points (plain Python, run by DVC) and the Prefect flows above them; env defaults for Prefect."""

import os
import tempfile
from pathlib import Path

# Prefect reads these at import time: keep its state out of the repo, and don't phone home.
os.environ.setdefault("PREFECT_HOME", str(Path(tempfile.gettempdir()) / "vim-prefect-home"))
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
Path(os.environ["PREFECT_HOME"]).expanduser().mkdir(parents=True, exist_ok=True)  # its sqlite db lives here
os.environ.setdefault("PREFECT_SERVER_LOGGING_LEVEL", "WARNING")
# A fresh ephemeral database migrates on first start; on a busy 2-core machine that can pass 20 s.
os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120")
