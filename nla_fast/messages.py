"""One-line error messages for users (a library error can span pages)."""
from __future__ import annotations


def short_error(err: BaseException, limit: int = 300) -> str:
    """``Type: message`` on one line, whitespace collapsed; past ``limit`` characters the middle
    is cut, since a compiler's error tends to sit at the end of its output."""
    text = " ".join(str(err).split())
    line = f"{type(err).__name__}: {text}" if text else type(err).__name__
    if len(line) <= limit:
        return line
    head = limit * 2 // 5
    return line[:head] + " ... " + line[-(limit - head - 5):]
