"""The one exception type for user mistakes: the CLI prints its message on one line, no traceback."""


class UserError(Exception):
    """Bad input the user can fix (a params key, a file, a path); the message says what to do."""
