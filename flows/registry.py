"""Model registry: register a pipeline run's model as the challenger, promote it to champion when it wins.

A pipeline run registers one version of one model, `vim`: the generator pyfunc, whose artifacts also hold
the tokenizer and transformer weights (flows/pyfunc_models.py). The version carries, as tags, the eval
metrics of that run's evaluate stage, the hash of the evaluation config, and the pipeline (parent) run.
`champion` and `challenger` are aliases of that one model, so registering is one register_model and one
alias set, and promoting is one alias move: nothing can leave them split across pipeline runs.

The comparison rule: a challenger is compared with the champion only when both were scored by the same
evaluation, i.e. their `vim.eval_config_hash` tags are equal (same held-out split, sample count, feature
extractor, seed). Otherwise the metrics are not comparable, the comparison is refused and the champion
stays.

Promotion is a choice, so it is made on the validation split (`fid_domain_val`, guarded by
`class_accuracy_val`, params.yaml `promotion:`); the held-out split that scores a model never decides it.
"""

import logging
import math

from flows.mlflow_run import MAX_TAG_VALUE, check_reachable, client, configure

log = logging.getLogger("vim.registry")

MODEL_NAME = "vim"
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG = "metric."
EVAL_HASH_TAG = "vim.eval_config_hash"
PIPELINE_TAG = "vim.pipeline_run"
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


def finite_number(value) -> float | None:
    """A metric value or tag as a float; None for missing, non-numeric or non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def by_alias(c, name: str, alias: str):
    """The version of `name` under `alias`, None when the model or the alias does not exist yet."""
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None
        raise


def _metric(mv, key: str) -> float | None:
    return None if mv is None else finite_number(mv.tags.get(f"{METRIC_TAG}{key}"))


def _decide(challenger, champion, metric, lower_is_better, guard_metric, guard_min):
    """(outcome, reason) with outcome in promoted | kept | refused | no_challenger."""
    if challenger is None:
        return "no_challenger", "no version carries the challenger alias"
    if champion is not None and champion.version == challenger.version:
        return "kept", "the challenger already is the champion"
    value = _metric(challenger, metric)
    if value is None:
        return "refused", f"challenger v{challenger.version} has no {metric}"
    if champion is not None:
        ours, theirs = challenger.tags.get(EVAL_HASH_TAG), champion.tags.get(EVAL_HASH_TAG)
        if not ours or ours != theirs:
            return "refused", (
                f"eval config differs (challenger {ours}, champion {theirs}): not scored on the same evaluation"
            )
    if guard_metric is not None:  # None: no guard
        guard = _metric(challenger, guard_metric)
        if guard is None:
            return "refused", f"challenger v{challenger.version} has no {guard_metric}"
        if guard < guard_min:
            return "kept", f"guard failed: {guard_metric} {guard:g} < {guard_min:g}"
    if champion is None:
        return "promoted", "first challenger to pass the guard"
    best = _metric(champion, metric)
    if best is None:
        return "refused", f"champion v{champion.version} has no {metric}"
    wins = value < best if lower_is_better else value > best
    if wins:
        return "promoted", f"{metric} {value:g} beats champion's {best:g}"
    return "kept", f"{metric} {value:g} does not beat champion's {best:g}"


def _table(challenger, champion, metric, guard_metric) -> dict[str, list]:
    """Columns for mlflow.log_table: one row per role."""
    scores = [m for m in (metric, guard_metric) if m is not None]
    cols = {k: [] for k in ("role", "version", *scores, "eval_config_hash", "pipeline_run")}
    for role, mv in ((CHAMPION, champion), (CHALLENGER, challenger)):
        cols["role"].append(role)
        cols["version"].append(_version(mv))
        for m in scores:
            cols[m].append(_metric(mv, m))
        cols["eval_config_hash"].append(None if mv is None else mv.tags.get(EVAL_HASH_TAG))
        cols["pipeline_run"].append(None if mv is None else mv.tags.get(PIPELINE_TAG))
    return cols


def compare_and_promote(
    name: str = MODEL_NAME,
    metric: str = "fid_domain_val",
    lower_is_better: bool = True,
    guard_metric: str | None = "class_accuracy_val",
    guard_min: float = 0.9,
    *,
    run_id: str | None = None,
) -> dict:
    """Compare the challenger with the champion; move `champion` to the challenger if it wins.

    The challenger wins when it was scored on the same evaluation as the champion (same eval-config
    hash), is strictly better on `metric`, and has `guard_metric` >= `guard_min` (no guard when
    guard_metric is None). With no champion yet, the first challenger passing the guard becomes
    champion. Ties keep the champion.
    Returns the decision with its comparison table; both are logged to `run_id` (default: the active
    run, if any) as promotion/decision.json and the table promotion/comparison.json.
    """
    import mlflow

    configure()
    check_reachable()
    c = client()
    challenger, champion = by_alias(c, name, CHALLENGER), by_alias(c, name, CHAMPION)
    outcome, reason = _decide(challenger, champion, metric, lower_is_better, guard_metric, guard_min)
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
        "challenger": _version(challenger),
        "champion_before": _version(champion),
        "champion_after": _version(challenger if outcome == "promoted" else champion),
        "table": _table(challenger, champion, metric, guard_metric),
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


def _version(mv) -> str | None:
    return None if mv is None else str(mv.version)
