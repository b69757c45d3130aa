"""Building and loading the native (C++/CUDA) NLA loss library: toolkit discovery, compile
commands, the just-in-time build. ``nla_fast.extension`` holds the operators' Python side.

CPU kernels are always built; the CUDA kernels (``csrc/nla_loss_cuda.cu``, plain launchers, and
their ATen glue in ``nla_loss.cpp`` behind ``-DNLA_WITH_CUDA``) are built too when
``torch.cuda.is_available()``, for the visible GPUs' architecture (or ``TORCH_CUDA_ARCH_LIST``).
If that build fails, the CPU-only library is built so CPU tensors keep the extension. The
library is compiled with ``torch.utils.cpp_extension.load`` (ninja) into the default torch
extensions directory under a name hashed from the sources, the flags and the torch version, so
an edit rebuilds and a rebuild is cached (about 20 s CPU-only on 2 cores; about a minute more
with the CUDA kernels).

Set ``NLA_FAST_NO_EXTENSION=1`` to never build or load the library.
"""
from __future__ import annotations

import hashlib
import os
import re
import shutil
import sys
import sysconfig
import threading
from pathlib import Path

import torch

from .messages import short_error

__all__ = [
    "load",
    "unavailable_reason",
    "op_exists",
    "source_dir",
    "find_cuda_home",
    "nvcc_compile_command",
    "cxx_compile_command",
]

_SOURCE_FILES = ("nla_loss.h", "nla_loss.cpp", "nla_loss_cuda.cu")


