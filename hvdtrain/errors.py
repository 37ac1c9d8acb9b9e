"""The one exception type users see: a one-line message saying what is wrong and how to fix it."""


class UserError(Exception):
    """Bad input or a broken setup. The CLI prints `hvdtrain: error: <message>` and exits with code 2."""

    exit_code = 2
