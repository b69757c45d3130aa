"""The CUDA extension's launch plan and shared-memory layouts, read without a GPU: csrc/nla_loss.h
compiled by the host compiler into the kernel model's plan program (bench/extension_launches.py,
cached by source hash: about a second the first time). What the extension then launches and
what its kernels compile to are the kernel model's (tests/test_kernel_model.py)."""
from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parent.parent / "bench"
sys.path.insert(0, str(BENCH))

import extension_launches  # noqa: E402
import kernel_model  # noqa: E402

H200_SMS = 132
DTYPES = {"float32": 4, "float64": 8, "float16": 2, "bfloat16": 2}
BATCHES = (1, 32, 129, 65536, 2**20)
CLASSES = (2, 5, 7, 8, 13, 32, 33, 64, 100, 1000, 1001, 1024, 1025, 5000)


@pytest.fixture(scope="module")
def header_dump(stable_kernel_model_cache):
    """Plans for every (dtype, B, C) above and the layouts of every C <= 32 and element size, as
    the header's own cuda_launch_plan / tile_layout give them (no torch, no CUDA)."""
    program = extension_launches.header_program(kernel_model.cache_dir() / "extension")
    keys = [(dtype, b, c) for dtype in DTYPES for b in BATCHES for c in CLASSES]
    plans = extension_launches.ask(program, [f"plan {b} {c} {dtype}" for dtype, b, c in keys])
    pairs = [(c, esize) for c in range(1, 33) for esize in (2, 4, 8)]
    layouts = extension_launches.ask(program, [f"layout {c} {esize}" for c, esize in pairs])
    return ({key: answer["plan"] for key, answer in zip(keys, plans)},
            {pair: answer["layout"] for pair, answer in zip(pairs, layouts)})


def test_launch_plan_rules(header_dump):
    """cuda_launch_plan follows the rules its comment states."""
    plans, _ = header_dump
    for (dtype, batch, classes), p in plans.items():
        esize = DTYPES[dtype]
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
        else:
            assert p["smem_bytes"] == 0
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


def test_plan_program_is_built_once_per_source_hash_and_refuses_a_bad_query(tmp_path):
    program = extension_launches.header_program(tmp_path)
    assert program.parent == tmp_path and program.name.startswith("extension_plan-")
    built = program.stat().st_mtime_ns
    assert extension_launches.header_program(tmp_path) == program and program.stat().st_mtime_ns == built
    assert [p.name for p in tmp_path.iterdir()] == [program.name]  # no temporary file left behind
    assert extension_launches.ask(program, ["plan 32 7 float32"])[0]["plan"]["kernel"] == "TileFixed"
    with pytest.raises(ValueError, match=r"cannot read the query: 'plan 32 7 float8'"):
        extension_launches.ask(program, ["plan 32 7 float32", "plan 32 7 float8"])
