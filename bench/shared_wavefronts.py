"""L1 / shared-memory wavefronts of the short-row loss kernels, counted from their addresses.

``kernel_model.py`` bounds a kernel by issue, DRAM and launch; it does not see the SM's unified
L1 / shared-memory data pipe, which moves one 128-byte wavefront a clock and serves every
shared and global access. What a shared access costs depends on its addresses (bank
conflicts), which the machine code does not show, so this script replays them: for one warp
of ``_nla_fwd_kernel``'s compute tile (one row a lane) and one view, every access of the tile
loop, with the widths the sm_90 SASS shows (Triton 3.8):

- logits in: 16-byte global loads of the flat block (LDG.128), stored to shared memory as
  they are (2 x STS.64 a lane for bf16, 2 x STS.128 for float32), gathered into compute rows:
  lane r reads flat elements r * C + c (C columns and the target's: C + 1 LDS);
- gradients out: the compute tile stored to shared memory row-major (its 16-bit or float32
  row: 2 x STS.64 / 2 x STS.128) or column-major (float32, 8 x STS.32 at c * BLOCK_B + r),
  gathered into flat rows (lane i reads slot j = flat element 8 i + j, 8 LDS), stored with
  16-byte global stores.

Beside it, the extension's fixed tile kernel (C = 7, 8; ``extension_tile_accesses``),
which stages a tile of 128 rows by 16-byte pieces and has each thread read and write its own
row there.

A shared access of 4 bytes or less is one phase of 32 lanes, of 8 bytes two phases of 16, of
16 bytes four of 8; a phase costs the most distinct 4-byte words any bank holds. A global
access costs the 128-byte lines it touches. Prints a table, writes ``shared_wavefronts.json``.
"""
from __future__ import annotations

import argparse
import collections
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import result_files  # noqa: E402

WARP = 32
SLOTS = 8  # BLOCK_C for 5 <= C <= 7


