"""Studies: the paper's experiments as named DVC experiments, compared in one committed report.

    python -m flows.study studies/generation.yaml            # run what is missing, then report
    python -m flows.study studies/generation.yaml --report-only

A study file names arms; each arm is a set of params.yaml overrides, run once per seed as
`dvc exp run --temp -n <study>-<arm>-s<seed> -S key=value ...`, one at a time. `--temp` keeps the
workspace untouched, stages the workspace's dvc.lock already holds are not rerun (DVC's run cache is
off for the training stages, whose loss curves persist), and `dvc exp show` lists every arm afterwards. A run that already
exists with the same params is skipped, so a study killed with Ctrl-C or SIGKILL resumes at the run it
was in. Each run gets an MLflow pipeline run tagged vim.study / vim.arm / vim.seed, which its stage runs
nest under, and the arm's metrics are logged on it for comparison in the UI.

The report, reports/<study>.{json,md,png}, holds every arm's mean and spread over seeds, the training
FLOPs that make arms comparable, and the paper's figures beside ours.
"""

import argparse
import contextlib
import datetime as dt
import json
import logging
import math
import os
import signal
import subprocess
import sys
from collections import deque
from pathlib import Path
from typing import Any, Literal

import yaml
from prefect import flow, task
from pydantic import Field, ValidationError, field_validator

from flows.common import run_flow_cli
from vim_core.config import apply_overrides, format_validation_error, load_params
from vim_core.config.base import StrictModel
from vim_core.errors import ConfigError, VimError
from vim_core.io import atomic_write_text

log = logging.getLogger("vim.study")


def _log() -> logging.Logger | logging.LoggerAdapter:
    """The Prefect run's logger inside a flow or task (shown by the CLI and the UI), else this module's."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return log


REPO = Path(__file__).resolve().parents[1]
SLUG = r"^[a-z0-9][a-z0-9_-]*$"
METRIC_FILES = {
    "tokenizer": "metrics/tokenizer.json",
    "transformer": "metrics/transformer.json",
    "eval": "metrics/eval.json",
}


# ---- the study file


class MetricSpec(StrictModel):
    """One row of the report: a number from one stage's metrics JSON."""

    key: str
    source: Literal["tokenizer", "transformer", "eval"]
    label: str | None = None
    better: Literal["lower", "higher"] | None = None


class ArmSpec(StrictModel):
    description: str = ""
    overrides: dict[str, Any] = Field(default_factory=dict, description="dotted params.yaml key -> value")
    seeds: list[int] | None = Field(default=None, description="None: the study's seeds")


class StudySpec(StrictModel):
    """A study file (studies/*.yaml)."""

    name: str = Field(pattern=SLUG)
    title: str
    question: str = ""
    seeds: list[int] = Field(default_factory=lambda: [0, 1], min_length=1)
    overrides: dict[str, Any] = Field(default_factory=dict, description="applied to every arm first")
    arms: dict[str, ArmSpec] = Field(min_length=1)
    compare: list[str] = Field(default_factory=list, description="the arms the headline compares")
    metrics: list[MetricSpec] = Field(min_length=1)
    paper: dict[str, dict[str, Any]] = Field(
        default_factory=dict, description="arm -> metric key -> the paper's figure, and 'source'"
    )
    notes: list[str] = Field(default_factory=list)

    @field_validator("arms")
    @classmethod
    def _arm_names(cls, arms: dict) -> dict:
        import re

        bad = [a for a in arms if not re.match(SLUG, a)]
        if bad:
            raise ValueError(f"arm names must be lower-case letters, digits, - or _: {bad}")
        return arms

    def runs(self) -> list["Run"]:
        out = []
        for arm, spec in self.arms.items():
            for seed in spec.seeds if spec.seeds is not None else self.seeds:
                overrides = {**self.overrides, **spec.overrides, "seed": seed}
                out.append(Run(study=self.name, arm=arm, seed=seed, overrides=overrides))
        return out


class Run(StrictModel):
    study: str
    arm: str
    seed: int
    overrides: dict[str, Any]

    @property
    def name(self) -> str:
        return f"{self.study}-{self.arm}-s{self.seed}"


