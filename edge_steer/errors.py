"""The one exception type the CLI turns into a clean one-line error and exit code 2."""


class UserError(Exception):
    """Bad input from the user: the message names the problem and the fix."""
