"""User-facing errors: the CLI prints them as one line and exits with status 2."""


class CryocvError(Exception):
    """Bad input or an unrecoverable condition the user can fix (no traceback shown)."""
