"""Static performance model of the NLA loss kernels, from their sm_90 / sm_80 machine code.

No GPU needed: for each SPEC 4 shape, both backends and every launch a fwd + bwd call makes
(Triton: the single-program or heuristic config and every config the autotuner may pick, from
``describe_launches``; extension: what its own C++ launches, ``extension_launches``: the
instantiation and sizes ``cuda_launch_plan`` and the launchers of ``csrc/nla_loss_cuda.cu`` pick,
recorded by running the extension's host code against a stand-in CUDA runtime), the kernels are
compiled for sm_90 (H200) and sm_80 (A100), Triton's with ``triton.compile`` (cubins left in
the Triton cache, ``TRITON_CACHE_DIR``), the extension's ``csrc/nla_loss_cuda.cu`` with nvcc
and the real build's flags (ptxas's ``-v`` report kept beside the cubin). From each cubin
(``cubin_stats``): registers, spills, shared memory, resident warps per SM, SASS instructions of
the main loop per row, load and store widths, MUFU and fp64 counts. Then a prediction per launch:

    time = max(issue, memory, L1, launch floor)
    issue  = warp-instructions on the busiest SM / (4 per clock x clock) (or its MUFU ones at 16
             lanes a clock, if slower), stretched by WARPS_TO_HIDE_LATENCY / resident warps when
             fewer warps are resident
    memory = bytes moved / copy bandwidth (SPEC 4 bytes plus what else the kernel moves)
    L1     = L1 / shared-memory wavefronts on the busiest SM / clock, where they are known:
             ``shared_wavefronts.py`` replays the addresses of the short-row kernels' shared and
             global accesses (Triton C = 5-7 contiguous, the extension's C = 7 tile), whose
             shared-memory instructions the slow tests check against the main loop's SASS

and per call the sum over its launches, with the share of copy bandwidth (SPEC 4 bytes / time).
The instructions of a loop body are all counted, both arms of a branch (exact for the Triton
kernels' branch-free bodies, an upper bound for branching CUDA code; ``instructions_per_row_min``
counts the cheapest path through each body, a lower bound). Code a launch runs once outside its
main loop (a partial last tile) is counted along its costliest path (an upper bound). Not
modelled: overlap of memory and issue across launches, the L1 pipe of the kernels not replayed
(wide rows), the memory side of latency (bytes in flight per SM).
Every GPU figure it prints is a prediction (not measured on a GPU); the constants are below.

    python bench/kernel_model.py                      # table + kernel_model.json
    python bench/kernel_model.py --check              # exit 1 listing the static targets missed
    python bench/kernel_model.py --backend extension --instantiations   # + every extension kernel
    python bench/kernel_model.py --backend triton --arch 90 --shape 32x7:float32
"""
from __future__ import annotations

import argparse
import collections
import datetime
import hashlib
import json
import math
import os
import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

if __name__ == "__main__":
    os.environ.pop("TRITON_INTERPRET", None)  # the machine code is the point: never the interpreter

import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
import cubin_stats  # noqa: E402
import extension_launches  # noqa: E402
import result_files  # noqa: E402  (where every bench writes)
import shared_wavefronts  # noqa: E402
from loss_bench import versions  # noqa: E402

from nla_fast import atomic  # noqa: E402


# ----------------------------------------------------------------------------- the model's constants
@dataclass(frozen=True)
class Device:
    name: str
    arch: int
    sms: int
    clock_ghz: float
    copy_gb_per_s: float
    bandwidth_source: str


DEVICES = (
    Device("NVIDIA H200", 90, 132, 1.98, 4251.0,
           "measured: device-to-device copy in loss_bench, shared/measurements/2026-11-29-h200"),
    Device("NVIDIA A100-SXM4-80GB", 80, 108, 1.41, 2039.0, "vendor figure (HBM2e peak), not measured"),
)
# The issue rule: a launch's warp-instructions on its busiest SM (blocks there x instructions per
# block), at ISSUE_PER_CLOCK a clock, or its MUFU instructions at MUFU_LANES_PER_SM results a
# clock if that is slower, stretched by WARPS_TO_HIDE_LATENCY / resident warps when fewer warps
# than that are resident.
ISSUE_PER_CLOCK = 4  # warp-instructions an SM issues per clock (4 schedulers, one each)
# (The only kernels measured so far, main at 41e7a4b on the 2026-11-29 H200 with Triton 3.6, ran
# 1.4-1.5x slower than this rule predicts from their Triton 3.8 code at 40 resident warps
# (forward at (2^20, 7) bf16: 129 us measured, 86 predicted with gradients; 97 and 68 without):
# a sustained ~2.7 a clock; the one-warp-group B = 32 forward ran in 2.6 us, 3.2 predicted. Kept
# at the hardware's 4 until the current kernels are measured: issue 18, item 5.)
MUFU_LANES_PER_SM = 16  # special-function (MUFU) results per clock and SM, sm_80 and sm_90
# Resident warps per SM at which a scheduler always has a ready warp (8 per scheduler): with w
# fewer, issue time is stretched by WARPS_TO_HIDE_LATENCY / w. A first guess, to be corrected
# from a GPU run (issue 18 item 5).
WARPS_TO_HIDE_LATENCY = 32
# Per launch: the smallest kernels of the 2026-11-29 H200 profile take 0.8-1.1 us of GPU time,
# plus about 1 us between dependent launches.
LAUNCH_FLOOR_US = 2.0
SPEC_SHAPES = ((32, 7, "float32"), (2**20, 7, "bfloat16"), (2**20, 7, "float32"), (4096, 1000, "bfloat16"))
ELEMENT_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}
# The static targets: SPEC 4's predicted share of copy bandwidth at (2^20, 7) bf16 and issue 18's at
# the other two large shapes (for the configs that run untuned); at large batches (LARGE_BATCH rows
# or more), for every config: warp-instructions per row at C = 7, resident warps per SM, 16-byte
# global loads in the main loop; and no spills.
BANDWIDTH_TARGETS = {(2**20, 7, "bfloat16"): 70.0, (2**20, 7, "float32"): 50.0, (4096, 1000, "bfloat16"): 50.0}
TARGETS = dict(instructions_per_row=13.0, warps_per_sm=32, global_load_bytes=16)
LARGE_BATCH = 4096
UNTUNED_ROLES = ("heuristic", "cuda_launch_plan")  # what runs where nothing was tuned


