"""The one exception smallm raises for problems a person can fix."""


class SmallmError(Exception):
    """A problem with the user's input (a path, a value, a file) whose message says what to do.

    The CLI prints it as one line and exits with a non-zero code; no traceback.
    """
