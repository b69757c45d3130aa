"""Every backend of ``nla_fast.nla_loss`` against the float64 oracle, and the behaviour they share.

Cases, oracle and tolerances: ``tests/loss_cases.py``. Without CUDA the Triton kernels run in
Triton's interpreter (float32, small shapes) and the extension runs its CPU kernels; the same
tests run on the GPU in ``make gpu-check`` (bf16/fp16, CUDA graphs, Inductor: the backends' own
test files, marked ``gpu``).
"""
from __future__ import annotations

import pytest
import torch

import nla_fast
from loss_cases import (
    CONFIGS,
    DEVICE,
    EPS_KINDS,
    assert_close,
    check,
    compile_matches_eager,
    fused_backends,
    make_eps,
    make_inputs,
    oracle,
    run,
)
from nla_fast.config import NLAConfig
from nla_fast.reference import naw_weight_reference, nla_forward_backward_closed_form

BACKENDS = ["reference", *fused_backends()]
FUSED = fused_backends()

# every combination of small shapes; then wider rows and several programs / column chunks
SMALL = [(b, c) for b in (1, 2, 7, 33) for c in (2, 7, 8, 13)]
LARGER = [(257, 7), (257, 8), (257, 13), (33, 1000), (2, 1000), (7, 1000), (257, 1000)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("config_name", list(CONFIGS))
@pytest.mark.parametrize("batch,classes", SMALL + LARGER)
def test_matches_the_oracle(backend, batch, classes, config_name):
    """Loss, both gradients and the weights; the eps kind (float or 0-d tensor) cycles over the grid."""
    eps_kind = EPS_KINDS[(batch + classes + len(config_name)) % len(EPS_KINDS)]
    z, zf, y = make_inputs(batch, classes)
    check(backend, z, zf, y, eps_kind, CONFIGS[config_name])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
@pytest.mark.parametrize("eps_kind", EPS_KINDS)
def test_every_eps(backend, eps_kind, config_name):
    z, zf, y = make_inputs(33, 7, seed=1)
    check(backend, z, zf, y, eps_kind, CONFIGS[config_name])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config_name", ["paper", "official-jsd"])
@pytest.mark.parametrize("classes", [7, 13])
def test_large_logits(backend, classes, config_name):
    gen = torch.Generator().manual_seed(classes)
    z = (torch.rand(33, classes, generator=gen) * 2 - 1) * 1e4
    zf = (torch.rand(33, classes, generator=gen) * 2 - 1) * 1e4
    zf[:11] = z[:11] + 1.0  # same argmax in a third of the rows
    y = torch.randint(0, classes, (33,), generator=gen)
    y[:5] = z[:5].argmax(1)  # confident and right
    for dtype in (torch.float32, torch.float64):
        check(backend, z.to(DEVICE, dtype), zf.to(DEVICE, dtype), y.to(DEVICE), 0.37, CONFIGS[config_name])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config_name", ["paper", "official", "official-jsd"])
def test_exact_ties(backend, config_name):
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
    check(backend, z.to(DEVICE), zf.to(DEVICE), y.to(DEVICE), 0.37, CONFIGS[config_name])
    check(backend, z.to(DEVICE), z.clone().to(DEVICE), y.to(DEVICE), "tensor", CONFIGS[config_name])  # z == z'


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_inputs_and_target_dtypes(backend):
    gen = torch.Generator().manual_seed(5)
    z = torch.randn(13, 40, generator=gen).t()  # (40, 13), column-major
    zf = torch.randn(40, 27, generator=gen)[:, ::2][:, :13]  # stride (27, 2)
    assert not z.is_contiguous() and not zf.is_contiguous()
    y_base = torch.randint(0, 13, (80,), generator=gen)
    for y in (y_base[::2], y_base[::2].to(torch.int32), y_base[1::2].to(torch.int16), y_base[::2].to(torch.uint8)):
        check(backend, z.to(DEVICE), zf.to(DEVICE), y.to(DEVICE), 0.37, CONFIGS["paper"])
    rows = torch.randn(99, 7, generator=gen)  # row slices: stride(0) larger than C
    y = torch.randint(0, 7, (33,), generator=gen)
    check(backend, rows[::3].to(DEVICE), rows[1::3].to(DEVICE), y.to(DEVICE), 1.0, CONFIGS["official-jsd"])


@pytest.mark.parametrize("backend", FUSED)
def test_non_contiguous_leaf_gradients(backend):
    """Gradients flow back through views to their bases."""
    gen = torch.Generator().manual_seed(6)
    base = torch.randn(7, 33, generator=gen).to(DEVICE).requires_grad_()
    base_f = torch.randn(33, 14, generator=gen).to(DEVICE).requires_grad_()
    y = torch.randint(0, 7, (33,), generator=gen).to(DEVICE)
    loss = nla_fast.nla_loss(base.t(), base_f[:, ::2], y, 0.37, backend=backend)
    loss.backward()
    ref_loss, ref_gz, ref_gzf, _ = oracle(base.t(), base_f[:, ::2], y, 0.37, NLAConfig())
    assert_close(loss, ref_loss, 2e-5, what="loss")
    assert_close(base.grad.t(), ref_gz, 2e-5, what="d/dlogits")
    assert_close(base_f.grad[:, ::2], ref_gzf, 2e-5, what="d/dlogits_flip")
    assert (base_f.grad[:, 1::2] == 0).all()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("grad_scale", [2.0, -0.5])
def test_backward_scales_by_grad_output(backend, grad_scale):
    z, zf, y = make_inputs(257, 7, seed=3)
    check(backend, z, zf, y, "tensor", CONFIGS["official"], grad_scale=grad_scale)


@pytest.mark.parametrize("backend", FUSED)
def test_retain_graph_backward_after_a_scaled_one(backend):
    """The first backward scales the saved gradients in place; a second one (retain_graph)
    undoes that scale, and the gradients returned first are not changed by it."""
    z, zf, y = make_inputs(9, 7, seed=4)
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_fast.nla_loss(a, b, y, 0.37, backend=backend, validate=False)
    _, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.37, NLAConfig())
    three = torch.tensor(3.0, device=DEVICE)
    gz1, gzf1 = torch.autograd.grad(loss, (a, b), grad_outputs=three, retain_graph=True)
    gz2, gzf2 = torch.autograd.grad(loss, (a, b), retain_graph=True)
    gz3, gzf3 = torch.autograd.grad(loss, (a, b), grad_outputs=torch.tensor(0.5, device=DEVICE))
    for got, want in ((gz1, 3 * ref_gz), (gzf1, 3 * ref_gzf), (gz2, ref_gz), (gzf2, ref_gzf),
                      (gz3, 0.5 * ref_gz), (gzf3, 0.5 * ref_gzf)):
        assert_close(got, want, 2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_unit_grad_output_then_again_with_retain_graph(backend):
    """grad_output == 1: the saved gradients are returned as they are; a second backward
    through the same graph still sees the unscaled values; .grad accumulates."""
    z, zf, y = make_inputs(40, 7, seed=6)
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_fast.nla_loss(a, b, y, 0.5, backend=backend, validate=False)
    _, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.5, NLAConfig())
    gz1, gzf1 = torch.autograd.grad(loss, (a, b), retain_graph=True)
    gz2, gzf2 = torch.autograd.grad(loss, (a, b), grad_outputs=torch.tensor(-2.0, device=DEVICE))
    for got, want in ((gz1, ref_gz), (gzf1, ref_gzf), (gz2, -2 * ref_gz), (gzf2, -2 * ref_gzf)):
        assert_close(got, want, 2e-5)
    loss = nla_fast.nla_loss(a, b, y, 0.5, backend=backend, validate=False)
    (2.0 * loss).backward(retain_graph=True)
    loss.backward()
    assert_close(a.grad, 3.0 * ref_gz, 2e-5)
    assert_close(b.grad, 3.0 * ref_gzf, 2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_double_backward_is_refused_with_a_clear_error(backend):
    """A gradient penalty through the loss (create_graph=True) would silently miss the second-order
    term: the fused backends refuse it, saying to use the reference, which gets it right."""
    z, zf, y = make_inputs(8, 7, seed=30)
    penalties = {}
    for name in (backend, "reference"):
        a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
        loss = nla_fast.nla_loss(a, b, y, 0.37, backend=name)
        gz, gzf = torch.autograd.grad(loss, (a, b), create_graph=True)
        _, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.37, NLAConfig())
        assert_close(gz, ref_gz, 2e-5)  # the first derivative is right either way
        penalty = gz.pow(2).sum() + gzf.pow(2).sum()
        if name == backend:
            with pytest.raises(RuntimeError, match="first derivatives only.*backend='reference'"):
                penalty.backward()
        else:
            penalty.backward()
            penalties[name] = a.grad
    assert torch.isfinite(penalties["reference"]).all() and penalties["reference"].abs().max() > 0


