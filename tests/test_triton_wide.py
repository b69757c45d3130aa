"""The wide-row Triton kernel (``kernels/nla_loss_wide.py``): which rows it takes, and its column
chunks, where a row's running sums, maxima and nearest negative cross from chunk to chunk.

Every case goes through the public API against the float64 oracle (``tests/loss_cases.py``).
Without CUDA the kernel runs in Triton's interpreter (tests/conftest.py); there the chunk width
and rows per tile are set per test (``chunks``) so that a row of C = 1000 crosses several
chunks, a tile is partly past the batch and programs take several tiles. The machine code of
the same kernel (registers, spills, loop structure) is checked in ``test_kernel_model.py``.
"""
import pytest
import torch

import nla_fast
from loss_cases import CONFIGS, DEVICE, assert_close, check, fused_backends, make_inputs, oracle
from nla_fast.reference import naw_weight_reference

pytestmark = pytest.mark.skipif("triton" not in fused_backends(), reason="needs CUDA or TRITON_INTERPRET=1")


@pytest.fixture
def chunks(monkeypatch):
    """``chunks(block_b, block_c)``: the wide kernel's next launches use tiles of ``block_b`` rows
    and column chunks of ``block_c`` (None: ``launch.block_c``'s one-warp chunk); returns the
    launches' (BLOCK_B, BLOCK_C) as they happen."""
    from nla_fast.kernels import launch

    seen = []
    real = launch.forward_kernel

    class Spy:
        def __init__(self, kernel):
            self.kernel = kernel

        def __getattr__(self, name):
            return getattr(self.kernel, name)

        def __getitem__(self, grid):
            def run(*args, **kwargs):
                seen.append((kwargs["BLOCK_B"], kwargs["BLOCK_C"]))
                return self.kernel[grid](*args, **kwargs)
            return run

    def set_chunks(block_b, block_c=None):
        config = launch.Config(block_b, 1, 1, None, block_c)
        monkeypatch.setattr(launch, "wide_configs", lambda *args, **kwargs: [config])
        monkeypatch.setattr(launch, "_plans", {})
        monkeypatch.setattr(launch, "forward_kernel",
                            lambda cols: Spy(real(cols)) if launch.is_wide(cols) else real(cols))
        return seen

    return set_chunks


def test_rows_over_32_classes_take_the_wide_kernel_in_chunks():
    from nla_fast.kernels import launch
    from nla_fast.kernels.nla_loss import _nla_fwd_kernel
    from nla_fast.kernels.nla_loss_wide import _nla_wide_kernel

    assert launch.forward_kernel(launch.block_c(32, 4)) is _nla_fwd_kernel
    assert launch.forward_kernel(launch.block_c(33, 4)) is _nla_wide_kernel
    # one warp's chunk: 32 lanes x 16 bytes; 64 columns (one lane each, twice) where rows are not
    # 16-byte aligned (C not a multiple of the vector) or not contiguous
    assert [launch.block_c(1000, 2), launch.block_c(1000, 4), launch.block_c(100, 4)] == [256, 128, 128]
    assert [launch.block_c(1025, 2), launch.block_c(1000, 4, flat_rows=False), launch.block_c(33, 4)] == [64, 64, 64]
    # large batches: a row per warp; small ones spread a row over up to 8 warps (a chunk each)
    assert launch.wide_row_warps(4096, 1000, 8) == 1 and launch.wide_row_warps(1024, 1000, 4) == 4
    assert launch.wide_row_warps(32, 1000, 8) == 4 and launch.wide_row_warps(32, 1000, 4) == 8
    assert launch.wide_row_warps(32, 1025, 1) == 1


def test_the_launch_is_the_wide_kernel_in_column_chunks(chunks):
    seen = chunks(4)
    z, zf, y = make_inputs(6, 1000, seed=40)
    check("triton", z, zf, y, 0.37, CONFIGS["paper"])
    assert seen == [(4, 128)]  # 8 chunks of 128 columns, the last one 104 wide; tiles of 4 rows


# (classes, rows per tile, chunk): one-warp chunks (C = 1000: 8 of them; 1025: 17 single-column
# lanes of 64; 2048: 16, no partial chunk), the chunks of a row over several warps (512, 1024),
# two chunks of 64 for C = 100, a single partial one for C = 33
CHUNKINGS = [(33, 4, None), (100, 4, 64), (1000, 4, None), (1000, 2, 512), (1025, 4, None), (2048, 4, None),
             (2048, 1, 1024)]


@pytest.mark.parametrize("classes,block_b,block_c", CHUNKINGS)
def test_chunked_rows_match_the_oracle(chunks, classes, block_b, block_c):
    """23 rows (9 past C = 1000): a partial last tile, more tiles than the interpreter's 4
    programs; contiguous rows and a strided flip; every consistency and reduction over the cases."""
    chunks(block_b, block_c)
    batch = 23 if classes <= 1000 else 9
    for i, name in enumerate(("paper", "official-jsd", "paper-mean", "jsd-sum")):
        if (i + classes) % 2:
            continue
        z, zf, y = make_inputs(batch, classes, seed=41 + i)
        check("triton", z, zf, y, ["tensor", 0.37][i % 2], CONFIGS[name])
    zf_wide = torch.zeros(batch, 2 * classes, device=DEVICE)
    zf_wide[:, ::2] = zf
    check("triton", z, zf_wide[:, ::2], y, 0.0, CONFIGS["official"])


