"""The one exception type for mistakes a user can fix (bad data, flags, files)."""


class UserError(Exception):
    """A problem the user can fix. The CLI prints it as one line and exits with
    status 2; no traceback. The message names the value and, where possible, the fix."""
