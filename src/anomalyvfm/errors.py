"""Errors a user can fix, kept apart from programming errors.

The CLI prints a `UserInputError` as one line and exits with code 2; anything else is a bug and keeps
its traceback. `ImageReadError` is raised for one unreadable image so that batch commands can record
it and carry on with the rest; `ImageTooLargeError` is the kind of unreadable image that a server
answers with "payload too large" rather than "not an image". `NotFittedError` is a detector used before
`fit()` or `load()`: the caller's order of calls, so it is reported like any other input mistake.
"""


class UserInputError(Exception):
    """A mistake in what the user asked for: a missing folder, a bad option, an unreadable model."""


class NotFittedError(UserInputError):
    """A model asked to score, save or export before it was fitted or loaded."""

    def __init__(self, message: str = "detector is not fitted: call fit() or AnomalyDetector.load()") -> None:
        super().__init__(message)


class ImageReadError(UserInputError):
    """One image file could not be decoded (missing, empty, truncated or not an image)."""


class ImageTooLargeError(ImageReadError):
    """An image declares more pixels than the caller allows (or than PIL's decompression-bomb limit)."""


def failure(source: str, exc: BaseException) -> str:
    """One line for an unexpected exception while processing `source` (a MemoryError's text is often empty)."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{source}: processing failed ({type(exc).__name__}{': ' + text if text else ''})"