def _cpu_flags() -> list[str]:
    """Host-compiler flags of nla_loss.cpp: OpenMP, so ``at::parallel_for`` splits rows over the
    threads (torch's own libgomp serves it at run time); at::vec's AVX2 code when this CPU has AVX2,
    FMA and F16C (the library is built on the machine that runs it, and this choice is part of its
    hashed name); no FMA contraction, so scalar rows round the same in every instantiation."""
    flags = ["-O3", "-fopenmp", "-ffp-contract=off"]
    try:
        cpuinfo = Path("/proc/cpuinfo").read_text()
    except OSError:
        return flags
    cpu_flags = set(next((line for line in cpuinfo.splitlines() if line.startswith("flags")), "").split())
    if {"avx2", "fma", "f16c"} <= cpu_flags:
        flags += ["-mavx2", "-mfma", "-mf16c", "-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    return flags


_EXTRA_CFLAGS = _cpu_flags()
_EXTRA_LDFLAGS = ["-fopenmp"]
_EXTRA_CUDA_CFLAGS = ["-O3"]

_lock = threading.RLock()
_load_state: dict[str, object] = {}  # "done": bool, "errors": {variant: message}, "library": name


# ----------------------------------------------------------------------------- locating things
def source_dir() -> Path:
    """The folder holding nla_loss.cpp: ``<repo>/csrc`` or the installed ``nla_fast.csrc``."""
    repo = Path(__file__).resolve().parent.parent / "csrc"
    if (repo / "nla_loss.cpp").is_file():
        return repo
    try:
        import importlib.resources

        installed = Path(str(importlib.resources.files("nla_fast.csrc")))
        if (installed / "nla_loss.cpp").is_file():
            return installed
    except (ImportError, ModuleNotFoundError, TypeError, FileNotFoundError):
        pass
    raise FileNotFoundError(f"the nla_fast C++ sources (nla_loss.cpp) are neither in {repo} nor in nla_fast.csrc")


def _version_key(path: Path):
    return tuple(int(x) for x in re.findall(r"\d+", path.name))


def _is_toolkit_root(root: Path) -> bool:
    if not (root / "bin" / "nvcc").is_file() or not (root / "include" / "cuda_runtime.h").is_file():
        return False
    return any((root / lib / "libcudart.so").exists() for lib in ("lib64", "lib", "targets/x86_64-linux/lib"))


def find_cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME / $CUDA_PATH if set, else resolved from ``nvcc``.

    ``torch.utils.cpp_extension`` guesses the root as the folder above ``nvcc`` on PATH, which is
    wrong when that ``nvcc`` is a symlink or a wrapper script outside the toolkit (linking then
    fails on ``-lcudart``). Here symlinks are resolved and a wrapper script is read for the path
    it runs, before falling back to /usr/local/cuda and /usr/local/cuda-*.
    """
    env = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if env:
        return env
    candidates: list[Path] = []
    nvcc = shutil.which("nvcc")
    if nvcc:
        real = Path(nvcc).resolve()
        candidates.append(real.parent.parent)
        try:
            if real.stat().st_size < 65536:  # a wrapper script, not the driver binary
                text = real.read_text(errors="ignore")
                candidates += [Path(m.group(1)) for m in re.finditer(r"(/[^\s'\"]+?)/bin/nvcc\b", text)]
        except OSError:
            pass
    candidates.append(Path("/usr/local/cuda"))
    candidates += sorted(Path("/usr/local").glob("cuda-*"), key=_version_key, reverse=True)
    for root in candidates:
        if _is_toolkit_root(root):
            return str(root.resolve())
    return None


def _ensure_cuda_home() -> None:
    """Point torch.utils.cpp_extension at the real toolkit when CUDA_HOME is unset."""
    from torch.utils import cpp_extension

    if os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH"):
        return
    current = getattr(cpp_extension, "CUDA_HOME", None)
    if current and _is_toolkit_root(Path(current)):
        return
    root = find_cuda_home()
    if root is not None:
        os.environ["CUDA_HOME"] = root
        cpp_extension.CUDA_HOME = root


def _cxx_std_flag() -> str:
    """The C++ standard this torch's cpp_extension builds with (c++20 from torch 2.10 on, else c++17)."""
    from torch.utils import cpp_extension

    try:
        text = Path(cpp_extension.__file__).read_text()
    except OSError:
        return "-std=c++17"
    return "-std=c++20" if "-std=c++20" in text else "-std=c++17"


def nvcc_compile_command(output: str | os.PathLike, arch: str = "90") -> list[str]:
    """An ``nvcc -c`` command compiling nla_loss_cuda.cu alone, with torch's include dirs and flags.

    Used by the tests to compile the CUDA source on machines without a GPU.
    """
    from torch.utils import cpp_extension

    _ensure_cuda_home()
    root = find_cuda_home()
    nvcc = os.path.join(root, "bin", "nvcc") if root else shutil.which("nvcc")
    if nvcc is None:
        raise FileNotFoundError("nvcc not found")
    src = source_dir()
    includes = list(cpp_extension.include_paths("cuda"))
    py_include = sysconfig.get_path("include", scheme="posix_prefix")
    if py_include:
        includes.append(py_include)
    cmd = [nvcc, "-c", str(src / "nla_loss_cuda.cu"), "-o", str(output), f"-I{src}"]
    for inc in includes:
        cmd += ["-isystem", inc]
    cmd += list(cpp_extension.COMMON_NVCC_FLAGS)
    cmd += [
        "-DTORCH_EXTENSION_NAME=nla_fast_nvcc_check",
        "-DTORCH_API_INCLUDE_EXTENSION_H",
        "-gencode",
        f"arch=compute_{arch},code=sm_{arch}",
        "--compiler-options",
        "-fPIC",
        _cxx_std_flag(),
        *_EXTRA_CUDA_CFLAGS,
    ]
    return cmd


def cxx_compile_command(output: str | os.PathLike, with_cuda: bool = True, syntax_only: bool = True) -> list[str]:
    """A host-compiler command for nla_loss.cpp (with its CUDA glue when ``with_cuda``).

    Used by the tests to check the CUDA-only parts of nla_loss.cpp on machines without a GPU.
    """
    from torch.utils import cpp_extension

    if with_cuda:
        _ensure_cuda_home()
    src = source_dir()
    includes = list(cpp_extension.include_paths("cuda" if with_cuda else "cpu"))
    py_include = sysconfig.get_path("include", scheme="posix_prefix")
    if py_include:
        includes.append(py_include)
    cxx = os.environ.get("CXX", "c++")
    cmd = [cxx, "-c", str(src / "nla_loss.cpp"), "-o", str(output), f"-I{src}"]
    for inc in includes:
        cmd += ["-isystem", inc]
    cmd += ["-DTORCH_EXTENSION_NAME=nla_fast_cxx_check", "-DTORCH_API_INCLUDE_EXTENSION_H", "-fPIC", _cxx_std_flag(),
            *_EXTRA_CFLAGS]
    if with_cuda:
        cmd.append("-DNLA_WITH_CUDA")
    if syntax_only:
        cmd.append("-fsyntax-only")
    return cmd


# ----------------------------------------------------------------------------- building / loading
def _library_name(src: Path, with_cuda: bool) -> str:
    digest = hashlib.sha256()
    for name in _SOURCE_FILES:
        if name.endswith(".cu") and not with_cuda:
            continue
        digest.update(name.encode())
        digest.update((src / name).read_bytes())
    arch: tuple = ()
    if with_cuda:  # the device code targets the visible GPUs (or TORCH_CUDA_ARCH_LIST)
        arch = (os.environ.get("TORCH_CUDA_ARCH_LIST"),
                tuple(torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count())))
    digest.update(repr((with_cuda, arch, _EXTRA_CFLAGS, _EXTRA_LDFLAGS, _EXTRA_CUDA_CFLAGS, torch.__version__,
                        torch.version.cuda, sys.version_info[:2])).encode())
    return f"nla_fast_{'cuda' if with_cuda else 'cpu'}_{digest.hexdigest()[:16]}"


