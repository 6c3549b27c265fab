"""Error messages that may quote untrusted input (a file's content, a request), kept to one short line."""

from __future__ import annotations


def shorten(value: object, limit: int = 60) -> str:
    """A short one-line description of ``value``, for echoing untrusted input in an error message.

    Input from a file or a request can be megabytes long, hold newlines or nest thousands of levels deep:
    strings are ``repr``-escaped (no newline survives) and cut to about ``limit`` characters, containers are
    described by their type and size only (their ``repr`` could be huge, or recurse too deep), and so are
    integers too long to print.
    """
    if isinstance(value, (dict, list, tuple, set)):
        return f"a {type(value).__name__} of {len(value):,} items"
    if isinstance(value, int) and not isinstance(value, bool) and value.bit_length() > 64:
        return f"an integer of {value.bit_length():,} bits"
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit]}... ({len(text):,} characters)"
