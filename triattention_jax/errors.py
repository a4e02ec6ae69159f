"""The one exception type that user-facing entry points turn into a one-line error."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