def load_study(path: str | Path, params_path: str | Path = "params.yaml") -> StudySpec:
    """Read and validate a study file; every arm's overrides must make a valid params.yaml."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError([f"{path}: file not found"])
    try:
        raw = yaml.safe_load(path.read_text())
        spec = StudySpec.model_validate(raw or {})
    except yaml.YAMLError as err:
        raise ConfigError([f"{path}: not valid YAML: {getattr(err, 'problem', err)}"]) from None
    except ValidationError as err:
        raise ConfigError(format_validation_error(err, str(path))) from None
    unknown = sorted({a for a in [*spec.compare, *spec.paper] if a not in spec.arms})
    if unknown:
        raise ConfigError([f"{path}: compare/paper name arms that do not exist: {unknown}"])
    params = load_params(params_path)
    for run in spec.runs():
        sets = [f"{k}={json.dumps(v)}" for k, v in run.overrides.items()]
        try:
            apply_overrides(params, sets, source=f"{path}: arm {run.arm}")
        except ConfigError as err:
            raise ConfigError(err.lines) from None
    return spec


# ---- DVC experiments


def _dvc() -> str:
    exe = Path(sys.executable).with_name("dvc")
    return str(exe) if exe.exists() else "dvc"


def hydra_value(value: Any) -> str:
    """A value in the override grammar of `dvc exp run -S` (Hydra's): dicts, lists, null, numbers, text."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int | float):
        return repr(value)
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{hydra_value(v)}" for k, v in value.items()) + "}"
    if isinstance(value, list | tuple):
        return "[" + ",".join(hydra_value(v) for v in value) + "]"
    text = str(value)
    return text if text.replace("-", "").replace("_", "").isalnum() else "'" + text.replace("'", "\\'") + "'"


def set_dotted(raw: dict, key: str, value: Any) -> None:
    *parents, leaf = key.split(".")
    node = raw
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def expected_params(run: Run, params_path: Path) -> dict:
    """params.yaml as the run's experiment must record it: the workspace file plus the overrides."""
    raw = yaml.safe_load(params_path.read_text()) or {}
    for key, value in run.overrides.items():
        set_dotted(raw, key, value)
    return json.loads(json.dumps(raw))


def experiments(cwd: Path, finished: bool = True) -> dict[str, dict]:
    """name -> {"params", "metrics", "state"} for the experiments on the current commit (`dvc exp show`).

    finished=True keeps only completed ones: `dvc exp show` also lists a running experiment (with its
    baseline's metrics) and a failed one, neither of which is a result.
    """
    out = subprocess.run(
        [_dvc(), "exp", "show", "--json"], cwd=cwd, capture_output=True, text=True, env=_env()
    )
    if out.returncode != 0:
        raise VimError(f"dvc exp show failed: {(out.stderr.strip().splitlines() or ['no output'])[-1]}")
    found: dict[str, dict] = {}
    for baseline in json.loads(out.stdout):
        for exp in (baseline.get("experiments") or []) if isinstance(baseline, dict) else []:
            state = (exp.get("executor") or {}).get("state", "success")
            rev = (exp.get("revs") or [{}])[0]
            data = rev.get("data") or {}
            if not rev.get("name") or (finished and state != "success"):
                continue
            params = ((data.get("params") or {}).get("params.yaml") or {}).get("data") or {}
            metrics = {k: (v or {}).get("data") for k, v in (data.get("metrics") or {}).items()}
            found.setdefault(rev["name"], {"params": params, "metrics": metrics, "state": state})
    return found


def _env(extra: dict | None = None) -> dict[str, str]:
    from flows.retrain import _child_env

    return {**_child_env(), **(extra or {})}


def _pidfile(cwd: Path, study: str) -> Path:
    return cwd / ".dvc" / "tmp" / f"study-{study}.pgid"


