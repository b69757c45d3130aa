"""Exceptions raised by the dataset loaders; every message names the file (and line) at fault.

All derive from :class:`DatasetError`. They also derive from the matching built-in
(``FileNotFoundError``, ``ValueError``) so generic handlers keep working.
"""
from __future__ import annotations


class DatasetError(Exception):
    """Base class of every dataset loading error."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    """The dataset root, a label file or an image file does not exist."""

    def __str__(self) -> str:  # FileNotFoundError would otherwise format errno/filename oddly
        return self.args[0] if self.args else ""


class CorruptImageError(DatasetError, ValueError):
    """An image file (or an image row of a CSV) cannot be decoded."""


class LabelFormatError(DatasetError, ValueError):
    """A label file line cannot be parsed; the message gives the file and line number."""


class LabelRangeError(LabelFormatError):
    """A label value lies outside the range the format allows; the message names the value."""
