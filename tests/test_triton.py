"""Fused Triton NLA loss (nla_fast.kernels.nla_loss) against the float64 autograd oracle.

Without CUDA the kernels run in Triton's interpreter (tests/conftest.py sets
TRITON_INTERPRET=1), float32 only and small shapes; bf16/fp16, CUDA graphs, inductor and
B = 2^24 are marked ``gpu`` and run in ``make gpu-check``.

Tolerances (norm-wise: max|actual - expected| <= atol + rtol * max|expected|, the oracle is
nla_loss_reference in float64 on the same input values):
- float32 logits: loss, gradients and weights rtol 2e-5, atol 1e-7 (the kernel computes in
  float32 and sums up to 1024 terms per row);
- bfloat16/float16 logits: the loss is float32 maths on the exact low-precision inputs, so
  the same rtol; the gradients are stored in the logits' dtype, rtol 1e-2 (bf16) / 2e-3 (fp16);
- large logits (|z| up to 1e4): the same norm-wise rtol, since the error scales with |z|.
"""

import os
import subprocess
import sys
import textwrap

import pytest
import torch

import nla_fast
from nla_fast.config import NLAConfig
from nla_fast.loss import NLALoss, nla_loss
from nla_fast.reference import naw_weight_reference, nla_forward_backward_closed_form, nla_loss_reference

TOL = {
    torch.float32: dict(loss=2e-5, grad=2e-5, w=2e-5, atol=1e-7),
    torch.float64: dict(loss=2e-5, grad=2e-5, w=2e-5, atol=1e-7),  # computed in float32
    torch.bfloat16: dict(loss=2e-5, grad=1e-2, w=2e-5, atol=1e-6),
    torch.float16: dict(loss=2e-5, grad=2e-3, w=2e-5, atol=1e-6),
}

CONFIGS = {
    "paper": NLAConfig(),  # official consistency, summed over the batch
    "official": NLAConfig.official(),
    "paper-jsd": NLAConfig(consistency="jsd"),  # averaged over the batch
    "official-jsd": NLAConfig.official(consistency="jsd"),
    "paper-mean": NLAConfig(consistency_reduction="mean"),
    "jsd-sum": NLAConfig(consistency="jsd", consistency_reduction="sum"),
}
EPS_KINDS = [0.0, 0.37, 1.0, "tensor"]
DEV = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")


def assert_close(actual, expected, rtol, atol=1e-7, what=""):
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def make_eps(kind, device=DEV):
    """(eps for the kernel, float eps for the oracle): 'tensor' is a 0-d tensor read by the kernel."""
    if kind == "tensor":
        return torch.tensor(0.61, device=device), 0.61
    return kind, kind


def oracle(z, zf, y, eps, config):
    z64 = z.detach().double().cpu().requires_grad_()
    zf64 = zf.detach().double().cpu().requires_grad_()
    y64 = y.detach().cpu().long()
    loss = nla_loss_reference(z64, zf64, y64, eps, config)
    loss.backward()
    w = naw_weight_reference(z64.detach(), y64, eps, config)
    return loss.detach(), z64.grad, zf64.grad, w


def run_triton(z, zf, y, eps, config, grad_scale=1.0):
    """Kernel loss, grads (on leaf copies of z, zf in their own dtype/layout) and weights."""
    z = z.detach().clone().requires_grad_()
    zf = zf.detach().clone().requires_grad_()
    loss, w = nla_loss_triton(z, zf, y, eps, config, True)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()
    return loss.detach(), z.grad, zf.grad, w


def check(z, zf, y, eps_kind, config, dtype=torch.float32, grad_scale=1.0):
    eps, eps_ref = make_eps(eps_kind, z.device)
    loss, gz, gzf, w = run_triton(z, zf, y, eps, config, grad_scale)
    ref_loss, ref_gz, ref_gzf, ref_w = oracle(z, zf, y, eps_ref, config)
    tol = TOL[dtype]
    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert gz.dtype == z.dtype and gzf.dtype == zf.dtype
    assert w.dtype == torch.float32 and w.shape == y.shape
    assert_close(loss, ref_loss, tol["loss"], tol["atol"], "loss")
    assert_close(gz, ref_gz * grad_scale, tol["grad"], tol["atol"], "d/dlogits")
    assert_close(gzf, ref_gzf * grad_scale, tol["grad"], tol["atol"], "d/dlogits_flip")
    assert_close(w, ref_w, tol["w"], tol["atol"], "weights")


