"""The static kernel model (bench/kernel_model.py, bench/cubin_stats.py): SASS control flow,
occupancy, the reading of real cubins, spills, the launch descriptions and its JSON.

Machine code for sm_90 is compiled on the CPU in subprocesses without TRITON_INTERPRET (this
process runs the kernels in Triton's interpreter, tests/conftest.py)."""
import json
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from nla_fast.config import NLAConfig
from nla_fast.loss import nla_loss

BENCH = Path(__file__).resolve().parent.parent / "bench"
CSRC = Path(__file__).resolve().parent.parent / "csrc"
sys.path.insert(0, str(BENCH))

import cubin_stats  # noqa: E402
from cubin_stats import readable_name  # noqa: E402
import kernel_model  # noqa: E402
import shared_wavefronts  # noqa: E402

# ----------------------------------------------------------------------------- SASS, by hand
# A kernel as cuobjdump -sass prints it: a prologue, a loop whose body has an if / else (the
# else arm longer), whose latch nvcc placed out of line and which it leaves sm_80 style with a
# predicated CALL.REL.NOINC, an EXIT, then a slow-path subroutine (CALL / RET) and the trap.
_LISTING = """
	code for sm_80
		Function : _Z6kernelPf
	.headerflags	@"EF_CUDA_TEXMODE_UNIFIED EF_CUDA_64BIT_ADDRESS EF_CUDA_SM80 EF_CUDA_VIRTUAL_SM(EF_CUDA_SM80)"
        /*0000*/                   MOV R1, c[0x0][0x28] ;                     /* 0x00000a0000017a02 */
                                                                                 /* 0x000fe40000000f00 */
        /*0010*/                   S2R R0, SR_TID.X ;                         /* 0x0000000000007919 */
        /*0020*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x168], PT ;
        /*0030*/               @P0 EXIT ;
        /*0040*/                   LDG.E.U16 R2, [R4.64] ;
        /*0050*/                   LDG.E.128.CONSTANT R8, [R6.64] ;
        /*0060*/                   ISETP.NE.AND P1, PT, R2, RZ, PT ;
        /*0070*/               @P1 BRA 0xa0 ;
        /*0080*/                   MUFU.EX2 R3, R2 ;
        /*0090*/                   BRA 0xe0 ;
        /*00a0*/                   DADD R10, R8, R8 ;
        /*00b0*/                   DMUL R10, R10, R8 ;
        /*00c0*/                   CALL.REL.NOINC 0x1a0 ;
        /*00d0*/                   STL [R1], R10 ;
        /*00e0*/                   STG.E.128 [R4.64], R8 ;
        /*00f0*/                   IADD3 R0, R0, 0x20, RZ ;
        /*0100*/                   ISETP.GE.AND P0, PT, R0, c[0x0][0x168], PT ;
        /*0110*/               @P0 CALL.REL.NOINC 0x170 ;
        /*0120*/                   BRA 0x150 ;
        /*0130*/                   NOP ;
        /*0140*/                   NOP ;
        /*0150*/                   LDL.64 R12, [R1] ;
        /*0160*/                   BRA 0x40 ;
        /*0170*/                   BAR.SYNC.DEFER_BLOCKING 0x0 ;
        /*0180*/                   STG.E [R4.64], R3 ;
        /*0190*/                   EXIT ;
        /*01a0*/                   MUFU.RCP R14, R10 ;
        /*01b0*/                   RET.REL.NODEC R20 0x0 ;
        /*01c0*/                   BRA 0x1c0;
		..........
"""
_USAGE = """
Resource usage:
 Common:
  GLOBAL:0
 Function _Z6kernelPf:
  REG:40 STACK:8 SHARED:128 LOCAL:0 CONSTANT[0]:368 TEXTURE:0 SURFACE:0 SAMPLER:0
"""


def test_sass_listing_parsed_into_loops_paths_and_classes():
    functions = cubin_stats.parse_sass(_LISTING)
    assert list(functions) == ["_Z6kernelPf"]
    code = cubin_stats.KernelCode("_Z6kernelPf", 80, cubin_stats.parse_resource_usage(_USAGE)["_Z6kernelPf"],
                                  functions["_Z6kernelPf"])
    assert (code.registers, code.usage["STACK"], code.usage["SHARED"]) == (40, 8, 128)
    assert (code.spill_store_bytes, code.spill_load_bytes) == (4, 8)  # STL (4 bytes), LDL.64 (8)
    flow = code.flow
    [loop] = flow.loops  # the out-of-line latch (0x150-0x160) belongs to it, the subroutine does not
    addresses = [ins.address for ins in loop.instructions]
    assert addresses == [a for a in range(0x40, 0x130, 0x10)] + [0x150, 0x160]
    assert flow.loop_instructions(loop) == 17  # both arms of the if / else
    assert flow.shortest_path(within=loop) == 17 - 4  # the MUFU arm, not the DADD/DMUL/CALL/STL one
    assert flow.loop_instructions_min(loop) == 17 - 4
    assert flow.shortest_path() == 4  # entry to the predicated EXIT
    mix = cubin_stats.instruction_mix(loop.instructions)
    assert mix["mufu"] == 1 and mix["fp64"] == 2 and mix["calls"] == 2 and mix["bar"] == 0
    assert mix["load_opcodes"] == {"LDG.E.U16": 1, "LDG.E.128.CONSTANT": 1}
    assert mix["max_global_load_bytes"] == 16 and mix["max_global_store_bytes"] == 16


_NESTED = """
		Function : nested
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0020*/                   MOV R2, RZ ;
        /*0030*/                   IADD3 R2, R2, 0x1, RZ ;
        /*0040*/                   MUFU.EX2 R3, R2 ;
        /*0050*/                   ISETP.GE.AND P1, PT, R2, 0x4, PT ;
        /*0060*/              @!P1 BRA 0x30 ;
        /*0070*/                   ISETP.GE.AND P0, PT, R0, 0x8, PT ;
        /*0080*/              @!P0 BRA 0x10 ;
        /*0090*/                   EXIT ;
        /*00a0*/                   BRA 0xa0;
"""


def test_nested_loops_count_the_inner_body_per_trip():
    flow = cubin_stats.ControlFlow(cubin_stats.parse_sass(_NESTED)["nested"])
    [outer] = flow.loops
    [inner] = outer.children
    assert (len(outer), len(inner), flow.main_loop() is outer) == (8, 4, True)
    assert flow.loop_instructions(outer, trips=lambda loop: 4) == 4 + 4 * 4
    assert flow.loop_instructions_min(outer, trips=lambda loop: 4) == 4 + 4 * 4  # branch-free bodies
    assert flow.loop_instructions(outer, lambda loop: 4, lambda ins: int(ins.base == "MUFU")) == 4


def test_longest_path_takes_the_costlier_arm_of_each_branch():
    flow = cubin_stats.ControlFlow(cubin_stats.parse_sass(_LISTING)["_Z6kernelPf"])
    [loop] = flow.loops
    assert flow.longest_path(within=loop) == 17 - 2  # the DADD/DMUL/CALL/STL arm, not the MUFU one
    # entry (4), the loop body once along its costlier arm (12 of 0x40-0x110), its exit (3)
    assert flow.longest_path() == 4 + 12 + 3 and flow.shortest_path() == 4
    outside = set(loop.instructions)
    assert flow.longest_path(weight=lambda ins: 0 if ins in outside else 1) == 4 + 3


