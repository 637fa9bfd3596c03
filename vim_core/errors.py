"""User-facing errors: one line that names the cause, never a traceback."""


class VimError(Exception):
    """A problem with the user's input or environment, reported as one line."""


class ConfigError(VimError):
    """params.yaml failed validation; holds one line per problem."""

    def __init__(self, lines: list[str]):
        self.lines = lines
        super().__init__("; ".join(lines))


class TransientError(VimError):
    """An I/O failure worth retrying (an endpoint that did not answer), unlike bad input."""