def rand_inputs(batch, classes, scale=3.0, dtype=torch.float32, seed=0, device=DEV):
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 7 + classes)
    z = (torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    noise = torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale / 2
    zf = (z.double() + noise).to(dtype)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return z.to(device), zf.to(device), y.to(device)


# ---------------------------------------------------------------------------------------
# value and gradient grid (small shapes: every combination; eps kind cycles over the grid)

SMALL = [(b, c) for b in (1, 2, 7, 33) for c in (2, 7, 8, 13)]


@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("batch,classes", SMALL)
def test_matches_reference_small_grid(batch, classes, config_name):
    eps_kind = EPS_KINDS[(batch + classes + len(config_name)) % len(EPS_KINDS)]
    z, zf, y = rand_inputs(batch, classes)
    check(z, zf, y, eps_kind, CONFIGS[config_name])


@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
@pytest.mark.parametrize("eps_kind", EPS_KINDS)
def test_every_eps(eps_kind, config_name):
    z, zf, y = rand_inputs(33, 7, seed=1)
    check(z, zf, y, eps_kind, CONFIGS[config_name])


@pytest.mark.parametrize(
    "batch,classes,config_name,eps_kind",
    [
        (257, 7, "paper", 0.37),  # two programs: partial sums + reduction launch
        (257, 8, "official-jsd", "tensor"),
        (257, 13, "official", 1.0),
        (33, 1000, "paper", 0.0),
        (2, 1000, "paper-jsd", "tensor"),
        (7, 1000, "official-jsd", 0.37),
        (257, 1000, "official", "tensor"),  # 129 programs of BLOCK_B = 2
    ],
)
def test_matches_reference_large_shapes(batch, classes, config_name, eps_kind):
    z, zf, y = rand_inputs(batch, classes, seed=2)
    check(z, zf, y, eps_kind, CONFIGS[config_name])


@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
@pytest.mark.parametrize("classes", [7, 13])
def test_large_logits(classes, config_name):
    gen = torch.Generator().manual_seed(classes)
    z = (torch.rand(33, classes, generator=gen) * 2 - 1) * 1e4
    zf = (torch.rand(33, classes, generator=gen) * 2 - 1) * 1e4
    zf[:11] = z[:11] + 1.0  # same argmax in a third of the rows
    y = torch.randint(0, classes, (33,), generator=gen)
    y[:5] = z[:5].argmax(1)  # confident and right
    check(z.to(DEV), zf.to(DEV), y.to(DEV), 0.37, CONFIGS[config_name])


@pytest.mark.parametrize("config_name", ["paper", "official", "official-jsd"])
def test_exact_ties(config_name):
    """g == n is the true case; the nearest negative is the first of tied negatives."""
    z = torch.tensor(
        [
            [1.0, 1.0, 1.0, 1.0, 1.0],  # all equal: g == n, k = first index != y
            [0.5, 2.0, -1.0, 2.0, 0.0],  # y = 1 ties with negative 3
            [3.0, 0.0, 3.0, 1.0, 3.0],  # y = 3, three tied negatives: k = 0
            [0.0, 0.0, 0.0, 0.0, 0.0],
            [-2.0, 4.0, 4.0, 4.0, -2.0],  # y = 2, tied with 1 and 3 on both sides
            [7.0, 7.0, 1.0, 1.0, 1.0],  # y = 0 ties with 1
        ]
    )
    y = torch.tensor([2, 1, 3, 0, 2, 0])
    zf = z.flip(1).contiguous()
    check(z.to(DEV), zf.to(DEV), y.to(DEV), 0.37, CONFIGS[config_name])
    check(z.to(DEV), z.clone().to(DEV), y.to(DEV), "tensor", CONFIGS[config_name])  # z == z'


def test_non_contiguous_inputs_and_target_dtypes():
    gen = torch.Generator().manual_seed(5)
    base = torch.randn(13, 40, generator=gen)  # transposed: stride (1, 40)
    z = base.t()  # (40, 13), column-major
    wide = torch.randn(40, 27, generator=gen)
    zf = wide[:, ::2]  # (40, 14) -> stride (27, 2); keep 13 columns
    zf = zf[:, :13]
    assert not z.is_contiguous() and not zf.is_contiguous()
    y_base = torch.randint(0, 13, (80,), generator=gen)
    targets = (y_base[::2], y_base[::2].to(torch.int32), y_base[1::2].to(torch.int16), y_base[::2].to(torch.uint8))
    for y in targets:
        check(z.to(DEV), zf.to(DEV), y.to(DEV), 0.37, CONFIGS["paper"])
    # row slices: stride(0) larger than C
    rows = torch.randn(99, 7, generator=gen)
    y = torch.randint(0, 7, (33,), generator=gen)
    check(rows[::3].to(DEV), rows[1::3].to(DEV), y.to(DEV), 1.0, CONFIGS["official-jsd"])


def test_non_contiguous_leaf_gradients():
    """Gradients flow back through views to their bases."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(7, 33, generator=gen, requires_grad=True)
    base_f = torch.randn(33, 14, generator=gen, requires_grad=True)
    y = torch.randint(0, 7, (33,), generator=gen)
    loss = nla_loss(base.t(), base_f[:, ::2], y, 0.37, backend="triton")
    loss.backward()
    ref_loss, ref_gz, ref_gzf, _ = oracle(base.t(), base_f[:, ::2], y, 0.37, NLAConfig())
    assert_close(loss, ref_loss, 2e-5, what="loss")
    assert_close(base.grad.t(), ref_gz, 2e-5, what="d/dlogits")
    assert_close(base_f.grad[:, ::2], ref_gzf, 2e-5, what="d/dlogits_flip")
    assert (base_f.grad[:, 1::2] == 0).all()


@pytest.mark.parametrize("grad_scale", [2.0, -0.5])
def test_backward_scales_by_grad_output(grad_scale):
    z, zf, y = rand_inputs(257, 7, seed=3)
    check(z, zf, y, "tensor", CONFIGS["official"], grad_scale=grad_scale)


def test_grad_output_from_a_tensor_and_retain_graph():
    z, zf, y = rand_inputs(9, 7, seed=4)
    z.requires_grad_()
    zf.requires_grad_()
    loss, _ = nla_loss_triton(z, zf, y, 0.37, NLAConfig(), False)
    _, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.37, NLAConfig())
    three = torch.tensor(3.0, device=DEV)
    gz1, gzf1 = torch.autograd.grad(loss, (z, zf), grad_outputs=three, retain_graph=True)
    gz2, gzf2 = torch.autograd.grad(loss, (z, zf))  # the saved gradients were not scaled in place
    assert_close(gz1, 3 * ref_gz, 2e-5)
    assert_close(gzf1, 3 * ref_gzf, 2e-5)
    assert_close(gz2, ref_gz, 2e-5)
    assert_close(gzf2, ref_gzf, 2e-5)


def test_backward_with_unit_grad_output_then_again_with_retain_graph():
    # grad_output == 1: the saved gradients are returned as they are (scaled in place only when
    # grad_output != 1); a second backward through the same graph still sees the unscaled values.
    z, zf, y = rand_inputs(40, 7, seed=6)
    z.requires_grad_()
    zf.requires_grad_()
    loss, _ = nla_loss_triton(z, zf, y, 0.5, NLAConfig(), False)
    _, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.5, NLAConfig())
    gz1, gzf1 = torch.autograd.grad(loss, (z, zf), retain_graph=True)
    gz2, gzf2 = torch.autograd.grad(loss, (z, zf), grad_outputs=torch.tensor(-2.0, device=DEV))
    assert_close(gz1, ref_gz, 2e-5)
    assert_close(gzf1, ref_gzf, 2e-5)
    assert_close(gz2, -2 * ref_gz, 2e-5)
    assert_close(gzf2, -2 * ref_gzf, 2e-5)


def test_return_weights_and_naw_weight():
    z, zf, y = rand_inputs(33, 7, seed=7)
    cfg = CONFIGS["official"]
    for eps_kind in EPS_KINDS:
        eps, eps_ref = make_eps(eps_kind)
        loss, w = nla_loss(z, zf, y, eps, cfg, backend="triton", return_weights=True)
        ref_w = naw_weight_reference(z.double().cpu(), y.cpu(), eps_ref, cfg)
        assert not w.requires_grad
        assert_close(w, ref_w, 2e-5, what="weights")
        w2 = naw_weight(z, y, eps, cfg)
        assert w2.dtype == torch.float32 and w2.shape == (33,)
        assert_close(w2, ref_w, 2e-5, what="naw_weight")
    loss2 = nla_loss(z, zf, y, 0.0, cfg, backend="triton")
    assert loss2.dim() == 0


def naw_weight(z, y, eps, cfg):
    return nla_fast.naw_weight(z, y, eps, cfg, backend="triton", validate=False)


def nla_loss_triton(z, zf, y, eps, cfg, return_weights):
    out = nla_loss(z, zf, y, eps, cfg, backend="triton", validate=False, return_weights=return_weights)
    return out if return_weights else (out, None)


@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 13), (257, 8), (5, 1000)])
def test_naw_weight_matches_reference(batch, classes):
    z, _, y = rand_inputs(batch, classes, seed=8)
    for cfg in (CONFIGS["paper"], CONFIGS["official"]):
        for eps_kind in (0.0, "tensor"):
            eps, eps_ref = make_eps(eps_kind)
            ref = naw_weight_reference(z.double().cpu(), y.cpu(), eps_ref, cfg)
            assert_close(naw_weight(z, y, eps, cfg), ref, 2e-5, what="naw_weight")


def test_no_grad_inputs():
    z, zf, y = rand_inputs(33, 7, seed=9)
    ref_loss, ref_gz, _, _ = oracle(z, zf, y, 0.37, NLAConfig())
    loss, w = nla_loss_triton(z, zf, y, 0.37, NLAConfig(), False)
    assert w is None and not loss.requires_grad and loss.grad_fn is None
    assert_close(loss, ref_loss, 2e-5)
    # only the first view needs a gradient (e.g. a detached flip)
    z1 = z.clone().requires_grad_()
    loss, _ = nla_loss_triton(z1, zf, y, 0.37, NLAConfig(), False)
    loss.backward()
    assert_close(z1.grad, ref_gz, 2e-5)
    # under no_grad nothing is differentiable
    with torch.no_grad():
        loss, _ = nla_loss_triton(z1, zf, y, 0.37, NLAConfig(), False)
    assert not loss.requires_grad
    assert_close(loss, ref_loss, 2e-5)


def test_float64_inputs_computed_in_float32():
    z, zf, y = rand_inputs(7, 13, dtype=torch.float64, seed=10)
    check(z, zf, y, 0.37, CONFIGS["paper"], dtype=torch.float64)


def test_mixed_input_dtypes():
    """Each gradient comes back in its own input's dtype."""
    z, zf, y = rand_inputs(7, 13, seed=10)
    check(z, zf.double(), y, 0.37, CONFIGS["official-jsd"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter warns on NaN maths
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_give_non_finite_loss(bad):
    z, zf, y = rand_inputs(33, 7, seed=11)
    for target in ("z", "zf"):
        a, b = z.clone(), zf.clone()
        (a if target == "z" else b)[4, 2] = bad
        if bad == float("-inf"):  # a whole row at -inf
            (a if target == "z" else b)[4] = bad
        a.requires_grad_()
        loss, _ = nla_loss_triton(a, b, y, 0.37, CONFIGS["paper"], True)
        loss.backward()
        assert not torch.isfinite(loss).item()


def test_out_of_range_targets_do_not_crash():
    z, zf, y = rand_inputs(33, 7, seed=12)
    bad = y.clone()
    bad[3], bad[10], bad[20] = -1, 7, 2**40  # 2^40 must not wrap into range as int32
    z.requires_grad_()
    loss, w = nla_loss(z, zf, bad, 0.37, backend="triton", validate=False, return_weights=True)
    loss.backward()
    assert torch.isnan(loss).item()
    ok = torch.ones(33, dtype=torch.bool)
    ok[[3, 10, 20]] = False
    assert torch.isnan(w[~ok.to(w.device)]).all()
    ref_w = naw_weight_reference(z.detach().double().cpu()[ok], y.cpu()[ok], 0.37)
    assert_close(w[ok.to(w.device)], ref_w, 2e-5, what="weights of the valid rows")
    with pytest.raises(ValueError):
        nla_loss(z, zf, bad, 0.37, backend="triton")


def test_deterministic_multi_program_reduction():
    z, zf, y = rand_inputs(513, 13, seed=13)  # 5 programs of 128 rows
    first = [t.clone() for t in run_triton(z, zf, y, 0.37, CONFIGS["paper"])]
    second = run_triton(z, zf, y, 0.37, CONFIGS["paper"])
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_public_api_and_module():
    z, zf, y = rand_inputs(7, 7, seed=14)
    ref_loss = oracle(z, zf, y, 0.37, CONFIGS["official"])[0]
    module = NLALoss(CONFIGS["official"], backend="triton")
    assert_close(module(z, zf, y, 0.37), ref_loss, 2e-5)
    eps = torch.tensor(0.37, device=DEV)
    loss, w = module(z, zf, y, eps, return_weights=True)
    assert_close(loss, ref_loss, 2e-5)
    assert w.shape == (7,)


def test_eps_tensor_is_read_at_run_time():
    z, zf, y = rand_inputs(7, 7, seed=15)
    eps = torch.tensor(0.0, device=DEV)
    first = nla_loss(z, zf, y, eps, backend="triton")
    eps.fill_(1.0)
    second = nla_loss(z, zf, y, eps, backend="triton")
    assert_close(first, oracle(z, zf, y, 0.0, NLAConfig())[0], 2e-5)
    assert_close(second, oracle(z, zf, y, 1.0, NLAConfig())[0], 2e-5)


@pytest.mark.parametrize("eps_kind", ["tensor", "float"])
@pytest.mark.filterwarnings("error:.*lru_cache.*:UserWarning")  # Dynamo's warning about tracing through a cache
def test_torch_compile_matches_eager(eps_kind):
    """Dynamo traces the autograd.Function and the custom op (aot_eager on CPU; inductor on GPU
    below); a second and third batch size make dynamo retrace with a symbolic batch."""
    _compile_check("aot_eager" if DEV.type == "cpu" else "inductor", batches=(9, 17), eps_kind=eps_kind)


def _compile_check(backend, batches, classes=7, eps_kind="tensor"):
    """torch.compile(fullgraph=True) of a step calling nla_loss(backend="triton") against eager:
    loss, both gradients and weights; eps a 0-d device tensor (read from memory: a new value
    reaches the compiled graph) or a Python float (under Inductor it arrives as fp64)."""
    eps = torch.tensor(0.37, device=DEV) if eps_kind == "tensor" else 0.37

    def step(a, b, t, e):
        loss, w = nla_loss(a, b, t, e, backend="triton", validate=False, return_weights=True)
        return 2.0 * loss, w

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=backend, fullgraph=True)
    for batch in batches:
        z, zf, y = rand_inputs(batch, classes, seed=16)
        if eps_kind == "tensor":
            eps.fill_(0.37)
        results = []
        for fn in (step, compiled):
            a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
            loss, w = fn(a, b, y, eps)
            loss.backward()
            results.append((loss.detach(), a.grad, b.grad, w))
        for eager_t, compiled_t in zip(*results):
            assert_close(compiled_t, eager_t, 1e-6, what=f"B={batch}")
        assert_close(results[0][0], 2 * oracle(z, zf, y, 0.37, NLAConfig())[0], 2e-5)
        if eps_kind == "tensor":
            eps.fill_(0.9)  # a new eps value reaches the compiled graph (it is read from memory)
            assert_close(compiled(z, zf, y, eps)[0], step(z, zf, y, eps)[0], 1e-6, what="new eps")
        else:
            assert_close(compiled(z, zf, y, 0.9)[0], step(z, zf, y, 0.9)[0], 1e-6, what="new eps")


# ---------------------------------------------------------------------------------------
# issue 9 / 11: layouts, shapes, reductions, -inf logits, target dtypes, the compile fault

# odd class counts at a small batch; odd batch sizes at C = 7: single program (B * BLOCK_C <= 4096),
# persistent grid with a partial last tile (B = 1000: 2 tiles of 512 rows), more tiles than
# programs (B = 2600: 6 tiles on 4 interpreter programs, the tail to program 1)
ODD_SHAPES = [(5, c) for c in (2, 3, 7, 8, 9, 100, 1000, 1025)] + [(b, 7) for b in (1, 31, 33, 257, 1000, 2600)]


@pytest.mark.parametrize("batch,classes", ODD_SHAPES)
def test_odd_shapes_flat_and_strided(batch, classes):
    """Contiguous logits take the flat path (32-bit in-tile offsets; aligned rows when C is a
    power of two); the same values through transposed / column-sliced views take the strided path."""
    name = list(CONFIGS)[(batch + classes) % len(CONFIGS)]
    z, zf, y = rand_inputs(batch, classes, seed=21)
    check(z, zf, y, EPS_KINDS[batch % len(EPS_KINDS)], CONFIGS[name])
    z_t = z.t().contiguous().t()  # same values, column-major
    zf_wide = torch.zeros(batch, 2 * classes, device=DEV)
    zf_wide[:, ::2] = zf
    zf_s = zf_wide[:, ::2]  # stride (2C, 2)
    assert not z_t.is_contiguous() or batch == 1
    assert not zf_s.is_contiguous()
    check(z_t, zf_s, y, 0.37, CONFIGS[name])


@pytest.mark.parametrize("config_name", ["paper", "paper-mean", "paper-jsd", "jsd-sum"])
@pytest.mark.parametrize("batch", [1, 33, 1000])
def test_consistency_reduction_every_combination(config_name, batch):
    """NLAConfig(consistency_reduction=...) for both variants: value and gradient against the
    autograd oracle and the closed form; 'sum' and 'mean' differ by exactly the factor B in the
    consistency part."""
    cfg = CONFIGS[config_name]
    z, zf, y = rand_inputs(batch, 7, seed=22)
    check(z, zf, y, 0.37, cfg)
    loss, gz, gzf, w = run_triton(z, zf, y, 0.37, cfg)
    ref = nla_forward_backward_closed_form(z.double().cpu(), zf.double().cpu(), y.cpu(), 0.37, cfg)
    for actual, expected, what in zip((loss, gz, gzf, w), ref, ("loss", "d/dlogits", "d/dlogits_flip", "weights")):
        assert_close(actual, expected, 2e-5, what=f"closed form {what}")
    if batch > 1:  # the consistency gradient of z' is (1 - lam) * reg_scale * ...: sum = B * mean
        other = NLAConfig(consistency=cfg.consistency,
                          consistency_reduction="sum" if cfg.consistency_reduction == "mean" else "mean")
        gzf_other = run_triton(z, zf, y, 0.37, other)[2]
        factor = batch if cfg.consistency_reduction == "sum" else 1.0 / batch
        assert_close(gzf, gzf_other * factor, 2e-5, what="sum vs mean")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("config_name", ["paper", "official-jsd", "paper-mean", "jsd-sum"])
@pytest.mark.parametrize("where", ["z", "zf", "both-same", "both-different"])
@pytest.mark.parametrize("classes", [2, 7])
def test_minus_inf_non_target_logit_is_finite(config_name, where, classes):
    """A -inf logit on a class that is not the target: finite loss and gradients equal to the
    reference, in one view or both (the JSD term made NaN from (-inf) - (-inf) before). With
    C = 2 the only negative is -inf (p_nn = 0)."""
    batch = 9
    z, zf, y = rand_inputs(batch, classes, seed=23)
    for row in range(batch):
        others = [c for c in range(classes) if c != int(y[row])]
        first, second = others[0], others[-1]
        if where in ("z", "both-same", "both-different"):
            z[row, first] = float("-inf")
        if where in ("zf", "both-same"):
            zf[row, first] = float("-inf")
        if where == "both-different":
            zf[row, second] = float("-inf")
    loss, gz, gzf, w = run_triton(z, zf, y, 0.37, CONFIGS[config_name])
    assert torch.isfinite(loss).item() and torch.isfinite(gz).all() and torch.isfinite(gzf).all()
    assert torch.isfinite(w).all()
    check(z, zf, y, 0.37, CONFIGS[config_name])


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_public_api_target_dtypes(dtype):
    """int32/int64 reach the kernel as they are; other integer dtypes are widened by the front."""
    z, zf, y = rand_inputs(33, 7, seed=24)
    ref_loss, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.37, NLAConfig())
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_loss(a, b, y.to(dtype), 0.37, backend="triton")
    loss.backward()
    assert_close(loss, ref_loss, 2e-5, what=f"loss, {dtype}")
    assert_close(a.grad, ref_gz, 2e-5, what=f"d/dlogits, {dtype}")
    assert_close(b.grad, ref_gzf, 2e-5, what=f"d/dlogits_flip, {dtype}")


def test_small_batches_are_one_launch_with_a_fixed_config_and_nothing_is_tuned_here():
    """B * BLOCK_C <= 4096 is one program whose config depends on B and C only (same loss bits in
    every process); the interpreter and the CPU never autotune."""
    from nla_fast.kernels import launch

    assert launch.fixed_config(32, 8) == launch.Config(32, 1, 1)  # the trainer's batch: one warp, one tile
    assert launch.fixed_config(512, 8).block_b == 512 and launch.fixed_config(513, 8).block_b == 512
    assert not launch.may_tune(torch.device("cpu")) and not launch.tunable_device(torch.device("cpu"))
    z, zf, y = rand_inputs(2600, 7, seed=25)
    run_triton(z, zf, y, 0.37, CONFIGS["paper"])
    assert launch._tuned == {}


def _stand_in_tuning(monkeypatch, times):
    """Tuning as on a GPU, with the interpreted kernel: candidate i 'takes' times[i] ms (None: it
    spills); every timed candidate is launched for real, so its outputs are checked too."""
    from nla_fast.kernels import launch

    timed = []

    def time_candidate(config, flags, args_for, batch, device):
        index = launch.tuning_candidates(flags["BLOCK_C"]).index(config)
        timed.append((config, flags["GRAD_Z"]))
        kwargs = launch._config_kwargs(flags, config)
        grid = launch.grid_size(batch, device, config, 1)
        launch._nla_fwd_kernel[(grid,)](*args_for(grid), **kwargs)
        return times[index]

    allowed = {"now": True}
    monkeypatch.setattr(launch, "tunable_device", lambda device: True)
    monkeypatch.setattr(launch, "may_tune", lambda device: allowed["now"])
    monkeypatch.setattr(launch, "time_candidate", time_candidate)
    monkeypatch.setattr(launch, "_tuned", {})
    monkeypatch.setattr(launch, "_plans", {})
    return launch, timed, allowed


@pytest.mark.parametrize("which", [1, -1])
def test_tuning_picks_the_fastest_non_spilling_candidate_once_per_kind_of_call(monkeypatch, which):
    """The GPU-only tuning path, its Python side: the fastest candidate that does not spill wins
    (the spilling one is faster and still loses), the choice is remembered per kind of call, and
    a forward-only call is tuned apart from a forward + backward one (their kernels differ)."""
    from nla_fast.kernels import launch as module

    candidates = module.tuning_candidates(8)
    times = [5.0] * len(candidates)
    times[which] = 1.0
    times[0] = None  # "spills": never chosen, although it would be timed as fastest
    launch, timed, _ = _stand_in_tuning(monkeypatch, times)
    z, zf, y = rand_inputs(1000, 7, seed=26)
    for _ in range(2):
        check(z, zf, y, 0.37, CONFIGS["paper"])
    assert len(timed) == len(candidates)  # tuned once, then remembered
    assert list(launch._tuned.values()) == [candidates[which]]
    with torch.no_grad():  # another kind of call: tuned for itself
        loss = nla_loss(z, zf, y, 0.37, CONFIGS["paper"], backend="triton", validate=False)
    assert len(timed) == 2 * len(candidates) and [g for _, g in timed[len(candidates):]] == [False] * len(candidates)
    ref_loss = oracle(z, zf, y, 0.37, CONFIGS["paper"])[0]
    assert_close(loss, ref_loss, 2e-5)


def test_a_plan_made_where_tuning_is_impossible_is_not_remembered(monkeypatch):
    """Under capture or tracing nothing is timed: the heuristic config runs, and the next eager
    call (where timing is allowed) still tunes."""
    launch, timed, allowed = _stand_in_tuning(monkeypatch, [1.0] * 8)
    z, zf, y = rand_inputs(1000, 7, seed=27)
    allowed["now"] = False
    check(z, zf, y, 0.37, CONFIGS["paper"])
    assert timed == [] and launch._plans == {}
    allowed["now"] = True
    check(z, zf, y, 0.37, CONFIGS["paper"])
    assert len(timed) == len(launch.tuning_candidates(8)) and len(launch._plans) == 1


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import json, sys, triton
    from triton.backends.compiler import GPUTarget
    from nla_fast.kernels.nla_loss import _nla_fwd_kernel as kernel

    # Scalars typed as Inductor passes them: Python floats as fp64, sizes and strides as i64.
    case = json.loads(sys.argv[1])
    signature, attrs = {}, {}
    for index, param in enumerate(kernel.params):
        name = param.name
        if param.is_constexpr:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + {"y_ptr": "i64", "loss_ptr": "fp32", "w_ptr": "fp32",
                                     "eps_ptr": "fp32"}.get(name, case["dtype"])
            attrs[(index,)] = [["tt.divisibility", 16]]  # what the launcher says of aligned tensors
        elif name in ("B", "C") or name.startswith("stride"):
            signature[name] = "i64"
        else:
            signature[name] = "fp64"
    constexprs = {k: v for k, v in case["constexprs"].items() if k in signature}
    source = triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32),
                              options=dict(num_warps=case["num_warps"], num_stages=1))
    print(json.dumps({"ttgir": compiled.asm["ttgir"], "ptx": compiled.asm["ptx"]}))
    """
)

_FLAGS = dict(EPS_FROM_PTR=False, HAS_FLIP=True, JSD=False, REG_MEAN=False, WRITE_LOSS=True, GRAD_Z=True,
              GRAD_ZF=True, WRITE_W=True, FLAT_ROWS=True, EXACT_C=False, BLOCK_B=512, BLOCK_C=8,
              PROGRAMS_PER_SM=4, NUM_STAGES=1)


def _compile_for_sm90(dtype, num_warps=8, **flags):
    """Compile the forward kernel for an sm_90 target in a subprocess WITHOUT the interpreter
    (tests/conftest.py sets TRITON_INTERPRET=1 in this process): what Inductor does on a GPU."""
    import json

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    case = json.dumps({"dtype": dtype, "num_warps": num_warps, "constexprs": {**_FLAGS, **flags}})
    done = subprocess.run([sys.executable, "-c", _COMPILE_SCRIPT, case], env=env, capture_output=True,
                          text=True, timeout=300)
    if done.returncode != 0 and "ptxas" in done.stderr and "not found" in done.stderr.lower():
        pytest.skip(f"no ptxas for a CUDA compile here: {done.stderr[-300:]}")
    assert done.returncode == 0, f"sm_90 compile of _nla_fwd_kernel failed:\n{done.stderr[-3000:]}"
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize(
    "dtype,flags",
    [
        ("fp32", dict(JSD=True, REG_MEAN=True, EPS_FROM_PTR=True, FLAT_ROWS=False, BLOCK_B=4, BLOCK_C=1024)),
        ("fp16", dict(HAS_FLIP=False, WRITE_LOSS=False, GRAD_Z=False, GRAD_ZF=False, EXACT_C=True)),
    ],
)
def test_kernel_compiles_for_sm90_with_fp64_scalars(dtype, flags):
    """Would have caught the Inductor fault on the CPU: the kernel compiled to PTX for sm_90 with
    fp64 float scalars and i64 sizes ('Loop-carried variable acc ... re-assigned to fp64' before)."""
    compiled = _compile_for_sm90(dtype, **flags)
    assert ".entry _nla_fwd_kernel" in compiled["ptx"]


def test_flat_path_compiles_for_sm90_row_per_thread_with_vector_stores():
    """The trainer's flat path, eps by value (the fault of the first GPU run), compiled with fp64
    scalars; and the bandwidth design as compiled (sm_90, bf16, C = 7): whole rows in one thread
    (no shuffles in the row reductions), gradients stored as 16-byte vectors."""
    compiled = _compile_for_sm90("bf16")
    assert ".entry _nla_fwd_kernel" in compiled["ptx"]
    assert "sizePerThread = [1, 8], threadsPerWarp = [32, 1]" in compiled["ttgir"], "compute tile is not row-per-thread"
    assert "st.global.v4" in compiled["ptx"], "no 16-byte vector stores of the gradients"
    assert compiled["ptx"].count("shfl.sync") <= 8, "row reductions use warp shuffles"


# ---------------------------------------------------------------------------------------
# GPU only (make gpu-check)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize(
    "batch,classes", [(1, 2), (33, 7), (257, 8), (4097, 13), (65, 1000), (17, 1024)]
)
def test_low_precision_gpu(dtype, batch, classes):
    for i, name in enumerate(CONFIGS):
        z, zf, y = rand_inputs(batch, classes, dtype=dtype, seed=i, device="cuda")
        check(z, zf, y, EPS_KINDS[i], CONFIGS[name], dtype=dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("batch,classes", [(1, 7), (32, 7), (1000, 7), (4097, 1000), (3, 1024)])
def test_float32_gpu(batch, classes):
    for i, name in enumerate(CONFIGS):
        z, zf, y = rand_inputs(batch, classes, seed=i, device="cuda")
        check(z, zf, y, EPS_KINDS[i], CONFIGS[name])


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [32, 1000])  # one launch / partial sums + reduction
@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
def test_cuda_graph_capture_and_replay(batch, config_name):
    cfg = CONFIGS[config_name]
    classes = 7
    z, zf, y = rand_inputs(batch, classes, seed=17, device="cuda")
    static_z = z.clone().requires_grad_()
    static_zf = zf.clone().requires_grad_()
    static_y = y.clone()
    eps = torch.tensor(0.1, device="cuda")

    def step():
        loss, w = nla_loss(static_z, static_zf, static_y, eps, cfg, backend="triton", validate=False,
                           return_weights=True)
        loss.backward()
        return loss, w

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm up: compile the kernels before capture
        for _ in range(2):
            static_z.grad = static_zf.grad = None
            step()
    torch.cuda.current_stream().wait_stream(side)
    static_z.grad = static_zf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_loss, static_w = step()

    for seed, eps_value in ((18, 0.8), (19, 0.0)):
        new_z, new_zf, new_y = rand_inputs(batch, classes, seed=seed, device="cuda")
        with torch.no_grad():
            static_z.copy_(new_z)
            static_zf.copy_(new_zf)
            static_y.copy_(new_y)
            eps.fill_(eps_value)
        graph.replay()
        torch.cuda.synchronize()
        loss, gz, gzf, w = run_triton(new_z, new_zf, new_y, eps_value, cfg)
        assert_close(static_loss, loss, 1e-6, what="replayed loss")
        assert_close(static_z.grad, gz, 1e-6, what="replayed d/dlogits")
        assert_close(static_zf.grad, gzf, 1e-6, what="replayed d/dlogits_flip")
        assert_close(static_w, w, 1e-6, what="replayed weights")
        ref_loss = oracle(new_z, new_zf, new_y, eps_value, cfg)[0]
        assert_close(static_loss, ref_loss, 2e-5, what="replayed loss vs oracle")


@pytest.mark.gpu
@pytest.mark.parametrize("eps_kind", ["tensor", "float"])
def test_torch_compile_inductor_gpu(eps_kind):
    """The first GPU run's fault: Inductor passed the float scalars as fp64 and the persistent
    loop's sum turned fp64 (a compile error). Both eps kinds, single-program and persistent grids."""
    _compile_check("inductor", batches=(32, 1000, 999, 4097), eps_kind=eps_kind)
    _compile_check("inductor", batches=(3, 65), classes=1000, eps_kind=eps_kind)


