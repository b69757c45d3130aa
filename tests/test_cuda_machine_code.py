"""The CUDA extension read without a GPU: its launch plan and shared-memory layouts (the header
compiled by the host compiler), and the sm_90 machine code of csrc/nla_loss_cuda.cu (nvcc with the
build's own flags, ``ptxas -v``, ``cuobjdump -sass``; bench/extension_sass.py).

The machine-code test compiles the whole file at -O3 (about a minute on 2 cores); its report is
remembered per hash of the sources and the nvcc command (in the torch extensions dir), so an
unchanged source is checked from the saved report.
"""
from __future__ import annotations

import hashlib
import json
import math
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from torch.utils.cpp_extension import get_default_build_root

from nla_fast import native_build

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import extension_sass  # noqa: E402

H200_SMS = 132
DTYPES = {0: ("float32", 4), 1: ("float64", 8), 2: ("float16", 2), 3: ("bfloat16", 2)}
KERNELS = {0: "TileFixed", 1: "TileGeneric", 2: "WarpRow", 3: "WarpChunked"}
BATCHES = (1, 32, 129, 65536, 2**20)
CLASSES = (2, 5, 7, 8, 13, 32, 33, 64, 100, 1000, 1001, 1024, 1025, 5000)

PLAN_DUMP = r"""
#include "nla_loss.h"
#include <cstdio>
#include <initializer_list>
using namespace nla_fast;
int main() {
  const long long batches[] = {%(batches)s};
  const int classes[] = {%(classes)s};
  for (int d = 0; d < 4; ++d)
    for (long long B : batches)
      for (int C : classes) {
        const CudaPlan p = cuda_launch_plan(B, C, static_cast<DType>(d));
        std::printf("plan %%d %%lld %%d %%d %%d %%d %%d %%d %%d\n", d, B, C, static_cast<int>(p.kernel), p.width,
                    p.threads, p.rows_per_block, p.smem_bytes, p.grid);
      }
  for (int C = 1; C <= 32; ++C)
    for (int esize : {2, 4, 8}) {
      const TileLayout L = tile_layout(C, esize);
      std::printf("layout %%d %%d %%d %%d %%d %%d %%d\n", C, esize, L.row_bytes, L.stride, L.vec, L.lane_rows,
                  tile_generic_stride(C, esize));
    }
}
"""


@pytest.fixture(scope="module")
def header_dump(tmp_path_factory):
    """Plans and layouts printed by a program that includes csrc/nla_loss.h (no torch, no CUDA)."""
    cxx = shutil.which("c++") or shutil.which("g++")
    if cxx is None:
        pytest.fail("no host C++ compiler (c++ / g++) on PATH: the extension cannot be built either")
    tmp = tmp_path_factory.mktemp("plan")
    src = tmp / "plan.cpp"
    src.write_text(PLAN_DUMP % {"batches": ", ".join(map(str, BATCHES)), "classes": ", ".join(map(str, CLASSES))})
    subprocess.run([cxx, "-std=c++17", "-O1", f"-I{native_build.source_dir()}", str(src), "-o", str(tmp / "plan")],
                   check=True, capture_output=True, text=True)
    out = subprocess.run([str(tmp / "plan")], check=True, capture_output=True, text=True).stdout
    plans, layouts = {}, {}
    for line in out.splitlines():
        kind, *values = line.split()
        values = [int(v) for v in values]
        if kind == "plan":
            d, b, c, kernel, width, threads, rows, smem, grid = values
            plans[(DTYPES[d][0], b, c)] = dict(kernel=KERNELS[kernel], width=width, threads=threads,
                                               rows_per_block=rows, smem_bytes=smem, grid=grid)
        else:
            c, esize, row_bytes, stride, vec, lane_rows, generic_stride = values
            layouts[(c, esize)] = dict(row_bytes=row_bytes, stride=stride, vec=vec, lane_rows=lane_rows,
                                       generic_stride=generic_stride)
    return plans, layouts


