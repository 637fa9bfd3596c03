"""The pipeline as one Prefect flow: each dvc.yaml stage a task that runs `dvc repro --single-item STAGE`.

    python -m flows.pipeline       # every stage in dependency order; DVC skips those up to date

The stages and their order come from DVC's own graph of dvc.yaml, so a stage is declared once. DVC decides
what runs: a stage whose inputs did not change finishes at once, logged as up to date. Each stage process
is plain Python (flows/common.py:run_stage) and knows nothing of Prefect; its output lines stream into the
task's log. A stage that exits EXIT_TRANSIENT (storage or a server unreachable) is retried; any other
failure ends the flow with the stage's one-line error, and the later stages do not run.
"""

import contextlib
import re
import sys
from pathlib import Path

from prefect import flow, task

from flows import vcs
from flows.common import EXIT_TRANSIENT
from flows.flow_cli import failed_on_bad_input, run_flow_cli
from flows.retry import transient_retries
from vim_core.errors import TransientError, VimError

REPO = Path(__file__).resolve().parents[1]
# what `dvc repro` prints for a stage it did not run (the second: restored from its run cache)
UP_TO_DATE = ("didn't change, skipping", "is cached - skipping run")
_EXITED = re.compile(r"exited with (\d+)")


def stage_order(repo: Path = REPO) -> list[str]:
    """dvc.yaml's stages with a command, each after those it depends on; ties keep dvc.yaml's order."""
    import networkx as nx
    from dvc.repo import Repo

    with contextlib.chdir(repo), Repo(".") as dvc_repo:  # names relative to the repo, as `dvc repro` there
        stages = [s for s in dvc_repo.index.stages if s.cmd]
        position = {s.addressing: i for i, s in enumerate(stages)}
        graph = dvc_repo.index.graph.reverse(copy=True)  # DVC's edges point from a stage to its deps
        graph.remove_nodes_from([s for s in list(graph) if s.addressing not in position])
        ordered = nx.lexicographical_topological_sort(graph, key=lambda s: position[s.addressing])
        return [s.addressing for s in ordered]


def failure(stage: str, code: int, lines: list[str]) -> VimError:
    """The stage's one-line error: its own `error:` lines, else DVC's; transient when it exited so."""
    exits = [int(m.group(1)) for line in lines if (m := _EXITED.search(line))]
    kind = TransientError if exits and exits[-1] == EXIT_TRANSIENT else VimError
    return kind(f"{stage}: {vcs.cause(lines, f'dvc repro exited {code}')}")


@task(**transient_retries())
def repro(stage: str, repo: Path = REPO) -> str:
    """`dvc repro --single-item STAGE`: 'ran', or 'up to date' when DVC had nothing to do."""
    from prefect.logging import get_run_logger

    logger = get_run_logger()
    code, lines = vcs.stream([vcs.dvc_executable(), "repro", "--single-item", stage], repo, logger)
    if code != 0:
        raise failure(stage, code, lines)
    if any(f"'{stage}' {skip}" in line for line in lines for skip in UP_TO_DATE):
        logger.info("stage %s is up to date", stage)
        return "up to date"
    return "ran"


@flow(name="pipeline")
def pipeline(repo: str = str(REPO)):
    """Every stage of dvc.yaml in dependency order, one task each, through `dvc repro --single-item`."""
    return failed_on_bad_input(run_stages, Path(repo))


def run_stages(repo: Path) -> dict[str, str]:
    """Each stage's task in turn; the first failure raises, so the later stages do not run."""
    return {s: repro.with_options(name=s, task_run_name=s)(s, repo) for s in stage_order(repo)}


def main(argv: list[str] | None = None) -> int:
    import argparse

    parser = argparse.ArgumentParser(description=pipeline.__doc__)
    parser.add_argument("--repo", default=str(REPO), help=f"the DVC repository (default: {REPO})")
    args = parser.parse_args(argv)
    return run_flow_cli(lambda: None, lambda: pipeline(args.repo, return_state=True))


if __name__ == "__main__":
    sys.exit(main())
