"""Errors caused by the user's input or environment: the CLI prints them as one line, exit code 2."""


class UserError(Exception):
    """Bad input or an environment that cannot run the request; the message says what and why."""
