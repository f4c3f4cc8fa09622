"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class FersynthError(Exception):
    """A bad input, setting or path; the message names the file, row or key."""
