"""What the CUDA extension's kernels compile to, read without a GPU (sm_90 machine code).

    python bench/extension_sass.py            # the kernels cuda_launch_plan picks at SPEC 4 shapes
    python bench/extension_sass.py --all      # every kernel of csrc/nla_loss_cuda.cu

Compiles csrc/nla_loss_cuda.cu to a cubin with the extension's own nvcc flags (-O3,
nla_fast.native_build.nvcc_compile_command) plus ``-Xptxas -v``, then reads ptxas's register and spill
report and ``cuobjdump -sass`` (triton's copy under backends/nvidia/bin). For each kernel: registers,
spill and stack bytes, resident warps per SM (register-limited), the SASS instructions of its main
loop (the outermost backward branch) per row and per warp, the global load / store widths in that
loop, and MUFU counts. A first-order H200 prediction (132 SMs, 1.98 GHz, 4 warp-instructions per
clock per SM, copy bandwidth 4,251 GB/s as measured on 2026-11-29): time = max(issue, memory).
These are static figures, not measurements on a GPU. Writes bench/results/extension_sass.json.
"""
from __future__ import annotations

import argparse
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from nla_fast import native_build  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results"
H200 = {"sms": 132, "ghz": 1.98, "issue_per_clock": 4, "copy_gb_per_s": 4251.0, "regs_per_sm": 65536,
        "max_warps_per_sm": 64}
# (B, C, dtype, gradients, kernel symbol pattern, rows per warp per main-loop iteration): the kernel
# cuda_launch_plan (csrc/nla_loss.h) picks, with the default (official) consistency term
_FIXED = r"nla_tile_fixed_kernel<{t}, {c}, \(nla_fast::Consistency\)1, {g}>"
SHAPES = [
    (32, 7, "float32", True, _FIXED.format(t="float", c=7, g="true"), 32),
    (2**20, 7, "bfloat16", True, _FIXED.format(t="__nv_bfloat16", c=7, g="true"), 32),
    (2**20, 7, "float32", True, _FIXED.format(t="float", c=7, g="true"), 32),
    (4096, 1000, "bfloat16", True, r"nla_warp_kernel<__nv_bfloat16, 32, \(nla_fast::Consistency\)1>", 1),
    (2**20, 7, "bfloat16", False, _FIXED.format(t="__nv_bfloat16", c=7, g="false"), 32),
    (2**20, 8, "bfloat16", True, _FIXED.format(t="__nv_bfloat16", c=8, g="true"), 32),
    (2**20, 8, "float32", True, _FIXED.format(t="float", c=8, g="true"), 32),
]
ESIZE = {"float32": 4, "bfloat16": 2, "float16": 2, "float64": 8}


def cuobjdump() -> str:
    import triton

    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
    return str(path) if path.is_file() else (shutil.which("cuobjdump") or "cuobjdump")


def compile_cubin(out_dir: Path, arch: str = "90") -> tuple[Path, str]:
    """(cubin path, ptxas -v report) of nla_loss_cuda.cu with the extension's nvcc flags."""
    cubin = out_dir / "nla_loss_cuda.cubin"
    cmd = native_build.nvcc_compile_command(cubin, arch=arch)
    cmd[cmd.index("-c")] = "-cubin"
    cmd += ["-Xptxas", "-v"]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"nvcc failed:\n{proc.stderr[-4000:]}")
    return cubin, proc.stderr


def demangle(names: list[str]) -> dict[str, str]:
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    return dict(zip(names, out))


