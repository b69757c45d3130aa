"""Plans and launches of the Triton NLA kernels (``nla_loss.py``; rows of more than 32 classes:
``nla_loss_wide.py``): configurations, tuning, grids.

- Small batches (B * BLOCK_C <= 4096, e.g. B <= 512 for C <= 8: the trainer's 32) are ONE
  program with a fixed configuration, so the loss bits are the same in every process and the
  launch is graph-capturable.
- Larger batches run a persistent grid: as many programs as fit on the device at once (the
  kernel's real occupancy, from its compiled register and shared-memory use), each looping over
  full tiles (the program next in turn takes the partial last tile), each writing one partial
  sum, which a one-program launch adds in program order: the loss bits are fixed per (device,
  shape, configuration); no float atomics.
- Tuning: on a GPU, in eager use, the large-batch configuration is chosen once per (device, C,
  dtypes, batch bucket, requested outputs) among candidates that do not spill registers, the
  heuristic one included, and remembered. Under CUDA-graph capture or torch.compile tracing
  nothing is benchmarked: a remembered configuration or the heuristic one is used, and a
  heuristic plan made there is not remembered, so a later eager call still tunes.
- Lean launches: the eager path keeps the compiled kernel of each plan and calls its launcher
  directly, skipping ``JITFunction.run``'s per-call argument binding and cache lookup (tens of
  microseconds of host time per launch). Unusual calls (misaligned or strided tensors, launch
  hooks set by a profiler) take the ordinary path.
"""
from __future__ import annotations

import os
from typing import NamedTuple, Optional

import torch
import triton

from .nla_loss import _nla_fwd_kernel, _scale_grads_kernel, _sum_partials_kernel
from .nla_loss_wide import _nla_wide_kernel

try:  # Triton >= 3.3: launch hooks live on knobs
    from triton import knobs as _knobs
except ImportError:  # pragma: no cover - older Triton: no lean launches
    _knobs = None

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
SINGLE_PROGRAM_ELEMENTS = 4096  # B * BLOCK_C up to this: one program, one launch, fixed config
_TILE_ELEMENTS = 4096  # heuristic large-batch tile: BLOCK_B * BLOCK_C (512 rows for C <= 8)
_ELEMENTS_PER_THREAD = 8  # heuristic warps: a row of 8 in one thread (C <= 8)
_ASSUMED_WARPS_PER_SM = 16  # persistent grid while tracing, before any compiled kernel was seen
_INTERPRETER_PROGRAMS = 4  # enough programs to exercise the tile loop on the CPU interpreter
_SCALE_BLOCK = 4096  # elements per program and loop step of the gradient-scaling kernel
_SCALE_PROGRAMS_PER_SM = 4  # its persistent grid (it returns at once when grad_output == 1)
_SUM_BLOCK = 1024  # partial sums added per loop step of the final reduction


class Config(NamedTuple):
    """A launch configuration of the forward kernel (``maxnreg``: a register cap, None for none;
    ``block_c``: the wide kernel's column chunk where it differs from ``block_c()``'s)."""

    block_b: int
    num_warps: int
    num_stages: int = 1
    maxnreg: Optional[int] = None
    block_c: Optional[int] = None

    @property
    def label(self) -> str:
        return (f"bb{self.block_b}_w{self.num_warps}" + (f"_r{self.maxnreg}" if self.maxnreg else "")
                + (f"_c{self.block_c}" if self.block_c else ""))


def next_pow2(n: int) -> int:
    return 1 << (n - 1).bit_length()  # plain Python: triton.next_power_of_2 is slower per call


def cdiv(a, b):
    return (a + b - 1) // b


def block_c(num_classes: int, element_size: int = 4, flat_rows: bool = True) -> int:
    """BLOCK_C: the padded row of the short-row kernel; the wide kernel's column chunk of one
    warp, 32 lanes x one vector (``wide_vector``; 64 columns, two a lane, where that is a single
    column; a config's ``block_c`` may spread a row over more warps)."""
    if num_classes <= NARROW_MAX_C:
        return max(2, next_pow2(num_classes))
    vector = wide_vector(num_classes, element_size, flat_rows)
    return min(32 * vector, next_pow2(num_classes)) if vector > 1 else _WIDE_SCALAR_CHUNK


