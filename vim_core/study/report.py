"""The study report's data, reports/<study>.json: per-arm mean and sd over seeds, each compared pair's
difference with its 95% Welch interval and a verdict, each arm's sampling choice, and the FLOP budgets.

Built from `dvc exp show`'s results (name -> params and metrics), so it can be rebuilt without rerunning.
"""

import datetime as dt
import math
import os
from pathlib import Path

from vim_core.config.study import StudySpec
from vim_core.errors import VimError
from vim_core.eval.generation import CHOICE_KEYS
from vim_core.study.stats import LEVEL, METHOD, compare_arms, pairs, summarize

METRIC_FILES = {
    "tokenizer": "metrics/tokenizer.json",
    "tokenizer_eval": "metrics/tokenizer_eval.json",
    "transformer": "metrics/transformer.json",
    "eval": "metrics/eval.json",
}
# What this module writes; a committed report without "protocol", or with one starting "old", predates it.
PROTOCOL = "val-tuned sampling per arm; Welch 95% CI over seeds with a verdict"
# The sampling each run chose on the validation split (eval.json), shown per arm and seed.
CHOSEN = tuple(k for k in CHOICE_KEYS if k.startswith("chosen_"))


def lookup(data: dict, key: str):
    """data[key], or a nested value by dotted path (probe_test_accuracy_by_block.2)."""
    if key in data:
        return data[key]
    node = data
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return None
        node = node[part]
    return node


def is_conditional(params: dict | None) -> bool | None:
    """Whether a run's VIM is class-conditional, from its params.yaml; None when they do not say."""
    from vim_core.config.transformer import PRESETS

    model = ((params or {}).get("transformer") or {}).get("model")
    if isinstance(model, dict):
        return int(model.get("num_classes") or 0) > 0
    if isinstance(model, str) and model in PRESETS:
        return PRESETS[model].num_classes > 0
    return None


def is_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _arm(spec: StudySpec, arm: str, runs: list, exps: dict) -> dict:
    per_run = [exps[r.name]["metrics"] for r in runs]
    flags = {is_conditional(exps[r.name].get("params")) for r in runs}
    conditional = False if flags == {False} else (True if flags == {True} else None)
    metrics = {}
    for m in spec.metrics:
        if m.conditional and conditional is False:
            continue  # an unconditional VIM has no class-conditional numbers, whatever its eval.json holds
        values = [lookup(pm.get(METRIC_FILES[m.source]) or {}, m.key) for pm in per_run]
        if values and all(is_number(v) for v in values):
            metrics[m.key] = summarize([float(v) for v in values])
    if spec.scaling is not None:
        x = spec.scaling.x
        xs = [lookup(pm.get(METRIC_FILES[x.source]) or {}, x.key) for pm in per_run]
        scaling_x = summarize([float(v) for v in xs]) if xs and all(is_number(v) for v in xs) else None
    budget = {}
    # A study that stops early reads only what its stages wrote: the rest is the baseline's files.
    made = spec.sources()
    for source in [s for s in ("tokenizer", "transformer") if s in made]:
        for key in ("train_flops", "steps", "flops_per_step"):
            values = [(pm.get(METRIC_FILES[source]) or {}).get(key) for pm in per_run]
            if values and all(is_number(v) for v in values):
                budget[f"{source}_{key}"] = summarize([float(v) for v in values])
    evals = [pm.get(METRIC_FILES["eval"]) or {} for pm in per_run] if "eval" in made else []
    sampling = {k: [e.get(k) for e in evals] for k in CHOSEN if any(k in e for e in evals)}
    chosen_on = sorted({str(s) for e in evals if (s := lookup(e, "definitions.generation.settings"))})
    tok = [pm.get(METRIC_FILES["tokenizer"]) or {} for pm in per_run]
    return {
        "description": spec.arms[arm].description,
        "overrides": {**spec.overrides, **spec.arms[arm].overrides},
        "seeds": [r.seed for r in runs],
        "experiments": [r.name for r in runs],
        "conditional": conditional,
        "tokenizer_train_flops": budget.get("tokenizer_train_flops", {}).get("mean"),
        "tokenizer_flops_definition": next(
            (t["flops_definition"] for t in tok if "flops_definition" in t), None
        ),
        "transformer_train_flops": budget.get("transformer_train_flops", {}).get("mean"),
        "budget": budget,
        "sampling": {"per_seed": sampling, "chosen_on": chosen_on},
        "metrics": metrics,
        **({"scaling_x": scaling_x} if spec.scaling is not None and scaling_x else {}),
    }


def build_report(
    spec: StudySpec, exps: dict[str, dict], study_file: str, partial: bool = False, commit: str | None = None
) -> dict:
    """The report of every finished run; with partial, unfinished runs are listed as missing, not an error."""
    missing = [r.name for r in spec.runs() if r.name not in exps]
    if missing and not partial:
        raise VimError(f"no finished experiment for {missing}; run the study first (or --partial)")
    arms = {}
    for arm in spec.arms:
        runs = [r for r in spec.runs() if r.arm == arm and r.name in exps]
        if runs:
            arms[arm] = _arm(spec, arm, runs, exps)
    compare = [a for a in spec.compare if a in arms]
    return {
        "study": spec.name,
        "title": spec.title,
        "question": spec.question,
        "protocol": PROTOCOL,
        "study_file": study_file,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": commit,  # the experiments' baseline commit
        "machine": machine(),
        "compare": compare,
        "missing_runs": missing,
        "arms": arms,
        "comparison": comparison(spec, arms, compare),
        "scaling": scaling(spec, arms),
        "paper": spec.paper,
        "notes": spec.notes,
    }


def comparison(spec: StudySpec, arms: dict, compare: list[str]) -> dict:
    """Each compared pair's per-metric difference, 95% interval and verdict (vim_core.study.stats)."""
    directions = {m.key: m.better for m in spec.metrics}
    out = []
    for a, b in pairs(compare):
        values = {arm: {k: s["values"] for k, s in arms[arm]["metrics"].items()} for arm in (a, b)}
        out.append({"a": a, "b": b, "metrics": compare_arms(a, b, values[a], values[b], directions)})
    return {"method": METHOD, "level": LEVEL, "pairs": out} if out else {}


def scaling(spec: StudySpec, arms: dict) -> dict | None:
    """The compute-scaling fit (vim_core.study.scaling) over the series whose every arm has finished."""
    if spec.scaling is None:
        return None
    from vim_core.study.scaling import analyse

    x, key = spec.scaling.x, spec.scaling.fit
    series = {}
    for name, names in spec.scaling.series.items():
        points = []
        for arm in names:
            data = arms.get(arm) or {}
            if "scaling_x" not in data or key not in data["metrics"]:
                break
            points.append({"arm": arm, "x": data["scaling_x"]["values"], "y": data["metrics"][key]["values"]})
        else:
            series[name] = points
    if len(series) < 2:
        return {"skipped": "fewer than two series have every budget finished"}
    return {"x": x.key, "x_source": x.source, "metric": key, **analyse(series)}


def machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def flat_metrics(metrics: dict) -> dict[str, float]:
    """eval.json's numbers as they are (fid_domain, ...); every other metrics file's under its stem
    (tokenizer/, tokenizer_eval/, transformer/)."""
    out = {}
    for path, data in metrics.items():
        prefix = "" if Path(path).name == "eval.json" else Path(path).stem + "/"
        for key, value in (data or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[prefix + key] = float(value)
    return out