def stop_leftover(cwd: Path, study: str) -> None:
    """A runner killed with SIGKILL leaves its `dvc exp run` going; end that process group first."""
    pidfile = _pidfile(cwd, study)
    if not pidfile.exists():
        return
    with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
        pgid = int(pidfile.read_text().strip())
        _log().warning(
            "stopping the experiment left running by an interrupted study (process group %d)", pgid
        )
        os.killpg(pgid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def run_experiment(run: Run, cwd: Path, env: dict[str, str]) -> None:
    """`dvc exp run --temp -n NAME -S ...` in its own process group, so an interrupt stops all of it."""
    cmd = [_dvc(), "exp", "run", "--temp", "-n", run.name]
    for key, value in run.overrides.items():
        cmd += ["-S", f"++{key}={hydra_value(value)}"]  # ++: add the key when params.yaml lacks it
    _log().info("$ %s", " ".join(cmd))
    pidfile = _pidfile(cwd, run.study)
    pidfile.parent.mkdir(parents=True, exist_ok=True)
    tail: deque[str] = deque(maxlen=40)
    proc = subprocess.Popen(
        cmd,
        cwd=cwd,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    pidfile.write_text(str(proc.pid))
    try:
        for line in proc.stdout:
            line = line.rstrip()
            if line:
                tail.append(line)
                _log().info(line)
        proc.wait()
    except BaseException:  # Ctrl-C or a flow cancellation: take the experiment down with us
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        raise
    finally:
        pidfile.unlink(missing_ok=True)
    if proc.returncode != 0:
        errors = [line for line in tail if line.startswith(("error:", "ERROR"))]
        cause = errors[-1] if errors else (tail[-1] if tail else "no output")
        raise VimError(f"{run.name}: dvc exp run failed (exit {proc.returncode}): {cause}")


@task
def run_arm(run: Run, cwd: str, params_path: str) -> str:
    """One (arm, seed): skip it when its experiment exists with the same params, else (re)run it."""
    from flows.mlflow_run import enabled, pipeline_run
    from flows.tracking import tracker_for

    cwd_path = Path(cwd)
    want = expected_params(run, cwd_path / params_path)
    have = experiments(cwd_path, finished=False).get(run.name)
    if have is not None and have["state"] == "success" and have["params"] == want:
        _log().info("%s: done already with these params, skipped", run.name)
        return "skipped"
    if have is not None:  # failed, killed, or stale (the study file or params.yaml changed since)
        removed = subprocess.run(
            [_dvc(), "exp", "remove", run.name], cwd=cwd_path, env=_env(), capture_output=True, text=True
        )
        if removed.returncode != 0:
            cause = (removed.stderr.strip().splitlines() or ["no output"])[-1]
            raise VimError(f"{run.name}: cannot remove its earlier {have['state']} experiment: {cause}")
    tags = {"vim.study": run.study, "vim.arm": run.arm, "vim.seed": str(run.seed)}
    extra = {"VIM_STUDY": run.study, "VIM_ARM": run.arm, "VIM_SEED": str(run.seed)}
    parent = pipeline_run(run.name, tags=tags) if enabled() else contextlib.nullcontext(None)
    with contextlib.chdir(cwd_path), parent as run_id:
        run_experiment(run, cwd_path, _env(extra))
        done = experiments(cwd_path).get(run.name)
        if done is None:
            raise VimError(f"{run.name}: dvc exp run finished but `dvc exp show` does not list it")
        if run_id is not None:
            tracker_for(run_id).log_metrics(flat_metrics(done["metrics"]), 0)
    return "ran"


def flat_metrics(metrics: dict) -> dict[str, float]:
    """eval.json's numbers as they are (fid_domain, ...); the training stages' under tokenizer/, transformer/."""
    out = {}
    for path, data in metrics.items():
        prefix = "" if path.endswith("eval.json") else Path(path).stem + "/"
        for key, value in (data or {}).items():
            if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
                out[prefix + key] = float(value)
    return out


# ---- the report


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


def summarize(values: list[float]) -> dict:
    """Mean, sample standard deviation (n - 1) and the values themselves, so a reader sees the spread."""
    n = len(values)
    mean = sum(values) / n
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "n": n, "values": values}


def build_report(
    spec: StudySpec, exps: dict[str, dict], study_file: str, partial: bool = False, cwd: Path = REPO
) -> dict:
    """The report of every finished run; with partial, unfinished runs are listed as missing, not an error."""
    arms: dict[str, dict] = {}
    missing = [r.name for r in spec.runs() if r.name not in exps]
    if missing and not partial:
        raise VimError(f"no finished experiment for {missing}; run the study first (or --partial)")
    for arm, arm_spec in spec.arms.items():
        runs = [r for r in spec.runs() if r.arm == arm and r.name in exps]
        if not runs:
            continue
        per_run = [exps[r.name]["metrics"] for r in runs]
        metrics = {}
        for m in spec.metrics:
            values = [lookup(pm.get(METRIC_FILES[m.source]) or {}, m.key) for pm in per_run]
            if all(isinstance(v, int | float) for v in values):
                metrics[m.key] = summarize([float(v) for v in values])
        budget = {}
        for source in ("tokenizer", "transformer"):
            for key in ("train_flops", "steps", "flops_per_step"):
                values = [(pm.get(METRIC_FILES[source]) or {}).get(key) for pm in per_run]
                if all(isinstance(v, int | float) for v in values):
                    budget[f"{source}_{key}"] = summarize([float(v) for v in values])
        arms[arm] = {
            "description": arm_spec.description,
            "overrides": {k: v for k, v in {**spec.overrides, **arm_spec.overrides}.items()},
            "seeds": [r.seed for r in runs],
            "experiments": [r.name for r in runs],
            "tokenizer_train_flops": budget.get("tokenizer_train_flops", {}).get("mean"),
            "transformer_train_flops": budget.get("transformer_train_flops", {}).get("mean"),
            "budget": budget,
            "metrics": metrics,
        }
    return {
        "study": spec.name,
        "title": spec.title,
        "question": spec.question,
        "study_file": study_file,
        "created": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "git_commit": _git(cwd, "rev-parse", "HEAD"),  # the experiments' baseline commit
        "machine": _machine(),
        "compare": [a for a in spec.compare if a in arms],
        "missing_runs": missing,
        "arms": arms,
        "comparison": _comparison(spec, arms),
        "paper": spec.paper,
        "notes": spec.notes,
    }


def _comparison(spec: StudySpec, arms: dict) -> dict:
    """For the headline pair: the difference of means, and whether the seeds' ranges overlap."""
    if len(spec.compare) != 2 or not all(a in arms for a in spec.compare):
        return {}
    a, b = spec.compare
    out = {}
    for m in spec.metrics:
        if m.key not in arms[a]["metrics"] or m.key not in arms[b]["metrics"]:
            continue
        va, vb = arms[a]["metrics"][m.key], arms[b]["metrics"][m.key]
        overlap = min(va["values"]) <= max(vb["values"]) and min(vb["values"]) <= max(va["values"])
        winner = None
        if m.better is not None and va["mean"] != vb["mean"]:
            a_better = (va["mean"] < vb["mean"]) == (m.better == "lower")
            winner = a if a_better else b
        out[m.key] = {
            f"{a}_minus_{b}": va["mean"] - vb["mean"],
            "better": m.better,
            "better_mean": winner,
            "seed_ranges_overlap": overlap,
        }
    return out


def _git(cwd: Path, *args: str) -> str | None:
    out = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True)
    return out.stdout.strip() if out.returncode == 0 else None


