"""The champion/challenger rule on versions' tags alone (flows/registry.py applies it on a real server)."""

from types import SimpleNamespace

import pytest

from vim_core.io import spec_hash
from vim_core.promotion import EVAL_HASH_TAG, decide, decision_table

EVAL = spec_hash({"split": "test", "samples": 256, "extractor": "domain", "seed": 0})


def _mv(version, fid, acc=0.95, eval_hash=EVAL):
    tags = {
        "metric.fid_domain_val": repr(fid),
        "metric.class_accuracy_val": repr(acc),
        EVAL_HASH_TAG: eval_hash,
    }
    return SimpleNamespace(version=version, tags=tags)


@pytest.mark.parametrize(
    ("lower", "challenger_fid", "outcome"),
    [(True, 9.0, "promoted"), (True, 10.0, "kept"), (False, 11.0, "promoted"), (False, 9.0, "kept")],
)
def test_direction_and_ties(lower, challenger_fid, outcome):
    got, _ = decide(
        _mv("2", challenger_fid),
        _mv("1", 10.0),
        "fid_domain_val",
        lower,
        "class_accuracy_val",
        0.9,
    )
    assert got == outcome


def test_missing_metric_or_hash_is_refused():
    champ = _mv("1", 10.0)
    no_metric = _mv("2", 5.0)
    del no_metric.tags["metric.fid_domain_val"]
    assert decide(no_metric, champ, "fid_domain_val", True, "class_accuracy_val", 0.9)[0] == "refused"
    no_hash = _mv("2", 5.0)
    del no_hash.tags[EVAL_HASH_TAG]
    assert decide(no_hash, champ, "fid_domain_val", True, "class_accuracy_val", 0.9)[0] == "refused"


def test_no_guard_metric_means_no_guard():
    champ = _mv("1", 10.0)
    no_acc = _mv("2", 5.0)
    del no_acc.tags["metric.class_accuracy_val"]
    assert decide(no_acc, champ, "fid_domain_val", True, None, 0.9)[0] == "promoted"
    assert decide(no_acc, None, "fid_domain_val", True, None, 0.9)[0] == "promoted"
    table = decision_table(no_acc, champ, "fid_domain_val", None)
    assert set(table) == {"role", "version", "fid_domain_val", "eval_config_hash", "pipeline_run"}
