"""bench/shared_wavefronts.py: the bank-conflict counter and what it says of the permutations."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))

import shared_wavefronts as sw  # noqa: E402


def test_the_counter_knows_conflict_free_and_conflicting_accesses():
    lanes = range(32)
    assert sw.shared_wavefronts([4 * i for i in lanes], 4) == 1  # 32 banks, one word each
    assert sw.shared_wavefronts([0] * 32, 4) == 1  # one word: a broadcast
    assert sw.shared_wavefronts([2 * i for i in lanes], 2) == 1  # two lanes a word
    assert sw.shared_wavefronts([8 * i for i in lanes], 4) == 2  # stride 2 words: 2-way
    assert sw.shared_wavefronts([128 * i for i in lanes], 4) == 32  # one bank
    assert sw.shared_wavefronts([16 * i for i in lanes], 16) == 4  # 512 contiguous bytes
    assert sw.shared_wavefronts([8 * i for i in lanes], 8) == 2
    assert sw.global_wavefronts([16 * i for i in lanes], 16) == 4
    assert sw.global_wavefronts([32 * i for i in lanes], 16) == 8  # half of each line


def test_column_major_gradients_cut_the_conflicts_of_every_short_row():
    for classes in (5, 6, 7):
        for element, block_b in ((2, 1024), (4, 256)):
            row_major = sw.warp_accesses(classes, element, block_b, columns_first=False)
            column_major = sw.warp_accesses(classes, element, block_b, columns_first=True)
            assert column_major["gradients LDS"] <= 16 < row_major["gradients LDS"], (classes, element)
            assert {k: v for k, v in column_major.items() if "gradients" not in k} == \
                   {k: v for k, v in row_major.items() if "gradients" not in k}
    # every warp of a tile alike, the last (flat rows past the tile's end) no worse
    first, last = (sw.warp_accesses(7, 2, 1024, True, warp=warp) for warp in (0, 31))
    assert last["gradients LDS"] <= first["gradients LDS"]


def test_the_replayed_instructions_name_the_flat_store_width():
    """Triton 3.8 stores a 16-byte flat row of bf16 as 2 x STS.64, 3.6 as one STS.128: the
    replay tells them apart by the loop's opcodes, and no other mix matches."""
    v38 = {"LDS": 16, "LDS.U16": 15, "STS": 16, "STS.64": 4}
    v36 = {"LDS": 16, "LDS.U16": 15, "STS": 16, "STS.128": 2}
    assert sw.flat_store_of(v38, 7, 2, True) == 8 and sw.flat_store_of(v36, 7, 2, True) == 16
    assert sw.flat_store_of({**v38, "LDS.U16": 14}, 7, 2, True) is None
    assert sw.flat_store_of({"LDS": 31, "STS.128": 8}, 7, 4, False) == 16
    # 16-byte stores of a contiguous flat block: half the wavefronts of 8-byte ones at 16-byte stride
    wide, narrow = (sw.warp_accesses(7, 2, 1024, True, flat_store=w)["logits STS"] for w in (16, 8))
    assert (wide, narrow) == (4, 8)


def test_the_extensions_row_reads_are_conflict_free_at_c_7():
    """tile_layout's rows of 14 / 28 bytes, lanes two rows / one row apart: each warp-wide read
    of a column (and of the target, the logits' view only) is one wavefront, and so is each
    write."""
    for element in (2, 4):
        groups = sw.extension_tile_accesses(7, element)
        warps = sw.EXTENSION_TILE_ROWS // 32
        assert groups["logits LDS"] == warps * (7 + 1 + 7) and groups["gradients STS"] == warps * 2 * 7
        # 16-byte pieces of a contiguous tile: a wavefront per 128 bytes, both views
        assert groups["logits LDG"] == groups["logits STS"] == 2 * sw.EXTENSION_TILE_ROWS * 7 * element // 128


def test_the_table_and_json(tmp_path, capsys):
    result = sw.main(["--out-dir", str(tmp_path)])
    assert (tmp_path / "shared_wavefronts.json").is_file()
    bf16 = {r["gradients"]: r for r in result if r["dtype"] == "bfloat16" and r["classes"] == 7}
    taken, other = bf16["column-major *"], bf16["row-major"]  # the kernel's order is starred
    assert taken["l1_us"] < taken["dram_floor_us"] < other["l1_us"]
    assert bf16["row a thread"]["backend"] == "extension"
    assert bf16["row a thread"]["l1_us"] < taken["l1_us"]
    assert "column-major *" in capsys.readouterr().out
