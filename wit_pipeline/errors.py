"""Errors that the CLI reports as one clear line, without a traceback."""


class WitError(Exception):
    """A user-facing error: bad input, missing file, invalid option."""
