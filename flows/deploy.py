"""Scheduled retraining: the `retrain` flow (flows/retrain.py) as a Prefect deployment with a cron schedule.

    python -m flows.deploy                          # serve it from this process (Ctrl-C stops it)
    python -m flows.deploy --pool vim-process       # register it on a process work pool, then exit
    prefect worker start --pool vim-process --type process   # ... where a worker runs it

Either way the deployment is `retrain/scheduled` on the Prefect API in PREFECT_API_URL (`prefect server
start` serves one on http://127.0.0.1:4200). The schedule is, first found: --cron, the VIM_RETRAIN_CRON
environment variable, `schedule.cron` in params.yaml, else Mondays at 03:00 (DEFAULT_CRON); the time
zone likewise (--timezone, VIM_RETRAIN_TIMEZONE, `schedule.timezone`, UTC). Runs never overlap: DVC
holds one lock per repository.
"""

import argparse
import os
import sys

from flows.retrain import REPO, add_run_options, retrain

DEPLOYMENT = "scheduled"
POOL = "vim-process"  # the process work pool the docker stack's worker polls
DEFAULT_CRON = "0 3 * * 1"
DEFAULT_TIMEZONE = "UTC"


def _from_params(key: str) -> str | None:
    """schedule.<key> from params.yaml, when params.yaml has that section."""
    from vim_core.config import load_params

    path = REPO / "params.yaml"
    if not path.is_file():  # an installed package without a checkout: the defaults deploy
        return None
    return getattr(load_params(path).schedule, key)  # a broken params.yaml stops here, in one line


def schedule(cron: str | None = None, timezone: str | None = None):
    """The deployment's Cron schedule, from the first of: argument, environment, params.yaml, default."""
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.schedules import Cron

    from vim_core.errors import VimError

    cron = cron or os.environ.get("VIM_RETRAIN_CRON") or _from_params("cron") or DEFAULT_CRON
    timezone = (
        timezone or os.environ.get("VIM_RETRAIN_TIMEZONE") or _from_params("timezone") or DEFAULT_TIMEZONE
    )
    try:
        CronSchedule(cron=cron, timezone=timezone)  # Prefect's own validation, before anything is sent
    except ValueError as err:
        errors = err.errors() if hasattr(err, "errors") else [{"msg": str(err)}]
        cause = "; ".join(e["msg"].removeprefix("Value error, ") for e in errors)
        raise VimError(f"schedule {cron!r} ({timezone}): {cause}") from None
    return Cron(cron, timezone=timezone)


def _parameters(args: argparse.Namespace) -> dict:
    return {"set_params": list(args.set_params), "push_outputs": bool(args.push)}


def ensure_pool(name: str) -> None:
    """Create the process work pool if it does not exist (what `prefect worker start --type process` does)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.exceptions import ObjectNotFound
    from prefect.workers.process import ProcessWorker

    with get_client(sync_client=True) as client:
        try:
            client.read_work_pool(name)
        except ObjectNotFound:
            template = ProcessWorker.get_default_base_job_template()
            client.create_work_pool(WorkPoolCreate(name=name, type="process", base_job_template=template))


def deploy_to_pool(args: argparse.Namespace):
    """Register the deployment on the work pool; a worker of that pool runs it. Returns its id."""
    from prefect.deployments.runner import EntrypointType

    ensure_pool(args.pool)
    # The worker starts each run in this checkout (working_dir) and imports flows.retrain from it, so
    # the deployment runs the code and the DVC repository it was deployed from: /app in the docker stack.
    # The worker's machine needs this checkout at the same path, with the project installed.
    return retrain.deploy(
        name=args.name,
        work_pool_name=args.pool,
        job_variables={"working_dir": str(REPO)},
        schedules=[schedule(args.cron, args.timezone)],
        parameters=_parameters(args),
        concurrency_limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
        build=False,
        push=False,
        print_next_steps=False,
        ignore_warnings=True,
    )


def serve(args: argparse.Namespace) -> None:
    """Register the deployment and run its scheduled (and manually triggered) runs from this process."""
    from prefect.deployments.runner import EntrypointType

    schedules = [schedule(args.cron, args.timezone)]
    os.chdir(REPO)  # the runner starts each flow run here, so it imports this checkout's flows
    retrain.serve(
        name=args.name,
        schedules=schedules,
        parameters=_parameters(args),
        limit=1,
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--name", default=DEPLOYMENT, help=f"deployment name (default: {DEPLOYMENT})")
    parser.add_argument("--cron", help=f"cron schedule (default: VIM_RETRAIN_CRON, params, {DEFAULT_CRON!r})")
    parser.add_argument("--timezone", help=f"the schedule's time zone (default: {DEFAULT_TIMEZONE})")
    parser.add_argument("--pool", help=f"register on this work pool (e.g. {POOL}) instead of serving here")
    add_run_options(parser)  # --set / --push, applied to every run
    args = parser.parse_args(argv)
    from vim_core.errors import VimError

    try:
        if args.pool:
            deployment_id = deploy_to_pool(args)
            print(f"deployment retrain/{args.name} ({deployment_id}) on work pool {args.pool}")
            print(f"run it: prefect worker start --pool {args.pool} --type process")
        else:
            serve(args)
    except VimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