def _machine() -> str:
    import platform

    import torch

    return f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}, {torch.get_num_threads()} threads"


def _fmt(stat: dict | None) -> str:
    if not stat:
        return "-"
    mean, std, n = stat["mean"], stat["std"], stat["n"]
    digits = 3 if abs(mean) < 100 else 1
    return f"{mean:.{digits}f} ± {std:.{digits}f} (n={n})" if n > 1 else f"{mean:.{digits}f} (n=1)"


def _sci(value) -> str:
    return "-" if value is None else f"{value:.3g}"


def render_markdown(report: dict, spec: StudySpec) -> str:
    arms = list(report["arms"])
    paper_arms = [a for a in arms if a in report["paper"]]
    lines = [f"# {report['title']}", ""]
    if report["question"]:
        lines += [report["question"], ""]
    lines += [
        f"Study `{report['study']}` ({report['study_file']}), commit `{(report['git_commit'] or '?')[:12]}`, "
        f"{report['created']}, {report['machine']}. Each cell: mean ± sample standard deviation over seeds "
        "(n = seeds); every seed's value is in the JSON.",
        "",
    ]
    if report["missing_runs"]:
        lines += [f"**Partial report: not run yet: {', '.join(report['missing_runs'])}.**", ""]
    lines += [
        "| metric | " + " | ".join(arms) + "".join(f" | paper: {a}" for a in paper_arms) + " |",
        "|---" * (1 + len(arms) + len(paper_arms)) + "|",
    ]
    for m in spec.metrics:
        arrow = {"lower": " (lower is better)", "higher": " (higher is better)", None: ""}[m.better]
        row = [f"{m.label or m.key}{arrow}"]
        row += [_fmt(report["arms"][a]["metrics"].get(m.key)) for a in arms]
        row += [str(report["paper"][a].get(m.key, "-")) for a in paper_arms]
        lines.append("| " + " | ".join(row) + " |")
    lines += ["", "Training budget (FLOPs counted by torch's FlopCounterMode on one real step):", ""]
    lines += [
        "| arm | seeds | tokenizer FLOPs | tokenizer steps | VIM FLOPs | VIM steps |",
        "|---|---|---|---|---|---|",
    ]
    for a in arms:
        b = report["arms"][a]["budget"]
        lines.append(
            f"| {a} | {report['arms'][a]['seeds']} | {_sci(b.get('tokenizer_train_flops', {}).get('mean'))} | "
            f"{_sci(b.get('tokenizer_steps', {}).get('mean'))} | "
            f"{_sci(b.get('transformer_train_flops', {}).get('mean'))} | "
            f"{_sci(b.get('transformer_steps', {}).get('mean'))} |"
        )
    if report["comparison"]:
        a, b = report["compare"]
        lines += [
            "",
            f"`{a}` against `{b}`:",
            "",
            f"| metric | {a} − {b} | better mean | seed ranges overlap |",
        ]
        lines.append("|---|---|---|---|")
        for key, c in report["comparison"].items():
            diff = c[f"{a}_minus_{b}"]
            lines.append(
                f"| {key} | {diff:+.3f} | {c['better_mean'] or '-'} | {'yes' if c['seed_ranges_overlap'] else 'no'} |"
            )
    lines += ["", "Arms:", ""]
    for a in arms:
        ov = ", ".join(f"`{k}={json.dumps(v)}`" for k, v in report["arms"][a]["overrides"].items()) or "none"
        lines.append(f"- `{a}`: {report['arms'][a]['description']} Overrides: {ov}.")
    if report["paper"]:
        lines += [
            "",
            "Paper figures: " + "; ".join(f"{a}: {p.get('source', '')}" for a, p in report["paper"].items()),
        ]
    for note in report["notes"]:
        lines += ["", note]
    return "\n".join(lines) + "\n"


