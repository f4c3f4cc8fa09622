"""Errors that are the user's to fix: the CLI prints them as one line, without a traceback."""


class FersynthError(Exception):
    """A bad input, setting or path; the message names the file, row or key."""


def one_line(exc: FersynthError) -> str:
    """The message of a FersynthError, also when a DataLoader worker raised it: torch re-raises
    it in the main process with "Caught FersynthError in DataLoader worker process N" and the
    worker's traceback, whose last line holds the message."""
    text = str(exc)
    if "Original Traceback" not in text:
        return text
    last = text.strip().splitlines()[-1]
    return last.split(": ", 1)[1] if last.startswith(f"{FersynthError.__module__}.FersynthError: ") else last
