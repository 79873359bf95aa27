"""The one exception type for mistakes a user can make (bad flags, bad files, missing models).

The CLI prints its message on one line and exits with status 2; programming errors keep their tracebacks.
"""


class UserError(Exception):
    """An error caused by the user's input; ``str(err)`` is a complete, printable, one-line message."""

    exit_code = 2

    def __str__(self) -> str:
        # One line always: a message built from file contents must not break the one-line promise.
        return " ".join(super().__str__().split("\n"))
