"""Printing to a standard output whose reader may go away (``nla-train ... | head``).

Python reports a closed pipe as ``BrokenPipeError`` on the next print: a training run would
die there, before its epoch's checkpoint. :func:`say` instead sends the rest of the output
to ``os.devnull``, notes it once on stderr, and lets the program go on.
"""
from __future__ import annotations

import os
import sys


def _detach(stream) -> bool:
    """Point ``stream``'s file descriptor at os.devnull (what Python's documentation advises
    for a closed pipe: the data still buffered then goes nowhere, at exit too)."""
    try:
        fd = stream.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (pytest's capture, StringIO)
        return False
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)
    return True


def say(*args, file=None, **kwargs) -> None:
    """``print`` that survives the reader of ``file`` (default stdout) going away."""
    stream = sys.stdout if file is None else file
    kwargs.pop("flush", None)
    try:
        # flushed at once: a closed pipe is met here, not in the flush at exit ("Exception ignored")
        print(*args, file=stream, flush=True, **kwargs)
    except BrokenPipeError:
        if not _detach(stream):
            return
        if stream is sys.stdout:
            say("nla_fast: standard output was closed by its reader (e.g. `| head`): the rest is not printed; "
                "the program goes on", file=sys.stderr)