def shared_wavefronts(addresses: list[int], width: int) -> int:
    """Wavefronts of one warp-wide shared access of ``width`` bytes a lane at ``addresses``."""
    per_phase = {1: 32, 2: 32, 4: 32, 8: 16, 16: 8}[width]
    total = 0
    for start in range(0, len(addresses), per_phase):
        words = {(a + b) // 4 for a in addresses[start:start + per_phase] for b in range(0, max(width, 1), 4)}
        total += max(collections.Counter(w % 32 for w in words).values())
    return total


def global_wavefronts(addresses: list[int], width: int) -> int:
    """128-byte lines one warp-wide global access touches."""
    return len({(a + b) // 128 for a in addresses for b in (0, width - 1)})


def pieces(total: int, width: int) -> list[int]:
    """Byte offsets of the ``width``-byte accesses that move ``total`` bytes a lane."""
    return list(range(0, total, width))


def columns_first(element: int) -> bool:
    """The kernel's choice (``_columns_first`` in kernels/nla_loss.py): 16-bit gradients are
    permuted column-major."""
    return element < 4


# Bytes a shared store of a lane's flat row (the logits' flat block, row-major gradients) moves:
# Triton 3.8 stores a 16-byte row of 16-bit values as 2 x STS.64, Triton 3.6 as one STS.128;
# float32 rows (32 bytes) go as 2 x STS.128 in both.
FLAT_STORES = (8, 16)


def flat_store_width(element: int, flat_store: int | None = None) -> int:
    """Bytes a flat-row store moves: ``flat_store`` (one of FLAT_STORES), by default Triton
    3.8's for ``element``-byte values, at most the row's SLOTS * element bytes."""
    return min(SLOTS * element, flat_store or (8 if element == 2 else 16))


def warp_accesses(classes: int, element: int, block_b: int, columns_first: bool, target: bool = True,
                  *, warp: int = 0, flat_store: int | None = None) -> dict:
    """Wavefronts of each access group, one warp (lanes = rows / flat rows) and one view
    (``target``: the logits' view, which also reads each row's target logit)."""
    lanes = range(warp * WARP, warp * WARP + WARP)
    flat_bytes = SLOTS * element  # a lane's flat row of the block
    sts = flat_store_width(element, flat_store)
    out = {}
    # logits in
    out["logits LDG"] = sum(global_wavefronts([i * flat_bytes + p for i in lanes], 16) for p in pieces(flat_bytes, 16))
    out["logits STS"] = sum(shared_wavefronts([i * flat_bytes + p for i in lanes], sts) for p in pieces(flat_bytes, sts))
    reads = [[(r * classes + c) * element for r in lanes] for c in range(classes)]
    if target:
        reads.append([(r * classes) * element for r in lanes])  # the target's column (addresses alike)
    out["logits LDS"] = sum(shared_wavefronts(a, element) for a in reads)
    # gradients out
    if columns_first:
        out["gradients STS"] = sum(shared_wavefronts([(c * block_b + r) * 4 for r in lanes], 4) for c in range(SLOTS))
    else:
        out["gradients STS"] = sum(shared_wavefronts([r * flat_bytes + p for r in lanes], sts)
                                   for p in pieces(flat_bytes, sts))
    lds = 0
    for j in range(SLOTS):
        addresses = []
        for i in lanes:
            f = i * SLOTS + j
            if f >= block_b * classes:
                continue
            row, col = divmod(f, classes)
            addresses.append((col * block_b + row) * 4 if columns_first else (row * SLOTS + col) * element)
        if addresses:
            lds += shared_wavefronts(addresses, 4 if columns_first else element)
    out["gradients LDS"] = lds
    out["gradients STG"] = sum(global_wavefronts([i * flat_bytes + p for i in lanes], 16) for p in pieces(flat_bytes, 16))
    return out


def call_accesses(classes: int, element: int, block_b: int, columns_first: bool, flat_store: int | None = None) -> dict:
    """``warp_accesses`` of both views (the logits' with the target read), summed: one warp."""
    views = (warp_accesses(classes, element, block_b, columns_first, target, flat_store=flat_store)
             for target in (True, False))
    return dict(sum((collections.Counter(v) for v in views), collections.Counter()))


def shared_instructions(classes: int, element: int, columns_first: bool,
                        flat_store: int | None = None) -> collections.Counter:
    """The shared-memory instructions a thread runs per tile in the replay, both views, by SASS
    opcode: what the kernel's machine code must show (tests/test_kernel_model.py)."""
    narrow = "LDS.U16" if element == 2 else "LDS"
    width = flat_store_width(element, flat_store)
    wide_store, per_row = {8: "STS.64", 16: "STS.128"}[width], SLOTS * element // width
    ops = collections.Counter({wide_store: 2 * per_row})
    ops[narrow] += 2 * classes + 1  # both views' columns, the target once
    if columns_first:
        ops["STS"] += 2 * SLOTS
        ops["LDS"] += 2 * SLOTS
    else:
        ops[wide_store] += 2 * per_row
        ops[narrow] += 2 * SLOTS
    return ops


def flat_store_of(loop_shared_opcodes: dict, classes: int, element: int, columns_first: bool) -> int | None:
    """The flat-row store width whose replay has exactly a main loop's shared-memory opcodes
    (None: the machine code is not the one replayed)."""
    return next((w for w in FLAT_STORES
                 if dict(shared_instructions(classes, element, columns_first, w)) == dict(loop_shared_opcodes)), None)


EXTENSION_TILE_ROWS = 128  # kCudaTileThreads (csrc/nla_loss.h): a row a thread, 128 rows a block


def extension_tile_layout(classes: int, element: int) -> tuple[int, int, int]:
    """(row stride in bytes, bytes a row read moves, lanes' row spacing): ``tile_layout`` of
    csrc/nla_loss.h, whose fixed tile kernel runs C = 7 and 8."""
    row = classes * element
    low = row & -row
    return (row + 16, 16, 1) if low >= 32 else ((row, low, 1) if low >= 4 else (row, 2, 2))


def extension_tile_accesses(classes: int, element: int) -> dict:
    """Wavefronts of each access group of the extension's fixed tile kernel, one tile of 128 rows
    (4 warps), both views (the target read from the logits' only): the tile staged into shared
    memory by 16-byte pieces (LDG.128 and STS.128, thread q piece q), each thread's row read and
    its gradients written there with ``vec``-byte accesses (C columns and the target's), the
    gradients out by 16-byte pieces."""
    stride, vec, lane_rows = extension_tile_layout(classes, element)
    row = classes * element
    pieces_in_tile = EXTENSION_TILE_ROWS * row // 16
    # piece q's shared offset (tile_offset): rows padded to `stride`
    offset = (lambda q: q * 16) if stride == row else (lambda q: (q // (row // 16)) * stride + (q % (row // 16)) * 16)
    staged = [list(range(w, min(w + WARP, pieces_in_tile))) for w in range(0, pieces_in_tile, WARP)]
    out = {"logits LDG": 2 * sum(global_wavefronts([16 * q for q in qs], 16) for qs in staged),
           "logits STS": 2 * sum(shared_wavefronts([offset(q) for q in qs], 16) for qs in staged)}
    lds = sts = 0
    for warp in range(EXTENSION_TILE_ROWS // WARP):
        rows_ = [(warp >> 1) * 64 + 2 * lane + (warp & 1) if lane_rows == 2 else warp * WARP + lane for lane in range(WARP)]
        per_row = [[r * stride + b for r in rows_] for b in range(0, row, vec)]
        lds += 2 * sum(shared_wavefronts(a, vec) for a in per_row) + shared_wavefronts([r * stride for r in rows_], element)
        sts += 2 * sum(shared_wavefronts(a, vec) for a in per_row)
    out["logits LDS"] = lds
    out["gradients STS"] = sts
    out["gradients LDS"] = out["logits STS"]
    out["gradients STG"] = out["logits LDG"]
    return out


def extension_shared_instructions(classes: int, element: int) -> collections.Counter:
    """The shared-memory instructions a thread runs per tile in the replay of the extension's
    fixed tile kernel, both views, by SASS opcode."""
    stride, vec, _ = extension_tile_layout(classes, element)
    row = classes * element
    staged = -(-EXTENSION_TILE_ROWS * row // 16 // EXTENSION_TILE_ROWS)  # 16-byte pieces a thread
    narrow = {2: "U16", 4: "", 8: "64", 16: "128"}
    name = lambda op, width: op + ("." + narrow[width] if narrow[width] else "")  # noqa: E731
    ops = collections.Counter({"STS.128": 2 * staged, "LDS.128": 2 * staged})
    ops[name("LDS", vec)] += 2 * (row // vec)
    ops[name("LDS", element)] += 1  # the target, from the logits' row
    ops[name("STS", vec)] += 2 * (row // vec)
    return ops


def rows(classes_list=(5, 6, 7), batch: int = 1 << 20) -> list[dict]:
    from kernel_model import DEVICES  # (kernel_model imports this module)

    device = DEVICES[0]  # the H200
    result = []

    def add(backend, dtype, element, classes, layout, groups, rows_counted):
        per_row = sum(groups.values()) / rows_counted
        dram_bytes = batch * (4 * classes * element + 8)  # both views' logits and gradients, int64 targets
        result.append(dict(backend=backend, dtype=dtype, classes=classes, gradients=layout, wavefronts=groups,
                           rows_counted=rows_counted, wavefronts_per_row=per_row,
                           l1_us=per_row * batch / device.sms / (device.clock_ghz * 1e3),
                           dram_floor_us=dram_bytes / (device.copy_gb_per_s * 1e3), batch=batch, device=device.name))

    for dtype, element, block_b in (("bfloat16", 2, 1024), ("float32", 4, 256)):
        for classes in classes_list:
            for order in (False, True):
                add("triton", dtype, element, classes, ("column-major" if order else "row-major")
                    + (" *" if order == columns_first(element) else ""), call_accesses(classes, element, block_b, order),
                    WARP)
        add("extension", dtype, element, 7, "row a thread", extension_tile_accesses(7, element), EXTENSION_TILE_ROWS)
    return result


def table(result: list[dict]) -> str:
    names = list(result[0]["wavefronts"])
    head = f"{'backend':<9} {'dtype':<9} {'C':>2} {'gradients':<14} {'rows':>4} " + " ".join(f"{n:>13}" for n in names)
    head += f" {'wf/row':>7} {'L1 us':>6} {'DRAM us':>7}"
    lines = [head]
    for r in result:
        lines.append(f"{r['backend']:<9} {r['dtype']:<9} {r['classes']:>2} {r['gradients']:<14} {r['rows_counted']:>4} "
                     + " ".join(f"{r['wavefronts'][n]:>13}" for n in names)
                     + f" {r['wavefronts_per_row']:>7.2f} {r['l1_us']:>6.1f} {r['dram_floor_us']:>7.1f}")
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    result_files.add_arguments(parser)
    args = parser.parse_args(argv)
    result = rows()
    print(table(result))
    print(f"(*: the order the kernel takes; wavefronts of both views over `rows` rows: a warp of the Triton kernel, a 128-row tile of the "
          f"extension's; forward, {result[0]['batch']} rows, {result[0]['device']}: one wavefront a clock an SM, "
          "the DRAM floor at the measured copy bandwidth)")
    out = result_files.output_dir(args, "model-sm90-80") / "shared_wavefronts.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")
    return result


if __name__ == "__main__":
    main()