def _build_and_load(with_cuda: bool) -> str:
    from torch.utils import cpp_extension

    src = source_dir()
    sources = [str(src / "nla_loss.cpp")]
    if with_cuda:
        _ensure_cuda_home()
        sources.append(str(src / "nla_loss_cuda.cu"))
    name = _library_name(src, with_cuda)
    cpp_extension.load(
        name=name,
        sources=sources,
        extra_cflags=_EXTRA_CFLAGS + (["-DNLA_WITH_CUDA"] if with_cuda else []),
        extra_cuda_cflags=_EXTRA_CUDA_CFLAGS if with_cuda else None,
        extra_ldflags=_EXTRA_LDFLAGS,
        extra_include_paths=[str(src)],
        with_cuda=with_cuda,
        is_python_module=False,
        verbose=os.environ.get("NLA_FAST_VERBOSE_BUILD") == "1",
    )
    return name


def op_exists() -> bool:
    try:
        torch.ops.nla_fast.nla_loss_fwd  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _has_cuda_kernels() -> bool:
    return op_exists() and torch._C._dispatch_has_kernel_for_dispatch_key("nla_fast::nla_loss_fwd", "CUDA")


def load() -> dict:
    """Build (first time) and load the library once per process; returns what happened.

    With a usable GPU both the CPU and CUDA kernels are built; if that build fails the CPU-only
    library is built instead, so CPU tensors still get the extension. Errors are recorded, never
    raised.
    """
    with _lock:
        if _load_state.get("done"):
            return _load_state
        errors: dict[str, str] = {}
        library = None
        if os.environ.get("NLA_FAST_NO_EXTENSION") == "1":
            errors["cpu"] = errors["cuda"] = "disabled by NLA_FAST_NO_EXTENSION=1"
        elif op_exists():
            library = "already loaded"
        else:
            variants = [False]
            if torch.cuda.is_available() and torch.version.cuda is not None:
                variants.insert(0, True)
            for with_cuda in variants:
                try:
                    library = _build_and_load(with_cuda)
                    break
                except Exception as err:  # noqa: BLE001 - any build/load failure becomes a reason
                    errors["cuda" if with_cuda else "cpu"] = short_error(err, limit=2000, tail=1400, keep_lines=True)
                    if op_exists():  # partially loaded: do not load a second library
                        break
        _load_state.update(done=True, errors=errors, library=library)
        return _load_state


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the library can run on tensors of ``device``, else why not. The first call in a
    process loads the library, building it if it is not cached."""
    device_type = torch.device(device).type
    if device_type not in ("cpu", "cuda"):
        return f"the extension has CPU and CUDA kernels only (got {device_type} tensors)"
    if device_type == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA support (ROCm/CPU-only builds are not supported)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    errors: dict = load()["errors"]  # type: ignore[assignment]
    if not op_exists():
        message = errors.get("cuda" if device_type == "cuda" else "cpu") or errors.get("cpu") or "unknown error"
        return f"building the C++ extension failed: {message}"
    if device_type == "cuda" and not _has_cuda_kernels():
        message = errors.get("cuda", "the library was built without CUDA kernels")
        return f"building the CUDA kernels failed: {message}"
    return None