def device_for(arch: int) -> Device:
    return next(d for d in DEVICES if d.arch == arch)


def cache_dir() -> Path:
    """Where the cubins go: the Triton cache (TRITON_CACHE_DIR or Triton's default)."""
    try:
        from triton import knobs

        base = knobs.cache.dir
    except (ImportError, AttributeError):
        base = os.environ.get("TRITON_CACHE_DIR") or str(Path.home() / ".triton" / "cache")
    return Path(base) / "nla_fast_kernel_model"


def spec_bytes(batch: int, classes: int, dtype: str) -> int:
    """SPEC 4's count: both logit tensors and the int64 targets read once, both gradients written once."""
    return 4 * batch * classes * ELEMENT_BYTES[dtype] + 8 * batch


# ----------------------------------------------------------------------------- prediction (any kernel)
def analyse(code: cubin_stats.KernelCode, threads: int, grid: int, shared_dynamic: int,
            warp_iterations: float, rows_per_warp_iteration: float | None, trips=lambda loop: 1.0,
            tail_warps: int = 0) -> dict:
    """Static facts of one launch: resources, occupancy and the instructions it issues.

    ``warp_iterations``: iterations of the kernel's main loop summed over all its warps;
    ``rows_per_warp_iteration``: rows one warp finishes per iteration (None: not a row loop);
    ``trips(loop)``: iterations of a loop nested in the main loop per main iteration;
    ``tail_warps``: warps that run a partial last tile, code outside the main loop: they are
    counted along the costliest path from entry to exit (every other warp along the cheapest),
    and when no warp runs the main loop, the rows' instructions are the tail's."""
    flow = code.flow
    main = flow.main_loop()
    occ = code.occupancy(threads, shared_dynamic)
    inside = set(main.instructions) if main else set()

    def outside_weight(test=lambda ins: True):
        return lambda ins: 0 if ins in inside else int(test(ins))

    # each warp once: the cheapest way from entry to exit, the main loop's body counted apart
    outside = flow.shortest_path(weight=outside_weight())
    tail = flow.longest_path(weight=outside_weight()) - outside if tail_warps else 0.0
    body = flow.loop_instructions(main, trips) if main else 0.0
    loop_mufu = flow.loop_instructions(main, trips, _is_mufu) if main else 0.0
    tail_mufu = flow.longest_path(weight=outside_weight(_is_mufu)) if tail_warps else 0.0
    facts = dict(code.summary(), threads=threads, grid=grid, shared_dynamic_bytes=shared_dynamic,
                 warps_per_sm=occ["warps_per_sm"], blocks_per_sm=occ["blocks_per_sm"],
                 occupancy_limiter=occ["limiter"], loop_instructions=body,
                 loop_instructions_min=flow.loop_instructions_min(main, trips) if main else 0.0,
                 warp_iterations=warp_iterations, rows_per_warp_iteration=rows_per_warp_iteration,
                 instructions_outside_loop=outside, tail_instructions=tail, tail_warps=tail_warps,
                 warp_instructions=grid * math.ceil(threads / 32) * outside + tail_warps * tail + warp_iterations * body,
                 warp_mufu=warp_iterations * loop_mufu + tail_warps * tail_mufu,
                 instructions_per_row=None, instructions_per_row_min=None, per_row={})
    loop_mix = cubin_stats.instruction_mix(main.instructions if main else [])
    facts["loop_load_opcodes"] = loop_mix["load_opcodes"]
    facts["loop_store_opcodes"] = loop_mix["store_opcodes"]
    facts["loop_max_load_bytes"] = loop_mix["max_global_load_bytes"]
    facts["loop_mufu_by_function"] = loop_mix["mufu_by_function"]
    facts["loop_shared_opcodes"] = dict(sorted(collections.Counter(
        ins.opcode for ins in (main.instructions if main else []) if ins.base in ("LDS", "STS")).items()))
    facts["kernel_fp64"] = cubin_stats.instruction_mix(code.instructions)["fp64"]
    if rows_per_warp_iteration and main and (warp_iterations or not tail_warps):
        facts["instructions_per_row"] = body / rows_per_warp_iteration
        facts["instructions_per_row_min"] = facts["loop_instructions_min"] / rows_per_warp_iteration
        facts["per_row"] = {name: flow.loop_instructions(main, trips, lambda ins, t=test: int(t(ins)))
                            / rows_per_warp_iteration for name, test in cubin_stats.CLASSES.items()}
    elif rows_per_warp_iteration and tail_warps:  # every row in the tail: its costliest path (an upper bound)
        facts["instructions_per_row"] = tail / rows_per_warp_iteration
        facts["per_row"] = {name: (flow.longest_path(weight=outside_weight(test))
                                   - flow.shortest_path(weight=outside_weight(test))) / rows_per_warp_iteration
                            for name, test in cubin_stats.CLASSES.items()}
    return facts


