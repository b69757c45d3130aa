"""How an exception is told to the user in one message (a note, an error line, a reason)."""
from __future__ import annotations


def short_error(err: BaseException, limit: int = 300, *, first_line: bool = False, tail: int = 0,
                keep_lines: bool = False) -> str:
    """``Type: message`` in at most ``limit`` characters.

    By default the message becomes one line, every run of whitespace one space (unpickling,
    ``load_state_dict`` and JSON errors span lines that all matter). ``first_line``: only its
    first line (a compiler's pages of traceback under it). ``keep_lines``: its lines as they
    are (a build log). A longer text keeps its first characters and, where ``tail`` > 0, its
    last ``tail`` (where a build log says what failed), joined by ``...``.
    """
    message = str(err).strip()
    if first_line:
        message = message.splitlines()[0] if message else ""
    elif not keep_lines:
        message = " ".join(message.split())
    text = f"{type(err).__name__}: {message}" if message else type(err).__name__
    if len(text) <= limit:
        return text
    if tail <= 0:
        return text[: limit - 3] + "..."
    gap = "\n...\n" if keep_lines else " ... "
    return text[: max(0, limit - tail - len(gap))] + gap + text[-tail:]
