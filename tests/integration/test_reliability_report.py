"""reports/reliability.json says only what one run saw (tests/reliability.py), checked on real pytest
sessions run in subprocesses against a small generated test module, with the report moved to tmp."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

CASES = """
import pytest

@pytest.mark.bad_input
def test_clean_case():
    pass

@pytest.mark.bad_input
def test_broken_case():
    assert False

@pytest.mark.bad_input
def test_skipped_case():
    pytest.skip("not here")

@pytest.mark.bad_input
@pytest.mark.slow
def test_deselected_case():
    pass

def test_fault_fails_after_recording(record_fault):
    record_fault("fault_after", injected=3, survived=3, data_lost=0)
    assert False, "a wrong curve"

def test_fault_fails_before_recording(record_fault):
    raise RuntimeError("the lab broke")

def test_fault_survives(record_fault):
    record_fault("fault_ok", injected=3, survived=3, data_lost=0)
"""

CONFTEST = "from tests.reliability import pytest_configure, pytest_deselected, pytest_runtest_makereport, \
pytest_sessionfinish, record_fault  # noqa: F401\n"


def _session(folder: Path, report: Path, run: str | None, *args: str) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "VIM_RELIABILITY_REPORT": str(report)}
    env.pop("VIM_RELIABILITY_RUN", None)
    if run:
        env["VIM_RELIABILITY_RUN"] = run
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow", *args]
    return subprocess.Popen(cmd, cwd=folder, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)


def _rows(report: Path, section: str) -> dict[str, dict]:
    return {r["name"]: r for r in json.loads(report.read_text())[section]}


@pytest.fixture
def suite(tmp_path) -> Path:
    folder = tmp_path / "suite"
    folder.mkdir()
    (folder / "conftest.py").write_text(CONFTEST)
    (folder / "test_cases.py").write_text(CASES)
    (folder / "pytest.ini").write_text("[pytest]\nmarkers =\n    slow: slow\n")
    return folder


def test_report_holds_this_run_only_and_never_a_pass_it_did_not_see(suite, tmp_path):
    report = tmp_path / "reports" / "reliability.json"
    report.parent.mkdir()
    ghost = {"name": "ghost", "clean": True}  # a row from an earlier run
    report.write_text(json.dumps({"faults": [], "bad_inputs": [ghost], "security": []}))
    proc = _session(suite, report, None)
    out = proc.communicate(timeout=120)[0].decode()
    assert proc.returncode == 1, out  # the failing cases fail
    bad = _rows(report, "bad_inputs")
    assert "ghost" not in bad
    assert {k: (v["status"], v["clean"]) for k, v in bad.items()} == {
        "clean_case": ("passed", True),
        "broken_case": ("failed", False),
        "skipped_case": ("not run", None),
        "deselected_case": ("not run", None),
    }
    faults = _rows(report, "faults")
    assert faults["fault_after"]["status"] == "failed" and faults["fault_after"]["survived"] == 2
    assert faults["fault_ok"]["status"] == "passed" and faults["fault_ok"]["survived"] == 3
    before = faults["fault_fails_before_recording (failed before recording)"]
    assert before["status"] == "failed" and before["survived"] == 0
    data = json.loads(report.read_text())
    assert data["run"].startswith("session-") and len(data["sessions"]) == 1
    assert all(r["at"] >= data["sessions"][0]["started"] for s in ("faults", "bad_inputs") for r in data[s])


def test_sessions_of_one_run_merge_and_a_new_run_starts_afresh(suite, tmp_path):
    """Two sessions of one run side by side (CI's slow steps): both sets of rows; a later run: its own."""
    report = tmp_path / "reliability.json"
    a = _session(suite, report, "run-1", "-k", "clean_case or fault_survives")
    b = _session(suite, report, "run-1", "-k", "broken_case")
    for p in (a, b):
        p.communicate(timeout=120)
    first = json.loads(report.read_text())
    assert first["run"] == "run-1" and len(first["sessions"]) == 2
    bad = _rows(report, "bad_inputs")
    assert bad["clean_case"]["status"] == "passed" and bad["broken_case"]["status"] == "failed"
    # -k deselects the others in each session; a case one session ran is not "not run" in the merge
    assert bad["skipped_case"]["status"] == "not run"
    assert "fault_ok" in _rows(report, "faults")
    c = _session(suite, report, "run-2", "-k", "clean_case")
    c.communicate(timeout=120)
    second = json.loads(report.read_text())
    assert second["run"] == "run-2" and len(second["sessions"]) == 1
    assert (
        "fault_ok" not in _rows(report, "faults")
        and _rows(report, "bad_inputs")["broken_case"]["status"] == "not run"
    )
