"""Turning exceptions into the one line a user reads (no imports beyond the standard library: the command lines use
it before anything heavy is loaded)."""

from __future__ import annotations


def error_message(err: BaseException) -> str:
    """The message of ``err`` as the user should read it.

    An exception raised in a DataLoader worker process (a corrupt image found while decoding) reaches the main
    process re-raised by torch with its whole worker traceback as the message ("Caught ImageLoadError in DataLoader
    worker process 0. Original Traceback ..."); its own message is the traceback's last line, after the class name.

    Example:
        >>> error_message(ValueError("Caught ImageLoadError in DataLoader worker process 0.\\nOriginal Traceback "
        ...                          "(most recent call last):\\n  ...\\nmetricsearch.data.io.ImageLoadError: bad.jpg"))
        'bad.jpg'
    """
    text = str(err)
    if not (text.startswith("Caught ") and "Original Traceback" in text):
        return text
    name = text.removeprefix("Caught ").split(" ", 1)[0]  # the class the worker raised
    last = next((line for line in reversed(text.splitlines()) if line.strip()), text)
    head, separator, rest = last.partition(": ")
    return rest if separator and head.rsplit(".", 1)[-1] == name else last
