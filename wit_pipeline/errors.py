"""Errors that the CLI reports as one clear line, without a traceback."""

from __future__ import annotations

import sys
from collections.abc import Callable


class WitError(Exception):
    """A user-facing error: bad input, missing file, invalid option."""


def exit_status(
    command: Callable[[], int | None], *, prog: str, interrupted: str = "interrupted"
) -> int:
    """Run ``command`` as a program: its result is the exit status (None: 0).

    A :class:`WitError` prints ``PROG: error: MESSAGE`` on stderr, one line without a
    traceback, and gives status 2; Ctrl-C prints ``PROG: INTERRUPTED`` and gives 130.
    """
    try:
        return int(command() or 0)
    except WitError as e:
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: {interrupted}", file=sys.stderr)
        return 130
