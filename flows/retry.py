"""Retry options for Prefect tasks that reach a server or storage: transient failures only, with backoff.

Prefect's own exponential_backoff gives the waits (first_delay, then twice that, ...) and
retry_jitter_factor spreads them, so processes that failed together do not all come back at once.
"""

from prefect.tasks import exponential_backoff

from vim_core.errors import TransientError, VimError

JITTER = 0.2  # each wait drawn within +-20% of its nominal value


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


def transient_retries(retries: int = 3, first_delay: float = 2.0, delays: list[float] | None = None) -> dict:
    """Task options: retry transient failures `retries` times, waiting first_delay, 2x, 4x ... seconds.

    `delays` (seconds before each retry, e.g. from an environment variable) replaces the backoff.
    """
    if delays is not None:
        retries, wait = len(delays), list(delays)
    else:
        wait = exponential_backoff(backoff_factor=first_delay)
    return dict(
        retries=retries,
        retry_delay_seconds=wait,
        retry_jitter_factor=JITTER,
        retry_condition_fn=retry_transient,
    )