def test_a_partial_tile_outside_the_main_loop_is_counted_along_its_costliest_path():
    functions = cubin_stats.parse_sass(_LISTING)
    code = cubin_stats.KernelCode("_Z6kernelPf", 80, cubin_stats.parse_resource_usage(_USAGE)["_Z6kernelPf"],
                                  functions["_Z6kernelPf"])
    # 3 full iterations of 2 warps; then one block's 2 warps also run the code after the loop (3 more)
    facts = kernel_model.analyse(code, 64, 2, 0, warp_iterations=3 * 2, rows_per_warp_iteration=32, tail_warps=2)
    assert (facts["instructions_outside_loop"], facts["tail_instructions"]) == (4, 3)
    assert facts["warp_instructions"] == 2 * 2 * 4 + 2 * 3 + 6 * 17
    assert facts["instructions_per_row"] == 17 / 32  # the main loop's rows
    tail_only = kernel_model.analyse(code, 64, 1, 0, warp_iterations=0, rows_per_warp_iteration=32, tail_warps=2)
    assert tail_only["warp_instructions"] == 2 * 4 + 2 * 3
    assert tail_only["instructions_per_row"] == 3 / 32 and tail_only["per_row"]["global_stores"] == 1 / 32
    assert kernel_model.analyse(code, 64, 1, 0, 0, 32)["warp_instructions"] == 2 * 4  # no tail: the cheapest path


_TWO_LOOPS = """
		Function : copy
        /*0000*/                   MOV R1, R2 ;
        /*0010*/                   LDG.E.EF.128 R4, desc[UR4][R2.64] ;
        /*0020*/                   FADD R1, R1, R4 ;
        /*0030*/               @P0 BRA 0x20 ;
        /*0040*/                   NOP ;
        /*0050*/              @!P1 BRA 0x10 ;
        /*0060*/                   EXIT ;
"""


def test_main_loop_is_the_outermost_loop_with_its_nested_one():
    flow = cubin_stats.ControlFlow(cubin_stats.parse_sass(_TWO_LOOPS)["copy"])
    main = flow.main_loop()
    assert [ins.address for ins in main.instructions] == [0x10, 0x20, 0x30, 0x40, 0x50]
    assert [[ins.address for ins in c.instructions] for c in main.children] == [[0x20, 0x30]]
    assert cubin_stats.instruction_mix(main.instructions)["load_opcodes"] == {"LDG.E.EF.128": 1}
    assert flow.loop_instructions(main, trips=lambda loop: 3) == 3 + 3 * 2


_DIVERGENCE_FALLBACK = """
		Function : reduce
        /*0000*/                   MOV R0, RZ ;
        /*0010*/                   IADD3 R0, R0, 0x1, RZ ;
        /*0020*/                   BRA.DIV UR4, 0x90 ;
        /*0030*/                   SHFL.BFLY PT, R2, R0, 0x10, 0x1f ;
        /*0040*/                   FADD R0, R0, R2 ;
        /*0050*/                   ISETP.GE.AND P0, PT, R0, 0x8, PT ;
        /*0060*/              @!P0 BRA 0x10 ;
        /*0070*/                   EXIT ;
        /*0080*/                   BRA 0x80;
        /*0090*/                   WARPSYNC.ALL ;
        /*00a0*/                   SHFL.BFLY PT, R2, R0, 0x10, 0x1f ;
        /*00b0*/                   MOV R3, R2 ;
        /*00c0*/                   BRA 0x40 ;
"""


def test_a_divergent_warp_fallback_is_on_no_path():
    """BRA.DIV goes to the fallback of a shuffle for a divergent warp: the converged path (its
    fall-through) is the loop; the fallback, out of line after the EXIT, is counted nowhere."""
    flow = cubin_stats.ControlFlow(cubin_stats.parse_sass(_DIVERGENCE_FALLBACK)["reduce"])
    [loop] = flow.loops
    assert [ins.address for ins in loop.instructions] == [0x10, 0x20, 0x30, 0x40, 0x50, 0x60]
    assert flow.loop_instructions(loop) == flow.loop_instructions_min(loop) == 6
    assert cubin_stats.instruction_mix(loop.instructions)["shfl"] == 1
    assert flow.shortest_path() == flow.longest_path() == 1 + 6 + 1


def test_warp_kernels_sweep_loops_are_counted_per_row():
    """A warp kernel's row: each sweep a loop of floor(C / (32 N)) iterations, N the columns a lane
    takes per iteration (cuda_lane_columns, as the launch program reports it)."""
    launch = dict(label="warp", block=[128, 1, 1], grid=[1024, 1, 1])
    work = kernel_model.extension_work(launch, dict(lane_columns=16), None, 4096, 1000, "bfloat16", "official", True)
    assert (work.warp_iterations, work.rows_per_warp_iteration, work.trips(None)) == (4096, 1.0, 1)
    assert work.moved == kernel_model.spec_bytes(4096, 1000, "bfloat16") + 4 * 1024
    chunked = dict(label="warp_chunked", block=[128, 1, 1], grid=[16, 1, 1])
    assert kernel_model.extension_work(chunked, dict(lane_columns=4), None, 64, 5000, "float32", "jsd",
                                       True).trips(None) == 5000 // 128


_FIXED_BF16 = ("_ZN8nla_fast49_GLOBAL__N__78aae3b1_16_nla_loss_cuda_cu_a34c50da21nla_tile_fixed_kernelI13__nv_bfloat16"
               "Li7ELNS_11ConsistencyE1ELb1EEEvNS0_6ParamsIT_fEE")


def test_mangled_template_names_read_like_cxxfilt():
    assert readable_name(_FIXED_BF16) == "nla_tile_fixed_kernel<__nv_bfloat16, 7, (nla_fast::Consistency)1, true>"
    assert readable_name("_ZN8nla_fast49_GLOBAL__N__78aae3b1_16_nla_loss_cuda_cu_a34c50da15nla_warp_kernelIfLi32ELNS_"
                         "11ConsistencyE2EEEvNS0_6ParamsIT_fEE") == "nla_warp_kernel<float, 32, (nla_fast::Consistency)2>"
    assert readable_name("_ZN8nla_fast49_GLOBAL__N__78aae3b1_16_nla_loss_cuda_cu_a34c50da16nla_scale_kernelI13__nv_"
                         "bfloat16ffEEvPKT1_PKT_S8_PS6_S9_llb") == "nla_scale_kernel<__nv_bfloat16, float, float>"
    assert readable_name("_ZN8nla_fast49_GLOBAL__N__78aae3b1_16_nla_loss_cuda_cu_a34c50da20nla_final_sum_kernelIdEEvPKT_"
                         "iPS2_") == "nla_final_sum_kernel<double>"
    assert readable_name("_Z3fooILin5ELb0EEvv") == "foo<-5, false>"
    assert readable_name("_nla_fwd_kernel") == "_nla_fwd_kernel" and readable_name("_Z1kPf") == "_Z1kPf"


