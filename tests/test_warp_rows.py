"""The CUDA extension's warp kernels (C > 32): ``nla_warp_kernel`` (a row in 16-byte pieces, C a
multiple of the piece, C <= 1024) and ``nla_warp_chunked_kernel`` (element by element, any C),
on cases that reach every part of their sweeps (whole steps and the partial last one, rows of one
piece a lane, ties of the nearest negative across lanes, pieces and steps, -inf columns, bad
targets), run two ways against the float64 oracle (tests/loss_cases.py):

- on the CPU, by an emulated warp: the warp row code of csrc/nla_loss.h (warp_row, PieceRow,
  ColumnRow: what the kernels run per row) built by the host compiler with tests/warp_emulator.cpp
  (32 threads a warp, each shuffle a barrier; the kernel and width cuda_launch_plan picks; exact
  exp2 / log2 where the GPU takes its approximations); built once per source hash, a few seconds;
- marked ``gpu``, by the CUDA kernels themselves (``make gpu-check``).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import struct
import subprocess
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

from nla_fast import atomic, native_build
from nla_fast.config import NLAConfig
from nla_fast.reference import naw_weight_reference

import loss_cases
from loss_cases import CONFIGS

EMULATOR_SOURCE = Path(__file__).resolve().parent / "warp_emulator.cpp"
DTYPE_CODES = {torch.float32: 0, torch.float64: 1, torch.float16: 2, torch.bfloat16: 3}
KERNELS = ("TileFixed", "TileGeneric", "WarpRow", "WarpChunked")
ACC = {torch.float64: torch.float64}  # the accumulation dtype: float32 for the others
BATCH = 6

# (C, dtype, the kernel and width cuda_launch_plan picks): rows of one piece a lane (C = 40, 100),
# rows in the partial last step only (100), whole steps and a partial one (520, 1000), whole steps
# only (1024), 8-, 4- and 2-byte pieces, and the element kernel for rows that are not whole pieces
# (33, 1025, 1001), longer than 1024 columns (4096) or double (1000).
SHAPES = [
    (33, torch.float32, ("WarpChunked", 0)), (33, torch.bfloat16, ("WarpChunked", 0)),
    (40, torch.bfloat16, ("WarpRow", 2)), (100, torch.float32, ("WarpRow", 4)), (100, torch.float16, ("WarpRow", 4)),
    (520, torch.bfloat16, ("WarpRow", 32)), (1000, torch.bfloat16, ("WarpRow", 32)),
    (1000, torch.float32, ("WarpRow", 32)), (1000, torch.float16, ("WarpRow", 32)),
    (1024, torch.float32, ("WarpRow", 32)), (1001, torch.float32, ("WarpChunked", 0)),
    (1025, torch.bfloat16, ("WarpChunked", 0)), (4096, torch.float32, ("WarpChunked", 0)),
    (1000, torch.float64, ("WarpChunked", 0)),
]
SHAPE_IDS = [f"{c}-{str(d).removeprefix('torch.')}" for c, d, _ in SHAPES]


# ----------------------------------------------------------------------------- the cases
def exact(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Values every dtype holds exactly (bfloat16-representable, float16 range), in ``dtype``."""
    return torch.where(torch.isfinite(t), t.clamp(-60000, 60000), t).to(torch.bfloat16).to(dtype)


def random_case(classes, dtype, seed=0):
    z, zf, y = loss_cases.make_inputs(BATCH, classes, torch.float32, seed=seed, device="cpu")
    return exact(z, dtype), exact(zf, dtype), y