@pytest.mark.parametrize("backend", FUSED)
def test_return_weights_and_naw_weight(backend):
    z, zf, y = make_inputs(33, 7, seed=7)
    cfg = CONFIGS["official"]
    for eps_kind in EPS_KINDS:
        eps, eps_ref = make_eps(eps_kind)
        _, w = nla_fast.nla_loss(z, zf, y, eps, cfg, backend=backend, return_weights=True)
        ref_w = naw_weight_reference(z.double().cpu(), y.cpu(), eps_ref, cfg)
        assert not w.requires_grad and w.dtype == torch.float32
        assert_close(w, ref_w, 2e-5, what="weights")
        w2 = nla_fast.naw_weight(z, y, eps, cfg, backend=backend)
        assert w2.dtype == torch.float32 and w2.shape == (33,) and not w2.requires_grad
        assert_close(w2, ref_w, 2e-5, what="naw_weight")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,classes", [(1, 2), (7, 13), (257, 8), (5, 1000)])
def test_naw_weight_matches_reference(backend, batch, classes):
    z, _, y = make_inputs(batch, classes, seed=8)
    for cfg in (CONFIGS["paper"], CONFIGS["official"]):
        for eps_kind in (0.0, "tensor"):
            eps, eps_ref = make_eps(eps_kind)
            ref = naw_weight_reference(z.double().cpu(), y.cpu(), eps_ref, cfg)
            assert_close(nla_fast.naw_weight(z, y, eps, cfg, backend=backend), ref, 2e-5, what="naw_weight")