def parse_ptxas(report: str) -> dict[str, dict]:
    """{mangled name: {registers, spill_stores, spill_loads, stack}} from ``ptxas -v`` output."""
    kernels: dict[str, dict] = {}
    current = None
    for line in report.splitlines():
        m = re.search(r"Compiling entry function '([^']+)'", line)
        if m:
            current = kernels.setdefault(m.group(1), {})
            continue
        if current is None:
            continue
        m = re.search(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads", line)
        if m:
            current.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        m = re.search(r"Used (\d+) registers", line)
        if m:
            current["registers"] = int(m.group(1))
    return kernels


def sass_instructions(cubin: Path, name: str) -> list[tuple[int, str]]:
    text = subprocess.run([cuobjdump(), "-sass", "-fun", name, str(cubin)], capture_output=True, text=True).stdout
    out = []
    for line in text.splitlines():
        m = re.match(r"\s+/\*([0-9a-f]{4,})\*/\s+(.*?)\s*;", line)
        if m:
            out.append((int(m.group(1), 16), m.group(2).strip()))
    return out


def main_loop(instrs: list[tuple[int, str]]) -> list[str]:
    """The instructions of the outermost loop: from the target of the backward branch that spans
    the most to that branch (the tile / row loop of every kernel here)."""
    best = None
    for addr, text in instrs:
        m = re.search(r"\bBRA(?:\.\w+)* (?:`\(\.L_x_\d+\) )?0x([0-9a-f]+)", text)
        if m and int(m.group(1), 16) <= addr:
            span = (int(m.group(1), 16), addr)
            if best is None or span[1] - span[0] > best[1] - best[0]:
                best = span
    if best is None:
        return [t for _, t in instrs]
    return [t for a, t in instrs if best[0] <= a <= best[1] and not t.startswith("NOP")]


def opcode(text: str) -> str:
    text = re.sub(r"^@!?U?P\w+\s+", "", text)
    return text.split()[0]


def loop_profile(loop: list[str]) -> dict:
    ops = [opcode(t) for t in loop]

    def count(prefix):
        return sum(1 for o in ops if o.startswith(prefix))

    widths = {}
    for o in ops:
        if o.startswith(("LDG", "STG")):
            widths[o] = widths.get(o, 0) + 1
    return {"instructions": len(ops), "mufu": count("MUFU"), "mufu_ex2": count("MUFU.EX2"),
            "mufu_lg2": count("MUFU.LG2"), "mufu_rcp": count("MUFU.RCP"), "calls": count("CALL"),
            "bar": count("BAR"), "lds": count("LDS"), "sts": count("STS"), "global": widths,
            "fp64": sum(1 for o in ops if o.startswith(("DADD", "DMUL", "DFMA")))}


def resident_warps(registers: int, threads: int) -> int:
    regs_per_warp = ((max(registers, 1) * 32 + 255) // 256) * 256  # allocated in 256-register units
    blocks = H200["regs_per_sm"] // (regs_per_warp * (threads // 32))
    return min(blocks * threads // 32, H200["max_warps_per_sm"])


def predict(batch: int, classes: int, dtype: str, grad: bool, per_row: float) -> dict:
    # both logits read, both gradients written (fwd+bwd), int64 targets read
    nbytes = (4 if grad else 2) * batch * classes * ESIZE[dtype] + 8 * batch
    memory_us = nbytes / (H200["copy_gb_per_s"] * 1e3)
    issue_us = batch * per_row / (H200["sms"] * H200["issue_per_clock"] * H200["ghz"] * 1e3)
    time_us = max(memory_us, issue_us)
    return {"bytes": nbytes, "memory_us": memory_us, "issue_us": issue_us, "predicted_us": time_us,
            "predicted_pct_copy_bw": 100 * memory_us / time_us}


def report(all_kernels: bool) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        cubin, ptxas = compile_cubin(Path(tmp))
        stats = parse_ptxas(ptxas)
        names = demangle(list(stats))
        rows = []
        for mangled, st in stats.items():
            pretty = names[mangled]
            st = dict(st, kernel=pretty)
            rows.append(st)
        shapes = []
        for batch, classes, dtype, grad, pattern, rows_per_warp in SHAPES:
            mangled = next(m for m, p in names.items() if re.search(pattern, p))
            st = stats[mangled]
            loop = loop_profile(main_loop(sass_instructions(cubin, mangled)))
            threads = 128
            per_row = loop["instructions"] / rows_per_warp
            shapes.append({"shape": [batch, classes], "dtype": dtype, "mode": "fwd+bwd" if grad else "fwd",
                           "kernel": names[mangled],
                           "registers": st["registers"], "spill_bytes": st["spill_stores"] + st["spill_loads"],
                           "warps_per_sm": resident_warps(st["registers"], threads),
                           "instructions_per_row": per_row, "loop": loop, **predict(batch, classes, dtype, grad, per_row)})
    return {"arch": "sm_90", "device_model": H200, "kernels": rows if all_kernels else None, "shapes": shapes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--all", action="store_true", help="list every kernel's registers and spills")
    args = parser.parse_args(argv)
    result = report(args.all)
    if result["kernels"]:
        print(f"{'regs':>5} {'spill B':>8} {'stack':>6}  kernel")
        for k in sorted(result["kernels"], key=lambda k: k["kernel"]):
            print(f"{k.get('registers', 0):5d} {k['spill_stores'] + k['spill_loads']:8d} {k['stack']:6d}  {k['kernel']}")
        print()
    print(f"{'B x C':>13} {'dtype':>9} {'mode':>7} {'regs':>5} {'spill':>5} {'warps/SM':>8} {'instr/row':>9} {'MUFU':>5} "
          f"{'issue us':>8} {'memory us':>9} {'% copy BW':>9}  global accesses in the main loop")
    for s in result["shapes"]:
        print(f"{s['shape'][0]:>8} x {s['shape'][1]:<4} {s['dtype']:>8} {s['mode']:>7} {s['registers']:5d} {s['spill_bytes']:5d} "
              f"{s['warps_per_sm']:8d} {s['instructions_per_row']:9.2f} {s['loop']['mufu']:5d} {s['issue_us']:8.2f} "
              f"{s['memory_us']:9.2f} {s['predicted_pct_copy_bw']:9.1f}  {s['loop']['global']}")
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "extension_sass.json").write_text(json.dumps(result, indent=2))
    print(f"wrote {RESULTS / 'extension_sass.json'} (static sm_90 figures, not measured on a GPU)")


if __name__ == "__main__":
    main()
