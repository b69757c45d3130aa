"""How an exception is told to the user in one message (a note, an error line, a reason)."""
from __future__ import annotations


def short_error(err: BaseException, limit: int = 300, tail: int = 0, one_line: bool = True) -> str:
    """``Type: message`` in at most about ``limit`` characters.

    ``one_line``: every run of whitespace becomes one space (Inductor, unpickling and JSON
    errors span many lines); ``False`` keeps the lines (a compiler's log). A longer text keeps
    its first ``limit - tail`` characters and, where ``tail`` > 0, its last ``tail`` (where a
    build log says what failed), joined by ``...``.
    """
    message = str(err).strip()
    if one_line:
        message = " ".join(message.split())
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    if len(text) <= limit:
        return text
    if tail <= 0:
        return text[: limit - 3] + "..."
    gap = " ... " if one_line else "\n...\n"
    return text[: max(0, limit - tail - len(gap))] + gap + text[-tail:]
