"""User-facing errors.

Anything a user can cause (bad path, bad config, bad data) raises ``QuantkitError`` with a message
that fits on one line; the CLI prints it and exits with ``exit_code`` instead of a traceback.
"""


class QuantkitError(Exception):
    """A failure the user can act on. ``exit_code`` 2 = bad usage/input, 1 = failure while working."""

    exit_code = 1

    def __init__(self, message: str, exit_code: int | None = None):
        super().__init__(message)
        if exit_code is not None:
            self.exit_code = exit_code


class UsageError(QuantkitError):
    """Bad input the user gave us: a missing path, an unknown name, an invalid option."""

    exit_code = 2