@pytest.mark.gpu
def test_batch_2_pow_24_int64_offsets():
    """B = 2^24 rows with a row stride of 160: row * stride exceeds int32."""
    batch, classes, stride = 2**24, 7, 160
    cfg = CONFIGS["official-jsd"]  # every term is a batch mean, so chunks of the oracle add up
    gen = torch.Generator(device="cuda").manual_seed(20)
    base = torch.empty(batch, stride, dtype=torch.bfloat16, device="cuda")
    base_f = torch.empty(batch, stride, dtype=torch.bfloat16, device="cuda")
    base[:, :classes] = torch.randn(batch, classes, generator=gen, device="cuda") * 3
    base_f[:, :classes] = torch.randn(batch, classes, generator=gen, device="cuda") * 3
    z, zf = base[:, :classes], base_f[:, :classes]
    y = torch.randint(0, classes, (batch,), generator=gen, device="cuda")
    zl, zfl = z.detach().requires_grad_(), zf.detach().requires_grad_()
    loss, w = nla_loss_triton(zl, zfl, y, 0.37, cfg, True)
    loss.backward()
    chunk = 2**20
    total = torch.zeros((), dtype=torch.float64, device="cuda")
    for start in range(0, batch, chunk):
        rows = slice(start, start + chunk)
        with torch.no_grad():
            total += nla_loss_reference(z[rows].double(), zf[rows].double(), y[rows], 0.37, cfg) * chunk
    assert_close(loss, total / batch, 1e-4, what="loss")
    for rows in (slice(0, chunk), slice(batch - chunk, batch)):
        _, ref_gz, ref_gzf, ref_w = oracle(z[rows], zf[rows], y[rows], 0.37, cfg)
        assert_close(zl.grad[rows], ref_gz * chunk / batch, 1e-2, 1e-12, "d/dlogits")
        assert_close(zfl.grad[rows], ref_gzf * chunk / batch, 1e-2, 1e-12, "d/dlogits_flip")
        assert_close(w[rows], ref_w, 2e-5, 1e-6, "weights")
