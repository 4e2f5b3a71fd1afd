"""User-facing errors: raised for bad input, printed without a traceback by the CLI and the stages."""

import sys
from functools import wraps


class UserError(Exception):
    """Bad input from the user (params, files, model ids). The message says what and where."""


def exit_on_user_error(fn):
    """Decorator for CLI/stage entry points: print a UserError as one clear line and exit 2."""

    @wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as e:
            print(f"error: {e}", file=sys.stderr)
            raise SystemExit(2)

    return wrapper


def stage_entry(fn):
    """Decorator of a DVC stage's main: its outputs are staged and moved into place only when the whole
    stage succeeds (romer.core.io.staged_outputs), and a UserError is one line and exit 2."""

    @exit_on_user_error
    @wraps(fn)
    def wrapper(*args, **kwargs):
        from romer.core.io import staged_outputs

        with staged_outputs():
            return fn(*args, **kwargs)

    return wrapper