def _is_mufu(ins) -> int:
    return int(ins.base == "MUFU")


def predict(facts: dict, bytes_moved: float, device: Device, l1_wavefronts: float | None = None) -> dict:
    """max(issue, memory, launch) in microseconds for one launch on ``device``, and the L1 /
    shared-memory pipe (one wavefront a clock an SM) where ``l1_wavefronts``, the launch's
    total, is known (``shared_wavefronts.py`` replays the short-row kernels' addresses)."""
    warps = math.ceil(facts["threads"] / 32)
    grid, resident = facts["grid"], facts["blocks_per_sm"]
    if resident == 0:
        return dict(issue_us=math.inf, memory_us=math.inf, launch_us=LAUNCH_FLOOR_US, predicted_us=math.inf,
                    bound="cannot launch")
    blocks_on_busiest = math.ceil(grid / device.sms)
    active_warps = min(blocks_on_busiest, resident) * warps
    efficiency = min(1.0, active_warps / WARPS_TO_HIDE_LATENCY)
    clocks_per_block = max(facts["warp_instructions"] / ISSUE_PER_CLOCK,
                           facts.get("warp_mufu", 0.0) * 32 / MUFU_LANES_PER_SM) / grid
    issue = clocks_per_block * blocks_on_busiest / (efficiency * device.clock_ghz * 1e3)
    memory = bytes_moved / (device.copy_gb_per_s * 1e3)
    times = {"issue": issue, "memory": memory, "launch": LAUNCH_FLOOR_US}
    l1 = None
    if l1_wavefronts is not None:
        times["l1"] = l1 = l1_wavefronts * blocks_on_busiest / grid / (device.clock_ghz * 1e3)
    bound = max(times, key=times.get)
    return dict(issue_us=issue, memory_us=memory, l1_us=l1, launch_us=LAUNCH_FLOOR_US, predicted_us=times[bound],
                bound=bound)


# ----------------------------------------------------------------------------- Triton backend
def triton_configs(batch: int, classes: int, dtype: str, device: Device) -> dict[str, list[dict]]:
    """{config label: the launches of one fwd + bwd call with that config} (the first label is
    the config that runs where nothing was tuned), from ``describe_launches``."""
    from nla_fast.kernels.launch import describe_launches

    launches = describe_launches(batch, classes, getattr(torch, dtype), sm_count=device.sms, fast_math=True)
    labels = [launches[0]["config"]] + [c["config"] for c in launches[0]["candidates"]]
    configs = {}
    for label in dict.fromkeys(labels):
        chosen = [next((c for c in lc["candidates"] if c["config"] == label), None) if lc["candidates"] else lc
                  for lc in launches]
        configs[label] = [dict(c, phase=lc["phase"]) for c, lc in zip(chosen, launches) if c is not None]
    return configs


def compile_triton(launch: dict, arch: int) -> tuple[Path, str, int]:
    """(cubin path, function name, dynamic shared memory) of a described launch, for sm_<arch>."""
    import triton
    from triton.backends.compiler import GPUTarget

    source = triton.compiler.ASTSource(fn=launch["kernel"], signature=launch["signature"],
                                       constexprs=launch["constexprs"], attrs=launch["attrs"])
    options = {"num_warps": launch["num_warps"]}
    for option in ("num_stages", "maxnreg"):
        if launch.get(option) is not None:
            options[option] = launch[option]
    compiled = triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)
    meta = compiled.metadata
    path = cache_dir() / "triton" / f"{meta.name}-{meta.hash[:16]}-sm{arch}.cubin"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic.write_bytes(path, compiled.asm["cubin"])
    return path, meta.name, int(meta.shared)