def _save_figure(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=110)
    plt.close(fig)
    os.replace(tmp, path)


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def render_plot(report: dict, spec: StudySpec, path: Path) -> None:
    """One panel per metric: each arm's seeds as dots and their mean as a bar."""
    plt = _pyplot()
    shown = [m for m in spec.metrics if any(m.key in a["metrics"] for a in report["arms"].values())]
    cols = min(4, len(shown))
    rows = math.ceil(len(shown) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3.2 * cols, 2.6 * rows), squeeze=False)
    arms = list(report["arms"])
    for ax, m in zip(axes.flat, shown, strict=False):
        for i, arm in enumerate(arms):
            stat = report["arms"][arm]["metrics"].get(m.key)
            if stat:
                ax.bar(i, stat["mean"], color=f"C{i}", alpha=0.5)
                ax.scatter([i] * len(stat["values"]), stat["values"], color=f"C{i}", s=12, zorder=3)
        ax.set_xticks(range(len(arms)), arms, rotation=20, fontsize=7)
        arrow = {"lower": " ↓", "higher": " ↑", None: ""}[m.better]
        ax.set_title((m.label or m.key) + arrow, fontsize=8)
        ax.tick_params(axis="y", labelsize=7)
    for ax in list(axes.flat)[len(shown) :]:
        ax.axis("off")
    fig.suptitle(report["title"], fontsize=9)
    _save_figure(fig, path)


