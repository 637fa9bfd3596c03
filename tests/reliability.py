"""Collects the reliability cases a test session ran into reports/reliability.json (hooks in conftest.py).

- tests marked `bad_input` give {"name", "clean"}: clean means the test passed, i.e. the bad input got a
  one-line error, a non-zero exit (or HTTP 4xx) and left nothing half-written;
- tests marked `security` give {"name", "ok"};
- `record_fault(name, injected=, survived=, data_lost=)` adds a fault-injection result.

A case's name is its parametrize id, else the test's name without `test_`. Rows of this session replace
the file's rows of the same name and the others stay, so running one test file (or one -k case) does not
wipe the rest; delete the file first for a report of one run alone. Written atomically, sorted by name,
under a lock, so sessions running side by side (CI's two slow-test processes) each keep their rows.
"""

import fcntl
import json
import tempfile
import zlib
from pathlib import Path

import pytest

from vim_core.io import atomic_write_text

REPORT = Path(__file__).resolve().parents[1] / "reports" / "reliability.json"
_KINDS = {"bad_input": ("bad_inputs", "clean"), "security": ("security", "ok")}
_results: dict[str, dict[str, dict]] = {"faults": {}, "bad_inputs": {}, "security": {}}


def case_name(item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else item.originalname.removeprefix("test_")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "bad_input: a bad-input case, reported in reports/reliability.json")
    config.addinivalue_line("markers", "security: a security check, reported in reports/reliability.json")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    for marker, (section, key) in _KINDS.items():
        if item.get_closest_marker(marker) is None:
            continue
        name = case_name(item)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            if report.skipped:
                _results[section].pop(name, None)
            else:
                _results[section][name] = {"name": name, key: report.passed}
        elif report.when == "teardown" and report.failed and name in _results[section]:
            _results[section][name][key] = False


@pytest.fixture
def record_fault():
    def record(name: str, *, injected: int, survived: int, data_lost: int) -> None:
        _results["faults"][name] = {
            "name": name,
            "injected": injected,
            "survived": survived,
            "data_lost": data_lost,
        }

    return record


def pytest_sessionfinish(session, exitstatus) -> None:
    if not any(_results.values()):
        return
    # CI runs the fault suite beside the other slow tests: two sessions may merge into the file at once.
    lock = Path(tempfile.gettempdir()) / f"vim-reliability-{zlib.crc32(str(REPORT).encode()):08x}.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _merge_into_report()


def _merge_into_report() -> None:
    try:
        old = json.loads(REPORT.read_text())
    except (OSError, ValueError):
        old = {}
    out = {}
    for section, rows in _results.items():
        merged = {row["name"]: row for row in old.get(section, []) if isinstance(row, dict) and "name" in row}
        merged.update(rows)
        out[section] = [merged[k] for k in sorted(merged)]
    atomic_write_text(REPORT, json.dumps(out, indent=2) + "\n")
