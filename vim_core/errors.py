"""User-facing errors: one line that names the cause, never a traceback."""


class VimError(Exception):
    """A problem with the user's input or environment, reported as one line.

    The message is made one line here, whatever it quotes: a library's multi-line error text (torch's
    weights_only refusal spans a dozen lines) is joined with single spaces.
    """

    def __init__(self, message: object = ""):
        super().__init__(" ".join(str(message).split()))


class ConfigError(VimError):
    """params.yaml failed validation; holds one line per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


class TransientError(VimError):
    """An I/O failure worth retrying (an endpoint that did not answer), unlike bad input."""