def curves(spec: StudySpec) -> dict[str, list[tuple[int, MetricSpec]]]:
    """Metrics indexed by position (`probe_test_accuracy_by_block.2`), grouped into curves by their prefix."""
    out: dict[str, list[tuple[int, MetricSpec]]] = {}
    for m in spec.metrics:
        prefix, _, index = m.key.rpartition(".")
        if prefix and index.isdigit():
            out.setdefault(prefix, []).append((int(index), m))
    return {k: sorted(v, key=lambda t: t[0]) for k, v in out.items() if len(v) > 1}


def render_curves(report: dict, spec: StudySpec, path: Path) -> bool:
    """One panel per curve (the probe over depth): each arm's mean with its seeds' range, per index."""
    groups = curves(spec)
    if not groups:
        return False
    plt = _pyplot()
    fig, axes = plt.subplots(1, len(groups), figsize=(4.2 * len(groups), 3.2), squeeze=False)
    for ax, (prefix, points) in zip(axes.flat, groups.items(), strict=True):
        for i, (arm, data) in enumerate(report["arms"].items()):
            stats = [(x, data["metrics"].get(m.key)) for x, m in points]
            stats = [(x, s) for x, s in stats if s]
            if not stats:
                continue
            xs = [x for x, _ in stats]
            ax.plot(xs, [s["mean"] for _, s in stats], marker="o", color=f"C{i}", label=arm)
            lo = [min(s["values"]) for _, s in stats]
            hi = [max(s["values"]) for _, s in stats]
            ax.fill_between(xs, lo, hi, color=f"C{i}", alpha=0.15)
        ax.set_xticks([x for x, _ in points])
        ax.set_xlabel("index (0-based)", fontsize=8)
        ax.set_title(prefix, fontsize=8)
        ax.tick_params(labelsize=7)
        ax.legend(fontsize=7)
    fig.suptitle(report["title"] + " (line: mean over seeds; band: the seeds' range)", fontsize=9)
    _save_figure(fig, path)
    return True


def write_report(spec: StudySpec, cwd: Path, study_file: str, out_dir: Path, partial: bool = False) -> dict:
    report = build_report(spec, experiments(cwd), study_file, partial, cwd)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / f"{spec.name}.json", json.dumps(report, indent=2) + "\n")
    atomic_write_text(out_dir / f"{spec.name}.md", render_markdown(report, spec))
    render_plot(report, spec, out_dir / f"{spec.name}.png")
    render_curves(report, spec, out_dir / f"{spec.name}_curves.png")
    return report


# ---- the flow


@flow(name="study")
def study_flow(
    study_file: str,
    params_path: str = "params.yaml",
    report_only: bool = False,
    out_dir: str = "reports",
    partial: bool = False,
):
    """Run a study's arms as DVC experiments (skipping those done), then write its report."""
    cwd = Path.cwd()
    spec = load_study(study_file, params_path)
    if not report_only:
        stop_leftover(cwd, spec.name)
        for run in spec.runs():
            run_arm(run, str(cwd), params_path)
    return write_report(spec, cwd, study_file, cwd / out_dir, partial)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("study", help="a study file, e.g. studies/generation.yaml")
    parser.add_argument("--params", default="params.yaml", help="the params file the arms override")
    parser.add_argument(
        "--report-only", action="store_true", help="only rebuild the report from `dvc exp show`"
    )
    parser.add_argument(
        "--partial", action="store_true", help="with --report-only: report the finished runs, list the rest"
    )
    parser.add_argument("--out-dir", default="reports")
    args = parser.parse_args(argv)
    try:
        return run_flow_cli(
            lambda: load_study(args.study, args.params),  # fail before Prefect starts, one line per problem
            lambda: study_flow(
                args.study, args.params, args.report_only, args.out_dir, args.partial, return_state=True
            ),
        )
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume at the unfinished run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