def test_stable_names_drop_the_anonymous_namespace_hash_only():
    other_build = _FIXED_BF16.replace("78aae3b1", "265abbe9")
    assert cubin_stats.stable_name(other_build) == cubin_stats.stable_name(_FIXED_BF16) != _FIXED_BF16
    assert cubin_stats.stable_name(_FIXED_BF16).startswith("_ZN8nla_fast12_GLOBAL__N_121nla_tile_fixed_kernel")
    assert readable_name(cubin_stats.stable_name(_FIXED_BF16)) == readable_name(_FIXED_BF16)
    assert cubin_stats.stable_name(_FIXED_BF16.replace("Li7E", "Li8E")) != cubin_stats.stable_name(_FIXED_BF16)
    assert cubin_stats.stable_name("_nla_fwd_kernel") == "_nla_fwd_kernel"


_PTXAS = """ptxas info    : 0 bytes gmem
ptxas info    : Compiling entry function '_Z1kPf' for 'sm_90'
ptxas info    : Function properties for _Z1kPf
    48 bytes stack frame, 80 bytes spill stores, 84 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 736 bytes cmem[0]
ptxas info    : Compile time = 7.595 ms
ptxas info    : Compiling entry function '_Z1gPf' for 'sm_90'
ptxas info    : Function properties for _Z1gPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 40 registers, used 0 barriers, 360 bytes cmem[0]
"""


def test_ptxas_report_parser_sees_spills():
    stats = cubin_stats.parse_ptxas_report(_PTXAS)
    assert stats == {"_Z1kPf": dict(registers=128, stack=48, spill_stores=80, spill_loads=84),
                     "_Z1gPf": dict(registers=40, stack=0, spill_stores=0, spill_loads=0)}


@pytest.mark.parametrize("arch,regs,threads,smem,dynamic,warps,limiter", [
    (90, 107, 512, 1024, 8192, 16, "registers"),  # the Triton forward: 128 registers a thread allocated
    (90, 98, 256, 1152, 29184, 16, "registers"),  # 104 x 32 per warp: 4 warps per scheduler
    (90, 24, 128, 1024, 0, 64, "warps"),
    (90, 32, 256, 1024, 100 * 1024, 16, "shared memory"),  # 2 blocks of 101 KB in 228 KB
    (80, 32, 256, 0, 100 * 1024, 8, "shared memory"),  # 1 block of 101 KB in 164 KB
    (90, 16, 32, 1024, 0, 32, "blocks"),
])
def test_occupancy_follows_the_cuda_occupancy_rules(arch, regs, threads, smem, dynamic, warps, limiter):
    occ = cubin_stats.occupancy(arch, regs, threads, smem, dynamic)
    assert (occ["warps_per_sm"], occ["limiter"]) == (warps, limiter)


def _facts(**kw):
    base = dict(threads=512, grid=264, blocks_per_sm=1, warp_instructions=27.0e6)
    return {**base, **kw}


def test_prediction_is_the_largest_of_issue_memory_l1_and_launch():
    h200 = kernel_model.device_for(90)
    # 16 resident warps: issue stretched 2x; 2 blocks per SM run one after the other
    p = kernel_model.predict(_facts(), 67e6, h200)
    per_sm = 27.0e6 / 264 * 2
    assert p["issue_us"] == pytest.approx(per_sm / (4 * 0.5 * 1.98e3))
    assert p["memory_us"] == pytest.approx(67e6 / 4251e3)
    assert p["bound"] == "issue" and p["predicted_us"] == p["issue_us"]
    # enough warps and few instructions: memory-bound
    p = kernel_model.predict(_facts(threads=1024, blocks_per_sm=2, warp_instructions=1e6), 67e6, h200)
    assert p["bound"] == "memory" and p["predicted_us"] == pytest.approx(67e6 / 4251e3)
    # MUFU-heavy: a warp's MUFU takes 2 clocks of the SM's 16 lanes, more than 4 instructions' issue
    p = kernel_model.predict(_facts(threads=1024, blocks_per_sm=2, warp_instructions=27.0e6, warp_mufu=20.0e6),
                             67e6, h200)
    assert p["issue_us"] == pytest.approx(20.0e6 / 264 * 2 * 2 / 1.98e3)
    p = kernel_model.predict(_facts(grid=1, warp_instructions=100), 64, h200)
    assert p["bound"] == "launch" and p["predicted_us"] == kernel_model.LAUNCH_FLOOR_US
    assert kernel_model.predict(_facts(blocks_per_sm=0), 64, h200)["bound"] == "cannot launch"
    # the L1 / shared pipe, where its wavefronts are known: one a clock on the busiest SM
    facts = _facts(threads=1024, blocks_per_sm=2, warp_instructions=1e6)
    p = kernel_model.predict(facts, 67e6, h200, l1_wavefronts=132 * 60e3)
    assert p["bound"] == "l1" and p["l1_us"] == pytest.approx(60e3 * math.ceil(facts["grid"] / 132)
                                                             / facts["grid"] * 132 / 1.98e3)
    assert kernel_model.predict(facts, 67e6, h200)["l1_us"] is None


def _row(**kw):
    row = dict(backend="triton", kernel="forward", config="c", role="heuristic", shape=[2**20, 7],
               dtype="bfloat16", arch=90, device="NVIDIA H200", main_kernel=True, registers=64, spill_bytes=0,
               warps_per_sm=32, instructions_per_row=12.0, loop_max_load_bytes=16, predicted_us=20.0,
               predicted_pct_copy_bw=75.0)
    return {**row, **kw}


