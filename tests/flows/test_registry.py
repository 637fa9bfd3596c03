"""Champion/challenger promotion against a real `mlflow server`, with real (tiny) pyfunc model versions."""

import json
from pathlib import Path

import pytest

from flows import mlflow_run, registry, tracking
from flows.registry import CHALLENGER, CHAMPION, compare_and_promote, register_challenger
from vim_core.io import spec_hash

ECHO = Path(__file__).resolve().parents[1] / "assets" / "echo_model.py"
EVAL = spec_hash({"split": "test", "samples": 256, "extractor": "domain", "seed": 0})
OTHER_EVAL = spec_hash({"split": "test", "samples": 512, "extractor": "domain", "seed": 0})

MLFLOW_EXPERIMENT = "registry-tests"


@pytest.fixture
def reg_env(tracking_env):
    return tracking_env


def _pipeline(name, fid, acc, eval_hash=EVAL) -> tuple[str, str]:
    """One pipeline run: log a real pyfunc model in its evaluate stage, register it as `name`."""
    import mlflow

    with mlflow_run.pipeline_run("pipeline") as parent, tracking.stage_run("evaluate") as t:
        info = mlflow.pyfunc.log_model(name="model", python_model=str(ECHO), pip_requirements=["mlflow"])
        # The test split's numbers rank the other way round: a promotion that read them would go wrong.
        metrics = {
            "fid_domain_val": fid,
            "class_accuracy_val": acc,
            "fid_domain": 100.0 - fid,
            "class_accuracy": 1.0 - acc,
            "psnr": 20.0,
        }
        t.log_metrics(metrics, step=0)
        version = register_challenger(info.model_uri, metrics, t.run_id, eval_hash=eval_hash, name=name)
    return parent, version


def _alias(name, alias) -> str | None:
    return registry.version_of(registry.by_alias(mlflow_run.client(), name, alias))


def test_champion_challenger_lifecycle(reg_env, name, tmp_path):
    import mlflow

    # 1. The first challenger passing the guard becomes champion.
    p1, v1 = _pipeline(name, fid=20.0, acc=0.95)
    assert v1 == "1" and _alias(name, CHALLENGER) == "1"
    c = mlflow_run.client()
    mv = c.get_model_version(name, "1")
    assert mv.tags[registry.PIPELINE_TAG] == p1 and mv.tags[registry.EVAL_HASH_TAG] == EVAL
    assert float(mv.tags["metric.fid_domain_val"]) == 20.0 and float(mv.tags["metric.fid_domain"]) == 80.0
    with mlflow_run.pipeline_run("promote") as promote_run:
        first = compare_and_promote(name)
    assert first["outcome"] == "promoted" and "first" in first["reason"]
    assert first["metric"] == "fid_domain_val" and first["guard_metric"] == "class_accuracy_val"
    assert _alias(name, CHAMPION) == v1 == first["champion_after"] and first["champion_before"] is None
    model = mlflow.pyfunc.load_model(registry.champion_uri(name))
    assert model.predict([1.0, 2.0]) == [2.0, 3.0]
    # the decision and its table are logged on the run that asked
    decision = json.loads(
        Path(c.download_artifacts(promote_run, "promotion/decision.json", str(tmp_path))).read_text()
    )
    assert decision["outcome"] == "promoted" and decision["table"]["role"] == [CHAMPION, CHALLENGER]
    assert c.get_run(promote_run).data.tags[registry.DECISION_TAG] == "promoted"
    assert "promotion/comparison.json" in [f.path for f in c.list_artifacts(promote_run, "promotion")]

    # 2. A worse challenger (higher FID) stays challenger; the champion does not move.
    _, v2 = _pipeline(name, fid=25.0, acc=0.97)
    worse = compare_and_promote(name)
    assert worse["outcome"] == "kept" and not worse["promoted"]
    assert _alias(name, CHAMPION) == v1 and _alias(name, CHALLENGER) == v2
    table = worse["table"]
    rows = {
        r: (v, f) for r, v, f in zip(table["role"], table["version"], table["fid_domain_val"], strict=True)
    }
    assert rows[CHAMPION] == ("1", 20.0) and rows[CHALLENGER] == ("2", 25.0)
    assert c.get_model_version(name, "2").tags[registry.DECISION_TAG].startswith("kept")

    # 3. A better one is promoted.
    _, v3 = _pipeline(name, fid=15.0, acc=0.96)
    better = compare_and_promote(name)
    assert better["outcome"] == "promoted" and better["champion_before"] == v1
    assert _alias(name, CHAMPION) == v3 == "3"

    # 4. Better on FID but failing the accuracy guard: not promoted.
    _, v4 = _pipeline(name, fid=10.0, acc=0.5)
    guarded = compare_and_promote(name, guard_min=0.9)
    assert guarded["outcome"] == "kept" and "guard" in guarded["reason"]
    assert _alias(name, CHAMPION) == v3
    # ... and the guard threshold is an argument, not a constant
    assert compare_and_promote(name, guard_min=0.4)["outcome"] == "promoted"
    assert _alias(name, CHAMPION) == v4
    assert compare_and_promote(name)["reason"] == "the challenger already is the champion"

    # 5. Scored by a different evaluation: refused, however good it looks.
    _, v5 = _pipeline(name, fid=1.0, acc=0.99, eval_hash=OTHER_EVAL)
    refused = compare_and_promote(name)
    assert refused["outcome"] == "refused" and "eval config" in refused["reason"]
    assert _alias(name, CHAMPION) == v4 and _alias(name, CHALLENGER) == v5


def test_first_challenger_failing_guard(reg_env, name):
    assert compare_and_promote(name)["outcome"] == "no_challenger"
    _pipeline(name, fid=5.0, acc=0.2)
    out = compare_and_promote(name)
    assert out["outcome"] == "kept" and _alias(name, CHAMPION) is None