def _rows_with_ties(classes=1000):
    """Rows whose nearest negative is tied across chunk boundaries (chunks of 128, and of 512)."""
    gen = torch.Generator().manual_seed(42)
    z = torch.randn(7, classes, generator=gen)
    y = torch.tensor([5, 300, 128, 0, 130, 700, 7])
    ties = [
        [127, 128],  # the two sides of the first chunk boundary: k = 127
        [128, 255],  # the first and the last lane of one chunk: k = 128
        [127, 128],  # the target (128) ties with negative 127 (g == n, the true case): k = 127
        [0, 500, 999],  # the target ties with 500 and 999, the latter in the partial last chunk
        [131, 259, 1],  # three chunks, the earliest tie last in column order: k = 1
        [100, 300, 511, 512],  # a 512-wide chunk's warps 0, 2 and 3, then the next chunk: k = 100
        [202, 201],  # two slots of one lane's vector: k = 201
    ]
    for row, cols in enumerate(ties):
        z[row, cols] = 9.0
    return z, y


@pytest.mark.parametrize("block_b,block_c", [(4, None), (2, 512)])
@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
def test_ties_across_chunk_boundaries_take_the_first_index(chunks, block_b, block_c, config_name):
    chunks(block_b, block_c)
    z, y = _rows_with_ties()
    zf = z.flip(1).contiguous()
    check("triton", z.to(DEVICE), zf.to(DEVICE), y.to(DEVICE), 0.37, CONFIGS[config_name])
    check("triton", z.to(DEVICE), z.clone().to(DEVICE), y.to(DEVICE), "tensor", CONFIGS[config_name])
    # the oracle tells the tied columns apart (the nearest negative's gradient term is on one)
    gz = oracle(z, zf, y, 0.37, CONFIGS[config_name])[1]
    assert (gz[0, 127] - gz[0, 128]).abs() > 1e-3 and (gz[4, 1] - gz[4, 131]).abs() > 1e-3
    assert (gz[6, 201] - gz[6, 202]).abs() > 1e-3


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config_name", ["paper", "official-jsd", "paper-mean", "jsd-sum"])
def test_minus_inf_columns_at_chunk_boundaries_are_finite(chunks, config_name):
    """-inf non-target logits at a chunk's first and last column, a whole first chunk at -inf in
    both views (the running maxima start there), every negative of a row at -inf (n = 0)."""
    chunks(4)
    z, zf, y = make_inputs(7, 1000, seed=43)
    y[:] = torch.tensor([5, 300, 600, 999, 3, 130, 64])
    z[0, [127, 128]] = float("-inf")
    zf[0, 128] = float("-inf")
    zf[1, [255, 256, 895, 896]] = float("-inf")
    z[2, :128] = float("-inf")
    zf[2, :128] = float("-inf")
    z[3, 896:999] = float("-inf")  # the partial last chunk but its target
    z[4, [c for c in range(1000) if c != 3]] = float("-inf")
    loss, gz, gzf, w = check("triton", z, zf, y, 0.37, CONFIGS[config_name])
    assert torch.isfinite(loss).item() and torch.isfinite(gz).all() and torch.isfinite(gzf).all()
    assert torch.isfinite(w).all()


def test_a_large_offset_and_a_maximum_growing_chunk_by_chunk(chunks):
    """Logits near 100 (exp overflows float32) rising across the row, so each chunk raises the
    running maximum and every lane's sum is rescaled again and again, and falling. (The official
    consistency's z + z' rounds to float32, 2^-17 of 2 x 100: larger offsets are out of reach of
    the tolerance for float32 inputs, as in every float32 kernel; bf16 sums are exact.)"""
    chunks(4)
    gen = torch.Generator().manual_seed(44)
    ramp = torch.linspace(0.0, 30.0, 1000)
    z = 100.0 + torch.randn(9, 1000, generator=gen) + ramp
    zf = 100.0 + torch.randn(9, 1000, generator=gen) - ramp
    y = torch.randint(0, 1000, (9,), generator=gen)
    y[0] = 999
    for name in ("paper", "official-jsd"):
        check("triton", z.to(DEVICE), zf.to(DEVICE), y.to(DEVICE), 0.37, CONFIGS[name])


@pytest.mark.parametrize("needs", [(True, False), (False, True), (False, False)])
@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
def test_one_gradient_or_none(chunks, needs, config_name):
    """Only d/dlogits, only d/dlogits_flip, or the loss alone (the JSD's sums sweep, no gradient sweep)."""
    chunks(4, 64)
    z, zf, y = make_inputs(9, 100, seed=45)
    a, b = z.clone().requires_grad_(needs[0]), zf.clone().requires_grad_(needs[1])
    loss = nla_fast.nla_loss(a, b, y, 0.37, CONFIGS[config_name], backend="triton", validate=False)
    ref_loss, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.37, CONFIGS[config_name])
    assert_close(loss, ref_loss, 2e-5, what="loss")
    if any(needs):
        loss.backward()
        for leaf, ref, wanted in ((a, ref_gz, needs[0]), (b, ref_gzf, needs[1])):
            assert (leaf.grad is not None) == wanted
            if wanted:
                assert_close(leaf.grad, ref, 2e-5, what="gradient")


def test_naw_weights_alone_in_chunks(chunks):
    """The weights-only launch (no flipped view): one sweep."""
    chunks(4)
    z, _, y = make_inputs(11, 1000, seed=46)
    w = nla_fast.naw_weight(z, y, 0.37)
    assert_close(w, naw_weight_reference(z.double().cpu(), y.cpu(), 0.37), 2e-5, what="weights")
