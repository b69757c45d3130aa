"""What a run was made with, recorded in its ``config.json`` and in every checkpoint: library
versions, the GPU, the package's git commit and the command line. Gathering it never fails a
run: what cannot be found is recorded as None."""
from __future__ import annotations

import functools
import platform
import subprocess
from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _version(module_name: str) -> str | None:
    try:
        module = __import__(module_name)
    except Exception:  # not installed, or broken: the record says so, the run goes on
        return None
    version = getattr(module, "__version__", None)
    return None if version is None else str(version)  # plain str: checkpoints load with weights_only


def git_state(folder: Path = PACKAGE_DIR) -> dict | None:
    """``{"commit", "dirty"}`` of the git checkout holding ``folder``; None when it is not one
    (an installed wheel) or git is missing."""
    def git(*args) -> str | None:
        try:
            done = subprocess.run(["git", *args], cwd=folder, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.SubprocessError):
            return None
        return done.stdout.strip() if done.returncode == 0 else None

    commit = git("rev-parse", "HEAD")
    if not commit:
        return None
    status = git("status", "--porcelain", "--untracked-files=no")
    return {"commit": commit, "dirty": None if status is None else bool(status)}


@functools.lru_cache(maxsize=None)
def _static_record() -> dict:
    import torch

    cuda = torch.cuda.is_available()
    return {
        "python": platform.python_version(),
        "torch": str(torch.__version__),  # a TorchVersion would not load with weights_only
        "torchvision": _version("torchvision"),
        "triton": _version("triton"),
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if cuda else None,
        "gpu": torch.cuda.get_device_name(torch.cuda.current_device()) if cuda else None,
        "git": git_state(),
    }


def environment_record() -> dict:
    """Versions, GPU name (None without CUDA) and git state; gathered once per process."""
    return dict(_static_record())