def tie_positions(classes: int) -> list[int]:
    """Columns in different lanes, pieces and steps of both kernels: lane 0's first piece, the
    last lane's, the first column of the second step of 16-byte pieces, the middle, the end."""
    return sorted({c for c in (1, 31, 32, 33, 255, 256, 257, 511, 512, classes // 2, classes - 2, classes - 1)
                   if 0 <= c < classes})


def ties_case(classes, dtype):
    """Rows whose largest non-target logit is shared by several columns: every column equal (y
    first, last); ties at the positions above with y on the first of them or elsewhere; the last
    two columns tied (the partial last step) with y the last."""
    g = torch.Generator().manual_seed(classes)
    z = -3.0 * torch.rand(BATCH, classes, generator=g)
    zf = z + torch.randn(BATCH, classes, generator=g)
    pos = tie_positions(classes)
    z[0] = 2.0
    z[1, pos] = 4.0
    z[2, pos] = 4.0
    z[3, [classes - 2, classes - 1]] = 4.0
    z[4, pos[1:]] = 4.0
    z[5] = 2.0
    y = torch.tensor([0, pos[0], 0 if pos[0] else 2, classes - 1, pos[1], classes - 1])
    return exact(z, dtype), exact(zf, dtype), y


def minus_inf_case(classes, dtype):
    """-inf columns: the first 256 columns of z (whole lanes and pieces; the target, the last
    column, stays finite in every row), every non-target column
    of z (the nearest negative's probability 0), columns of z' only, the same columns of both."""
    z, zf, y = random_case(classes, torch.float32, seed=3)
    y[:] = classes - 1
    inf = -math.inf
    z[0, :min(256, classes - 1)] = inf
    z[1, :-1] = inf
    zf[2, ::3] = inf
    z[3, 1::5] = inf
    zf[3, 1::5] = inf
    zf[4, :-1] = inf
    return exact(z, dtype), exact(zf, dtype), y


def large_case(classes, dtype):
    """Logits in the thousands, the target the largest logit in every other row: the running
    maxima rescale their sums by factors that underflow to 0."""
    z, zf, y = loss_cases.make_inputs(BATCH, classes, torch.float32, scale=3000.0, seed=7, device="cpu")
    y[::2] = z[::2].argmax(1)
    return exact(z, dtype), exact(zf, dtype), y


CASES = {"random": random_case, "ties": ties_case, "minus-inf": minus_inf_case, "large": large_case}


# ----------------------------------------------------------------------------- the emulated warp
def _emulator_command(output: str) -> list[str]:
    return [os.environ.get("CXX", "c++"), "-std=c++17", "-O1", "-pthread", f"-I{native_build.source_dir()}",
            str(EMULATOR_SOURCE), "-o", output]


@pytest.fixture(scope="module")
def emulator() -> Path:
    """The emulator program, built once per hash of its sources and command."""
    digest = hashlib.sha256(json.dumps(_emulator_command("OUT")).encode())
    for path in (native_build.source_dir() / "nla_loss.h", EMULATOR_SOURCE):
        digest.update(path.read_bytes())
    program = Path(get_default_build_root()) / f"nla_fast_warp_emulator-{digest.hexdigest()[:16]}"
    if not program.is_file():
        with atomic.target(program) as tmp:
            done = subprocess.run(_emulator_command(str(tmp)), capture_output=True, text=True)
            assert done.returncode == 0, done.stderr[-4000:]
    return program


def emulate(program, tmp_path, z, zf, y, eps, config, grad=True, flip=True):
    """(kernel, width, loss, d/dz, d/dz', weights, each row's share of the loss) of the warp row
    code on an emulated warp; without ``flip`` the weights only (naw_weight)."""
    dtype, (batch, classes) = z.dtype, z.shape
    c = config.constants
    consistency = 0 if not flip else (2 if c.jsd else 1)
    head = struct.pack("<4i2q13d", DTYPE_CODES[dtype], consistency, int(grad), int(c.reg_mean), batch, classes,
                       float(eps), *c.as_list())
    logits = [t.contiguous().view(torch.int16) if t.element_size() == 2 else t.contiguous() for t in (z, zf)]
    parts = [head, logits[0].numpy().tobytes()] + ([logits[1].numpy().tobytes()] if flip else [])
    (tmp_path / "in.bin").write_bytes(b"".join(parts + [y.to(torch.int64).numpy().tobytes()]))
    done = subprocess.run([str(program), str(tmp_path / "in.bin"), str(tmp_path / "out.bin")], capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    out = (tmp_path / "out.bin").read_bytes()
    kernel, width = struct.unpack_from("<2i", out)
    acc = ACC.get(dtype, torch.float32)
    rows = torch.frombuffer(bytearray(out[8:]), dtype=acc, count=2 * batch)
    contrib, weights = rows[:batch], rows[batch:]
    grads = (None, None)
    if flip and grad:
        raw = torch.frombuffer(bytearray(out[8 + 2 * batch * rows.element_size():]),
                               dtype=torch.int16 if z.element_size() == 2 else dtype, count=2 * batch * classes)
        raw = raw.view(dtype) if z.element_size() == 2 else raw
        grads = (raw[:batch * classes].view(batch, classes), raw[batch * classes:].view(batch, classes))
    return KERNELS[kernel], width, contrib.double().sum(), *grads, weights, contrib


def check_against_oracle(out, z, zf, y, eps, config):
    loss, gz, gzf, w = out
    computed = torch.float64 if z.dtype == torch.float64 else torch.float32
    loss_cases.assert_matches((loss, gz, gzf, w), loss_cases.oracle(z, zf, y, eps, config), computed, z.dtype)


@pytest.mark.parametrize("classes,dtype,plan", SHAPES, ids=SHAPE_IDS)
def test_emulated_warp_rows_match_the_oracle(emulator, tmp_path, classes, dtype, plan):
    """Every case, official and JSD consistency, through the kernel cuda_launch_plan picks."""
    for case, make in CASES.items():
        z, zf, y = make(classes, dtype)
        for name in ("paper", "paper-jsd"):
            kernel, width, loss, gz, gzf, w, _ = emulate(emulator, tmp_path, z, zf, y, 0.37, CONFIGS[name])
            assert (kernel, width) == plan
            out = (loss, gz, gzf, w)
            assert all(torch.isfinite(t).all() for t in out), (case, name)
            check_against_oracle(out, z, zf, y, 0.37, CONFIGS[name])


def tied_rows(classes: int) -> dict[int, tuple[list[int], int]]:
    """Rows of ties_case with two or more tied non-target columns: (tied columns, the first of
    them that is not the target: the nearest negative)."""
    pos = tie_positions(classes)
    every = list(range(classes))
    return {0: (every, 1), 1: (pos, pos[1]), 2: (pos, pos[0]), 4: (pos[1:], pos[2]), 5: (every, 0)}


def ek_column(gz: torch.Tensor, row: int, tied: list[int], y: int) -> int | None:
    """The tied non-target column whose d/dz differs from its twins' (same logits in both views):
    where Ek was added."""
    cols = [c for c in tied if c != y]
    values = gz[row, cols].tolist()
    odd = [c for c, v in zip(cols, values) if values.count(v) == 1]
    return odd[0] if len(odd) == 1 else None


@pytest.mark.parametrize("classes,dtype", [(1000, torch.bfloat16), (1000, torch.float32), (100, torch.float32),
                                           (1025, torch.float32), (4096, torch.float32)])
def test_emulated_nearest_negative_is_the_first_of_tied_columns(emulator, tmp_path, classes, dtype):
    """Ek lands on the first tied column that is not the target, wherever the ties sit (the flipped
    logits equal the logits, so tied columns have the same gradient but there)."""
    z, _, y = ties_case(classes, dtype)
    gz = emulate(emulator, tmp_path, z, z, y, 0.37, NLAConfig())[3]
    for row, (tied, first) in tied_rows(classes).items():
        assert ek_column(gz, row, tied, int(y[row])) == first, row


def test_emulated_bad_targets_poison_their_rows_only(emulator, tmp_path):
    z, zf, y = random_case(1000, torch.bfloat16)
    bad = y.clone()
    bad[2], bad[4] = 1000, -1
    for config in (CONFIGS["paper"], CONFIGS["paper-jsd"]):
        good = emulate(emulator, tmp_path, z, zf, y, 0.37, config)
        out = emulate(emulator, tmp_path, z, zf, bad, 0.37, config)
        contrib, w, gz, gzf = out[6], out[5], out[3], out[4]
        for row in (2, 4):
            assert torch.isnan(contrib[row]) and torch.isnan(w[row])
            assert torch.isnan(gz[row]).all() and torch.isnan(gzf[row]).all()
        rows = [0, 1, 3, 5]  # the other rows: bit for bit what valid targets give
        assert torch.equal(contrib[rows], good[6][rows]) and torch.equal(w[rows], good[5][rows])
        assert torch.equal(gz[rows], good[3][rows]) and torch.equal(gzf[rows], good[4][rows])


@pytest.mark.parametrize("classes,dtype", [(1000, torch.bfloat16), (1025, torch.float32), (64, torch.float16)])
def test_emulated_weights_only_and_forward_only(emulator, tmp_path, classes, dtype):
    """naw_weight (no flipped logits) and the loss without gradients: the weights of the full
    call, the same shares of the loss, bit for bit."""
    z, zf, y = random_case(classes, dtype, seed=5)
    config = NLAConfig()
    full = emulate(emulator, tmp_path, z, zf, y, 0.37, config)
    weights_only = emulate(emulator, tmp_path, z, zf, y, 0.37, config, grad=False, flip=False)
    forward_only = emulate(emulator, tmp_path, z, zf, y, 0.37, config, grad=False)
    assert torch.equal(weights_only[5], full[5]) and torch.equal(forward_only[5], full[5])
    assert torch.equal(forward_only[6], full[6]) and (weights_only[6] == 0).all()
    loss_cases.assert_close(full[5], naw_weight_reference(z.double(), y, 0.37, config), 2e-5, what="weights")


def test_emulated_nan_logit_makes_its_row_nan(emulator, tmp_path):
    z, zf, y = random_case(1000, torch.float32)
    z[3, 700] = math.nan
    _, _, _, gz, _, w, contrib = emulate(emulator, tmp_path, z, zf, y, 0.37, NLAConfig())
    assert torch.isnan(contrib[3]) and torch.isfinite(contrib[[0, 1, 2, 4, 5]]).all()
    assert torch.isnan(gz[3]).all()


# ----------------------------------------------------------------------------- the CUDA kernels
def cuda_op(z, zf, y, eps, config, grad=True):
    c = config.constants
    return torch.ops.nla_fast.nla_loss_fwd(z.cuda(), zf.cuda(), y.cuda(), None, float(eps), c.as_list(), c.jsd,
                                           c.reg_mean, grad, True)


@pytest.mark.gpu
@pytest.mark.parametrize("classes,dtype,plan", SHAPES, ids=SHAPE_IDS)
def test_cuda_warp_kernels_match_the_oracle(classes, dtype, plan):
    """The emulated cases on the CUDA kernels (MUFU exponentials: the same tolerances)."""
    for case, make in CASES.items():
        z, zf, y = make(classes, dtype)
        for name in ("paper", "paper-jsd"):
            out = cuda_op(z, zf, y, 0.37, CONFIGS[name])
            assert all(torch.isfinite(t).all() for t in out), (case, name)
            check_against_oracle(out, z, zf, y, 0.37, CONFIGS[name])


@pytest.mark.gpu
def test_cuda_nearest_negative_and_bad_targets():
    """On the CUDA kernels as on the emulated warp: Ek on the first tied non-target column across
    lanes, pieces and steps; a bad target's row NaN, every other row bit for bit what valid targets
    give (rows are independent). Both warp kernels."""
    for classes, dtype in ((1000, torch.bfloat16), (1000, torch.float32), (1025, torch.float32),
                           (4096, torch.float32)):
        z, _, y = ties_case(classes, dtype)
        good = [t.cpu() for t in cuda_op(z, z, y, 0.37, NLAConfig())]
        for row, (tied, first) in tied_rows(classes).items():
            assert ek_column(good[1], row, tied, int(y[row])) == first, (classes, row)
        bad = y.clone()
        bad[3] = classes
        loss, gz, gzf, w = (t.cpu() for t in cuda_op(z, z, bad, 0.37, NLAConfig()))
        assert torch.isnan(gz[3]).all() and torch.isnan(gzf[3]).all() and torch.isnan(w[3]) and torch.isnan(loss)
        rows = [0, 1, 2, 4, 5]
        for got, want in ((gz, good[1]), (gzf, good[2]), (w, good[3])):
            assert torch.equal(got[rows], want[rows]), classes


@pytest.mark.gpu
@pytest.mark.parametrize("classes", [33, 1000, 1024, 1025, 4096])
def test_cuda_warp_kernels_many_rows_and_eps_tensor(classes):
    """Enough rows for every block to stride over rows, eps read from device memory, bfloat16."""
    z, zf, y = loss_cases.make_inputs(3000, classes, torch.float32, device="cpu")
    z, zf = exact(z, torch.bfloat16), exact(zf, torch.bfloat16)
    eps = torch.tensor(0.61, device="cuda")
    c = NLAConfig().constants
    out = torch.ops.nla_fast.nla_loss_fwd(z.cuda(), zf.cuda(), y.cuda(), eps, 0.0, c.as_list(), c.jsd, c.reg_mean,
                                          True, True)
    check_against_oracle(out, z, zf, y, 0.61, NLAConfig())
