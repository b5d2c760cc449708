"""The benchmark's error kinds and how an exception is shown in a table note.

A failure while measuring one implementation becomes a row status and a note, never a
crash: only ``FatalCuda`` (the CUDA context is gone) stops a run, and even then what was
measured is written.
"""
from __future__ import annotations


class Unavailable(Exception):
    """An implementation does not run a shape: status 'n/a' (outside what its API does)
    or 'refused' (its library said no)."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = status
        self.reason = reason


class FatalCuda(RuntimeError):
    """The CUDA context no longer works (a sticky error): nothing after can be measured."""


def short_error(e: BaseException) -> str:
    """'Type: first line' (at most 300 characters of it): one table note."""
    lines = str(e).strip().splitlines()
    return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")
