"""One-line error messages: of exceptions, and of a config field's bad value.

Errors are reported in one line: a command line prints them, ranks share them through a
collective (:func:`covrl.parallel.raise_if_any_rank`). An exception whose message is
empty or blank is named by its type, so every exception has a line to report.
"""

from __future__ import annotations

__all__ = ["check_field", "first_line", "type_and_message"]


def first_line(exc: BaseException) -> str:
    """The first line of ``exc``'s message (surrounding blanks stripped), or the
    exception's type name when the message is empty or blank."""
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def type_and_message(exc: BaseException) -> str:
    """``"TypeName: message"`` on one line (runs of whitespace, newlines included,
    become one space); just the type name when the message is empty or blank."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def check_field(ok: bool, name: str, value, expected: str) -> None:
    """A config check: raise ``ValueError("<name>=<value>: expected <expected>")``
    unless ``ok``. (Write ``ok`` so that NaN fails it: ``x >= 0``, not ``not x < 0``.)"""
    if not ok:
        raise ValueError(f"{name}={value!r}: expected {expected}")
