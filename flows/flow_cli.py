"""Running a Prefect flow (pipeline, retrain, publish, study) as a CLI: one `error:` line, not a traceback.

With no PREFECT_API_URL, Prefect starts its own temporary API server for the run, as it documents.
"""

from collections.abc import Callable

from flows.common import report, setup_logging
from vim_core.errors import TransientError, VimError


def failed_on_bad_input(fn: Callable[..., object], *args, **kwargs):
    """Call a flow body; turn a VimError into a Failed state with its one-line cause, not a traceback."""
    from prefect.states import Failed

    try:
        return fn(*args, **kwargs)
    except VimError as err:
        kind = "transient" if isinstance(err, TransientError) else "input"
        return Failed(message=str(err), data={"error": str(err), "kind": kind})


def run_flow_cli(validate: Callable[[], object], run: Callable[[], object]) -> int:
    """validate(), then run() a flow for its final state: exit 0, or one line per problem and exit 2 for
    bad input files (ConfigError) or 1 for any other VimError, a failed flow run included."""
    setup_logging()
    try:
        validate()
        state = run()
        if state.is_failed():
            raise VimError(state.message or "the flow failed")
    except VimError as err:
        return 1 if report(err) != 2 else 2
    return 0


def run_logger(fallback):
    """The Prefect run's logger inside a flow or task (shown by the CLI and the UI), else `fallback`."""
    from prefect.exceptions import MissingContextError
    from prefect.logging import get_run_logger

    try:
        return get_run_logger()
    except MissingContextError:
        return fallback
