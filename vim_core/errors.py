"""User-facing errors: one line that names the cause, never a traceback."""

from vim_core.redact import redact_text


class VimError(Exception):
    """A problem with the user's input or environment, reported as one line.

    The message is made one line here, whatever it quotes: a library's multi-line error text (torch's
    weights_only refusal spans a dozen lines) is joined with single spaces, and any credentials in a URL
    it quotes are redacted (vim_core.redact): error lines go to terminals, CI logs and Prefect's API.
    """

    def __init__(self, message: object = ""):
        super().__init__(redact_text(" ".join(str(message).split())))


class ConfigError(VimError):
    """params.yaml failed validation; holds one line per problem."""

    def __init__(self, lines: list[str]):
        self.lines = [redact_text(line) for line in lines]
        super().__init__("; ".join(lines))


class TransientError(VimError):
    """An I/O failure worth retrying (an endpoint that did not answer), unlike bad input."""
