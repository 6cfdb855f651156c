"""The one exception type that means "the user gave us something we cannot use".

The CLI prints it as a single line and exits 2; anything else is a bug and keeps its traceback.
"""


class UserError(Exception):
    """A problem with the user's input: the message names the problem and the fix."""

    exit_code = 2
