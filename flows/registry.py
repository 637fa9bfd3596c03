"""Model registry: register challengers, and promote a challenger set to champion when it wins.

A pipeline run produces a *bundle*: the tokenizer (vit-vqgan), the transformer (vim-transformer) and the
generator that chains them (vim-generator). Each is registered as a version carrying, as tags, the eval
metrics of that run's evaluate stage, the hash of the evaluation config, and the bundle id (the pipeline's
parent run). The bundle moves as one: aliases of all names are set together.

The comparison rule: a challenger is compared with the champion only when both were scored by the same
evaluation, i.e. their `vim.eval_config_hash` tags are equal (same held-out split, sample count, feature
extractor, seed). Otherwise the metrics are not comparable, the comparison is refused and the champion
stays. Metrics are read from the first name in `names` (all versions of a bundle carry the same ones).

Promotion is a choice, so it is made on the validation split (`fid_domain_val`, guarded by
`class_accuracy_val`, params.yaml `promotion:`); the held-out split that scores a model never decides it.
"""

import logging
import math

from flows.mlflow_run import MAX_TAG_VALUE, check_reachable, client, configure
from vim_core.errors import TransientError, VimError

log = logging.getLogger("vim.registry")

MODEL_NAMES = ("vit-vqgan", "vim-transformer", "vim-generator")
CHAMPION = "champion"
CHALLENGER = "challenger"
METRIC_TAG = "metric."
EVAL_HASH_TAG = "vim.eval_config_hash"
BUNDLE_TAG = "vim.bundle"
RUN_TAG = "vim.source_run"
DECISION_TAG = "vim.promotion"


def champion_uri(name: str) -> str:
    return f"models:/{name}@{CHAMPION}"


def _bundle_of(run_id: str | None) -> str | None:
    """The pipeline (parent) run a stage run belongs to, else the run itself."""
    if not run_id:
        return None
    from mlflow.utils.mlflow_tags import MLFLOW_PARENT_RUN_ID

    return client().get_run(run_id).data.tags.get(MLFLOW_PARENT_RUN_ID, run_id)


def register_challenger(
    model_uri: str,
    name: str,
    metrics: dict[str, float],
    run_id: str | None,
    *,
    eval_hash: str,
    bundle: str | None = None,
) -> str:
    """Register `model_uri` as a new version of `name`, tag it with its eval metrics, alias it challenger.

    `eval_hash` is vim_core.eval.report.eval_config_hash() of the evaluation that produced `metrics`.
    `bundle` defaults to the parent (pipeline) run of `run_id`, so the versions registered by one pipeline
    run form one set.
    Returns the version number as a string.
    """
    return register_bundle({name: model_uri}, metrics, run_id, eval_hash=eval_hash, bundle=bundle)[name]


def register_bundle(
    model_uris: dict[str, str],
    metrics: dict[str, float],
    run_id: str | None,
    *,
    eval_hash: str,
    bundle: str | None = None,
) -> dict[str, str]:
    """Register each (name, uri) of one pipeline run as a new version, then alias them all challenger.

    All versions are created before any alias moves, and the aliases move together (put back on a
    failure), so a registration that dies half-way leaves the previous challengers in place and at most
    some unaliased versions: never a challenger set mixing two pipeline runs. Returns name -> version.
    """
    import mlflow

    configure()
    check_reachable()
    tags = {f"{METRIC_TAG}{k}": repr(float(v)) for k, v in metrics.items() if finite_number(v) is not None}
    tags[EVAL_HASH_TAG] = eval_hash
    bundle = bundle or _bundle_of(run_id)
    if bundle:
        tags[BUNDLE_TAG] = bundle
    if run_id:
        tags[RUN_TAG] = run_id
    versions = {
        name: str(mlflow.register_model(uri, name, tags=tags).version) for name, uri in model_uris.items()
    }
    c = client()
    before = {name: _version(_by_alias(c, name, CHALLENGER)) for name in versions}
    _move_alias(c, CHALLENGER, versions, before)
    log.info("registered %s as %s", versions, CHALLENGER)
    return versions


