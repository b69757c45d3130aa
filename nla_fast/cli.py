"""Small helpers shared by the command-line entry points."""
from __future__ import annotations

import argparse


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already explain the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if "default" in text or default is None or default is argparse.SUPPRESS or default is False \
                or not action.option_strings:
            return text
        return super()._get_help_string(action)