@pytest.mark.parametrize("backend", FUSED)
def test_inputs_without_gradients(backend):
    z, zf, y = make_inputs(33, 7, seed=9)
    ref_loss, ref_gz, _, _ = oracle(z, zf, y, 0.37, NLAConfig())
    loss = nla_fast.nla_loss(z, zf, y, 0.37, backend=backend)
    assert not loss.requires_grad and loss.grad_fn is None
    assert_close(loss, ref_loss, 2e-5)
    z1 = z.clone().requires_grad_()  # only the first view needs a gradient (e.g. a detached flip)
    nla_fast.nla_loss(z1, zf, y, 0.37, backend=backend).backward()
    assert_close(z1.grad, ref_gz, 2e-5)
    with torch.no_grad():  # under no_grad nothing is differentiable
        loss = nla_fast.nla_loss(z1, zf, y, 0.37, backend=backend)
    assert not loss.requires_grad
    assert_close(loss, ref_loss, 2e-5)


@pytest.mark.parametrize("backend", FUSED)
def test_float64_and_mixed_input_dtypes(backend):
    """float64 logits (float32 maths on Triton, float64 on the extension); each gradient comes
    back in its own input's dtype."""
    z, zf, y = make_inputs(7, 13, dtype=torch.float64, seed=10)
    check(backend, z, zf, y, 0.37, CONFIGS["paper"])
    z, zf, y = make_inputs(7, 13, seed=10)
    check(backend, z, zf.double(), y, 0.37, CONFIGS["official-jsd"])


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy in the interpreter warns on NaN maths
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_logits_give_non_finite_loss(backend, bad):
    z, zf, y = make_inputs(33, 7, seed=11)
    for target in ("z", "zf"):
        a, b = z.clone(), zf.clone()
        (a if target == "z" else b)[4, 2] = bad
        if bad == float("-inf"):  # a whole row at -inf (one -inf logit is a valid probability 0)
            (a if target == "z" else b)[4] = bad
        a.requires_grad_()
        loss = nla_fast.nla_loss(a, b, y, 0.37, backend=backend, validate=False)
        loss.backward()
        assert not torch.isfinite(loss).item()


