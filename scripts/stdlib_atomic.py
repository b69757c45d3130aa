"""``nla_fast.atomic`` (the project's one way to write a file) loaded from its file, without
importing the ``nla_fast`` package, whose ``__init__`` imports torch: the GPU-check driver and
the test runner must work before the install step, in the CPU dry run, and where torch is
broken. ``nla_fast/atomic.py`` and what it imports (``nla_fast/disk.py``) use the standard
library only; they load here as modules of a stand-in package over the same folder."""
import importlib
import sys
import types
from pathlib import Path

_PACKAGE = "nla_fast_standalone"
if _PACKAGE not in sys.modules:
    _stand_in = types.ModuleType(_PACKAGE)
    _stand_in.__path__ = [str(Path(__file__).resolve().parents[1] / "nla_fast")]
    sys.modules[_PACKAGE] = _stand_in
atomic = importlib.import_module(f"{_PACKAGE}.atomic")
