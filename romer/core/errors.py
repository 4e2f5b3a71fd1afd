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