def finite_number(value) -> float | None:
    """A metric value or tag as a float; None for missing, non-numeric or non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def _by_alias(c, name: str, alias: str):
    from mlflow.exceptions import MlflowException

    try:
        return c.get_model_version_by_alias(name, alias)
    except MlflowException as err:
        if err.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            return None  # no such model, or no such alias yet
        raise


def _metric(mv, key: str) -> float | None:
    return None if mv is None else finite_number(mv.tags.get(f"{METRIC_TAG}{key}"))


def _decide(names, challengers, champions, metric, lower_is_better, guard_metric, guard_min):
    """(outcome, reason) with outcome in promoted | kept | refused | no_challenger."""
    missing = [n for n in names if challengers[n] is None]
    if len(missing) == len(names):
        return "no_challenger", "no version carries the challenger alias"
    if missing:
        return "refused", f"incomplete set: {', '.join(missing)} has no challenger"
    bundles = {challengers[n].tags.get(BUNDLE_TAG) for n in names}
    if len(bundles) > 1:
        return (
            "refused",
            f"the challengers come from different pipeline runs ({', '.join(map(str, bundles))})",
        )
    if all(champions[n] is not None and champions[n].version == challengers[n].version for n in names):
        return "kept", "the challenger already is the champion"

    lead = names[0]
    challenger, champion = challengers[lead], champions[lead]
    value = _metric(challenger, metric)
    if value is None:
        return "refused", f"challenger {lead} v{challenger.version} has no {metric}"
    if champion is not None:
        ours, theirs = challenger.tags.get(EVAL_HASH_TAG), champion.tags.get(EVAL_HASH_TAG)
        if not ours or ours != theirs:
            return "refused", (
                f"eval config differs (challenger {ours}, champion {theirs}): not scored on the same evaluation"
            )
    if guard_metric is not None:  # None: no guard
        guard = _metric(challenger, guard_metric)
        if guard is None:
            return "refused", f"challenger {lead} v{challenger.version} has no {guard_metric}"
        if guard < guard_min:
            return "kept", f"guard failed: {guard_metric} {guard:g} < {guard_min:g}"
    if champion is None:
        return "promoted", "first challenger to pass the guard"
    best = _metric(champion, metric)
    if best is None:
        return "refused", f"champion {lead} v{champion.version} has no {metric}"
    wins = value < best if lower_is_better else value > best
    if wins:
        return "promoted", f"{metric} {value:g} beats champion's {best:g}"
    return "kept", f"{metric} {value:g} does not beat champion's {best:g}"


def _table(names, challengers, champions, metric, guard_metric) -> dict[str, list]:
    """Columns for mlflow.log_table: one row per (model, role)."""
    scores = [m for m in (metric, guard_metric) if m is not None]
    cols = {k: [] for k in ("model", "role", "version", *scores, "eval_config_hash", "bundle")}
    for name in names:
        for role, mv in ((CHAMPION, champions[name]), (CHALLENGER, challengers[name])):
            cols["model"].append(name)
            cols["role"].append(role)
            cols["version"].append(None if mv is None else str(mv.version))
            for m in scores:
                cols[m].append(_metric(mv, m))
            cols["eval_config_hash"].append(None if mv is None else mv.tags.get(EVAL_HASH_TAG))
            cols["bundle"].append(None if mv is None else mv.tags.get(BUNDLE_TAG))
    return cols


def _move_alias(c, alias: str, to: dict[str, str], before: dict[str, str | None]) -> None:
    """Point `alias` of each name at version to[name]; on a failure, put back the ones already moved.

    `before` holds each name's version under `alias` beforehand (None: it had none).
    """
    moved = []
    try:
        for name, version in to.items():
            c.set_registered_model_alias(name, alias, version)
            moved.append(name)
    except Exception as err:
        for name in moved:
            try:
                if before[name] is None:
                    c.delete_registered_model_alias(name, alias)
                else:
                    c.set_registered_model_alias(name, alias, before[name])
            except Exception:  # the server is gone; report the split set below
                log.error("could not restore %s@%s", name, alias)
        raise TransientError(f"moving {alias} interrupted after {moved or 'no models'}: {err}") from err


def compare_and_promote(
    names=MODEL_NAMES,
    metric: str = "fid_domain_val",
    lower_is_better: bool = True,
    guard_metric: str | None = "class_accuracy_val",
    guard_min: float = 0.9,
    *,
    run_id: str | None = None,
) -> dict:
    """Compare the challenger set with the champion set; move `champion` to the challengers if they win.

    The challenger wins when it was scored on the same evaluation as the champion (same eval-config
    hash), is strictly better on `metric`, and has `guard_metric` >= `guard_min` (no guard when
    guard_metric is None). With no champion yet, the first challenger passing the guard becomes
    champion. Ties keep the champion.
    Returns the decision with its comparison table; both are logged to `run_id` (default: the active
    run, if any) as promotion/decision.json and the table promotion/comparison.json.
    """
    import mlflow

    names = tuple(names)
    if not names:
        raise VimError("compare_and_promote needs at least one model name")
    configure()
    check_reachable()
    c = client()
    challengers = {n: _by_alias(c, n, CHALLENGER) for n in names}
    champions = {n: _by_alias(c, n, CHAMPION) for n in names}
    outcome, reason = _decide(names, challengers, champions, metric, lower_is_better, guard_metric, guard_min)
    if outcome == "promoted":
        to = {n: str(challengers[n].version) for n in names}
        _move_alias(c, CHAMPION, to, {n: _version(champions[n]) for n in names})
    after = champions if outcome != "promoted" else challengers
    report = {
        "outcome": outcome,
        "promoted": outcome == "promoted",
        "reason": reason,
        "metric": metric,
        "lower_is_better": lower_is_better,
        "guard_metric": guard_metric,
        "guard_min": guard_min,
        "challenger": {n: _version(challengers[n]) for n in names},
        "champion_before": {n: _version(champions[n]) for n in names},
        "champion_after": {n: _version(after[n]) for n in names},
        "table": _table(names, challengers, champions, metric, guard_metric),
    }
    log.info("promotion %s: %s", outcome, reason)
    for name in names:
        if challengers[name] is not None and outcome != "no_challenger":
            c.set_model_version_tag(
                name, challengers[name].version, DECISION_TAG, f"{outcome}: {reason}"[:MAX_TAG_VALUE]
            )
    target = run_id or (mlflow.active_run().info.run_id if mlflow.active_run() else None)
    if target:
        mlflow.log_table(report["table"], "promotion/comparison.json", run_id=target)
        mlflow.log_dict(report, "promotion/decision.json", run_id=target)
        c.set_tag(target, DECISION_TAG, outcome)
    return report


def _version(mv) -> str | None:
    return None if mv is None else str(mv.version)
