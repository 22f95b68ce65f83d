"""User-facing errors: one line on stderr and a non-zero exit instead of a traceback."""

import sys
from typing import Any, Callable

__all__ = ["UserError", "run_cli"]


class UserError(Exception):
    """A mistake the user can fix (missing data, bad argument combination, mismatched checkpoint)."""


def run_cli(main: Callable[[Any], Any], args: Any) -> Any:
    """Call ``main(args)``; turn a :class:`UserError` into ``error: <msg>`` on stderr and exit code 2."""
    try:
        return main(args)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        sys.exit(130)
