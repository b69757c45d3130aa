"""Label and CSV files opened as UTF-8 text, with a one-line error naming the file, line and
byte when they are not UTF-8 (a file saved as Latin-1 or UTF-16, a binary file)."""
from __future__ import annotations

import contextlib
from pathlib import Path

from .errors import LabelFormatError


@contextlib.contextmanager
def open_label_text(path, newline=None):
    """``open(path)`` as UTF-8 text (a leading byte-order mark dropped: Windows editors and
    Excel write one); a byte that is not UTF-8 raises LabelFormatError naming its line."""
    try:
        with open(path, encoding="utf-8-sig", newline=newline) as handle:
            yield handle
    except UnicodeDecodeError:
        raise LabelFormatError(_first_bad_line(Path(path))) from None


def _first_bad_line(path: Path) -> str:
    """Where the first byte that is not UTF-8 sits, read line by line in binary."""
    with open(path, "rb") as handle:
        for lineno, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                byte = line[err.start]
                return (f"{path}, line {lineno}: byte 0x{byte:02x} at column {err.start + 1} is not UTF-8 text; "
                        "save the file as UTF-8")
    return f"{path}: not UTF-8 text; save the file as UTF-8"
