"""The champion/challenger rule: whether a registered version replaces the champion, from their tags alone.

A version is anything with `.version` and `.tags` (an MLflow ModelVersion; flows/registry.py moves the
aliases). Its eval metrics are tags `metric.<name>`, and `vim.eval_config_hash` says which evaluation
scored them: two versions are compared only when they were scored by the same one. Promotion is a choice,
so params.yaml's rule compares validation-split metrics; the test split never decides it.
"""

import math

METRIC_TAG = "metric."
EVAL_HASH_TAG = "vim.eval_config_hash"
PIPELINE_TAG = "vim.pipeline_run"


def finite_number(value) -> float | None:
    """A metric value or tag as a float; None for missing, non-numeric or non-finite values."""
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) else None


def metric_of(mv, key: str) -> float | None:
    return None if mv is None else finite_number(mv.tags.get(f"{METRIC_TAG}{key}"))


def decide(challenger, champion, metric, lower_is_better, guard_metric, guard_min) -> tuple[str, str]:
    """(outcome, reason), outcome one of promoted | kept | refused | no_challenger. The challenger wins
    when it was scored on the champion's evaluation, passes the guard (guard_metric >= guard_min; None: no
    guard) and is strictly better on `metric`; ties keep the champion. With no champion, the first
    challenger that passes the guard wins."""
    if challenger is None:
        return "no_challenger", "no version carries the challenger alias"
    if champion is not None and champion.version == challenger.version:
        return "kept", "the challenger already is the champion"
    value = metric_of(challenger, metric)
    if value is None:
        return "refused", f"challenger v{challenger.version} has no {metric}"
    if champion is not None:
        ours, theirs = challenger.tags.get(EVAL_HASH_TAG), champion.tags.get(EVAL_HASH_TAG)
        if not ours or ours != theirs:
            return "refused", (
                f"eval config differs (challenger {ours}, champion {theirs}): not scored on the same evaluation"
            )
    if guard_metric is not None:
        guard = metric_of(challenger, guard_metric)
        if guard is None:
            return "refused", f"challenger v{challenger.version} has no {guard_metric}"
        if guard < guard_min:
            return "kept", f"guard failed: {guard_metric} {guard:g} < {guard_min:g}"
    if champion is None:
        return "promoted", "first challenger to pass the guard"
    best = metric_of(champion, metric)
    if best is None:
        return "refused", f"champion v{champion.version} has no {metric}"
    if value < best if lower_is_better else value > best:
        return "promoted", f"{metric} {value:g} beats champion's {best:g}"
    return "kept", f"{metric} {value:g} does not beat champion's {best:g}"


def version_of(mv) -> str | None:
    return None if mv is None else str(mv.version)


def decision_table(challenger, champion, metric, guard_metric) -> dict[str, list]:
    """One row per role (champion, challenger), as columns (what mlflow.log_table takes)."""
    scores = [m for m in (metric, guard_metric) if m is not None]
    cols = {k: [] for k in ("role", "version", *scores, "eval_config_hash", "pipeline_run")}
    for role, mv in (("champion", champion), ("challenger", challenger)):
        cols["role"].append(role)
        cols["version"].append(version_of(mv))
        for m in scores:
            cols[m].append(metric_of(mv, m))
        cols["eval_config_hash"].append(None if mv is None else mv.tags.get(EVAL_HASH_TAG))
        cols["pipeline_run"].append(None if mv is None else mv.tags.get(PIPELINE_TAG))
    return cols
