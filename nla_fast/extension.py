"""The native (C++/CUDA) NLA loss: build on first use, op registrations and Python wrappers.

The operators are declared once in ``csrc/nla_loss.cpp`` (``TORCH_LIBRARY(nla_fast, m)``):

- ``nla_fast::nla_loss_fwd(logits, logits_flip, target, eps_tensor?, eps_value, constants,
  jsd, reg_mean, need_grad, need_weights) -> (loss, grad_logits, grad_logits_flip, weights)``:
  the loss, both gradients (when ``need_grad``) and the NAW weights (when ``need_weights``) in
  one sweep; ``reg_mean``: the consistency term is a batch mean (else a sum); any C >= 2;
  targets int64 or int32;
- ``nla_fast::nla_scale_grads(grad_output, grad_logits, grad_logits_flip) -> (Tensor, Tensor)``:
  the traced backward, the saved gradients times ``grad_output`` (read from memory, no host check);
- ``nla_fast::nla_scale_grads_(grad_output, grad_logits!, grad_logits_flip!)``: the eager
  backward, in place, moving no data when ``grad_output`` is 1 (checked on the device);
- ``nla_fast::naw_weight(logits, target, eps_tensor?, eps_value, constants) -> weights``.

CPU kernels are always built; the CUDA kernels (``csrc/nla_loss_cuda.cu``, plain launchers, and
their ATen glue in ``nla_loss.cpp`` behind ``-DNLA_WITH_CUDA``) are built too when
``torch.cuda.is_available()``, for the visible GPUs' architecture (or ``TORCH_CUDA_ARCH_LIST``).
If that build fails, the CPU-only library is built so CPU tensors keep the extension. The library is compiled with ``torch.utils.cpp_extension.load``
(ninja) into the default torch extensions directory under a name hashed from the sources, the
flags and the torch version, so an edit rebuilds and a rebuild is cached. Fake (meta) kernels
and the autograd formula are registered here, from Python, so ``torch.compile`` can trace the ops;
eager calls use a lean ``torch.autograd.Function`` over the same op.

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

from .config import NLAConstants
from .loss_inputs import BackendUnavailable, split_eps

__all__ = [
    "unavailable_reason",
    "nla_loss_extension",
    "naw_weight_extension",
    "load",
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
_MISSING = object()
_reasons: dict[str, str | None] = {}  # device type -> cached unavailable_reason
_load_state: dict[str, object] = {}  # "done": bool, "errors": {variant: message}, "library": path


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


def _short_error(err: BaseException, limit: int = 2000) -> str:
    text = f"{type(err).__name__}: {err}".strip()
    if len(text) > limit:
        text = text[:600] + "\n...\n" + text[-(limit - 600):]
    return text


def _op_exists() -> bool:
    try:
        torch.ops.nla_fast.nla_loss_fwd  # noqa: B018
    except (AttributeError, RuntimeError):
        return False
    return True


def _has_cuda_kernels() -> bool:
    return _op_exists() and torch._C._dispatch_has_kernel_for_dispatch_key("nla_fast::nla_loss_fwd", "CUDA")


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
        elif _op_exists():
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
                    errors["cuda" if with_cuda else "cpu"] = _short_error(err)
                    if _op_exists():  # partially loaded: do not load a second library
                        break
        if _op_exists():
            try:
                _register_python_side()
            except Exception as err:  # noqa: BLE001
                errors["python"] = _short_error(err)
        _load_state.update(done=True, errors=errors, library=library)
        return _load_state


def unavailable_reason(device: torch.device | str) -> str | None:
    """None if the extension can run on tensors of ``device``, else why not (cached per device type).

    The first call in a process loads the library, building it if it is not cached (about 20 s
    CPU-only on 2 cores; about a minute more with the CUDA kernels); later calls are a dictionary
    lookup, so it is cheap inside ``torch.compile``d code.
    """
    device_type = torch.device(device).type
    cached = _reasons.get(device_type, _MISSING)
    if cached is not _MISSING:
        return cached
    reason = _compute_reason(device_type)
    _reasons[device_type] = reason
    return reason


def _compute_reason(device_type: str) -> str | None:
    if device_type not in ("cpu", "cuda"):
        return f"the extension has CPU and CUDA kernels only (got {device_type} tensors)"
    if device_type == "cuda":
        if torch.version.cuda is None:
            return "this torch build has no CUDA support (ROCm/CPU-only builds are not supported)"
        if not torch.cuda.is_available():
            return "no CUDA device is available"
    state = load()
    errors: dict = state["errors"]  # type: ignore[assignment]
    if "python" in errors:
        return f"registering the fake/autograd kernels failed: {errors['python']}"
    if not _op_exists():
        message = errors.get("cuda" if device_type == "cuda" else "cpu") or errors.get("cpu") or "unknown error"
        return f"building the C++ extension failed: {message}"
    if device_type == "cuda" and not _has_cuda_kernels():
        message = errors.get("cuda", "the library was built without CUDA kernels")
        return f"building the CUDA kernels failed: {message}"
    return None


def _require(device: torch.device) -> None:
    reason = _reasons.get(device.type, _MISSING)
    if reason is _MISSING:
        reason = unavailable_reason(device)
    if reason is not None:
        raise BackendUnavailable(f"backend 'extension' is unavailable: {reason}")


# ----------------------------------------------------------------------------- Python-side registrations
_registered = False


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _register_python_side() -> None:
    """Fake (meta) kernels for torch.compile and the autograd formula of nla_loss_fwd.

    The registered autograd formula is what torch.compile and export trace; eager calls take
    ``_NLALossFunction`` instead (no dispatcher round trips through Python, no zero-filled
    gradients for the op's non-differentiable outputs, and an in-place backward).
    """
    global _registered
    if _registered:
        return

    @torch.library.register_fake("nla_fast::nla_loss_fwd")
    def _nla_loss_fwd_fake(logits, logits_flip, target, eps_tensor, eps_value, constants, jsd, reg_mean,
                           need_grad, need_weights):
        torch._check(logits.dim() == 2, lambda: f"logits must be (B, C), got {tuple(logits.shape)}")
        torch._check(logits_flip.shape == logits.shape, lambda: "logits_flip must match logits")
        batch, classes = logits.shape
        acc = _acc_dtype(logits.dtype)
        loss = logits.new_empty((), dtype=acc)
        if need_grad:
            grad = logits.new_empty((batch, classes))
            grad_flip = logits_flip.new_empty((batch, classes))
        else:
            grad = logits.new_empty((0,))
            grad_flip = logits_flip.new_empty((0,))
        weights = logits.new_empty((batch if need_weights else 0,), dtype=acc)
        return loss, grad, grad_flip, weights

    @torch.library.register_fake("nla_fast::nla_scale_grads")
    def _nla_scale_grads_fake(grad_output, grad_logits, grad_logits_flip):
        return grad_logits.new_empty(grad_logits.shape), grad_logits_flip.new_empty(grad_logits_flip.shape)

    @torch.library.register_fake("nla_fast::nla_scale_grads_")
    def _nla_scale_grads_inplace_fake(grad_output, grad_logits, grad_logits_flip):
        return None

    @torch.library.register_fake("nla_fast::naw_weight")
    def _naw_weight_fake(logits, target, eps_tensor, eps_value, constants):
        torch._check(logits.dim() == 2, lambda: f"logits must be (B, C), got {tuple(logits.shape)}")
        return logits.new_empty((logits.shape[0],), dtype=_acc_dtype(logits.dtype))

    def _setup_context(ctx, inputs, output):
        _loss, grad, grad_flip, weights = output
        ctx.need_grad = bool(inputs[8])
        ctx.mark_non_differentiable(grad, grad_flip, weights)
        ctx.save_for_backward(grad, grad_flip)

    def _backward(ctx, grad_loss, _grad_grad, _grad_grad_flip, _grad_weights):
        if not ctx.need_grad:
            raise RuntimeError(
                "nla_fast::nla_loss_fwd was called with need_grad=False, so it saved no gradient; "
                "call it with need_grad=True to differentiate it"
            )
        grad, grad_flip = ctx.saved_tensors
        scaled, scaled_flip = torch.ops.nla_fast.nla_scale_grads(grad_loss, grad, grad_flip)
        needs = ctx.needs_input_grad
        return (
            scaled if needs[0] else None,
            scaled_flip if needs[1] else None,
            None, None, None, None, None, None, None, None,
        )

    torch.library.register_autograd("nla_fast::nla_loss_fwd", _backward, setup_context=_setup_context)
    _ops.update(
        fwd=torch.ops.nla_fast.nla_loss_fwd.default,
        scale=torch.ops.nla_fast.nla_scale_grads.default,
        scale_inplace=torch.ops.nla_fast.nla_scale_grads_.default,
        weights=torch.ops.nla_fast.naw_weight.default,
    )
    _registered = True


# ----------------------------------------------------------------------------- the eager autograd path
_ops: dict[str, object] = {}  # resolved OpOverloads (no overload lookup per call)
_constants_lists: dict[NLAConstants, list[float]] = {}


def _constants_list(constants: NLAConstants) -> list[float]:
    """``constants.as_list()``, built once per NLAConstants."""
    values = _constants_lists.get(constants)
    if values is None:
        values = _constants_lists[constants] = constants.as_list()
    return values


# Eager calls skip the op's Autograd kernel (a Python autograd.Function generated by
# register_autograd): _NLALossFunction already records the graph.
_below_autograd = torch._C._AutoDispatchBelowAutograd
# The in-place backward also skips ADInplaceOrView: it rescales buffers this Function owns, and a
# version bump would make a retain_graph backward refuse to read them.
_below_inplace_or_view = torch._C._AutoDispatchBelowADInplaceOrView


class _NLALossFunction(torch.autograd.Function):
    """Eager autograd for nla_loss_fwd: one forward launch that also writes both gradients;
    backward scales them in place by grad_output (read on the device; nothing at all when it is
    1) and returns them."""

    @staticmethod
    def forward(ctx, logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, return_weights):
        with _below_autograd():
            loss, grad, grad_flip, weights = _ops["fwd"](
                logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean, True, return_weights)
        ctx.save_for_backward(grad, grad_flip)
        ctx.applied_scale = None  # the grad_output already multiplied into the saved gradients
        ctx.set_materialize_grads(False)
        if not return_weights:
            return loss
        ctx.mark_non_differentiable(weights)
        return loss, weights

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        needs = ctx.needs_input_grad
        if grad_loss is None:
            return (None,) * 9
        grad, grad_flip = ctx.saved_tensors
        if ctx.applied_scale is None:
            # first backward: the saved buffers (each forward allocates its own) become the
            # gradients, scaled in place by a kernel that returns at once when grad_output == 1
            with _below_inplace_or_view():
                _ops["scale_inplace"](grad_loss, grad, grad_flip)
            ctx.applied_scale = grad_loss
        else:
            # a further backward (retain_graph=True): undo the first scale, into new tensors (NaN
            # if that scale was exactly 0, whose information is gone)
            with _below_autograd():
                grad, grad_flip = _ops["scale"](grad_loss / ctx.applied_scale, grad, grad_flip)
        return (grad if needs[0] else None, grad_flip if needs[1] else None, None, None, None, None, None, None,
                None)


# ----------------------------------------------------------------------------- wrappers used by nla_fast.loss
def nla_loss_extension(logits: torch.Tensor, logits_flip: torch.Tensor, target: torch.Tensor, eps,
                       constants: NLAConstants, return_weights: bool):
    """(loss, weights or None) from ``torch.ops.nla_fast.nla_loss_fwd``, differentiable in both logits.

    The loss is 0-d float32 (float64 for float64 logits); the weights are (B,) float32, detached.
    Targets must be int64 or int32 (``nla_fast.nla_loss`` widens other integer dtypes).
    """
    _require(logits.device)
    if logits_flip.dtype != logits.dtype:
        common = torch.promote_types(logits.dtype, logits_flip.dtype)
        logits, logits_flip = logits.to(common), logits_flip.to(common)
    eps_tensor, eps_value = split_eps(eps, logits.device)
    consts = _constants_list(constants)
    need_grad = torch.is_grad_enabled() and (logits.requires_grad or logits_flip.requires_grad)
    if torch.compiler.is_compiling():
        # traced: the registered op, its fake kernel and its register_autograd formula
        loss, _grad, _grad_flip, weights = torch.ops.nla_fast.nla_loss_fwd(
            logits, logits_flip, target, eps_tensor, eps_value, consts, constants.jsd, constants.reg_mean,
            need_grad, return_weights)
    elif need_grad:
        out = _NLALossFunction.apply(logits, logits_flip, target, eps_tensor, eps_value, consts, constants.jsd,
                                     constants.reg_mean, return_weights)
        if not return_weights:
            return out, None
        loss, weights = out
    else:
        with _below_autograd():
            loss, _grad, _grad_flip, weights = _ops["fwd"](
                logits, logits_flip, target, eps_tensor, eps_value, consts, constants.jsd, constants.reg_mean,
                False, return_weights)
    if return_weights:
        return loss, weights.detach().float()
    return loss, None


def naw_weight_extension(logits: torch.Tensor, target: torch.Tensor, eps, constants: NLAConstants) -> torch.Tensor:
    """(B,) float32 NAW weights from ``torch.ops.nla_fast.naw_weight`` (no gradient)."""
    _require(logits.device)
    eps_tensor, eps_value = split_eps(eps, logits.device)
    with torch.no_grad():
        weights = torch.ops.nla_fast.naw_weight(logits.detach(), target, eps_tensor, eps_value,
                                                _constants_list(constants))
    return weights.float()
