"""``nla_fast.atomic`` (the project's one way to write a file) loaded from its file, without
importing the ``nla_fast`` package, whose ``__init__`` imports torch: the GPU-check driver and
the test runner must work before the install step, in the CPU dry run, and where torch is
broken. ``nla_fast/atomic.py`` uses the standard library only."""
import importlib.util
from pathlib import Path

_SOURCE = Path(__file__).resolve().parents[1] / "nla_fast" / "atomic.py"
_spec = importlib.util.spec_from_file_location("nla_fast_atomic_standalone", _SOURCE)
atomic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(atomic)
