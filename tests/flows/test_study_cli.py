"""The study runner's command line: a committed report of the old protocol stops it before Prefect starts,
with one line and exit 1."""

import json
from pathlib import Path

from flows.study import main

REPO = Path(__file__).resolve().parents[2]


def test_report_only_refuses_an_old_protocol_report_before_prefect_starts(
    tmp_path: Path, monkeypatch, capsys
):
    (tmp_path / "reports").mkdir()
    (tmp_path / "params.yaml").write_text((REPO / "params.yaml").read_text())
    # an old-protocol report, as the studies committed theirs before the rerun (#27)
    old = {"study": "generation", "protocol": "old (pinned cfg 3, 2 seeds, range overlap)", "arms": {}}
    (tmp_path / "reports" / "generation.json").write_text(json.dumps(old))
    study = {
        "name": "generation",
        "title": "t",
        "arms": {"a": {}},
        "metrics": [{"key": "psnr", "source": "eval"}],
    }
    (tmp_path / "gen.yaml").write_text(json.dumps(study))
    monkeypatch.chdir(tmp_path)
    assert main(["gen.yaml", "--report-only"]) == 1
    err = capsys.readouterr().err
    assert "old protocol" in err and "--replace-old" in err
    assert json.loads((tmp_path / "reports" / "generation.json").read_text())["protocol"].startswith("old")