def test_launch_plan_rules(header_dump):
    """cuda_launch_plan follows the rules its comment states (the kernel model mirrors them)."""
    plans, _ = header_dump
    for (dtype, batch, classes), p in plans.items():
        esize = dict(DTYPES.values())[dtype]
        if classes in (7, 8) and dtype != "float64":
            want = ("TileFixed", classes)
        elif classes <= 32:
            want = ("TileGeneric", 32)
        else:
            elems = max(2, 2 ** math.ceil(math.log2(math.ceil(classes / 32))))
            piece = min(16 // esize, elems)
            warp_row = classes <= 1024 and dtype != "float64" and classes % piece == 0
            want = ("WarpRow", elems) if warp_row else ("WarpChunked", 0)
        assert (p["kernel"], p["width"]) == want, (dtype, batch, classes, p)
        tile = p["kernel"].startswith("Tile")
        assert p["rows_per_block"] == (p["threads"] if tile else p["threads"] // 32)
        assert p["grid"] == min(max(1, math.ceil(batch / p["rows_per_block"])), 4096)
        if p["kernel"] == "TileGeneric":
            assert p["smem_bytes"] == 2 * p["threads"] * header_dump[1][(classes, esize)]["generic_stride"] <= 48 * 1024
        if batch == 65536:  # rows per block capped: at least two blocks per SM of an H200
            assert p["grid"] >= 2 * H200_SMS, (dtype, classes, p)
    assert plans[("bfloat16", 2**20, 7)] == dict(kernel="TileFixed", width=7, threads=128, rows_per_block=128,
                                                 smem_bytes=0, grid=4096)
    assert (plans[("bfloat16", 65536, 1000)]["kernel"], plans[("bfloat16", 65536, 1000)]["width"]) == ("WarpRow", 32)
    assert plans[("bfloat16", 65536, 1001)]["kernel"] == "WarpChunked"


def bank_conflict(addresses: list[int], width: int) -> bool:
    """Whether a warp's shared-memory access (one byte address per lane, `width` bytes each) has a
    bank conflict: the lanes of one phase (128 / width of them, at most 32) touching two different
    4-byte words of the same bank."""
    per_phase = min(32, max(1, 128 // width))
    for start in range(0, 32, per_phase):
        words_by_bank: dict[int, set[int]] = {}
        for a in addresses[start:start + per_phase]:
            for word in range(a // 4, (a + width - 1) // 4 + 1):
                words_by_bank.setdefault(word % 32, set()).add(word)
        if any(len(words) > 1 for words in words_by_bank.values()):
            return True
    return False


def test_bank_conflict_model_sees_conflicts():
    assert bank_conflict([32 * lane for lane in range(32)], 4)           # fp32 rows of 8: 8-way
    assert bank_conflict([14 * lane for lane in range(32)], 2)           # bf16 rows of 7, a row per lane
    assert not bank_conflict([4 * lane for lane in range(32)], 4)
    assert not bank_conflict([16 * lane for lane in range(32)], 16)


def test_tile_layouts_are_bank_conflict_free(header_dump):
    """Every thread's row reads in the fixed-width kernel's layout (vector loads, lanes lane_rows
    rows apart) and the generic kernel's (element loads), for every C <= 32 and element size."""
    _, layouts = header_dump
    for (classes, esize), lay in layouts.items():
        assert lay["stride"] in (lay["row_bytes"], lay["row_bytes"] + 16)
        assert lay["row_bytes"] % lay["vec"] == 0 and lay["stride"] % lay["vec"] == 0
        for warp in (0, 1):
            rows = [lane if lay["lane_rows"] == 1 else 2 * lane + warp for lane in range(32)]
            for i in range(lay["row_bytes"] // lay["vec"]):
                addresses = [r * lay["stride"] + i * lay["vec"] for r in rows]
                assert not bank_conflict(addresses, lay["vec"]), (classes, esize, lay, i)
            for j in range(classes):
                addresses = [lane * lay["generic_stride"] + j * esize for lane in range(32)]
                assert not bank_conflict(addresses, esize), (classes, esize, lay["generic_stride"], j)
    # the shapes the old kernel read with conflicts now have none: bf16 C=7, fp32 C=8, fp32 C=16
    assert layouts[(7, 2)]["lane_rows"] == 2 and layouts[(8, 4)]["stride"] == 48


PTXAS_SAMPLE = """ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    48 bytes stack frame, 80 bytes spill stores, 84 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 736 bytes cmem[0]
ptxas info    : Compiling entry function '_Z1gPf' for 'sm_90'
ptxas info    : Function properties for _Z1gPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_ptxas_report_parser_sees_spills():
    stats = extension_sass.parse_ptxas(PTXAS_SAMPLE)
    assert stats["_Z1kPf"] == dict(registers=128, stack=48, spill_stores=80, spill_loads=84)
    assert stats["_Z1gPf"] == dict(registers=40, stack=0, spill_stores=0, spill_loads=0)


def test_main_loop_is_the_outermost_backward_branch():
    instrs = [(0x00, "MOV R1, R2"), (0x10, "LDG.E.EF.128 R4, desc[UR4][R2.64]"), (0x20, "FADD R1, R1, R4"),
              (0x30, "@P0 BRA 0x20"), (0x40, "NOP"), (0x50, "@!P1 BRA 0x10"), (0x60, "EXIT")]
    loop = extension_sass.main_loop(instrs)
    assert loop == ["LDG.E.EF.128 R4, desc[UR4][R2.64]", "FADD R1, R1, R4", "@P0 BRA 0x20", "@!P1 BRA 0x10"]
    assert extension_sass.loop_profile(loop)["global"] == {"LDG.E.EF.128": 1}


@pytest.fixture(scope="module")
def sm90_report():
    """bench/extension_sass.report(): the whole .cu at -O3 for sm_90, remembered per source hash."""
    if shutil.which("nvcc") is None and native_build.find_cuda_home() is None:
        pytest.skip("nvcc is not installed")
    digest = hashlib.sha256()
    for name in ("nla_loss.h", "nla_loss_cuda.cu"):
        digest.update((native_build.source_dir() / name).read_bytes())
    digest.update(" ".join(native_build.nvcc_compile_command("OUT", arch="90")).encode())
    digest.update((BENCH / "extension_sass.py").read_bytes())
    saved = Path(get_default_build_root()) / f"nla_fast_sm90_report_{digest.hexdigest()[:16]}.json"
    if saved.is_file():
        return json.loads(saved.read_text())
    report = extension_sass.report(all_kernels=True)
    try:
        saved.parent.mkdir(parents=True, exist_ok=True)
        saved.write_text(json.dumps(report))
    except OSError:
        pass
    return report


@pytest.mark.slow
def test_sm90_fp32_bf16_fp16_kernels_do_not_spill(sm90_report):
    kernels = sm90_report["kernels"]
    assert len(kernels) > 40
    loss_kernels = [k for k in kernels if "nla_fast" in k["kernel"] and "<double" not in k["kernel"]]
    assert any("nla_tile_fixed_kernel<__nv_bfloat16, 7" in k["kernel"] for k in loss_kernels)
    spilling = [(k["kernel"], k["spill_stores"], k["spill_loads"]) for k in loss_kernels
                if k["spill_stores"] or k["spill_loads"]]
    assert spilling == []


@pytest.mark.slow
def test_sm90_large_batch_kernels_meet_the_static_targets(sm90_report):
    """At the SPEC 4 shapes: <= 13 warp-instructions per row at C = 7, >= 32 resident warps per SM
    for the large-batch kernel, 16-byte loads of the logits, and the H200 first-order prediction
    (max of issue and memory time) >= 70% of copy bandwidth for bf16, >= 50% for the others."""
    shapes = {(tuple(s["shape"]), s["dtype"]): s for s in sm90_report["shapes"]}
    for key in (((2**20, 7), "bfloat16"), ((2**20, 7), "float32"), ((32, 7), "float32")):
        s = shapes[key]
        assert s["spill_bytes"] == 0 and s["warps_per_sm"] >= 32, s
        assert s["instructions_per_row"] <= 13, s
        loads = s["loop"]["global"]
        assert loads.get("LDG.E.EF.128", 0) >= 2 and not any(".U16" in k or ".U8" in k for k in loads), loads
    assert shapes[((2**20, 7), "bfloat16")]["predicted_pct_copy_bw"] >= 70
    assert shapes[((2**20, 7), "float32")]["predicted_pct_copy_bw"] >= 50
    wide = shapes[((4096, 1000), "bfloat16")]
    assert wide["spill_bytes"] == 0 and wide["loop"]["global"].get("LDG.E.EF.128", 0) >= 8, wide
    assert wide["predicted_pct_copy_bw"] >= 50
