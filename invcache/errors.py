"""Errors that reach the user as one line, without a traceback."""


class InvcacheError(Exception):
    """A failure the user can act on; the CLI prints its message and exits 1."""


class UsageError(InvcacheError, ValueError):
    """A wrong value on the command line or in an API call; the CLI exits 2."""


class WeightsError(InvcacheError):
    """A checkpoint that cannot be loaded into the chosen model."""