def _pointer_bytes(launch: dict, arg: str) -> int:
    return ELEMENT_BYTES[{"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}
                         [launch["signature"][arg].lstrip("*")]]


def triton_work(launch: dict, batch: int):
    """(main-loop iterations summed over warps, rows per warp per iteration, trips of the loops
    nested in the main loop, bytes moved) of a launch of one of the Triton kernels (their loops:
    kernels/nla_loss.py, kernels/nla_loss_wide.py)."""
    from nla_fast.kernels.launch import is_wide

    const, warps, grid = launch["constexprs"], launch["num_warps"], launch["grid"][0]
    if launch["name"] == "forward":  # persistent loop over full tiles of BLOCK_B rows
        classes = launch["constexprs"]["C"]
        logits = batch * classes * (_pointer_bytes(launch, "z_ptr") + _pointer_bytes(launch, "zf_ptr"))
        grads = batch * classes * (const["GRAD_Z"] * _pointer_bytes(launch, "gz_ptr")
                                   + const["GRAD_ZF"] * _pointer_bytes(launch, "gzf_ptr"))
        moved = logits + 8 * batch + grads + 4 * batch * const["WRITE_W"] + 4 * grid
        # the wide kernel: each sweep over a row is a loop over its column chunks (the last one
        # masked); its second (JSD: and third) read of a row comes from L2, so DRAM bytes count
        # each row once (SPEC 4)
        chunks = -(-classes // const["BLOCK_C"]) if is_wide(const["BLOCK_C"]) else 1
        return batch // const["BLOCK_B"] * warps, const["BLOCK_B"] / warps, lambda loop: chunks, moved
    if launch["name"] == "sum_partials":  # one program, a loop over the partial sums
        n = launch["args"][2]
        return math.ceil(n / const["BLOCK"]) * warps, None, lambda loop: 1.0, 4 * n + 4
    # scale_grads at grad_output == 1: every program reads grad_output, every load / store is masked off
    return 0.0, None, lambda loop: 1.0, 4 * grid


def _steady_grid(launch: dict, code: cubin_stats.KernelCode, shared: int, batch: int, device: Device) -> int:
    """The persistent forward's grid from the second eager call on: the first is sized from an
    assumed occupancy (``describe_launches``), then ``launch._remember_occupancy`` resizes it to
    the compiled kernel's resident blocks per SM (as here, from the cubin)."""
    from nla_fast.kernels.launch import persistent_grid

    per_sm = code.occupancy(32 * launch["num_warps"], shared)["blocks_per_sm"]
    if launch["name"] != "forward" or launch["role"] not in ("heuristic", "autotune") or not per_sm:
        return launch["grid"][0]
    return persistent_grid(batch, launch["constexprs"]["BLOCK_B"], per_sm, device.sms)


def triton_l1_wavefronts(launch: dict, facts: dict, batch: int, dtype: str) -> float | None:
    """The forward's L1 / shared wavefronts where ``shared_wavefronts`` replays it: contiguous
    rows of 5-7 classes in slots of 8, both views and both gradients, and a main loop with the
    replay's shared-memory instructions (the flat rows' store width is read from them: Triton
    3.6 and 3.8 differ); else None (not counted)."""
    c = launch["constexprs"]
    if launch["name"] != "forward" or not (5 <= c.get("C", 0) <= 7 and c.get("BLOCK_C") == shared_wavefronts.SLOTS
                                           and c.get("FLAT_ROWS") and c.get("HAS_FLIP") and c.get("GRAD_Z")
                                           and c.get("GRAD_ZF")):
        return None
    element = ELEMENT_BYTES[dtype]
    order = shared_wavefronts.columns_first(element)
    store = shared_wavefronts.flat_store_of(facts["loop_shared_opcodes"], c["C"], element, order)
    if store is None:
        return None
    per_warp = shared_wavefronts.call_accesses(c["C"], element, c["BLOCK_B"], order, store)
    return sum(per_warp.values()) * batch / shared_wavefronts.WARP


def triton_rows(batch: int, classes: int, dtype: str, arch: int) -> list[dict]:
    """One row per launch of every config, and one "total" row per config."""
    device = device_for(arch)
    rows = []
    for label, launches in triton_configs(batch, classes, dtype, device).items():
        parts = []
        for launch in launches:
            path, function, shared = compile_triton(launch, arch)
            code = cubin_stats.read_cubin(path)[function]
            iterations, rows_per_iteration, trips, moved = triton_work(launch, batch)
            facts = analyse(code, 32 * launch["num_warps"], _steady_grid(launch, code, shared, batch, device), shared,
                            iterations, rows_per_iteration, trips)
            wavefronts = triton_l1_wavefronts(launch, facts, batch, dtype)
            parts.append(dict(facts, kernel=launch["name"], phase=launch["phase"], role=launch["role"],
                              launch_config=launch["config"], bytes=moved, cubin=str(path), l1_wavefronts=wavefronts,
                              **predict(facts, moved, device, wavefronts)))
        role = launches[0]["role"]
        rows += [_row("triton", label, role, batch, classes, dtype, device, p, i == 0) for i, p in enumerate(parts)]
        rows.append(_total_row("triton", label, role, batch, classes, dtype, device, parts))
    return rows


# ----------------------------------------------------------------------------- extension backend
# What the extension launches is asked of its own C++ (extension_launches: cuda_launch_plan and
# the launchers of csrc/nla_loss_cuda.cu run against a recording CUDA runtime), never copied here.
ACC_BYTES = {"float32": 4, "bfloat16": 4, "float16": 4, "float64": 8}


def extension_call(batch: int, classes: int, dtype: str, consistency: str = "official", grad: bool = True) -> dict:
    """The plan and the launches of one eager extension fwd + bwd call (the first backward's
    in-place scale included), each launch with its kernel's readable name and a short label."""
    call = extension_launches.launches(cache_dir() / "extension", batch, classes, dtype, consistency, grad)
    for launch in call["launches"]:
        launch["name"] = cubin_stats.readable_name(launch["function"])
        launch["label"] = re.sub(r"^nla_|_kernel$", "", launch["name"].split("<")[0])
    return call


def extension_cubin(arch: int) -> Path:
    """csrc/nla_loss_cuda.cu compiled to a cubin for sm_<arch> with the real build's nvcc flags
    (``native_build.nvcc_compile_command``), cached by the sources and the command; ptxas's own
    report (``-Xptxas -v``: registers, spills per kernel) is kept beside it (``.ptxas.txt``)."""
    from nla_fast import native_build

    src = native_build.source_dir()
    command = native_build.nvcc_compile_command("OUTPUT", str(arch)) + ["-Xptxas", "-v"]
    command[command.index("-c")] = "-cubin"
    digest = hashlib.sha256(json.dumps(command).encode())
    for path in sorted(src.iterdir()):
        if path.suffix in (".h", ".cuh", ".cu"):
            digest.update(path.name.encode() + path.read_bytes())
    cubin = cache_dir() / "extension" / f"nla_loss_cuda-{digest.hexdigest()[:16]}-sm{arch}.cubin"
    if not cubin.is_file():
        cubin.parent.mkdir(parents=True, exist_ok=True)
        with atomic.target(cubin) as tmp:
            done = subprocess.run([str(tmp) if c == "OUTPUT" else c for c in command], capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"nvcc -cubin sm_{arch} of {src / 'nla_loss_cuda.cu'} failed:\n{done.stderr[-3000:]}")
            atomic.write_text(cubin.with_suffix(".ptxas.txt"), done.stderr)
    return cubin


_cubins: dict[Path, dict] = {}


def kernels_of(path: Path) -> dict[str, cubin_stats.KernelCode]:
    """The kernels of a cubin by ``stable_name`` (their mangled names less the anonymous
    namespace's per-compilation hash), read once per process."""
    if path not in _cubins:
        _cubins[path] = {cubin_stats.stable_name(n): k for n, k in cubin_stats.read_cubin(path).items()}
    return _cubins[path]


@dataclass
class Work:
    """What a launch does, for ``analyse``: main-loop iterations summed over its warps, rows a
    warp finishes per iteration (None: not a row loop), trips of the loops nested in the main
    loop, warps that run a partial last tile (outside the main loop), and bytes moved."""

    warp_iterations: float
    rows_per_warp_iteration: float | None
    moved: float
    trips: Callable[[cubin_stats.Loop], float] = lambda loop: 1.0
    tail_warps: int = 0


def extension_work(launch: dict, plan: dict, code: cubin_stats.KernelCode, batch: int, classes: int, dtype: str,
                   consistency: str, grad: bool) -> Work:
    """The loops of each kernel of csrc/nla_loss_cuda.cu, as its source writes them."""
    threads, grid = launch["block"][0], launch["grid"][0]
    warps = threads // 32
    esize = ELEMENT_BYTES[dtype]
    flip = consistency != "none"
    if launch["label"] in ("tile_fixed", "tile_generic", "warp", "warp_chunked"):
        moved = (batch * classes * esize * ((2 if flip else 1) + (2 if flip and grad else 0)) + 8 * batch
                 + ACC_BYTES[dtype] * (batch * (not flip) + grid * (flip and grid > 1)))
    if launch["label"] == "tile_fixed":  # a loop over full tiles, a row per thread; the partial tile after it
        rows = plan["rows_per_block"]
        return Work(batch // rows * warps, rows / warps, moved, tail_warps=warps if batch % rows else 0)
    if launch["label"] == "tile_generic":  # a loop over tiles; staging and write-out loops inside it
        rows, tiles = plan["rows_per_block"], -(-batch // plan["rows_per_block"])
        copies = -(-min(batch, rows) * classes * esize // 16 // threads)

        def trips(loop):  # the 16-byte copy loops run; the element loops only for a tile's tail
            mix = cubin_stats.instruction_mix(loop.instructions)
            return copies if max(mix["max_global_load_bytes"], mix["max_global_store_bytes"]) >= 16 else 0.0
        return Work(tiles * warps, batch / (tiles * warps), moved, trips)
    if launch["label"] in ("warp", "warp_chunked"):
        # a row per warp and iteration; each sweep over the row is a loop of floor(C / (32 N)) whole
        # iterations (N: columns a lane takes per iteration, from the extension's cuda_lane_columns),
        # the last partial iteration inline after it
        columns = plan["lane_columns"]
        return Work(batch, 1.0, moved, lambda loop: classes // (32 * columns))
    if launch["label"] == "final_sum":  # one block; its main loop sums as many partials a thread as it loads
        main = code.flow.main_loop()
        per_trip = max(1, cubin_stats.instruction_mix(main.instructions)["global_loads"]) if main else 1
        n = plan["grid"]
        return Work(-(-n // (threads * per_trip)) * warps, None, ACC_BYTES[dtype] * (n + 1))
    if launch["label"] == "scale":  # in place at grad_output == 1: every thread reads it and returns
        return Work(0.0, None, 4 * grid)
    raise KeyError(f"{launch['name']}: no work model in bench/kernel_model.py (extension_work)")


def extension_l1_wavefronts(facts: dict, plan: dict, batch: int, classes: int, dtype: str, grad: bool) -> float | None:
    """The fixed tile kernel's L1 / shared wavefronts where ``shared_wavefronts`` replays it (C = 7,
    both gradients written) and its main loop has the replay's shared-memory instructions; else
    None (not counted)."""
    element = ELEMENT_BYTES[dtype]
    if not (plan["kernel"] == "TileFixed" and classes == 7 and grad and facts["loop_shared_opcodes"]
            == dict(shared_wavefronts.extension_shared_instructions(classes, element))):
        return None
    per_tile = shared_wavefronts.extension_tile_accesses(classes, element)
    return sum(per_tile.values()) * batch / shared_wavefronts.EXTENSION_TILE_ROWS


def extension_rows(batch: int, classes: int, dtype: str, arch: int, consistency: str = "official",
                   grad: bool = True) -> list[dict]:
    """One row per launch of the extension's fwd + bwd call and its "total" row."""
    device, path = device_for(arch), extension_cubin(arch)
    kernels = kernels_of(path)
    call = extension_call(batch, classes, dtype, consistency, grad)
    parts = []
    for launch in call["launches"]:
        code = kernels.get(cubin_stats.stable_name(launch["function"]))
        if code is None:
            raise KeyError(f"{launch['name']}, launched at ({batch}, {classes}) {dtype}, is not in {path}")
        work = extension_work(launch, dict(call["plan"], lane_columns=call["lane_columns"]), code, batch, classes,
                              dtype, consistency, grad)
        threads, grid, shared = launch["block"][0], launch["grid"][0], launch["shared_dynamic"]
        facts = analyse(code, threads, grid, shared, work.warp_iterations, work.rows_per_warp_iteration,
                        work.trips, work.tail_warps)
        ptxas = ptxas_report(path).get(cubin_stats.stable_name(code.name), {})
        wavefronts = (extension_l1_wavefronts(facts, call["plan"], batch, classes, dtype, grad)
                      if launch is call["launches"][0] else None)
        parts.append(dict(facts, kernel=launch["label"], phase="backward" if launch["label"] == "scale" else "forward",
                          role="cuda_launch_plan", launch_config=f"{threads} threads, {grid} blocks",
                          plan=call["plan"] if launch is call["launches"][0] else None, ptxas=ptxas,
                          bytes=work.moved, cubin=str(path), l1_wavefronts=wavefronts,
                          **predict(facts, work.moved, device, wavefronts)))
    config = call["plan"]["kernel"]
    rows = [_row("extension", config, "cuda_launch_plan", batch, classes, dtype, device, p, i == 0)
            for i, p in enumerate(parts)]
    return rows + [_total_row("extension", config, "cuda_launch_plan", batch, classes, dtype, device, parts)]


def ptxas_report(cubin: Path) -> dict[str, dict]:
    """ptxas's registers, stack and spills of each kernel of an extension cubin, by stable name."""
    report = cubin_stats.parse_ptxas_report(cubin.with_suffix(".ptxas.txt").read_text())
    return {cubin_stats.stable_name(name): figures for name, figures in report.items()}


def extension_instantiations(arch: int) -> list[dict]:
    """Every kernel of the extension's cubin: registers, stack and spills, from its SASS and from
    ptxas (fp64 ones only serve gradcheck)."""
    path = extension_cubin(arch)
    ptxas = ptxas_report(path)
    return [dict(code.summary(), arch=arch, fp64_instantiation="double" in code.summary()["name"],
                 ptxas=ptxas.get(key, {}))
            for key, code in sorted(kernels_of(path).items(), key=lambda item: cubin_stats.readable_name(item[0]))]


# ----------------------------------------------------------------------------- rows, table, JSON, check
def _finite(x):
    return None if isinstance(x, float) and not math.isfinite(x) else x


def _pct(bytes_moved: float, microseconds: float, device: Device) -> float | None:
    if not microseconds or not math.isfinite(microseconds):
        return None
    return 100.0 * bytes_moved / (microseconds * device.copy_gb_per_s * 1e3)


def _row(backend, config, role, batch, classes, dtype, device, part, main_kernel=False) -> dict:
    """One launch; ``main_kernel``: the call's first launch, the one that does the rows."""
    row = dict(backend=backend, kernel=part["kernel"], config=config, role=role, shape=[batch, classes],
               dtype=dtype, arch=device.arch, device=device.name, main_kernel=main_kernel)
    row.update({k: v for k, v in part.items() if k not in row})
    row["function_name"] = row.pop("name")
    row["predicted_pct_copy_bw"] = _pct(part["bytes"], part["predicted_us"], device)
    return {k: _finite(v) for k, v in row.items()}


def _total_row(backend, config, role, batch, classes, dtype, device, parts) -> dict:
    """The whole fwd + bwd call: its launches one after another; the main kernel's facts."""
    main = parts[0]
    total_us = sum(p["predicted_us"] for p in parts)
    counted = spec_bytes(batch, classes, dtype)
    return {k: _finite(v) for k, v in dict(
        backend=backend, kernel="total", config=config, role=role, shape=[batch, classes], dtype=dtype,
        arch=device.arch, device=device.name, launches=[p["kernel"] for p in parts],
        registers=main["registers"], spill_bytes=sum(p["spill_bytes"] for p in parts),
        warps_per_sm=main["warps_per_sm"], instructions_per_row=main["instructions_per_row"],
        instructions_per_row_min=main["instructions_per_row_min"],
        bytes=counted, bytes_moved=sum(p["bytes"] for p in parts),
        issue_us=sum(p["issue_us"] for p in parts), memory_us=sum(p["memory_us"] for p in parts),
        l1_us=main["l1_us"],
        predicted_us=total_us, predicted_pct_copy_bw=_pct(counted, total_us, device),
        floor_us=counted / (device.copy_gb_per_s * 1e3)).items()}


def run(backends, arches, shapes) -> dict:
    rows, instantiations = [], []
    for batch, classes, dtype in shapes:
        for backend in backends:
            for arch in arches:
                make = triton_rows if backend == "triton" else extension_rows
                rows += make(batch, classes, dtype, arch)
    if "extension" in backends:
        for arch in arches:
            instantiations += extension_instantiations(arch)
    result = dict(
        benchmark="kernel_model", note="static predictions from machine code, not measured on a GPU",
        date=datetime.datetime.now().isoformat(timespec="seconds"), versions=dict(versions(), nvcc=_nvcc_version()),
        devices=[vars(d) for d in DEVICES if d.arch in arches],
        constants=dict(ISSUE_PER_CLOCK=ISSUE_PER_CLOCK, MUFU_LANES_PER_SM=MUFU_LANES_PER_SM,
                       WARPS_TO_HIDE_LATENCY=WARPS_TO_HIDE_LATENCY, LAUNCH_FLOOR_US=LAUNCH_FLOOR_US),
        cache_dir=str(cache_dir()), sources_sha256=sources_digest(), rows=rows,
        extension_instantiations=instantiations)
    result["check"] = [line for arch in arches for line in check(result, arch)]
    return result


def sources_digest() -> str:
    """sha256 of the kernels' sources (kernels/*.py, csrc/*): what a prediction is a prediction of."""
    root = Path(__file__).resolve().parent.parent
    digest = hashlib.sha256()
    for path in sorted([*root.glob("kernels/*.py"), *root.glob("csrc/*.h"), *root.glob("csrc/*.cpp"),
                        *root.glob("csrc/*.cu")]):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


def saved_prediction(arches) -> Path | None:
    """The newest saved (``--save``) kernel_model.json of these very sources covering ``arches``."""
    digest = sources_digest()
    for path in sorted(result_files.REFERENCE.glob("*/kernel_model.json"), reverse=True):
        try:
            saved = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if saved.get("sources_sha256") == digest and set(arches) <= {d["arch"] for d in saved.get("devices", [])}:
            return path
    return None


def _nvcc_version() -> str | None:
    try:
        from nla_fast import native_build

        root = native_build.find_cuda_home()
        out = subprocess.run([os.path.join(root, "bin", "nvcc") if root else "nvcc", "--version"],
                             capture_output=True, text=True).stdout
        return re.findall(r"release ([\d.]+)", out)[-1]
    except (OSError, IndexError, FileNotFoundError):
        return None


def check(result: dict, arch: int = 90) -> list[str]:
    """The static targets (see BANDWIDTH_TARGETS) the rows of sm_<arch> miss, one line each
    (SPEC 4 judges sm_90; sm_80 is judged alike, against the A100's bandwidth)."""
    failures = []
    # a tuning candidate that spills is never launched (launch.time_candidate drops it)
    dropped = {id(r) for r in dropped_candidates(result, arch)}
    rows = [r for r in result["rows"] if r["arch"] == arch and id(r) not in dropped]
    for r in rows:
        want = BANDWIDTH_TARGETS.get((*r["shape"], r["dtype"]))
        if r["kernel"] == "total" and r["role"] in UNTUNED_ROLES and want and (r["predicted_pct_copy_bw"] or 0) < want:
            failures.append(f"{r['backend']} {r['config']}: {r['predicted_pct_copy_bw'] or 0:.1f}% of "
                            f"{r['device'].removeprefix('NVIDIA ')} copy bandwidth at ({_batch_text(r['shape'][0])}, "
                            f"{r['shape'][1]}) {r['dtype']} sm_{arch} (target >= {want:.0f}%)")
    for r in rows:
        if not r.get("main_kernel") or r["shape"][0] < LARGE_BATCH:
            continue
        if r["shape"][1] == 7 and (r["instructions_per_row"] or math.inf) > TARGETS["instructions_per_row"]:
            failures.append(f"{_where(r)}: {r['instructions_per_row'] or math.inf:.1f} warp-instructions per row "
                            f"(target <= {TARGETS['instructions_per_row']:.0f})")
        if r["warps_per_sm"] < TARGETS["warps_per_sm"]:
            failures.append(f"{_where(r)}: {r['warps_per_sm']} resident warps per SM (target >= {TARGETS['warps_per_sm']})")
        if (r.get("loop_max_load_bytes") or 0) < TARGETS["global_load_bytes"]:
            failures.append(f"{_where(r)}: global loads of {r.get('loop_max_load_bytes') or 0} bytes at most in its "
                            f"main loop (target {TARGETS['global_load_bytes']}-byte loads)")
    failures += [f"{_where(r)}: {_spilled(r)} spill bytes" for r in rows if r["kernel"] != "total" and _spilled(r)]
    failures += [f"extension instantiation {k['name']} (sm_{arch}): {_spilled(k)} spill bytes"
                 for k in result["extension_instantiations"]
                 if k["arch"] == arch and _spilled(k) and not k["fp64_instantiation"]]
    return failures


def dropped_candidates(result: dict, arch: int = 90) -> list[dict]:
    """The rows of sm_<arch>'s tuning candidates (role autotune) that spill, each kernel of
    them: the tuner compiles a candidate before timing it and drops it when it spills, so the
    code never launches them (the heuristic config, launched untuned, has no such way out)."""
    spilling = {(r["backend"], r["config"], tuple(r["shape"]), r["dtype"]) for r in result["rows"]
                if r["arch"] == arch and r["role"] == "autotune" and r["kernel"] == "forward" and _spilled(r)}
    return [r for r in result["rows"]
            if r["arch"] == arch and (r["backend"], r["config"], tuple(r["shape"]), r["dtype"]) in spilling
            and r["role"] == "autotune"]


def _spilled(r: dict) -> int:
    """Spill bytes read from the SASS (STL / LDL), or ptxas's count where it says more."""
    ptxas = r.get("ptxas") or {}
    return max(r["spill_bytes"] or 0, ptxas.get("spill_stores", 0) + ptxas.get("spill_loads", 0))


def _batch_text(batch: int) -> str:
    return f"2^{batch.bit_length() - 1}" if batch >= 65536 and batch & (batch - 1) == 0 else str(batch)


def _where(r: dict) -> str:
    return f"{r['backend']} {r['kernel']} {r['config']} ({r['shape'][0]}, {r['shape'][1]}) {r['dtype']} sm_{r['arch']}"


def table(result: dict) -> str:
    head = (f"{'backend':<9} {'sm':>2} {'shape':>12} {'dtype':<8} {'config':<11} {'kernel':<12} {'regs':>4} "
            f"{'spill':>5} {'warps':>5} {'ins/row':>7} {'mufu/row':>8} {'ld B':>4} {'L1 us':>6} {'us':>8} {'bound':<7} "
            f"{'%BW':>5}")
    lines = [head, "-" * len(head)]
    for r in result["rows"]:
        per_row = r.get("per_row") or {}
        ins = f"{r['instructions_per_row']:.1f}" if r["instructions_per_row"] is not None else "-"
        mufu = f"{per_row['mufu']:.2f}" if "mufu" in per_row else "-"
        us = f"{r['predicted_us']:.1f}" if r["predicted_us"] is not None else "inf"
        pct = f"{r['predicted_pct_copy_bw']:.1f}" if r["predicted_pct_copy_bw"] is not None else "-"
        l1 = f"{r['l1_us']:.1f}" if r.get("l1_us") is not None else "-"  # (not replayed: not counted)
        lines.append(f"{r['backend']:<9} {r['arch']:>2} {r['shape'][0]:>7}x{r['shape'][1]:<4} {r['dtype']:<8} "
                     f"{r['config']:<11} {r['kernel']:<12} {r['registers']:>4} {r['spill_bytes']:>5} "
                     f"{r['warps_per_sm']:>5} {ins:>7} {mufu:>8} {r.get('loop_max_load_bytes', '') or '':>4} "
                     f"{l1:>6} {us:>8} {r.get('bound', '') or '':<7} {pct:>5}")
    return "\n".join(lines)


def instantiations_table(result: dict) -> str:
    """Every kernel of the extension's cubins: registers, spill bytes (SASS, ptxas) and stack."""
    head = f"{'sm':>2} {'regs':>4} {'spill':>5} {'ptxas spill':>11} {'stack':>5}  kernel"
    lines = [head, "-" * 80]
    for k in result.get("extension_instantiations", []):
        ptxas = k.get("ptxas") or {}
        ptxas_spill = ptxas.get("spill_stores", 0) + ptxas.get("spill_loads", 0) if ptxas else "-"
        lines.append(f"{k['arch']:>2} {k['registers']:>4} {k['spill_bytes']:>5} {ptxas_spill:>11} "
                     f"{k['stack_bytes']:>5}  {k['name']}")
    return "\n".join(lines)


def write(result: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "kernel_model.json"
    atomic.write_text(path, json.dumps(result, indent=1))
    return path


def _shape(text: str) -> tuple[int, int, str]:
    match = re.fullmatch(r"(\d+)x(\d+):(float32|bfloat16|float16|float64)", text)
    if not match:
        raise argparse.ArgumentTypeError(f"shape {text!r}: expected BxC:dtype, e.g. 1048576x7:bfloat16")
    batch, classes = int(match.group(1)), int(match.group(2))
    if batch < 1 or classes < 2:
        raise argparse.ArgumentTypeError(f"shape {text!r}: NLA needs B >= 1 rows and C >= 2 classes")
    return batch, classes, match.group(3)


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--backend", nargs="+", choices=("triton", "extension"), default=["triton", "extension"])
    parser.add_argument("--arch", nargs="+", type=int, choices=(90, 80), default=[90, 80])
    parser.add_argument("--shape", nargs="+", type=_shape, default=list(SPEC_SHAPES), help="BxC:dtype (default: SPEC 4)")
    result_files.add_arguments(parser)
    parser.add_argument("--reuse-saved", action="store_true",
                        help="take the saved prediction of these very sources when there is one (seconds, not minutes)")
    parser.add_argument("--check", action="store_true", help="exit 1 when a static target is missed")
    parser.add_argument("--instantiations", action="store_true",
                        help="also list every kernel of the extension's cubins (registers, spills, stack)")
    args = parser.parse_args(argv)
    saved = saved_prediction(args.arch) if args.reuse_saved else None
    try:
        result = json.loads(saved.read_text()) if saved else run(args.backend, args.arch, args.shape)
    except FileNotFoundError as err:  # no nvcc / cuobjdump here: say which, and how to go on without
        raise SystemExit(f"kernel_model: {err} (the Triton kernels alone: --backend triton)") from err
    if saved:
        print(f"(the saved prediction of these sources: {saved})")
    print(table(result))
    if args.instantiations:
        print("\n" + instantiations_table(result))
    paths = [write(result, result_files.output_dir(args, "model-sm" + "-".join(map(str, args.arch))))]
    if os.environ.get("OUT"):
        paths.append(write(result, Path(os.environ["OUT"])))
    print("\nStatic targets (SPEC 4 and issue 18 on sm_90; sm_80 alike, against the A100's bandwidth):",
          "all met" if not result["check"] else "")
    for line in result["check"]:
        print(f"  MISSED {line}")
    for arch in args.arch:
        for r in dropped_candidates(result, arch):
            if r["kernel"] == "forward":
                print(f"  (not a miss: the tuner drops {_where(r)}, which spills {_spilled(r)} bytes)")
    print("wrote " + ", ".join(map(str, paths)))
    if args.check and result["check"]:
        raise SystemExit(1)
    return result


if __name__ == "__main__":
    main()
