"""Model registry: register a pipeline run's model as the challenger, promote it to champion when it wins.

A pipeline run registers one version of one model, `vim`: the generator pyfunc, whose artifacts also hold
the tokenizer and transformer weights (flows/pyfunc_models.py). The version carries, as tags, the eval
metrics of that run's evaluate stage, the hash of the evaluation config, and the pipeline (parent) run.
`champion` and `challenger` are aliases of that one model, so registering is one register_model and one
alias set, and promoting is one alias move: nothing can leave them split across pipeline runs.

The rule itself (vim_core/promotion.py) compares the two versions' tags: the same evaluation (eval-config
hash), the guard, then the metric, all on the validation split (params.yaml `promotion:`).
"""

import logging

from flows.mlflow_run import MAX_TAG_VALUE, check_reachable, client, configure
from vim_core.promotion import (
    EVAL_HASH_TAG,
    METRIC_TAG,
    PIPELINE_TAG,
    decide,
    decision_table,
    finite_number,
    version_of,
)

log = logging.getLogger("vim.registry")

MODEL_NAME = "vim"
CHAMPION = "champion"
CHALLENGER = "challenger"
RUN_TAG = "vim.source_run"
DECISION_TAG = "vim.promotion"


def champion_uri(name: str = MODEL_NAME) -> str:
    return f"models:/{name}@{CHAMPION}"


def _pipeline_of(run_id: str | None) -> str | None:
    """The pipeline (parent) run a stage run belongs to, else the run itself."""
    if not run_id:
        return None
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    return client().get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID, run_id)


def register_challenger(
    model_uri: str, metrics: dict[str, float], run_id: str | None, *, eval_hash: str, name: str = MODEL_NAME
) -> str:
    """Register `model_uri` as a new version of `name`, tag it with its eval metrics, alias it challenger.

    `eval_hash` is vim_core.eval.report.eval_config_hash() of the evaluation that produced `metrics`.
    The tags are set by register_model itself, so a version is never seen without them; a registration
    that dies before the alias moves leaves an unaliased version and the previous challenger in place.
    Returns the version number as a string.
    """
    import mlflow

    configure()
    check_reachable()
    tags = {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items() if finite_number(v) is not None}
    tags[EVAL_HASH_TAG] = eval_hash
    if pipeline := _pipeline_of(run_id):
        tags[PIPELINE_TAG] = pipeline
    if run_id:
        tags[RUN_TAG] = run_id
    version = str(mlflow.register_model(model_uri, name, tags=tags).version)
    client().set_registered_model_alias(name, CHALLENGER, version)
    log.info("registered %s v%s as %s", name, version, CHALLENGER)
    return version


def by_alias(c, name: str, alias: str):
    """The version of `name` under `alias`, None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def compare_and_promote(
    name: str = MODEL_NAME,
    metric: str = "fid_domain_val",
    lower_is_better: bool = True,
    guard_metric: str | None = "class_accuracy_val",
    guard_min: float = 0.9,
    *,
    run_id: str | None = None,
) -> dict:
    """Compare the challenger with the champion (vim_core.promotion.decide); move `champion` to the
    challenger if it wins. Returns the decision with its comparison table; both are logged to `run_id`
    (default: the active run, if any) as promotion/decision.json and the table promotion/comparison.json.
    """
    import mlflow

    configure()
    check_reachable()
    c = client()
    challenger, champion = by_alias(c, name, CHALLENGER), by_alias(c, name, CHAMPION)
    outcome, reason = decide(challenger, champion, metric, lower_is_better, guard_metric, guard_min)
    if outcome == "promoted":
        c.set_registered_model_alias(name, CHAMPION, challenger.version)  # the one, atomic move
    report = {
        "model": name,
        "outcome": outcome,
        "promoted": outcome == "promoted",
        "reason": reason,
        "metric": metric,
        "lower_is_better": lower_is_better,
        "guard_metric": guard_metric,
        "guard_min": guard_min,
        "challenger": version_of(challenger),
        "champion_before": version_of(champion),
        "champion_after": version_of(challenger if outcome == "promoted" else champion),
        "table": decision_table(challenger, champion, metric, guard_metric),
    }
    log.info("promotion %s: %s", outcome, reason)
    if challenger is not None:
        c.set_model_version_tag(
            name, challenger.version, DECISION_TAG, f"{outcome}: {reason}"[:MAX_TAG_VALUE]
        )
    target = run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if target:
        mlflow.log_table(report["table"], "promotion/comparison.json", run_id=target)
        mlflow.log_dict(report, "promotion/decision.json", run_id=target)
        c.set_tag(target, DECISION_TAG, outcome)
    return report
