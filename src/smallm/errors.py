"""The exceptions smallm raises for problems a person can fix."""


class SmallmError(Exception):
    """A problem with the user's input (a path, a value, a file) whose message says what to do.

    The CLI prints it as one line and exits with a non-zero code; no traceback.
    """


class WriteFailed(SmallmError):
    """A file could not be written (disk full, quota, read-only, file too large); the message names the path
    and the space left there. Whatever was being written has been removed; what was there before is kept."""