def test_check_lists_each_missed_target_and_nothing_else():
    good = [_row(), _row(kernel="total", main_kernel=False), _row(kernel="scale_grads", main_kernel=False),
            _row(shape=[32, 7], instructions_per_row=20.1, warps_per_sm=8, loop_max_load_bytes=2),  # small batch
            _row(kernel="total", main_kernel=False, role="autotune", predicted_pct_copy_bw=30.0),  # a candidate
            _row(kernel="total", main_kernel=False, shape=[4096, 1000], predicted_pct_copy_bw=50.0),
            _row(arch=80, device="NVIDIA A100-SXM4-80GB", warps_per_sm=8)]
    inst = [dict(name="nla_warp_kernel<double, 32, (nla_fast::Consistency)1>", arch=90, spill_bytes=6000,
                 fp64_instantiation=True)]
    assert kernel_model.check(dict(rows=good, extension_instantiations=inst)) == []
    bad = [_row(instructions_per_row=25.4, warps_per_sm=16, spill_bytes=32, loop_max_load_bytes=2),
           _row(kernel="total", main_kernel=False, predicted_pct_copy_bw=27.5),
           _row(kernel="total", main_kernel=False, backend="extension", role="cuda_launch_plan", config="WarpRow",
                shape=[4096, 1000], predicted_pct_copy_bw=39.3),
           _row(kernel="final_sum", main_kernel=False, spill_bytes=0, ptxas=dict(spill_stores=8, spill_loads=8))]
    inst.append(dict(name="nla_warp_kernel<float, 8, (nla_fast::Consistency)1>", arch=90, spill_bytes=32,
                     fp64_instantiation=False))
    failures = kernel_model.check(dict(rows=bad, extension_instantiations=inst))
    assert len(failures) == 8, failures
    for words in ("27.5% of H200 copy bandwidth at (2^20, 7) bfloat16 sm_90 (target >= 70%)",
                  "extension WarpRow: 39.3% of H200 copy bandwidth at (4096, 1000) bfloat16 sm_90 (target >= 50%)",
                  "25.4 warp-instructions per row", "16 resident warps", "global loads of 2 bytes at most",
                  "forward c (1048576, 7) bfloat16 sm_90: 32 spill bytes", "final_sum c (1048576, 7) bfloat16 sm_90: "
                  "16 spill bytes", "nla_warp_kernel<float, 8, (nla_fast::Consistency)1> (sm_90): 32 spill bytes"):
        assert sum(words in f for f in failures) == 1, (words, failures)
    # sm_80 is judged alike, against the A100's bandwidth, when asked
    a100 = [_row(kernel="total", main_kernel=False, arch=80, device="NVIDIA A100-SXM4-80GB", predicted_pct_copy_bw=60.0)]
    assert kernel_model.check(dict(rows=a100, extension_instantiations=[]), 80) == [
        "triton c: 60.0% of A100-SXM4-80GB copy bandwidth at (2^20, 7) bfloat16 sm_80 (target >= 70%)"]
    assert kernel_model.check(dict(rows=a100, extension_instantiations=[])) == []


def test_l1_is_counted_only_where_the_replay_is_the_machine_code():
    """The L1 term comes from shared_wavefronts' replay, and only for a main loop whose
    shared-memory opcodes are the replay's: other machine code gets no L1 bound (None)."""
    ext_ops = dict(shared_wavefronts.extension_shared_instructions(7, 2))
    plan = dict(kernel="TileFixed")
    per_tile = sum(shared_wavefronts.extension_tile_accesses(7, 2).values())
    assert kernel_model.extension_l1_wavefronts(dict(loop_shared_opcodes=ext_ops), plan, 2**20, 7, "bfloat16",
                                                True) == per_tile * 2**20 / 128
    for facts, plan_, grad in ((dict(loop_shared_opcodes={**ext_ops, "STS.U16": 7}), plan, True),
                               (dict(loop_shared_opcodes=ext_ops), dict(kernel="WarpRow"), True),
                               (dict(loop_shared_opcodes=ext_ops), plan, False)):
        assert kernel_model.extension_l1_wavefronts(facts, plan_, 2**20, 7, "bfloat16", grad) is None
    constexprs = dict(C=7, BLOCK_C=8, BLOCK_B=1024, FLAT_ROWS=True, HAS_FLIP=True, GRAD_Z=True, GRAD_ZF=True)
    launch = dict(name="forward", constexprs=constexprs)
    v38 = dict(shared_wavefronts.shared_instructions(7, 2, True, 8))
    per_warp = sum(shared_wavefronts.call_accesses(7, 2, 1024, True, 8).values())
    assert kernel_model.triton_l1_wavefronts(launch, dict(loop_shared_opcodes=v38), 2**20, "bfloat16") \
        == per_warp * 2**20 / 32
    assert kernel_model.triton_l1_wavefronts(launch, dict(loop_shared_opcodes={"LDS.U16": 31, "STS.64": 8}),
                                             2**20, "bfloat16") is None  # row-major: not this kernel
    strided = dict(launch, constexprs=dict(constexprs, FLAT_ROWS=False))
    assert kernel_model.triton_l1_wavefronts(strided, dict(loop_shared_opcodes=v38), 2**20, "bfloat16") is None


def test_a_spilling_tuning_candidate_is_dropped_not_missed():
    """The tuner drops a candidate that spills (launch.time_candidate), so no target judges it;
    a heuristic config that spills is a miss (it is launched untuned)."""
    candidate = [_row(role="autotune", config="bb512_w16", spill_bytes=8, instructions_per_row=25.0),
                 _row(role="autotune", config="bb512_w16", kernel="total", main_kernel=False, spill_bytes=8,
                      predicted_pct_copy_bw=10.0)]
    result = dict(rows=[_row(), *candidate], extension_instantiations=[])
    assert kernel_model.check(result) == []
    assert kernel_model.dropped_candidates(result) == candidate
    heuristic = [dict(r, role="heuristic") for r in candidate]
    failures = kernel_model.check(dict(rows=heuristic, extension_instantiations=[]))
    assert any("8 spill bytes" in f for f in failures) and any("25.0 warp-instructions" in f for f in failures)


# ----------------------------------------------------------------------------- the extension's launches
@pytest.mark.slow
def test_extension_launches_are_the_ones_its_code_picks(stable_kernel_model_cache):
    """The launches come from the extension's own host code (cuda_launch_plan and the launchers
    of nla_loss_cuda.cu, run against a recording runtime): the instantiation follows the dtype,
    width, consistency term and gradients; the loss sum and the backward's scale follow the grid."""
    def call(*args, **kw):
        launches = kernel_model.extension_call(*args, **kw)["launches"]
        return [(l["name"], l["grid"][0], l["block"][0], l["shared_dynamic"]) for l in launches]

    big = kernel_model.extension_call(2**20, 7, "bfloat16")
    assert big["plan"] == dict(kernel="TileFixed", width=7, threads=128, rows_per_block=128, smem_bytes=0, grid=4096)
    assert [l["label"] for l in big["launches"]] == ["tile_fixed", "final_sum", "scale"]
    assert call(2**20, 7, "bfloat16") == [
        ("nla_tile_fixed_kernel<__nv_bfloat16, 7, (nla_fast::Consistency)1, true>", 4096, 128, 0),
        ("nla_final_sum_kernel<float>", 1, 256, 0), ("nla_scale_kernel<__nv_bfloat16, float, float>", 1024, 256, 0)]
    assert call(32, 7, "float32") == [  # one block writes the loss itself: no final sum
        ("nla_tile_fixed_kernel<float, 7, (nla_fast::Consistency)1, true>", 1, 128, 0),
        ("nla_scale_kernel<float, float, float>", 2, 256, 0)]
    assert call(4096, 1000, "bfloat16")[0] == ("nla_warp_kernel<__nv_bfloat16, 32, (nla_fast::Consistency)1>",
                                               1024, 128, 0)
    assert call(2**20, 8, "float16", "jsd", grad=False) == [  # forward only: no scale launch
        ("nla_tile_fixed_kernel<__half, 8, (nla_fast::Consistency)2, false>", 4096, 128, 0),
        ("nla_final_sum_kernel<float>", 1, 256, 0)]
    assert call(300, 7, "float32", "none") == [  # the weights-only op: no loss, no partial sums
        ("nla_tile_fixed_kernel<float, 7, (nla_fast::Consistency)0, false>", 3, 128, 0)]
    generic = kernel_model.extension_call(1000, 7, "float64")
    assert call(1000, 7, "float64")[0] == ("nla_tile_generic_kernel<double>", 8, 128, generic["plan"]["smem_bytes"])
    assert generic["plan"]["smem_bytes"] > 0
    assert call(64, 5000, "float32")[0] == ("nla_warp_chunked_kernel<float>", 16, 128, 0)