@pytest.mark.parametrize("backend", FUSED)
def test_out_of_range_targets_give_nan_rows_or_an_error(backend):
    z, zf, y = make_inputs(33, 7, seed=12)
    bad = y.clone()
    bad[3], bad[10], bad[20] = -1, 7, 2**40  # 2^40 must not wrap into range as int32
    a = z.clone().requires_grad_()
    loss, w = nla_fast.nla_loss(a, zf, bad, 0.37, backend=backend, validate=False, return_weights=True)
    loss.backward()
    assert torch.isnan(loss).item()
    ok = torch.ones(33, dtype=torch.bool)
    ok[[3, 10, 20]] = False
    assert torch.isnan(w[~ok.to(w.device)]).all()
    ref_w = naw_weight_reference(z.double().cpu()[ok], y.cpu()[ok], 0.37)
    assert_close(w[ok.to(w.device)], ref_w, 2e-5, what="weights of the valid rows")
    assert torch.isfinite(a.grad[ok.to(a.device)]).all()
    with pytest.raises(ValueError, match=r"target\[3\] = -1 is outside \[0, 7\)"):
        nla_fast.nla_loss(z, zf, bad, 0.37, backend=backend)


@pytest.mark.parametrize("backend", FUSED)
def test_deterministic(backend):
    z, zf, y = make_inputs(513, 13, seed=13)  # several programs of the Triton kernel
    first = [t.clone() for t in run(backend, z, zf, y, 0.37, CONFIGS["paper"])]
    for a, b in zip(first, run(backend, z, zf, y, 0.37, CONFIGS["paper"])):
        assert torch.equal(a, b)


@pytest.mark.parametrize("backend", FUSED)
def test_module_wrapper_and_eps_tensor_read_at_run_time(backend):
    z, zf, y = make_inputs(7, 7, seed=14)
    ref_loss = oracle(z, zf, y, 0.37, CONFIGS["official"])[0]
    module = nla_fast.NLALoss(CONFIGS["official"], backend=backend)
    assert_close(module(z, zf, y, 0.37), ref_loss, 2e-5)
    eps = torch.tensor(0.37, device=DEVICE)
    loss, w = module(z, zf, y, eps, return_weights=True)
    assert_close(loss, ref_loss, 2e-5)
    assert w.shape == (7,)
    eps.fill_(1.0)  # the same tensor, a new value: read from memory at run time
    assert_close(module(z, zf, y, eps), oracle(z, zf, y, 1.0, CONFIGS["official"])[0], 2e-5)


