"""What every stage entry point shares: env defaults, params loading, and one-line errors."""

import logging
import sys
from collections.abc import Callable

from vim_core.errors import ConfigError, TransientError, VimError

log = logging.getLogger("vim")


def retry_transient(task, task_run, state) -> bool:
    """Retry only failures that may pass (storage or server unreachable), never bad input."""
    try:
        state.result()
    except TransientError:
        return True
    except VimError:
        return False
    except (ConnectionError, TimeoutError, OSError):
        return True
    except Exception:
        return False
    return False


def failed_on_bad_input(fn: Callable[..., object], *args, **kwargs):
    """Call a flow body; turn a VimError into a Failed state with its one-line cause, not a traceback."""
    from prefect.states import Failed

    try:
        return fn(*args, **kwargs)
    except VimError as err:
        kind = "transient" if isinstance(err, TransientError) else "input"
        return Failed(message=str(err), data={"error": str(err), "kind": kind})


def run_stage(flow: Callable[..., object], argv: list[str] | None = None) -> int:
    """Run a stage flow as a CLI: exit 0, or print one line per problem and exit non-zero."""
    import argparse

    parser = argparse.ArgumentParser(description=flow.__doc__)
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        from vim_core.config import load_params

        load_params(args.params)  # fail before Prefect starts, in one line per problem
        state = flow(params_path=args.params, return_state=True)
        if state.is_failed():
            raise VimError(state.message or "the flow failed")
    except ConfigError as err:
        for line in err.lines:
            print(f"error: {line}", file=sys.stderr)
        return 2
    except VimError as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    return 0
