"""Small helpers of the command-line programs: help text, Ctrl-C and SIGTERM, progress bar."""
from __future__ import annotations

import argparse
import contextlib
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
    """Ctrl-C or SIGTERM (what a cluster scheduler sends before it kills a job): finish the
    current step, write last.pt and stop. A second Ctrl-C aborts at once; a second SIGTERM
    changes nothing (the scheduler's SIGKILL ends a save that takes longer than its grace)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.requested = False
        self.signal: int | None = None  # the first signal that asked to stop
        self._previous: dict = {}

    @property
    def name(self) -> str:
        return "SIGTERM" if self.signal == signal.SIGTERM else "Ctrl-C"

    @property
    def exit_code(self) -> int:
        """128 + the signal's number, as the shell reports a process that signal ended (130, 143)."""
        return 128 + (self.signal or signal.SIGINT)

    def _handle(self, signum, frame):
        if self.requested:
            if signum == signal.SIGINT:
                raise KeyboardInterrupt
            return
        self.requested, self.signal = True, signum
        if signum == signal.SIGINT:
            print("\nnla_fast: Ctrl-C: stopping after this step and writing last.pt "
                  "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = {signum: signal.signal(signum, self._handle) for signum in self.SIGNALS}
        return self

    def __exit__(self, *exc):
        for signum, previous in self._previous.items():
            signal.signal(signum, previous)
        self._previous = {}
        return False


class Terminated(BaseException):
    """SIGTERM outside the training steps (loading data, compiling): like KeyboardInterrupt, a
    BaseException, so that no ``except Exception`` swallows it and every ``finally`` runs."""


@contextlib.contextmanager
def sigterm_raises():
    """Within the block SIGTERM raises :class:`Terminated` (the default would end the process
    at once, leaving the run folder's lock); ``StopRequest`` takes over during the steps."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signum, frame):
        raise Terminated()

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def progress_bar(total: int, epoch: int, epochs: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch} ({epoch + 1}/{epochs})", unit="step",
                disable=not enabled, dynamic_ncols=True, leave=True, file=sys.stderr)