# odd class counts at a small batch; odd batch sizes at C = 7: single program (B * BLOCK_C <= 4096),
# persistent grid with a partial last tile (B = 1000: 2 tiles of 512 rows), more tiles than
# programs (B = 2600: 6 tiles on 4 interpreter programs); C = 1025: a column chunk past 1024
ODD_SHAPES = [(5, c) for c in (2, 3, 7, 8, 9, 100, 1000, 1025)] + [(b, 7) for b in (1, 31, 33, 257, 1000, 2600)]


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("batch,classes", ODD_SHAPES)
def test_odd_shapes_contiguous_and_strided(backend, batch, classes):
    """Contiguous logits and the same values through column-major / column-sliced views."""
    name = list(CONFIGS)[(batch + classes) % len(CONFIGS)]
    z, zf, y = make_inputs(batch, classes, seed=21)
    check(backend, z, zf, y, EPS_KINDS[batch % len(EPS_KINDS)], CONFIGS[name])
    z_t = z.t().contiguous().t()  # same values, column-major
    zf_wide = torch.zeros(batch, 2 * classes, device=DEVICE)
    zf_wide[:, ::2] = zf
    zf_s = zf_wide[:, ::2]  # stride (2C, 2)
    assert (not z_t.is_contiguous() or batch == 1) and not zf_s.is_contiguous()
    check(backend, z_t, zf_s, y, 0.37, CONFIGS[name])


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config_name", ["paper", "paper-mean", "paper-jsd", "jsd-sum"])
@pytest.mark.parametrize("batch", [1, 33, 1000])
def test_consistency_reduction_every_combination(backend, config_name, batch):
    """NLAConfig(consistency_reduction=...) for both variants: value and gradient against the
    oracle and the closed form; 'sum' and 'mean' differ by exactly the factor B in the
    consistency part (the only part of d/dlogits_flip)."""
    cfg = CONFIGS[config_name]
    z, zf, y = make_inputs(batch, 7, seed=22)
    out = check(backend, z, zf, y, 0.37, cfg)
    ref = nla_forward_backward_closed_form(z.double().cpu(), zf.double().cpu(), y.cpu(), 0.37, cfg)
    for actual, expected, what in zip(out, ref, ("loss", "d/dlogits", "d/dlogits_flip", "weights")):
        assert_close(actual, expected, 2e-5, what=f"closed form {what}")
    if batch > 1:
        other = NLAConfig(consistency=cfg.consistency,
                          consistency_reduction="sum" if cfg.consistency_reduction == "mean" else "mean")
        gzf_other = run(backend, z, zf, y, 0.37, other)[2]
        factor = batch if cfg.consistency_reduction == "sum" else 1.0 / batch
        assert_close(out[2], gzf_other * factor, 2e-5, what="sum vs mean")


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("config_name", ["paper", "official-jsd", "paper-mean", "jsd-sum"])
@pytest.mark.parametrize("where", ["z", "zf", "both-same", "both-different"])
@pytest.mark.parametrize("classes", [2, 7])
def test_minus_inf_non_target_logit_is_finite(backend, config_name, where, classes):
    """A -inf logit on a class that is not the target: finite loss and gradients equal to the
    reference, in one view or both. With C = 2 the only negative is -inf (p_nn = 0)."""
    batch = 9
    z, zf, y = make_inputs(batch, classes, seed=23)
    for row in range(batch):
        others = [c for c in range(classes) if c != int(y[row])]
        if where in ("z", "both-same", "both-different"):
            z[row, others[0]] = float("-inf")
        if where in ("zf", "both-same"):
            zf[row, others[0]] = float("-inf")
        if where == "both-different":
            zf[row, others[-1]] = float("-inf")
    loss, gz, gzf, w = check(backend, z, zf, y, 0.37, CONFIGS[config_name])
    assert torch.isfinite(loss).item() and torch.isfinite(gz).all() and torch.isfinite(gzf).all()
    assert torch.isfinite(w).all()


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("dtype", [torch.uint8, torch.int16, torch.int32, torch.int64])
def test_public_api_target_dtypes(backend, dtype):
    """int32/int64 reach the kernels as they are; other integer dtypes are widened by the front."""
    z, zf, y = make_inputs(33, 7, seed=24)
    ref_loss, ref_gz, ref_gzf, _ = oracle(z, zf, y, 0.37, NLAConfig())
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_fast.nla_loss(a, b, y.to(dtype), 0.37, backend=backend)
    loss.backward()
    assert_close(loss, ref_loss, 2e-5, what=f"loss, {dtype}")
    assert_close(a.grad, ref_gz, 2e-5, what=f"d/dlogits, {dtype}")
    assert_close(b.grad, ref_gzf, 2e-5, what=f"d/dlogits_flip, {dtype}")


@pytest.mark.parametrize("backend", FUSED)
@pytest.mark.parametrize("eps_kind", ["tensor", "float"])
@pytest.mark.filterwarnings("error:.*lru_cache.*:UserWarning")  # Dynamo's warning about tracing through a cache
def test_torch_compile_matches_eager(backend, eps_kind):
    """torch.compile(fullgraph=True) of a step calling nla_loss against eager (aot_eager on the
    CPU; Inductor on a GPU): loss, both gradients and weights; a second batch size makes dynamo
    retrace with a symbolic batch; a new eps value reaches the compiled graph."""
    compile_matches_eager(backend, "aot_eager" if DEVICE.type == "cpu" else "inductor", (9, 17), eps_kind)


@pytest.mark.parametrize("backend", FUSED)
def test_compiled_validation_refuses_out_of_range_targets(backend):
    """validate=True under torch.compile cannot read the labels on the host; it checks them in
    the graph instead: an out-of-range target is an error, not a NaN loss."""
    def step(a, b, t):
        return nla_fast.nla_loss(a, b, t, 0.37, backend=backend)

    torch._dynamo.reset()
    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    z, zf, y = make_inputs(9, 7, seed=17)
    assert_close(compiled(z, zf, y), step(z, zf, y), 1e-6)
    bad = y.clone()
    bad[4] = 7
    with pytest.raises(RuntimeError, match=r"target outside \[0, 7\)"):
        compiled(z, zf, bad)
