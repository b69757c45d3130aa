"""Small helpers of the command-line programs: help text, Ctrl-C, progress bar."""
from __future__ import annotations

import argparse
import signal
import sys
import threading


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows ``(default: X)`` only where the help text does not already explain the default."""

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        # a switch (--no-progress, --overwrite) says what it does: "(default: True)" would only confuse
        if "default" in text or default is None or default is argparse.SUPPRESS or default is False \
                or not action.option_strings or (action.nargs == 0 and isinstance(default, bool)):
            return text
        return super()._get_help_string(action)


class StopRequest:
    """First Ctrl-C: finish the current step, write last.pt and stop. A second one aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nnla_fast: Ctrl-C: stopping after this step and writing last.pt "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def progress_bar(total: int, epoch: int, epochs: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch} ({epoch + 1}/{epochs})", unit="step",
                disable=not enabled, dynamic_ncols=True, leave=True, file=sys.stderr)
