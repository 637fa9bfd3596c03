"""Studies: the paper's experiments as named DVC experiments, compared in one committed report.

    python -m flows.study studies/generation.yaml            # run what is missing, then report
    python -m flows.study studies/generation.yaml --report-only

A study file names arms; each arm is a set of params.yaml overrides, run once per seed as
`dvc exp run --temp -n <study>-<arm>-s<seed> -S key=value ... [stages]`, one at a time (a study that
names `stages` stops there, e.g. at the tokenizer's). `--temp` keeps the
workspace untouched, stages the workspace's dvc.lock already holds are not rerun (DVC's run cache is
off for the training stages, whose loss curves persist), and `dvc exp show` lists every arm afterwards. A run that already
exists with the same params is skipped, so a study killed with Ctrl-C or SIGKILL resumes at the run it
was in. Each run gets an MLflow pipeline run tagged vim.study / vim.arm / vim.seed, which its stage runs
nest under, and the arm's metrics are logged on it for comparison in the UI.

The report, reports/<study>.{json,md,png} (vim_core.study: its statistics, data and rendering),
holds every arm's mean and sd over seeds, each compared pair's difference with a 95% Welch interval and a
verdict, each run's sampling choice, the training FLOPs that make arms comparable, and the paper's figures
beside ours. A committed report of the old protocol is not overwritten unless --replace-old says so.

This module is the runner: the study file is vim_core.config.study, the report vim_core.study.
"""

import argparse
import contextlib
import json
import logging
import os
import signal
import sys
from pathlib import Path

from prefect import flow, task

from flows import vcs
from flows.flow_cli import run_flow_cli, run_logger
from flows.stages import DVC_YAML, all_declared, declared
from vim_core.config.study import Run, load_study
from vim_core.errors import VimError
from vim_core.study.render import check_replaceable, write_report
from vim_core.study.report import flat_metrics

log = logging.getLogger("vim.study")


# ---- DVC experiments


def experiments(cwd: Path, finished: bool = True) -> dict[str, dict]:
    """name -> {"params", "metrics", "state"} for the experiments on the current commit (`dvc exp show`).

    finished=True keeps only completed ones: `dvc exp show` also lists a running experiment (with its
    baseline's metrics) and a failed one, neither of which is a result.
    """
    out = vcs.dvc("exp", "show", "--json", cwd=cwd, env=vcs.child_env())
    found: dict[str, dict] = {}
    for baseline in json.loads(out):
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


def _pidfile(cwd: Path, study: str) -> Path:
    return cwd / ".dvc" / "tmp" / f"study-{study}.pgid"


def stop_leftover(cwd: Path, study: str) -> None:
    """A runner killed with SIGKILL leaves its `dvc exp run` going; end that process group first."""
    pidfile = _pidfile(cwd, study)
    if not pidfile.exists():
        return
    with contextlib.suppress(ValueError, ProcessLookupError, PermissionError):
        pgid = int(pidfile.read_text().strip())
        run_logger(log).warning(
            "stopping the experiment left running by an interrupted study (process group %d)", pgid
        )
        os.killpg(pgid, signal.SIGKILL)
    pidfile.unlink(missing_ok=True)


def run_experiment(run: Run, cwd: Path, env: dict[str, str]) -> None:
    """`dvc exp run --temp -n NAME -S ...` in its own process group, so an interrupt stops all of it."""
    cmd = [vcs.dvc_executable(), "exp", "run", "--temp", "-n", run.name, *run.set_args(), *run.stages]
    code, tail = vcs.stream(cmd, cwd, run_logger(log), env, pidfile=_pidfile(cwd, run.study))
    if code != 0:
        raise VimError(f"{run.name}: dvc exp run failed (exit {code}): {vcs.cause(tail)}")


@task
def run_arm(run: Run, cwd: str, params_path: str) -> str:
    """One (arm, seed): skip it when its experiment exists with the same params, else (re)run it."""
    from flows.mlflow_run import enabled, pipeline_run
    from flows.tracking import tracker_for

    cwd_path = Path(cwd)
    want = run.expected_params(cwd_path / params_path)
    have = experiments(cwd_path, finished=False).get(run.name)
    if have is not None and have["state"] == "success" and have["params"] == want:
        run_logger(log).info("%s: done already with these params, skipped", run.name)
        return "skipped"
    if have is not None:  # failed, killed, or stale (the study file or params.yaml changed since)
        try:
            vcs.dvc("exp", "remove", run.name, cwd=cwd_path, env=vcs.child_env())
        except VimError as err:
            raise VimError(
                f"{run.name}: cannot remove its earlier {have['state']} experiment: {err}"
            ) from None
    tags = {"vim.study": run.study, "vim.arm": run.arm, "vim.seed": str(run.seed)}
    extra = {"VIM_STUDY": run.study, "VIM_ARM": run.arm, "VIM_SEED": str(run.seed)}
    parent = pipeline_run(run.name, tags=tags) if enabled() else contextlib.nullcontext(None)
    with contextlib.chdir(cwd_path), parent as run_id:
        run_experiment(run, cwd_path, vcs.child_env(extra))
        done = experiments(cwd_path).get(run.name)
        if done is None:
            raise VimError(f"{run.name}: dvc exp run finished but `dvc exp show` does not list it")
        if run_id is not None:
            tracker_for(run_id).log_metrics(flat_metrics(ran_metrics(run, done["metrics"])), 0)
    return "ran"


def ran_metrics(run: Run, metrics: dict) -> dict:
    """The metrics files of the stages the run ran: a study that stops early (run.stages) carries the
    baseline's later files (eval.json) unchanged in its experiment, and they are not this run's."""
    if not run.stages:
        return metrics
    ran = {path for stage in run.stages for path in declared(stage).metrics}
    return {path: data for path, data in metrics.items() if path in ran}


# ---- the flow


@flow(name="study")
def study_flow(
    study_file: str,
    params_path: str = "params.yaml",
    report_only: bool = False,
    out_dir: str = "reports",
    partial: bool = False,
    replace_old: bool = False,
):
    """Run a study's arms as DVC experiments (skipping those done), then write its report."""
    cwd = Path.cwd()
    spec = load_study(study_file, params_path)
    check_replaceable(cwd / out_dir, spec.name, replace_old)  # before an hour of runs, not after
    if not report_only:
        stop_leftover(cwd, spec.name)
        for run in spec.runs():
            run_arm(run, str(cwd), params_path)
    return write_report(spec, experiments(cwd), study_file, cwd / out_dir, partial, head_commit(cwd))


def head_commit(cwd: Path) -> str | None:
    """The experiments' baseline commit, for the report; None outside a git repository."""
    try:
        return vcs.git("rev-parse", "HEAD", cwd=cwd).strip()
    except VimError:
        return None


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
    parser.add_argument(
        "--replace-old",
        action="store_true",
        help="overwrite a committed report of the old protocol (refused otherwise)",
    )
    args = parser.parse_args(argv)

    def validate() -> None:  # fail before Prefect starts, one line per problem
        spec = load_study(args.study, args.params)
        unknown = sorted(set(spec.stages) - {s.name for s in all_declared()})
        if unknown:
            raise VimError(f"{args.study}: stages not in {DVC_YAML}: {unknown}")
        check_replaceable(Path.cwd() / args.out_dir, spec.name, args.replace_old)

    try:
        return run_flow_cli(
            validate,
            lambda: study_flow(
                args.study,
                args.params,
                args.report_only,
                args.out_dir,
                args.partial,
                args.replace_old,
                return_state=True,
            ),
        )
    except KeyboardInterrupt:
        print("interrupted: rerun the same command to resume at the unfinished run", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
