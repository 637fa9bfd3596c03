"""Collects the reliability cases a test run saw into reports/reliability.json (hooks in conftest.py).

- tests marked `bad_input` give {"name", "clean", "status", "at"}: clean means the test passed, i.e. the
  bad input got a one-line error, a non-zero exit (or HTTP 4xx) and left nothing half-written;
- tests marked `security` give {"name", "ok", "status", "at"};
- `record_fault(name, injected=, survived=, data_lost=)` adds a fault-injection row.

The report only says what one run saw. Nothing is kept from an earlier run: every row is written by the
session that ran it, with its UTC time. status is "passed", "failed" or "not run" (skipped or deselected:
clean/ok is then null, never true). A fault row is recorded even when its test fails: a test that fails
after record_fault (a wrong curve, a dirty `dvc status`) gets status "failed" and at most injected - 1
survived; one that fails before gets a row of its own, named after the test, with nothing survived.

A run may span pytest processes (CI's default suite, then its two slow steps side by side): those
sharing VIM_RELIABILITY_RUN (.ci/run sets it) each write their rows to reports/.reliability/<run>/ and
merge that folder into the report, under a lock, so neither clobbers the other and the last one to finish
leaves the whole run. A session without the variable is a run of its own. Parts of other runs are
deleted; the report names its run, its sessions and when each finished.
"""

import datetime
import fcntl
import json
import os
import shutil
import tempfile
import uuid
import zlib
from pathlib import Path

import pytest

from vim_core.io import atomic_write_text

# VIM_RELIABILITY_REPORT moves the report (tests of this module write theirs to tmp).
REPORT = Path(
    os.environ.get("VIM_RELIABILITY_REPORT")
    or Path(__file__).resolve().parents[1] / "reports" / "reliability.json"
)
PARTS = REPORT.parent / ".reliability"
RUN_ENV = "VIM_RELIABILITY_RUN"
_KINDS = {"bad_input": ("bad_inputs", "clean"), "security": ("security", "ok")}
_RANK = {"not run": 0, "passed": 1, "failed": 2}  # when two sessions hold a row: ran beats not run
_results: dict[str, dict[str, dict]] = {"faults": {}, "bad_inputs": {}, "security": {}}
_faults_of: dict[str, list[str]] = {}  # test nodeid -> fault rows it recorded
_session = {"id": f"{os.getpid()}-{uuid.uuid4().hex[:6]}", "started": None}


def now() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds")


def run_id() -> str:
    return os.environ.get(RUN_ENV) or f"session-{_session['id']}"


def case_name(item) -> str:
    callspec = getattr(item, "callspec", None)
    return callspec.id if callspec is not None else item.originalname.removeprefix("test_")


def pytest_configure(config) -> None:
    config.addinivalue_line("markers", "bad_input: a bad-input case, reported in reports/reliability.json")
    config.addinivalue_line("markers", "security: a security check, reported in reports/reliability.json")
    _session["started"] = now()


def _set(section: str, key: str, name: str, status: str) -> None:
    row = {"name": name, key: {"passed": True, "failed": False}.get(status), "status": status, "at": now()}
    old = _results[section].get(name)
    if old is None or _RANK[status] >= _RANK[old["status"]]:
        _results[section][name] = row


def pytest_deselected(items) -> None:
    for item in items:
        for marker, (section, key) in _KINDS.items():
            if item.get_closest_marker(marker) is not None:
                _set(section, key, case_name(item), "not run")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    report = outcome.get_result()
    for marker, (section, key) in _KINDS.items():
        if item.get_closest_marker(marker) is None:
            continue
        name = case_name(item)
        if report.when == "call" or (report.when == "setup" and not report.passed):
            _set(section, key, name, "not run" if report.skipped else "passed" if report.passed else "failed")
        elif report.when == "teardown" and report.failed:
            _set(section, key, name, "failed")
    if report.failed and "record_fault" in getattr(item, "fixturenames", ()):
        _fault_test_failed(item)


def _fault_test_failed(item) -> None:
    """A failing fault test cannot report a fault as survived, whatever it recorded before failing."""
    names = _faults_of.get(item.nodeid) or []
    if not names:  # it failed before record_fault: the row says so
        name = f"{case_name(item)} (failed before recording)"
        _results["faults"][name] = {
            "name": name, "injected": None, "survived": 0, "data_lost": None, "status": "failed", "at": now(),
        }  # fmt: skip
        _faults_of[item.nodeid] = [name]
        return
    for name in names:
        row = _results["faults"][name]
        row["status"] = "failed"
        if row["injected"]:
            row["survived"] = min(row["survived"], row["injected"] - 1)


@pytest.fixture
def record_fault(request):
    def record(name: str, *, injected: int, survived: int, data_lost: int) -> None:
        _results["faults"][name] = {
            "name": name,
            "injected": injected,
            "survived": survived,
            "data_lost": data_lost,
            "status": "passed",  # until the test fails (then the hook above lowers it)
            "at": now(),
        }
        _faults_of.setdefault(request.node.nodeid, []).append(name)

    return record


def write_run_report(path: Path, data: dict) -> None:
    """Another report of this run (reports/serving_load.json): stamped with the run and its time."""
    atomic_write_text(path, json.dumps({"run": run_id(), "at": now(), **data}, indent=2) + "\n")


def pytest_sessionfinish(session, exitstatus) -> None:
    if not any(_results.values()):
        return
    lock = Path(tempfile.gettempdir()) / f"vim-reliability-{zlib.crc32(str(REPORT).encode()):08x}.lock"
    with open(lock, "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        _write_part_and_merge()


def _write_part_and_merge() -> None:
    run = run_id()
    folder = PARTS / run
    for other in PARTS.glob("*") if PARTS.is_dir() else []:
        if other.name != run:  # an earlier run's parts say nothing about this one
            shutil.rmtree(other, ignore_errors=True)
    part = {
        "session": _session["id"],
        "started": _session["started"],
        "finished": now(),
        **{section: list(rows.values()) for section, rows in _results.items()},
    }
    atomic_write_text(folder / f"{_session['id']}.json", json.dumps(part, indent=2) + "\n")
    parts = [json.loads(p.read_text()) for p in sorted(folder.glob("*.json"))]
    out: dict = {
        "run": run,
        "generated_at": now(),
        "sessions": [{k: p[k] for k in ("session", "started", "finished")} for p in parts],
    }
    for section in _results:
        merged: dict[str, dict] = {}
        for p in parts:
            for row in p.get(section, []):
                old = merged.get(row["name"])
                if old is None or _RANK[row["status"]] >= _RANK[old["status"]]:
                    merged[row["name"]] = row
        out[section] = [merged[k] for k in sorted(merged)]
    atomic_write_text(REPORT, json.dumps(out, indent=2) + "\n")