# ----------------------------------------------------------------------------- describe_launches
class _Recorder:
    """Stands in for a kernel: records each launch, then runs the real one."""

    def __init__(self, kernel, log):
        self.kernel, self.log = kernel, log

    def __getattr__(self, name):
        return getattr(self.kernel, name)

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.log.append((self.kernel, grid, args, kwargs))
            return self.kernel[grid](*args, **kwargs)
        return launch


def _triton_types(kernel, args, kwargs):
    """(signature, constexprs, divisible-by-16 argument indices) as Triton's own launcher
    specialises these arguments for an sm_90 target."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import make_backend
    from triton.runtime.jit import create_function_from_signature

    jit = triton.runtime.jit.JITFunction(kernel.fn)
    binder = create_function_from_signature(jit.signature, jit.params, make_backend(GPUTarget("cuda", 90, 32)))
    options = {k: v for k, v in kwargs.items() if k in ("num_warps", "num_stages", "maxnreg")}
    _, specialization, _ = binder(*args, **{k: v for k, v in kwargs.items() if k not in options})
    signature = {p.name: s[0] for p, s in zip(jit.params, specialization)}
    constexprs = {p.name: s[1] for p, s in zip(jit.params, specialization) if s[0] == "constexpr"}
    divisible = {(i,) for i, s in enumerate(specialization) if s[0] != "constexpr" and s[1] and "D" in s[1]}
    return signature, constexprs, divisible


@pytest.mark.parametrize("batch,classes,dtype_flip,grad_zf,contiguous,weights,eps_tensor", [
    (32, 7, torch.float32, True, True, False, False),  # the trainer's batch: one program, then the scale launch
    (3000, 7, torch.float32, True, True, True, True),  # the persistent grid (4 programs here), partial sums
    (600, 5, torch.float64, False, False, False, False),  # transposed logits, float64 flip without a gradient
    (300, 100, torch.float32, True, True, True, False),  # the wide kernel, a persistent grid of tiles
    (40, 1000, torch.float32, False, False, False, True),  # the wide kernel, a small batch, transposed logits
])
def test_describe_launches_is_what_a_call_launches(monkeypatch, batch, classes, dtype_flip, grad_zf, contiguous,
                                                   weights, eps_tensor):
    from nla_fast.kernels import launch as module

    log = []
    for name in ("_nla_fwd_kernel", "_nla_wide_kernel", "_sum_partials_kernel", "_scale_grads_kernel"):
        monkeypatch.setattr(module, name, _Recorder(getattr(module, name), log))
    monkeypatch.setattr(module, "_plans", {})
    monkeypatch.setattr(module, "_scale_plans", {})
    g = torch.Generator().manual_seed(3)
    z = torch.randn(batch, classes, generator=g) if contiguous else torch.randn(classes, batch, generator=g).t()
    zf = (torch.randn(batch, classes, generator=g) if contiguous else torch.randn(classes, batch, generator=g).t())
    zf = zf.to(dtype_flip)
    y = torch.randint(0, classes, (batch,), generator=g)
    z.requires_grad_(True)
    zf.requires_grad_(grad_zf)
    eps = torch.tensor(0.4) if eps_tensor else 0.4
    loss = nla_loss(z, zf, y, eps, NLAConfig(), backend="triton", return_weights=weights)
    (loss[0] if weights else loss).backward()

    described = module.describe_launches(batch, classes, torch.float32, dtype_flip, grad_z=True, grad_zf=grad_zf,
                                         weights=weights, contiguous=contiguous,
                                         eps_dtype=torch.float32 if eps_tensor else None)
    assert len(described) == len(log), ([d["name"] for d in described], [k.fn.__name__ for k, *_ in log])
    for want, (kernel, grid, args, kwargs) in zip(described, log):
        assert want["kernel"].fn is kernel.fn
        assert tuple(want["grid"]) == tuple(grid)
        assert want["num_warps"] == kwargs.get("num_warps") and want["num_stages"] == kwargs.get("num_stages")
        assert want["maxnreg"] == kwargs.get("maxnreg")
        signature, constexprs, divisible = _triton_types(kernel, args, kwargs)
        assert want["signature"] == signature
        assert want["constexprs"] == constexprs
        assert set(want["attrs"]) == divisible
        assert all(v == [["tt.divisibility", 16]] for v in want["attrs"].values())
    assert described[-1]["phase"] == "backward" and described[-1]["name"] == "scale_grads"


def test_describe_launches_lists_every_autotune_candidate_and_the_heuristic():
    from nla_fast.kernels import launch as module

    launches = module.describe_launches(2**20, 7, torch.bfloat16, sm_count=132, warps_per_sm=32, fast_math=True)
    forward, partials = launches[0], launches[1]
    heuristic = module.fixed_config(2**20, 8, 2)
    assert forward["role"] == "heuristic" and forward["config"] == heuristic.label
    assert forward["maxnreg"] == heuristic.maxnreg and forward["grid"] == (132 * 32 // heuristic.num_warps,)
    expected = [(c.block_b, c.num_warps, c.maxnreg) for c in module.tuning_candidates(8, 2)[1:]]
    expected.append((heuristic.block_b, heuristic.num_warps, heuristic.maxnreg))
    assert [(c["constexprs"]["BLOCK_B"], c["num_warps"], c["maxnreg"]) for c in forward["candidates"]] == expected
    assert [c["config"] for c in partials["candidates"]] == [c["config"] for c in forward["candidates"]]
    for cand, part in zip(forward["candidates"], partials["candidates"]):
        assert part["args"][2] == cand["grid"][0]  # the partial sums of that candidate's grid
    assert module.describe_launches(32, 7, torch.float32, sm_count=132)[0]["candidates"] == []


# ----------------------------------------------------------------------------- real machine code
_KNOWN_KERNELS = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import triton, triton.language as tl
    from triton.backends.compiler import GPUTarget
    import cubin_stats, kernel_model

    @triton.jit
    def exp2_copy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        # grid-stride loop; 512 fp32 per iteration over 4 warps: 4 per thread, one 16-byte load and store
        for start in tl.range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, tl.exp2(tl.load(x_ptr + offs)))

    @triton.jit
    def fp64_axpy(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
        for start in tl.range(tl.program_id(0) * BLOCK, n, tl.num_programs(0) * BLOCK):
            offs = start + tl.arange(0, BLOCK)
            x = tl.load(x_ptr + offs).to(tl.float64)
            tl.store(y_ptr + offs, (x * 3.0 + 1.0).to(tl.float32))

    def read(fn, block, warps, **options):
        sig = {"x_ptr": "*fp32", "y_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"}
        attrs = {(0,): [["tt.divisibility", 16]], (1,): [["tt.divisibility", 16]], (2,): [["tt.divisibility", 16]]}
        src = triton.compiler.ASTSource(fn=fn, signature=sig, constexprs={"BLOCK": block}, attrs=attrs)
        k = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=warps, **options))
        path = kernel_model.cache_dir() / "test" / f"{k.metadata.name}-{k.metadata.hash[:12]}.cubin"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(k.asm["cubin"])
        code = cubin_stats.read_cubin(path)[k.metadata.name]
        n = 2 ** 20
        facts = kernel_model.analyse(code, 32 * warps, 132, k.metadata.shared, n // block * warps, block / warps)
        return dict(facts, cubin=str(path))

    print(json.dumps({
        "exp2": read(exp2_copy, 512, 4),
        "fp64": read(fp64_axpy, 512, 4),
        "squeezed": read(exp2_copy, 8192, 1, maxnreg=32),  # 256 values a thread in 32 registers
    }))
    """
)


