"""The one exception a user can cause by what they ask for.

Library code raises :class:`UsageError` with one line that names the problem and the fix;
the command-line tools print that line and exit with status 2, never a traceback.
"""


class UsageError(ValueError):
    """Bad input from the user (an option, a file, a missing dataset): a one-line message."""