def _warps_for(block_b: int, block_cols: int) -> int:
    return max(1, min(16, (block_b * block_cols) // (32 * _ELEMENTS_PER_THREAD)))


def is_single_program(batch, block_cols: int) -> bool:
    return isinstance(batch, int) and batch * block_cols <= SINGLE_PROGRAM_ELEMENTS


def is_untuned(batch, block_cols: int) -> bool:
    """Small batches run a fixed configuration, the same in every process (never tuned)."""
    if is_wide(block_cols):
        return isinstance(batch, int) and batch <= WIDE_UNTUNED_ROWS
    return is_single_program(batch, block_cols)


# Large batches of short rows (C <= 8): one row per thread, under a 64-register cap (32 warps
# resident per SM) without spills (sm_90 / sm_80 machine code from Triton 3.6 and 3.8,
# bench/kernel_model.py). 2-byte logits: 1024-thread programs. float32: 256-thread programs
# (1024 threads spill 16 bytes on sm_80). That holds for the official loss on contiguous rows
# without the weights' output; under the cap the other kinds of call (JSD, strided rows, the
# weights) spilled 2-29 instructions in some combinations, so they run uncapped (ptxas picks
# their registers: 16-32 warps; tests/test_kernel_model.py checks every combination on sm_90).
_ROWS_CONFIGS = {2: Config(1024, 32, 1, 64), 4: Config(256, 8, 1, 64)}
_ROWS_CONFIGS_UNCAPPED = {2: Config(512, 16), 4: Config(128, 4)}


def capped(flags: dict) -> bool:
    """Whether a call's short-row kernel fits the 64-register configs without spilling."""
    return not flags["JSD"] and flags["FLAT_ROWS"] and not flags["WRITE_W"]


def fixed_config(batch, block_cols: int, element_size: int = 2, num_classes: Optional[int] = None,
                 flat_rows: bool = True, cap: bool = True) -> Config:
    """The configuration used without tuning, the same in every process: one program holding
    the whole batch for small batches, else the large-batch heuristic (wide rows: for this
    batch, ``wide_configs``; short rows: a 64-register one where ``cap``, see ``capped``)."""
    if is_wide(block_cols):
        return wide_configs(batch, num_classes or block_cols, element_size, flat_rows)[0]
    if is_single_program(batch, block_cols):
        block_b = next_pow2(batch)
        return Config(block_b, _warps_for(block_b, block_cols))
    if block_cols <= 8:
        return (_ROWS_CONFIGS if cap else _ROWS_CONFIGS_UNCAPPED)[2 if element_size <= 2 else 4]
    block_b = max(1, _TILE_ELEMENTS // block_cols)
    return Config(block_b, _warps_for(block_b, block_cols))


def tuning_candidates(block_cols: int, element_size: int = 2, num_classes: Optional[int] = None,
                      flat_rows: bool = True, cap: bool = True, batch=None) -> list[Config]:
    """Large-batch candidates, the heuristic one (for ``batch``) first. Candidates that spill
    registers are dropped when compiled (``time_candidate``)."""
    if is_wide(block_cols):
        return wide_configs(batch, num_classes or block_cols, element_size, flat_rows)
    configs = [fixed_config(None, block_cols, element_size, num_classes, flat_rows, cap)]
    if block_cols <= 8 and element_size <= 2:
        extra = [Config(1024, 32, 1, 64), Config(512, 16, 1, 64), Config(256, 8, 1, 64), Config(128, 4, 1, 64),
                 Config(512, 16)]
    elif block_cols <= 8:  # float32: see _ROWS_CONFIGS
        extra = [Config(512, 16, 1, 64), Config(128, 4, 1, 64)]
    else:
        extra = [Config(max(1, tile // block_cols), warps)
                 for tile, warps in ((2048, 4), (4096, 4), (4096, 8), (8192, 8), (8192, 16), (16384, 16))]
    return configs + [c for c in extra if c not in configs]


# ----------------------------------------------------------------------------- wide rows
# C above NARROW_MAX_C runs _nla_wide_kernel (nla_loss_wide.py): rows in column chunks, each
# lane of a chunk one vector load (16 bytes where rows are aligned), lanes keeping their own
# running sums; up to it, _nla_fwd_kernel keeps whole rows in one thread. At C = 33 (odd: one
# column a lane, the wide kernel's worst case) the static model (bench/kernel_model.py, sm_90,
# B = 2^16) predicts both alike, above it the wide kernel 1.2-1.9x faster (bench/NOTES.md).
NARROW_MAX_C = 32
WIDE_UNTUNED_ROWS = 256  # wide rows, B up to this: a fixed configuration, one row per program
_WIDE_SCALAR_CHUNK = 64  # the chunk where a lane's vector is one column (odd C, strided rows): two a lane
# A sweep walks a row's chunks one after another, so where the batch leaves warps idle (fewer rows
# than about _WIDE_WARPS_TARGET, 32 resident warps x 132 SMs) a row spans several warps (a
# chunk per warp, their lanes' sums meeting once per row): _WIDE_ROW_WARPS. (Rows over 2 warps
# are left out: at float32, C = 1000, ptxas unrolls their chunk loops and spills under the cap.)
_WIDE_WARPS_TARGET = 4096
_WIDE_ROW_WARPS = (4, 8)
# A cap of 64 registers keeps 32 warps resident per SM (sm_80, sm_90) without spills
# (bench/kernel_model.py). One-warp programs need no block barrier or shared memory at all (with
# more warps: one barrier for the program's loss sum, two per tile for the weights' store).
_WIDE_CAP = 64
# The interpreter runs a program's tiles one after another in Python: tiles of 16 rows keep the
# test suite's C = 1000 cases fast (layouts, registers and warps do not exist there).
_WIDE_INTERPRETER_ROWS = 16


def is_wide(block_cols: int) -> bool:
    """Whether BLOCK_C is a column chunk of the wide kernel (which always exceeds NARROW_MAX_C)."""
    return block_cols > NARROW_MAX_C


def forward_kernel(block_cols: int):
    """The forward kernel for rows of this BLOCK_C (both take the same arguments)."""
    return _nla_wide_kernel if is_wide(block_cols) else _nla_fwd_kernel


def wide_vector(num_classes: int, element_size: int, flat_rows: bool) -> int:
    """Columns per lane in a chunk of the wide kernel, one vector load: 16 bytes where contiguous
    rows are 16-byte aligned, else the widest power of two dividing C; 1 for strided rows (the
    kernel's VEC, by the same rule)."""
    return min(16 // element_size, num_classes & -num_classes) if flat_rows else 1


def _row_warps_options(num_classes: int, vector: int) -> list[int]:
    """The warps a row can span: _WIDE_ROW_WARPS where each warp's lanes get a vector."""
    if vector == 1:
        return []
    return [w for w in _WIDE_ROW_WARPS if w * 32 * vector <= next_pow2(num_classes)]


def wide_row_warps(batch, num_classes: int, vector: int) -> int:
    """Warps a row spans in the heuristic config: the most of ``_row_warps_options`` that the
    batch needs to fill the device's warps (1 at B >= 1024; 1 for an unknown batch)."""
    if not isinstance(batch, int):
        return 1
    fill = _WIDE_WARPS_TARGET // max(1, batch)
    return max([1] + [w for w in _row_warps_options(num_classes, vector) if w <= fill])


def wide_configs(batch, num_classes: int, element_size: int, flat_rows: bool = True) -> list[Config]:
    """The wide kernel's configurations, the heuristic for ``batch`` first; the tuner's
    candidates: programs of 1, 2 or 4 one-warp rows, and rows over 4 or 8 warps. A one-warp
    chunk of fewer than 32 lanes leaves a warp 32 / lanes rows: BLOCK_B covers every warp, which
    keeps the warps along the rows (row reductions within one warp)."""
    vector = wide_vector(num_classes, element_size, flat_rows)
    chunk = block_c(num_classes, element_size, flat_rows)
    rows_per_warp = 32 // min(32, chunk // vector)
    if INTERPRET:
        return [Config(rows_per_warp * _WIDE_INTERPRETER_ROWS, 1)]
    configs = [Config(rows_per_warp * warps, warps, 1, _WIDE_CAP) for warps in (1, 2, 4)]
    configs += [Config(1, warps, 1, _WIDE_CAP, 32 * vector * warps)
                for warps in _row_warps_options(num_classes, vector)]
    row_warps = wide_row_warps(batch, num_classes, vector)
    heuristic = configs[0] if row_warps == 1 else Config(1, row_warps, 1, _WIDE_CAP, 32 * vector * row_warps)
    return [heuristic] + [c for c in configs if c != heuristic]


def assumed_warps_per_sm(config: Config) -> int:
    """Resident warps per SM before a compiled kernel is seen: what a register cap allows
    (65,536 registers, at most 64 warps), else an assumed 16."""
    if config.maxnreg is None:
        return _ASSUMED_WARPS_PER_SM
    return min(64, 65536 // (32 * config.maxnreg)) // config.num_warps * config.num_warps


# ----------------------------------------------------------------------------- device facts
_sm_counts: dict = {}
_occupancy: dict = {}  # (device index, config, kernel key) -> resident programs per SM


def _sm_count(device: torch.device) -> int:
    count = _sm_counts.get(device.index)
    if count is None:
        count = _sm_counts[device.index] = torch.cuda.get_device_properties(device).multi_processor_count
    return count


def programs_per_sm(device: torch.device, num_warps: int, compiled=None) -> int:
    """Resident programs per SM: from the compiled kernel's registers and shared memory when
    known, else an assumed 16 resident warps."""
    if compiled is None or getattr(compiled, "n_regs", None) is None:
        return max(1, _ASSUMED_WARPS_PER_SM // num_warps)
    props = torch.cuda.get_device_properties(device)
    regs_per_sm = getattr(props, "regs_per_multiprocessor", 65536)
    warps_per_sm = getattr(props, "max_threads_per_multi_processor", 2048) // 32
    smem_per_sm = getattr(props, "shared_memory_per_multiprocessor", 232448)
    regs_per_warp = cdiv(max(1, compiled.n_regs) * 32, 256) * 256  # allocated per warp in 256s
    limits = [warps_per_sm // num_warps, regs_per_sm // (regs_per_warp * num_warps)]
    shared = getattr(compiled.metadata, "shared", 0)
    if shared:
        limits.append(smem_per_sm // (shared + 1024))  # 1 KB reserved per block on sm_80+
    return max(1, min(limits))


def persistent_grid(batch, block_b: int, per_sm: int, sm_count: int) -> int:
    """Programs of a forward launch on a GPU: one per tile, at most what is resident at once."""
    return min(cdiv(batch, block_b), per_sm * sm_count)


def grid_size(batch, device: torch.device, config: Config, per_sm: int) -> int:
    """Programs of the forward launch on ``device`` (the interpreter: a fixed few)."""
    if device.type != "cuda":
        return min(cdiv(batch, config.block_b), _INTERPRETER_PROGRAMS)
    return persistent_grid(batch, config.block_b, per_sm, _sm_count(device))


def may_tune(device: torch.device) -> bool:
    """Benchmarking launches and synchronises: never while tracing or capturing a CUDA graph."""
    return (device.type == "cuda" and not INTERPRET and not torch.compiler.is_compiling()
            and not torch.cuda.is_current_stream_capturing())


# ----------------------------------------------------------------------------- lean launches
class LeanLaunch:
    """A compiled kernel with a fixed grid, launched through its C launcher directly.

    Valid only for calls that Triton would specialise the same way as the call that compiled
    it: the same dtypes, integer arguments and 16-byte pointer alignment (the plan key and
    ``aligned`` see to that)."""

    __slots__ = ("grid", "run", "function", "packed", "tail")

    def __init__(self, compiled, grid: int, tail: tuple):
        self.grid = grid
        self.run = compiled.run  # the C launcher (loads the module on first use)
        self.function = compiled.function
        self.packed = compiled.packed_metadata
        self.tail = tail  # the constexpr arguments, which the launcher receives and skips

    def __call__(self, stream, *args) -> None:
        self.run(self.grid, 1, 1, stream, self.function, self.packed, None, None, None, *args, *self.tail)


def _unhooked(hook) -> bool:
    # Triton >= 3.4: an empty HookChain; earlier: None
    return hook is None or not getattr(hook, "calls", True)


def lean_allowed() -> bool:
    """No launch hooks to feed (a profiler's need JITFunction.run's launch metadata)."""
    return (_knobs is not None and _unhooked(_knobs.runtime.launch_enter_hook)
            and _unhooked(_knobs.runtime.launch_exit_hook))


def stream_of(device: torch.device) -> int:
    """The raw current stream a launcher takes (0 off CUDA: only a host-cost benchmark with a
    stubbed launcher gets here with CPU tensors)."""
    return torch._C._cuda_getCurrentRawStream(device.index) if device.type == "cuda" else 0


def aligned(*tensors) -> bool:
    """All data pointers 16-byte aligned (how Triton specialises pointer arguments)."""
    bits = 0
    for t in tensors:
        if t is not None:
            bits |= t.data_ptr()
    return bits & 15 == 0


def constexpr_tail(kernel, kwargs: dict) -> tuple:
    """The constexpr argument values in parameter order (they follow the runtime arguments)."""
    return tuple(kwargs[p.name] for p in kernel.params if p.is_constexpr)


def launch(kernel, grid: int, args: tuple, kwargs: dict, wrap=None):
    """Launch ``kernel`` on ``grid`` programs through Triton's ordinary path (``wrap``:
    wrap_triton while tracing); returns the compiled kernel of an eager launch."""
    if wrap is not None:
        wrap(kernel)[(grid,)](*args, **kwargs)
        return None
    return kernel[(grid,)](*args, **kwargs)


# ----------------------------------------------------------------------------- the forward
class Plan:
    """How one kind of call launches: the forward kernel and its keyword arguments (constexprs,
    BLOCK_B, warps, stages), its grid, and the remembered compiled kernels of both launches."""

    __slots__ = ("kernel", "config", "kwargs", "num_programs", "forward", "total")

    def __init__(self, kernel, config: Config, kwargs: dict, num_programs: int):
        self.kernel = kernel
        self.config = config
        self.kwargs = kwargs
        self.num_programs = num_programs
        self.forward = self.total = None  # LeanLaunch of the forward / of the partial-sum kernel


_tuned: dict = {}  # tuning key -> Config
_plans: dict = {}  # plan key -> Plan (eager calls only)


_kernel_constants: dict = {}  # NLAConfig.kernel_args constants -> the forward kernel's


def kernel_constants(consts) -> tuple:
    """The forward kernel's constants from the 12 of ``NLAConfig.kernel_args`` (computed once per
    config): the false-case Gaussian, which does not depend on eps, as norm * exp(alpha (d1^2 +
    d2^2) + beta d1 d2) with alpha = -a / (2 det), beta = b / det, so no register holds it."""
    consts = tuple(consts)  # (the traced operator receives a list)
    derived = _kernel_constants.get(consts)
    if derived is None:
        lam, mu_t1, mu_t2, diag_t, off_t, true_scale, mu_f1, mu_f2, diag_f, off_f, inv_det_f, norm_f = consts
        derived = (lam, mu_t1, mu_t2, diag_t, off_t, true_scale, mu_f1, mu_f2,
                   -0.5 * diag_f * inv_det_f, off_f * inv_det_f, norm_f)
        _kernel_constants[consts] = derived
    return derived


def _flags(logits, zf, eps_tensor, has_flip, jsd, reg_mean, grad_z, grad_zf, weights, loss, num_classes):
    flat_rows = logits.is_contiguous() and zf.is_contiguous()
    return dict(
        C=num_classes, EPS_FROM_PTR=eps_tensor is not None, HAS_FLIP=has_flip, JSD=jsd, REG_MEAN=reg_mean,
        WRITE_LOSS=loss, GRAD_Z=grad_z, GRAD_ZF=grad_zf, WRITE_W=weights, FLAT_ROWS=flat_rows,
        BLOCK_C=block_c(num_classes, max(logits.element_size(), zf.element_size()), flat_rows),
        FAST_MATH=not INTERPRET,
    )


def _config_kwargs(flags: dict, config: Config) -> dict:
    kwargs = {**flags, "BLOCK_B": config.block_b, "BLOCK_C": config.block_c or flags["BLOCK_C"],
              "num_warps": config.num_warps, "num_stages": config.num_stages}
    if config.maxnreg is not None and not INTERPRET:
        kwargs["maxnreg"] = config.maxnreg
    return kwargs


def time_candidate(config: Config, flags: dict, args_for, batch, device):
    """Milliseconds of the forward with ``config``, or None when it spills registers (such a
    kernel is never a candidate). Compiling launches one tile once."""
    from triton.testing import do_bench

    kwargs = _config_kwargs(flags, config)
    kernel = forward_kernel(flags["BLOCK_C"])
    compiled = kernel[(1,)](*args_for(1), **kwargs)
    if getattr(compiled, "n_spills", 0):
        return None
    grid = grid_size(batch, device, config, programs_per_sm(device, config.num_warps, compiled))
    args = args_for(grid)
    return do_bench(lambda: kernel[(grid,)](*args, **kwargs), warmup=5, rep=25)


def _tune(args_for, flags, batch, device, tuning_key, element_size) -> Config:
    """Time the candidates once (eager, on a GPU) and remember the fastest non-spilling one."""
    shape = (flags["C"], flags["FLAT_ROWS"], capped(flags))
    best, best_ms = fixed_config(batch, flags["BLOCK_C"], element_size, *shape), float("inf")
    for config in tuning_candidates(flags["BLOCK_C"], element_size, *shape, batch=batch):
        ms = time_candidate(config, flags, args_for, batch, device)
        if ms is not None and ms < best_ms:
            best, best_ms = config, ms
    _tuned[tuning_key] = best
    return best


def tunable_device(device: torch.device) -> bool:
    """Whether calls on ``device`` are ever tuned (a GPU, not the interpreter)."""
    return device.type == "cuda" and not INTERPRET


def _choose_plan(key, batch, device, flags, args_for, eager: bool) -> Plan:
    """The plan of a call not seen before: fixed, remembered-tuned, freshly tuned or heuristic."""
    cols = flags["BLOCK_C"]
    element_size = max(key[3].itemsize, key[4].itemsize)  # the logits' dtypes
    config = fixed_config(batch, cols, element_size, flags["C"], flags["FLAT_ROWS"], capped(flags))
    tunable = not is_untuned(batch, cols) and tunable_device(device)
    # every field of the plan key but the exact batch, which is bucketed by its bit length
    tuning_key = key[:1] + key[2:] + (int(batch).bit_length() if isinstance(batch, int) else None,)
    if tunable:
        remembered = _tuned.get(tuning_key)
        if remembered is not None:
            config = remembered
        elif eager and may_tune(device) and isinstance(batch, int):
            config = _tune(args_for, flags, batch, device, tuning_key, element_size)
    per_sm = _occupancy.get((device, config, key[3:])) or max(1, assumed_warps_per_sm(config) // config.num_warps)
    plan = Plan(forward_kernel(cols), config, _config_kwargs(flags, config),
                grid_size(batch, device, config, per_sm))
    # a heuristic plan made where nothing could be tuned (capture, tracing) is not remembered
    if eager and isinstance(batch, int) and (not tunable or tuning_key in _tuned):
        _plans[key] = plan
    return plan


def _remember_occupancy(plan: Plan, key, batch, device, compiled) -> None:
    """After the first eager launch: the grid the compiled kernel's occupancy allows."""
    if device.type != "cuda" or compiled is None or getattr(compiled, "n_regs", None) is None:
        return
    config = plan.config
    per_sm = programs_per_sm(device, config.num_warps, compiled)
    _occupancy[(device, config, key[3:])] = per_sm
    plan.num_programs = grid_size(batch, device, config, per_sm)


# Strided short rows are addressed by 32-bit offsets from each tile's 64-bit base; a view whose
# tile of up to _TILE_ROWS_MAX rows could span 2^31 elements is copied to contiguous first.
_TILE_ROWS_MAX = 4096


def _tile_addressable(t: torch.Tensor, num_classes: int) -> torch.Tensor:
    """``t``, or its contiguous copy where a short-row tile of it is not 32-bit addressable."""
    if t.is_contiguous() or num_classes > NARROW_MAX_C:  # (wide rows: 64-bit offsets)
        return t
    span = (_TILE_ROWS_MAX - 1) * abs(t.stride(0)) + (num_classes - 1) * abs(t.stride(1))
    return t if span < 2**31 else t.contiguous()


def forward(logits, logits_flip, target, eps_tensor, eps_value, consts, jsd, reg_mean,
            grad_z, grad_zf, weights, loss, wrap=None):
    """(loss, d/dlogits, d/dlogits_flip, weights), None for what was not asked for. Eager
    (``wrap`` None) or inside a traced ``triton_op`` (``wrap`` = wrap_triton or a no-launch)."""
    batch, num_classes = logits.shape
    num_classes = int(num_classes)  # C picks constexpr block sizes: specialise on it under compile
    device = logits.device
    zf = logits_flip if logits_flip is not None else logits
    layout = True  # contiguous rows; strided ones: their strides (below)
    if not (logits.is_contiguous() and zf.is_contiguous()):
        logits = _tile_addressable(logits, num_classes)
        zf = _tile_addressable(zf, num_classes) if logits_flip is not None else logits
        if not (logits.is_contiguous() and zf.is_contiguous()):
            # in the key: Triton specialises a compiled kernel on strides of 1 and multiples of
            # 16, and a remembered kernel is launched as compiled
            layout = (logits.stride(), zf.stride())
    eps_dtype = None if eps_tensor is None else eps_tensor.dtype
    key = (device, batch, num_classes, logits.dtype, zf.dtype, target.dtype, target.stride(0), eps_dtype,
           layout, logits_flip is not None, jsd, reg_mean, grad_z, grad_zf, weights, loss)
    eager = wrap is None
    plan = _plans.get(key) if eager else None
    gz = logits.new_empty((batch, num_classes)) if grad_z else None
    gzf = zf.new_empty((batch, num_classes)) if grad_zf else None
    w = logits.new_empty((batch,), dtype=torch.float32) if weights else None
    loss_out = logits.new_empty((), dtype=torch.float32) if loss else None
    partial = None

    def args_for(num_programs):
        nonlocal partial
        # one program writes the final loss directly: small batches are a single launch
        if loss:
            partial = loss_out if num_programs == 1 else logits.new_empty((num_programs,), dtype=torch.float32)
        return (logits, zf, target, logits if eps_tensor is None else eps_tensor,
                logits if partial is None else partial, logits if gz is None else gz,
                logits if gzf is None else gzf, logits if w is None else w,
                batch, *logits.stride(), *zf.stride(), target.stride(0), eps_value, *kernel_constants(consts))

    if plan is None:
        flags = _flags(logits, zf, eps_tensor, logits_flip is not None, jsd, reg_mean, grad_z, grad_zf,
                       weights, loss, num_classes)
        plan = _choose_plan(key, batch, device, flags, args_for, eager)
    args = args_for(plan.num_programs)
    if plan.forward is not None and aligned(logits, zf, target, eps_tensor) and lean_allowed():
        stream = stream_of(device)
        plan.forward(stream, *args)
        if partial is not loss_out:
            plan.total(stream, partial, loss_out, plan.num_programs)
        return loss_out, gz, gzf, w
    _launch_forward(plan, key, args, partial, loss_out, wrap, device, batch, logits, zf, target, eps_tensor)
    return loss_out, gz, gzf, w


def _launch_forward(plan, key, args, partial, loss_out, wrap, device, batch, *inputs) -> None:
    """The ordinary (JITFunction.run) launches of a plan; the first eager one remembers the
    compiled kernels for lean launches and the occupancy-sized grid."""
    first = wrap is None and plan.forward is None and key in _plans
    compiled = launch(plan.kernel, plan.num_programs, args, plan.kwargs, wrap)
    if partial is not None and partial is not loss_out:
        block = min(_SUM_BLOCK, next_pow2(plan.num_programs))
        sum_kwargs = dict(BLOCK=block, num_warps=max(1, min(8, block // 128)))
        total = launch(_sum_partials_kernel, 1, (partial, loss_out, plan.num_programs), sum_kwargs, wrap)
    else:
        total = sum_kwargs = None
    if not first or compiled is None or not aligned(*inputs) or getattr(compiled, "packed_metadata", None) is None:
        return
    grid = plan.num_programs
    _remember_occupancy(plan, key, batch, device, compiled)
    if plan.num_programs != grid:  # the real occupancy changed the grid: lean launches next time
        return
    meta = {k: v for k, v in plan.kwargs.items() if k not in ("num_warps", "num_stages", "maxnreg")}
    plan.forward = LeanLaunch(compiled, grid, constexpr_tail(plan.kernel, meta))
    if total is not None:
        plan.total = LeanLaunch(total, 1, constexpr_tail(_sum_partials_kernel, {"BLOCK": sum_kwargs["BLOCK"]}))


# ----------------------------------------------------------------------------- the backward
_scale_plans: dict = {}  # (device, numel, dtypes, has_z, has_zf, in place) -> (grid, kwargs, LeanLaunch|None)


def _scale_plan(device, numel, key):
    plan = _scale_plans.get(key) if isinstance(numel, int) else None
    if plan is None:
        block = min(_SCALE_BLOCK, next_pow2(numel))
        tiles = cdiv(numel, block)
        cap = _INTERPRETER_PROGRAMS if device.type != "cuda" else _SCALE_PROGRAMS_PER_SM * _sm_count(device)
        plan = [min(tiles, cap), dict(HAS_Z=key[3], HAS_ZF=key[4], IN_PLACE=key[5], BLOCK=block,
                                     num_warps=max(1, min(8, block // 512))), None]
        if isinstance(numel, int):
            _scale_plans[key] = plan
    return plan


def scale(grad_output, gz, gzf, in_place: bool, wrap=None):
    """grad_output * gz and grad_output * gzf (None stays None): into new tensors, or in place
    (``in_place``; the kernel then returns at once when grad_output == 1, moving no data).
    grad_output is read on the device: no host check, graph-capturable."""
    ref = gz if gz is not None else gzf
    if ref is None:
        return None, None
    oz = gz if in_place or gz is None else torch.empty_like(gz)
    ozf = gzf if in_place or gzf is None else torch.empty_like(gzf)
    numel = ref.numel()
    if numel == 0:
        return oz, ozf
    key = (ref.device, numel, ref.dtype, gz is not None, gzf is not None, in_place,
           None if gzf is None else gzf.dtype, grad_output.dtype)
    plan = _scale_plan(ref.device, numel, key)
    args = (grad_output, ref if gz is None else gz, ref if gzf is None else gzf,
            ref if oz is None else oz, ref if ozf is None else ozf, numel)
    lean = plan[2]
    if lean is not None and wrap is None and aligned(*args[:5]) and lean_allowed():
        lean(stream_of(ref.device), *args)
        return oz, ozf
    compiled = launch(_scale_grads_kernel, plan[0], args, plan[1], wrap)
    if (compiled is not None and isinstance(numel, int) and aligned(*args[:5])
            and getattr(compiled, "packed_metadata", None) is not None):
        meta = {k: v for k, v in plan[1].items() if k != "num_warps"}
        plan[2] = LeanLaunch(compiled, plan[0], constexpr_tail(_scale_grads_kernel, meta))
    return oz, ozf


# ----------------------------------------------------------------------------- described, not launched
_TRITON_TYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64",
                 torch.int64: "i64", torch.int32: "i32", torch.int16: "i16", torch.int8: "i8", torch.uint8: "u8"}


def _described(name, kernel, args, constexprs, options, grid, config, role):
    """One launch as ``triton.compiler.ASTSource`` takes it. ``args``: the positional arguments
    in order, a tensor given by its dtype (allocations are 16-byte aligned). Typed the way
    Triton's launcher specialises them: an int equal to 1 becomes a constexpr, other ints are
    i32 (i64 past 2^31) and, like pointers, marked divisible by 16 when they are; floats fp32."""
    signature, consts, attrs = {}, dict(constexprs), {}
    values = iter(args)
    for index, arg in enumerate(kernel.arg_names):
        if arg in constexprs:
            signature[arg] = "constexpr"
            continue
        value = next(values)
        if isinstance(value, torch.dtype):
            signature[arg] = "*" + _TRITON_TYPES[value]
            attrs[(index,)] = [["tt.divisibility", 16]]
        elif isinstance(value, int) and value == 1:
            signature[arg] = "constexpr"
            consts[arg] = 1
        elif isinstance(value, int):
            signature[arg] = "i32" if -2**31 <= value < 2**31 else "i64"
            if value % 16 == 0:
                attrs[(index,)] = [["tt.divisibility", 16]]
        else:
            signature[arg] = "fp32"
    return dict(name=name, kernel=kernel, args=tuple(args), signature=signature, constexprs=consts, attrs=attrs,
                num_warps=options["num_warps"], num_stages=options.get("num_stages"),
                maxnreg=options.get("maxnreg"), grid=grid, config=config, role=role, candidates=[])


def describe_launches(batch, num_classes, dtype, flip_dtype=None, grad_z=True, grad_zf=True, weights=False,
                      contiguous=True, *, sm_count=None, device=None, jsd=False, reg_mean=False, eps_dtype=None,
                      warps_per_sm=None, fast_math=None):
    """The kernel launches of one eager ``nla_loss(..., backend="triton")`` forward + backward
    on contiguous (or, ``contiguous=False``, transposed) (batch, num_classes) logits of ``dtype``
    (the flipped view's ``flip_dtype``, default the same) and int64 targets, in launch order,
    built from the planning functions the launches use; nothing is launched.

    One dict per launch: name, kernel (the JITFunction), args (positional, a tensor by its
    dtype), signature / constexprs / attrs (as ``ASTSource`` takes them), num_warps, num_stages,
    maxnreg (compile options; None: Triton's default), grid (programs), config (a label), role
    ("single program"; "fixed": a small batch of wide rows, a fixed untuned config of several
    programs; "heuristic", "autotune" or "backward"), phase ("forward" / "backward")
    and candidates. On the tuned large-batch path the launches are those of the heuristic config
    (what runs where nothing was tuned) and each config-dependent launch lists, as candidates,
    itself for every config the tuner may pick (the heuristic one included): a config's launches
    are, for each launch with candidates, its candidate of that config label and every launch
    without candidates. The backward's scale launch (phase "backward") moves data only when
    grad_output != 1. The grid is the one of a GPU with ``sm_count`` SMs and ``warps_per_sm``
    resident warps (default: the assumption made before a kernel is compiled), else of
    ``device`` (default: this process's). ``eps_dtype``: a tensor eps's dtype, None for a float.
    ``fast_math``: the kernels' MUFU path (default: as this process launches, i.e. not under the
    interpreter)."""
    flip_dtype = flip_dtype or dtype
    element_size = max(dtype.itemsize, flip_dtype.itemsize)
    cols = block_c(num_classes, element_size, contiguous)
    flags = dict(C=num_classes, EPS_FROM_PTR=eps_dtype is not None, HAS_FLIP=True, JSD=jsd, REG_MEAN=reg_mean,
                 WRITE_LOSS=True, GRAD_Z=grad_z, GRAD_ZF=grad_zf, WRITE_W=weights, FLAT_ROWS=contiguous,
                 BLOCK_C=cols, FAST_MATH=not INTERPRET if fast_math is None else fast_math)
    large = not is_untuned(batch, cols)
    small_role = "fixed" if is_wide(cols) else "single program"
    shape = (num_classes, contiguous, capped(flags))
    configs = [("heuristic" if large else small_role, fixed_config(batch, cols, element_size, *shape))]
    if large:
        configs += [("autotune", c) for c in tuning_candidates(cols, element_size, *shape, batch=batch)[1:]]
    strides = (num_classes, 1) if contiguous else (1, batch)  # else: a transposed (C, B) tensor
    args = (dtype, flip_dtype, torch.int64, eps_dtype or dtype, torch.float32,
            dtype, flip_dtype if grad_zf else dtype, torch.float32 if weights else dtype,
            batch, *strides, *strides, 1, 0.5, *[0.5] * 11)
    forwards, sums = [], {}
    for role, config in configs:
        forward, total = _described_forward(batch, config, role, flags, args, sm_count, device, warps_per_sm)
        forwards.append(forward)
        if total is not None:
            sums[config.label] = total
    candidates = forwards[1:] + forwards[:1] if large else []
    launches = [dict(forwards[0], candidates=candidates)]
    if forwards[0]["config"] in sums:
        launches.append(dict(sums[forwards[0]["config"]],
                             candidates=[sums[f["config"]] for f in candidates if f["config"] in sums]))
    for launch in launches:
        launch["phase"] = "forward"
    if grad_z or grad_zf:
        launches.append(dict(_described_scale(batch * num_classes, (dtype, flip_dtype), grad_z, grad_zf, sm_count),
                             phase="backward"))
    return launches


def _described_forward(batch, config, role, flags, args, sm_count, device, warps_per_sm):
    """(the forward launch of one config, its partial-sum launch or None)."""
    per_sm = max(1, (warps_per_sm or assumed_warps_per_sm(config)) // config.num_warps)
    grid = (persistent_grid(batch, config.block_b, per_sm, sm_count) if sm_count
            else grid_size(batch, torch.device(device or "cpu"), config, per_sm))
    options = {"num_warps": config.num_warps, "num_stages": config.num_stages,
               "maxnreg": None if flags["FAST_MATH"] is False else config.maxnreg}
    forward = _described("forward", forward_kernel(flags["BLOCK_C"]), args,
                         dict(flags, BLOCK_B=config.block_b, BLOCK_C=config.block_c or flags["BLOCK_C"]), options,
                         (grid,), config.label, role)
    forward["classes"] = flags["C"]
    if grid == 1:
        return forward, None
    block = min(_SUM_BLOCK, next_pow2(grid))
    total = _described("sum_partials", _sum_partials_kernel, (torch.float32, torch.float32, grid), dict(BLOCK=block),
                       {"num_warps": max(1, min(8, block // 128))}, (1,), config.label, role)
    return forward, total


def _described_scale(numel, dtypes, grad_z, grad_zf, sm_count):
    """The eager backward's in-place scaling launch (``scale`` with ``in_place``)."""
    block = min(_SCALE_BLOCK, next_pow2(numel))
    grid = min(cdiv(numel, block), _SCALE_PROGRAMS_PER_SM * (sm_count or 1) if sm_count else _INTERPRETER_PROGRAMS)
    z_or_ref = dtypes[0] if grad_z else dtypes[1]
    zf_or_ref = dtypes[1] if grad_zf else z_or_ref
    flags = dict(HAS_Z=grad_z, HAS_ZF=grad_zf, IN_PLACE=True, BLOCK=block)
    num_warps = max(1, min(8, block // 512))
    launch = _described("scale_grads", _scale_grads_kernel, (torch.float32, z_or_ref, zf_or_ref, z_or_ref, zf_or_ref,
                        numel), flags, {"num_warps": num_warps}, (grid,), f"block{block}_w{num_warps}", "backward")
    launch["moves_data"] = "only when grad_output != 1 (in place; the kernel returns at once at 1)"
    return launch