def machine_code_script(folder: Path, name: str, text: str):
    """Run ``text`` as a script in a fresh process with the real compiler (no interpreter; its
    Triton cache under ``folder``) and return the JSON of its last line. @triton.jit needs its
    source in a file."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["TRITON_CACHE_DIR"] = str(folder / "cache")
    script = folder / name
    script.write_text(text)
    done = subprocess.run([sys.executable, str(script), str(BENCH)], env=env, capture_output=True, text=True,
                          timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def known_kernels(tmp_path_factory):
    return machine_code_script(tmp_path_factory.mktemp("known_kernels"), "known_kernels.py", _KNOWN_KERNELS)


@pytest.mark.slow
def test_model_reads_a_small_known_kernel(known_kernels):
    k = known_kernels["exp2"]
    assert k["function"] == "exp2_copy" and Path(k["cubin"]).is_file()
    assert k["loop_load_opcodes"] == {"LDG.E.128": 1} or k["loop_load_opcodes"] == {"LDG.E.128.CONSTANT": 1}
    assert k["loop_store_opcodes"] == {"STG.E.128": 1} and k["loop_max_load_bytes"] == 16
    assert k["loop_mufu_by_function"] == {"MUFU.EX2": 4}  # 4 values a thread
    assert k["per_row"]["mufu"] == pytest.approx(4 / 128)  # 128 elements a warp and iteration
    assert k["per_row"]["fp64"] == 0 and k["per_row"]["bar"] == 0 and k["kernel_fp64"] == 0
    assert k["spill_bytes"] == 0 and k["stack_bytes"] == 0
    assert k["registers"] <= 32 and k["warps_per_sm"] == 64  # 16 blocks of 4 warps
    assert 10 <= k["loop_instructions"] <= 40 and k["loop_instructions_min"] == k["loop_instructions"]
    assert k["warp_instructions"] == pytest.approx(132 * 4 * k["instructions_outside_loop"]
                                                   + 2**20 // 512 * 4 * k["loop_instructions"])
    f = known_kernels["fp64"]
    assert f["per_row"]["fp64"] * 128 >= 4  # DMUL + DADD (or a DFMA) on each of 4 values, conversions
    assert f["per_row"]["mufu"] == 0


@pytest.mark.slow
def test_model_reports_the_spill_of_a_squeezed_config(known_kernels):
    k = known_kernels["squeezed"]
    assert k["registers"] <= 32
    assert k["spill_store_bytes"] > 0 and k["spill_load_bytes"] > 0 and k["spill_bytes"] > 0
    assert known_kernels["exp2"]["spill_bytes"] == 0


def _no_nvcc() -> bool:
    from nla_fast import native_build

    return native_build.find_cuda_home() is None and shutil.which("nvcc") is None


_WIDE_KERNEL = textwrap.dedent(
    """
    import json, sys
    sys.path.insert(0, sys.argv[1])
    import kernel_model as km

    out = {}
    for dtype in ("bfloat16", "float32"):
        for arch in (90, 80):
            device = km.device_for(arch)
            label, launches = next(iter(km.triton_configs(4096, 1000, dtype, device).items()))
            parts = []
            for launch in launches:
                path, function, shared = km.compile_triton(launch, arch)
                code = km.cubin_stats.read_cubin(path)[function]
                iterations, rows, trips, moved = km.triton_work(launch, 4096)
                facts = km.analyse(code, 32 * launch["num_warps"], launch["grid"][0], shared, iterations, rows, trips)
                loop = km.cubin_stats.instruction_mix(code.flow.main_loop().instructions)
                parts.append(dict(facts, kernel=launch["name"], block_c=launch["constexprs"].get("BLOCK_C"),
                                  loop_bar=loop["bar"], loop_lds=loop["lds"], **km.predict(facts, moved, device)))
            total_us = sum(p["predicted_us"] for p in parts)
            pct = 100 * km.spec_bytes(4096, 1000, dtype) / (total_us * device.copy_gb_per_s * 1e3)
            out[f"{dtype} sm_{arch}"] = dict(label=label, forward=parts[0], pct=pct)
    print(json.dumps(out))
    """
)


@pytest.mark.slow
def test_wide_kernel_machine_code_at_4096_by_1000(tmp_path):
    """The wide kernel as the model sees it (heuristic config, sm_90 and sm_80, bf16 and fp32):
    one-warp programs under a 64-register cap, no spill, 32 resident warps, no block barrier or
    shared memory in the tile loop, 16-byte loads; the loads and stores the model counts per row
    are exactly each chunk's (both views read twice, both gradients written once), i.e. its
    trips of the chunk loops match the compiled loops; >= 50% of H200 copy bandwidth (SPEC 4)."""
    result = machine_code_script(tmp_path, "wide_kernel.py", _WIDE_KERNEL)
    for case, facts in result.items():
        forward, chunks = facts["forward"], -(-1000 // facts["forward"]["block_c"])
        assert facts["label"] == "bb1_w1_r64" and forward["function"] == "_nla_wide_kernel", case
        assert forward["registers"] <= 64 and forward["spill_bytes"] == 0 and forward["warps_per_sm"] >= 32, case
        assert forward["loop_bar"] == 0 and forward["loop_lds"] == 0 and forward["loop_max_load_bytes"] == 16, case
        assert chunks == (4 if case.startswith("bfloat16") else 8)
        # a row: y and z_y, then 2 views x 2 sweeps x the chunks; 2 gradients x the chunks
        assert forward["per_row"]["global_loads"] == pytest.approx(2 + 4 * chunks), case
        assert forward["per_row"]["global_stores"] == pytest.approx(2 * chunks), case
    assert result["bfloat16 sm_90"]["pct"] >= 50.0


@pytest.mark.slow
def test_extension_cubin_spills_agree_with_ptxas(stable_kernel_model_cache):
    """Every instantiation of csrc/nla_loss_cuda.cu in the sm_90 cubin: the registers and spill
    bytes read from the SASS (STL / LDL) are the ones ptxas reports, and every kernel the
    extension launches at the SPEC 4 shapes (and forward-only, JSD, weights-only) exists in it."""
    if _no_nvcc():
        pytest.skip("no nvcc here to compile csrc/nla_loss_cuda.cu")
    path = kernel_model.extension_cubin(90)
    kernels = kernel_model.kernels_of(path)
    assert path.is_relative_to(kernel_model.cache_dir())
    calls = [(b, c, d, "official", True) for b, c, d in kernel_model.SPEC_SHAPES]
    calls += [(2**20, 7, "bfloat16", "official", False), (2**20, 8, "float32", "jsd", True), (64, 9, "float16", "none",
                                                                                             False)]
    for batch, classes, dtype, consistency, grad in calls:
        for launch in kernel_model.extension_call(batch, classes, dtype, consistency, grad)["launches"]:
            assert cubin_stats.stable_name(launch["function"]) in kernels, launch["name"]
    reported = kernel_model.ptxas_report(path)
    assert set(reported) == set(kernels) and len(kernels) > 40
    for key, code in kernels.items():
        assert (reported[key]["registers"], reported[key]["spill_stores"], reported[key]["spill_loads"]) == \
            (code.registers, code.spill_store_bytes, code.spill_load_bytes), readable_name(code.name)


@pytest.mark.slow
def test_sm90_fp32_bf16_fp16_instantiations_do_not_spill(stable_kernel_model_cache):
    if _no_nvcc():
        pytest.skip("no nvcc here to compile csrc/nla_loss_cuda.cu")
    kernels = kernel_model.extension_instantiations(90)
    assert len(kernels) > 40 and all(k["ptxas"] for k in kernels)
    loss_kernels = [k for k in kernels if not k["fp64_instantiation"]]
    assert "nla_tile_fixed_kernel<__nv_bfloat16, 7, (nla_fast::Consistency)1, true>" in {k["name"] for k in loss_kernels}
    spilling = [(k["name"], k["spill_bytes"], k["ptxas"]) for k in loss_kernels
                if k["spill_bytes"] or k["ptxas"]["spill_stores"] or k["ptxas"]["spill_loads"]]
    assert spilling == []


@pytest.mark.slow
def test_sm90_extension_meets_the_static_targets(stable_kernel_model_cache):
    """What the extension launches at the SPEC 4 shapes, from the real sm_90 build: no spills; at
    C = 7 the fixed-width tile kernel with <= 13 warp-instructions per row, >= 32 resident warps,
    the logits in 16-byte loads (no 1- or 2-byte ones) and a predicted >= 70% (bf16) / >= 50%
    (fp32) of H200 copy bandwidth; at (4096, 1000) the row in 16-byte pieces (predicted share:
    ``--check``, the occupancy and launches it costs are listed there)."""
    if _no_nvcc():
        pytest.skip("no nvcc here to compile csrc/nla_loss_cuda.cu")
    rows = {(tuple(r["shape"]), r["dtype"], r["kernel"]): r
            for b, c, d in kernel_model.SPEC_SHAPES for r in kernel_model.extension_rows(b, c, d, 90)}
    assert all(kernel_model._spilled(r) == 0 for r in rows.values() if r["kernel"] != "total")
    for shape, dtype, pct in (((2**20, 7), "bfloat16", 70), ((2**20, 7), "float32", 50)):
        tile, total = rows[(shape, dtype, "tile_fixed")], rows[(shape, dtype, "total")]
        assert tile["main_kernel"] and tile["function_name"].startswith("nla_tile_fixed_kernel<")
        assert tile["instructions_per_row"] <= 13 and tile["warps_per_sm"] >= 32, tile
        loads = tile["loop_load_opcodes"]
        assert sum(n for op, n in loads.items() if ".128" in op) >= 2, loads
        assert not any(".U16" in op or ".U8" in op or ".S16" in op for op in loads), loads
        assert total["predicted_pct_copy_bw"] >= pct, total
        # the L1 replay's shared-memory instructions are the machine code's; its pipe under DRAM
        element = kernel_model.ELEMENT_BYTES[dtype]
        assert tile["loop_shared_opcodes"] == dict(shared_wavefronts.extension_shared_instructions(7, element))
        assert tile["l1_us"] is not None and tile["l1_us"] < tile["memory_us"], tile
    small = rows[((32, 7), "float32", "tile_fixed")]  # the same instantiation, its partial tile only
    assert small["function_name"] == rows[((2**20, 7), "float32", "tile_fixed")]["function_name"]
    assert small["tail_warps"] == 4 and small["instructions_per_row"] > 0
    wide = rows[((4096, 1000), "bfloat16", "warp")]
    assert sum(n for op, n in wide["loop_load_opcodes"].items() if ".128" in op) >= 8, wide["loop_load_opcodes"]
    assert wide["instructions_per_row"] >= wide["instructions_per_row_min"] > 0


@pytest.mark.slow
def test_sm90_triton_short_rows_meet_the_static_targets(tmp_path):
    """(2^20, 7), issue 18, every config the Triton backend may launch (the heuristic one and each
    autotune candidate), from the sm_90 machine code of this Triton, bf16 and float32 alike: no
    spills, <= 13 warp-instructions per row, >= 32 resident warps, 16-byte loads of the logits in
    the main loop; a predicted >= 70% of H200 copy bandwidth for bf16, >= 50% for float32. Each
    persistent grid is the steady one: the compiled occupancy times the SMs."""
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, str(BENCH / "kernel_model.py"), "--backend", "triton", "--arch", "90",
                           "--shape", "1048576x7:bfloat16", "1048576x7:float32", "--out-dir", str(tmp_path)],
                          env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    rows = json.loads((tmp_path / "kernel_model.json").read_text())["rows"]
    forwards = [r for r in rows if r["kernel"] == "forward"]
    totals = {(r["dtype"], r["config"]): r for r in rows if r["kernel"] == "total"}
    assert {r["role"] for r in forwards} == {"heuristic", "autotune"}
    for r in forwards:
        assert r["spill_bytes"] == 0, r
        block_b = int(r["config"].split("_")[0][2:])  # "bb1024_w32_r64"
        assert r["grid"] == min(2**20 // block_b, r["blocks_per_sm"] * 132), r
        assert r["instructions_per_row"] <= 13 and r["warps_per_sm"] >= 32, r
        # logits in 16-byte vectors, int64 targets in 8 bytes: no narrower load in the main loop
        assert r["loop_max_load_bytes"] == 16, r
        assert all(".128" in op or ".64" in op for op in r["loop_load_opcodes"]), r["loop_load_opcodes"]
        if r["dtype"] == "bfloat16":
            assert totals[("bfloat16", r["config"])]["predicted_pct_copy_bw"] >= 70, r["config"]
        else:
            assert totals[("float32", r["config"])]["predicted_pct_copy_bw"] >= 50, r["config"]
        # the L1 replay (bench/shared_wavefronts.py) has the shared-memory instructions of the
        # machine code (one of the flat-row store widths it knows); with it, the L1 / shared
        # pipe stays under the DRAM floor
        element = kernel_model.ELEMENT_BYTES[r["dtype"]]
        order = shared_wavefronts.columns_first(element)
        assert shared_wavefronts.flat_store_of(r["loop_shared_opcodes"], 7, element, order), r["loop_shared_opcodes"]
        assert r["l1_us"] is not None and r["l1_us"] < r["memory_us"], r


_VARIANTS = textwrap.dedent(
    """
    import itertools, json, sys
    sys.path.insert(0, sys.argv[1])
    import torch
    import kernel_model
    from nla_fast.kernels import launch

    found = {}
    for dtype, jsd, contiguous, grad_zf, weights in itertools.product(
            ("bfloat16", "float32"), (False, True), (True, False), (True, False), (False, True)):
        forward = launch.describe_launches(2**20, 7, getattr(torch, dtype), grad_zf=grad_zf, weights=weights,
                                           contiguous=contiguous, jsd=jsd, sm_count=132, warps_per_sm=32,
                                           fast_math=True)[0]
        path, function, _ = kernel_model.compile_triton(forward, 90)
        code = kernel_model.kernels_of(path)[function]
        found[f"{dtype} jsd={jsd} contiguous={contiguous} grad_zf={grad_zf} weights={weights}"] = dict(
            config=forward["config"], spill_bytes=code.summary()["spill_bytes"], registers=code.registers)
    print(json.dumps(found))
    """
)


@pytest.mark.slow
def test_sm90_short_rows_do_not_spill_in_any_kind_of_call(tmp_path):
    """(2^20, 7), the heuristic config of every kind of call (official / JSD, contiguous /
    strided logits, with or without d/dlogits_flip and the weights), bf16 and float32, sm_90 of
    this Triton: no spill. The official loss on contiguous rows without the weights is the
    64-register config; the other kinds run uncapped (``launch.capped``)."""
    found = machine_code_script(tmp_path, "variants.py", _VARIANTS)
    assert len(found) == 32
    for case, facts in found.items():
        assert facts["spill_bytes"] == 0, (case, facts)
        capped = "jsd=False contiguous=True" in case and "weights=False" in case
        assert facts["config"].endswith("_r64") == capped, (case, facts)


_REQUIRED = ("backend", "kernel", "shape", "dtype", "arch", "registers", "spill_bytes", "warps_per_sm",
             "instructions_per_row", "predicted_us", "predicted_pct_copy_bw")


@pytest.mark.slow
def test_bench_writes_json_with_the_required_fields_and_check_exits_on_misses(tmp_path):
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    done = subprocess.run([sys.executable, str(BENCH / "kernel_model.py"), "--backend", "triton", "--arch", "90",
                           "--shape", "32x7:float32", "--out-dir", str(tmp_path / "out"), "--check"],
                          env=env, capture_output=True, text=True, timeout=600)
    data = json.loads((tmp_path / "out" / "kernel_model.json").read_text())
    assert done.returncode == (1 if data["check"] else 0), done.stderr[-2000:]
    assert [line.strip() for line in done.stdout.splitlines() if "MISSED" in line] == \
        [f"MISSED {line}" for line in data["check"]]
    assert data["versions"]["torch"] and data["versions"]["triton"] and data["date"]
    assert {d["name"] for d in data["devices"]} == {"NVIDIA H200"}
    rows = data["rows"]
    assert [r["kernel"] for r in rows] == ["forward", "scale_grads", "total"]
    for row in rows:
        assert all(key in row for key in _REQUIRED), row
        assert row["shape"] == [32, 7] and row["dtype"] == "float32" and row["arch"] == 90
    forward, scale, total = rows
    assert forward["instructions_per_row"] > 0 and forward["registers"] > 0
    assert total["predicted_us"] == pytest.approx(forward["predicted_us"] + scale["predicted_us"])
    assert total["bytes"] == kernel_model.spec_bytes(32, 7, "float32")
    for row in (forward, scale):  # every cubin it built is left in TRITON_CACHE_DIR
        assert Path(row["cubin"]).is_file() and Path(row["cubin"]).is_relative_to(tmp_path / "cache")
    assert "forward" in done.stdout and "total" in done.stdout


@pytest.mark.slow
def test_bench_models_the_extension_call_and_lists_its_instantiations(tmp_path, stable_kernel_model_cache):
    if _no_nvcc():
        pytest.skip("no nvcc here to compile csrc/nla_loss_cuda.cu")
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "OUT")}
    done = subprocess.run([sys.executable, str(BENCH / "kernel_model.py"), "--backend", "extension", "--arch", "90",
                           "--shape", "1048576x7:bfloat16", "--out-dir", str(tmp_path), "--instantiations"],
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    data = json.loads((tmp_path / "kernel_model.json").read_text())
    tile, final_sum, scale, total = data["rows"]
    assert [r["kernel"] for r in data["rows"]] == ["tile_fixed", "final_sum", "scale", "total"]
    assert all(key in r for r in data["rows"] for key in _REQUIRED)
    assert tile["plan"]["grid"] == tile["grid"] == 4096 and final_sum["plan"] is None
    assert (tile["threads"], tile["blocks_per_sm"], final_sum["grid"], scale["grid"]) == (128, 8, 1, 1024)
    # 2^20 rows: 8192 full tiles of 128 rows over 4096 blocks, no partial tile; the scale reads grad_output only
    assert tile["tail_warps"] == 0 and scale["bytes"] == 4 * 1024
    assert tile["bytes"] == kernel_model.spec_bytes(2**20, 7, "bfloat16") + 4 * 4096
    assert total["predicted_us"] == pytest.approx(sum(r["predicted_us"] for r in (tile, final_sum, scale)))
    assert data["extension_instantiations"] and all(k["arch"] == 90 for k in data["extension_instantiations"])
    assert "nla_tile_fixed_kernel<__nv_bfloat16, 7, (nla_fast::Consistency)1, true>" in done.stdout
    assert [line.strip() for line in done.stdout.splitlines() if "MISSED" in line] == \
        [f"MISSED {line}" for line in data["check"]]


@pytest.mark.slow
def test_sm90_wide_rows_meet_the_static_targets(stable_kernel_model_cache):
    """(4096, 1000) bf16, issue 18: the piece kernel at 32 resident warps without spills, its two
    sweeps 16-byte loads counted per row (N = 16 columns a lane per iteration: two 8-column pieces),
    a predicted >= 50% of H200 copy bandwidth for the whole fwd + bwd call."""
    if _no_nvcc():
        pytest.skip("no nvcc here to compile csrc/nla_loss_cuda.cu")
    assert kernel_model.extension_call(4096, 1000, "bfloat16")["lane_columns"] == 16
    assert kernel_model.extension_call(4096, 1000, "bfloat16", "jsd")["lane_columns"] == 8  # a piece a step
    assert kernel_model.extension_call(64, 5000, "float32")["lane_columns"] == 4  # the element kernel's group
    assert kernel_model.extension_call(2**20, 7, "bfloat16")["lane_columns"] == 0  # a tile kernel
    rows = {r["kernel"]: r for r in kernel_model.extension_rows(4096, 1000, "bfloat16", 90)}
    warp, total = rows["warp"], rows["total"]
    assert warp["function_name"] == "nla_warp_kernel<__nv_bfloat16, 32, (nla_fast::Consistency)1>"
    assert warp["registers"] <= 64 and warp["warps_per_sm"] >= 32 and kernel_model._spilled(warp) == 0
    assert warp["loop_max_load_bytes"] == 16 and warp["instructions_per_row"] > warp["instructions_per_row_min"]
    assert total["predicted_pct_copy_bw"] >= 50.0, total

