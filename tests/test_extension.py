"""The native (C++/CUDA) NLA loss, ``nla_fast.extension`` / ``csrc/``.

The operators' own behaviour; what every backend shares (values and gradients through
``nla_fast.nla_loss``, layouts, autograd, torch.compile) is in ``test_loss_backends.py``. Cases,
oracle and tolerances: ``tests/loss_cases.py``.

The CPU tests build the CPU library on first use (about 40 s on 2 cores, cached afterwards in the
torch extensions dir). The nvcc test compiles the CUDA source for sm_90 with device optimisation
off (-Xcicc -O0 -Xptxas -O0: it checks that the source compiles, quickly) and, in parallel, the
CUDA glue of nla_loss.cpp (-DNLA_WITH_CUDA, -fsyntax-only); a success is remembered per source
hash. Tests marked ``gpu`` compare the CUDA kernels and run only with a CUDA device
(``make gpu-check``; the first one builds the CUDA library, about a minute).
"""
from __future__ import annotations

import hashlib
import math
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch.utils.cpp_extension import get_default_build_root

import nla_fast
from nla_fast import native_build
from nla_fast.config import NLAConfig
from nla_fast.reference import gaussian_pdf_2d, naw_weight_reference

import loss_cases
from loss_cases import CONFIGS, F64, oracle as reference

OP_CONFIGS = {name: CONFIGS[name] for name in ("paper", "official", "paper-jsd")}
# every consistency variant with each batch reduction (NLAConfig.consistency_reduction)
REDUCTION_CONFIGS = {"official-sum": CONFIGS["paper"], "official-mean": CONFIGS["paper-mean"],
                     "jsd-mean": CONFIGS["paper-jsd"], "jsd-sum": CONFIGS["jsd-sum"]}
EPS_VALUES = (0.0, 0.37, 1.0)
F64_RTOL, F64_ATOL = F64["loss"], F64["atol"]


def make_inputs(batch, classes, dtype=torch.float32, scale=3.0, seed=0, device="cpu"):
    return loss_cases.make_inputs(batch, classes, dtype=dtype, scale=scale, seed=seed, device=device)


def assert_op_matches(out, ref, dtype):
    """The op's (loss, gz, gzf, w), its maths in float64 for float64 logits, else float32."""
    loss_cases.assert_matches(out, ref, torch.float64 if dtype == torch.float64 else torch.float32, dtype)


def _cpu_reason():
    return native_build.unavailable_reason(torch.device("cpu"))


@pytest.fixture(scope="module", autouse=True)
def built():
    reason = _cpu_reason()
    if reason is not None:
        pytest.fail(f"the CPU extension did not build: {reason}")


# ----------------------------------------------------------------------------- helpers
def op(z, zf, y, eps, config, need_grad=True, need_weights=True):
    c = config.constants
    eps_tensor, eps_value = (eps, 0.0) if isinstance(eps, torch.Tensor) else (None, float(eps))
    return torch.ops.nla_fast.nla_loss_fwd(z, zf, y, eps_tensor, eps_value, c.as_list(), c.jsd, c.reg_mean,
                                           need_grad, need_weights)



# ----------------------------------------------------------------------------- CPU op vs the oracle
@pytest.mark.parametrize("config_name", list(OP_CONFIGS))
@pytest.mark.parametrize("classes", [2, 7, 8, 13, 1000])
@pytest.mark.parametrize("batch", [1, 2, 7, 33, 257])
def test_cpu_matches_reference(batch, classes, config_name):
    """float64 and float32 ops on the same (float32-representable) values; eps float and 0-d tensor."""
    config = OP_CONFIGS[config_name]
    z32, zf32, y = make_inputs(batch, classes, torch.float32)
    consts = config.constants.as_list()
    eps64, eps32 = torch.tensor(0.37, dtype=torch.float64), torch.tensor(0.37, dtype=torch.float32)
    ref_eps32 = reference(z32, zf32, y, eps32, config)  # eps = float(float32(0.37))
    for eps in EPS_VALUES:
        ref = reference(z32, zf32, y, eps, config)
        for dtype in (torch.float64, torch.float32):
            z, zf = z32.to(dtype), zf32.to(dtype)
            out = op(z, zf, y, eps, config)
            assert_op_matches(out, ref, dtype)
            w = torch.ops.nla_fast.naw_weight(z, y, None, eps, consts)
            assert torch.equal(w, out[3])
            if eps == 0.37:
                # a float64 0-d tensor holds exactly the float: identical results
                for got, want in zip(op(z, zf, y, eps64, config), out):
                    assert torch.equal(got, want)
                out32 = op(z, zf, y, eps32, config)
                assert_op_matches(out32, ref_eps32, dtype)
                assert torch.equal(torch.ops.nla_fast.naw_weight(z, y, eps32, 0.0, consts), out32[3])


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cpu_half_inputs(dtype):
    z, zf, y = make_inputs(33, 13, dtype)
    for config in OP_CONFIGS.values():
        out = op(z, zf, y, 0.5, config)
        assert out[0].dtype == torch.float32 and out[3].dtype == torch.float32
        assert out[1].dtype == dtype and out[2].dtype == dtype
        assert_op_matches(out, reference(z, zf, y, 0.5, config), dtype)


@pytest.mark.parametrize("config_name", list(OP_CONFIGS))
def test_cpu_large_logits(config_name):
    config = OP_CONFIGS[config_name]
    for dtype in (torch.float64, torch.float32):
        z, zf, y = make_inputs(33, 13, dtype, scale=3000.0)
        z[0, 0], zf[1, 2], z[2, 5] = 1e4, -1e4, -1e4
        for eps in (0.0, 1.0):
            assert_op_matches(op(z, zf, y, eps, config), reference(z, zf, y, eps, config), dtype)


def test_cpu_exact_ties():
    """g == n is the true case; among tied negatives the first index is the nearest."""
    z = torch.tensor([
        [2.0, 1.0, 2.0, 0.0, -1.0, 0.5],   # y=0 ties with negative 2
        [0.0, 3.0, 1.0, 3.0, 3.0, 0.0],   # y=2 below three tied negatives: nearest is index 1
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # all equal: true case, nearest is the first j != y
        [5.0, 5.0, -2.0, 0.0, 0.0, 0.0],  # y=1 ties with negative 0
    ], dtype=torch.float64)
    y = torch.tensor([0, 2, 3, 1])
    zf = z.flip(1).clone()
    for config in OP_CONFIGS.values():
        for dtype in (torch.float64, torch.float32):
            for eps in EPS_VALUES:
                zd, zfd = z.to(dtype), zf.to(dtype)
                out = op(zd, zfd, y, eps, config)
                assert_op_matches(out, reference(zd, zfd, y, eps, config), dtype)
    # the tie rows really take the true-case Gaussian
    c = NLAConfig().constants
    w = torch.ops.nla_fast.naw_weight(z, y, None, 1.0, c.as_list())
    p = torch.softmax(z, 1)
    for row in (0, 2, 3):
        g = p[row, y[row]]
        expected = c.true_scale * gaussian_pdf_2d(g, g, c.mu_true_gt, c.mu_true_nn, c.diag_true, -c.offdiag_true)
        torch.testing.assert_close(w[row], expected, rtol=1e-12, atol=0)


def test_cpu_non_contiguous_and_int32_targets():
    batch, classes = 33, 13
    z_base = torch.randn(classes, batch, dtype=torch.float64) * 3
    zf_base = torch.randn(batch, 2 * classes, dtype=torch.float64) * 3
    z = z_base.t()  # strides (1, B)
    zf = zf_base[:, ::2]  # column stride 2
    y = torch.randint(0, classes, (2 * batch,)).to(torch.int32)[::2]  # strided int32
    assert not z.is_contiguous() and not zf.is_contiguous() and not y.is_contiguous()
    for config in OP_CONFIGS.values():
        for dtype in (torch.float64, torch.float32):
            zd, zfd = z_base.to(dtype).t(), zf_base.to(dtype)[:, ::2]
            assert zd.stride() == (1, batch) and zfd.stride() == (2 * classes, 2)
            ref = reference(zd, zfd, y, 0.37, config)
            assert_op_matches(op(zd, zfd, y, 0.37, config), ref, dtype)
            assert_op_matches(op(zd.contiguous(), zfd.contiguous(), y.long().contiguous(), 0.37, config), ref, dtype)
    # the op reads int64 and int32 only and names the others; the front widens them
    for dtype in (torch.int16, torch.int8, torch.uint8):
        with pytest.raises(RuntimeError, match=r"int64 or int32, got .*widens other integer dtypes"):
            op(z, zf, y.to(dtype), 0.37, NLAConfig())
        want = nla_fast.nla_loss(z, zf, y.long(), 0.37, backend="extension")
        torch.testing.assert_close(nla_fast.nla_loss(z, zf, y.to(dtype), 0.37, backend="extension"), want,
                                   rtol=0, atol=0)
    with pytest.raises(RuntimeError, match="int64 or int32, got Bool"):
        op(z, zf, y.bool(), 0.37, NLAConfig())


def test_op_output_shapes_without_grad_or_weights():
    z, zf, y = make_inputs(5, 7)
    loss, gz, gzf, w = op(z, zf, y, 0.0, NLAConfig(), need_grad=False, need_weights=False)
    assert loss.shape == () and gz.shape == (0,) and gzf.shape == (0,) and w.shape == (0,)
    full = op(z, zf, y, 0.0, NLAConfig())
    assert torch.equal(loss, full[0])
    zr = z.clone().requires_grad_()
    loss2 = op(zr, zf, y, 0.0, NLAConfig(), need_grad=False)[0]
    with pytest.raises(RuntimeError, match="need_grad=False"):
        loss2.backward()


def test_empty_batch_gives_nan():
    z, zf, y = make_inputs(0, 7)
    loss, gz, gzf, w = op(z, zf, y, 0.0, NLAConfig())
    assert torch.isnan(loss) and gz.shape == (0, 7) and w.shape == (0,)


def test_cpu_deterministic_across_thread_counts():
    z, zf, y = make_inputs(1000, 13)
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = op(z, zf, y, 0.37, NLAConfig())
        torch.set_num_threads(2)
        two = op(z, zf, y, 0.37, NLAConfig())
    finally:
        torch.set_num_threads(before)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.parametrize("classes", [1025, 2048, 5000])
def test_cpu_any_number_of_classes(classes):
    """No class limit on any backend: wide rows match the oracle (both variants, float64 and float32)."""
    z32, zf32, y = make_inputs(3, classes, torch.float32)
    y[0] = classes - 1
    for config in (CONFIGS["official"], CONFIGS["paper-jsd"]):
        ref = reference(z32, zf32, y, 0.37, config)
        for dtype in (torch.float64, torch.float32):
            assert_op_matches(op(z32.to(dtype), zf32.to(dtype), y, 0.37, config), ref, dtype)


@pytest.mark.parametrize("name", list(REDUCTION_CONFIGS))
def test_consistency_reduction_sum_and_mean(name):
    """Both variants, consistency summed or averaged over the batch: value and gradients."""
    config = REDUCTION_CONFIGS[name]
    for batch, classes in ((1, 7), (9, 7), (70, 13), (5, 100)):
        z32, zf32, y = make_inputs(batch, classes, torch.float32)
        ref = reference(z32, zf32, y, 0.37, config)
        for dtype in (torch.float64, torch.float32):
            z, zf = z32.to(dtype), zf32.to(dtype)
            assert_op_matches(op(z, zf, y, 0.37, config), ref, dtype)
    # the other reduction really differs by the factor B on the consistency term
    variant, reduction = name.split("-")
    other = NLAConfig(consistency=variant, consistency_reduction="mean" if reduction == "sum" else "sum")
    z, zf, y = make_inputs(9, 7, torch.float64)
    lam_zero = {"lam": 0.0}
    mine = op(z, zf, y, 0.0, NLAConfig(consistency=variant, consistency_reduction=reduction, **lam_zero))[0]
    theirs = op(z, zf, y, 0.0, NLAConfig(consistency=variant, consistency_reduction=other.consistency_reduction,
                                          **lam_zero))[0]
    factor = 9.0 if reduction == "sum" else 1.0 / 9.0
    torch.testing.assert_close(mine, theirs * factor, rtol=1e-12, atol=0)


@pytest.mark.parametrize("name", ["official", "paper-jsd"])
@pytest.mark.parametrize("where", ["one view", "both views"])
def test_minus_inf_on_a_non_target_class(name, where):
    """A -inf logit on a class that is not the target: the reference's finite loss and gradients."""
    config = CONFIGS[name]
    g = torch.Generator().manual_seed(3)
    z = torch.randn(6, 5, generator=g, dtype=torch.float64) * 2
    zf = z + torch.randn(6, 5, generator=g, dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    z[:, 4][y != 4] = -math.inf
    if where == "both views":
        zf[:, 4][y != 4] = -math.inf
    zf[5, 3] = -math.inf
    ref = reference(z, zf, y, 0.5, config)
    rloss, rgz, rgzf, rw = ref
    assert torch.isfinite(rloss) and torch.isfinite(rgz).all() and torch.isfinite(rgzf).all()
    for dtype in (torch.float64, torch.float32):
        out = op(z.to(dtype), zf.to(dtype), y, 0.5, config)
        assert all(torch.isfinite(t).all() for t in out)
        assert_op_matches(out, ref, dtype)
    # and through the public API with autograd
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_fast.nla_loss(a, b, y, 0.5, config, backend="extension")
    ga, gb = torch.autograd.grad(loss, (a, b))
    torch.testing.assert_close(loss.detach(), rloss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(ga, rgz, rtol=0, atol=1e-12)
    torch.testing.assert_close(gb, rgzf, rtol=0, atol=1e-12)


def test_eager_call_is_two_native_ops():
    """fwd + autograd.grad on the extension: one forward op, one in-place scale, the four outputs
    allocated, nothing filled, multiplied, copied or read back beyond autograd.grad's own
    ones_like (counted with torch.profiler, as on the GPU run)."""
    from torch.profiler import ProfilerActivity, profile

    config = NLAConfig.official()
    z, zf, y = make_inputs(32, 7)
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    eps = torch.tensor(0.37)
    for _ in range(3):
        torch.autograd.grad(nla_fast.nla_loss(a, b, y, eps, config, backend="extension", validate=False), (a, b))
    calls = 5
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            torch.autograd.grad(nla_fast.nla_loss(a, b, y, eps, config, backend="extension", validate=False),
                                (a, b))
    counts = {e.key: e.count // calls for e in prof.key_averages() if e.key.startswith(("aten::", "nla_fast::"))}
    assert counts.pop("nla_fast::nla_loss_fwd") == 1
    assert counts.pop("nla_fast::nla_scale_grads_") == 1
    assert counts.pop("aten::empty") == 4  # loss, both gradients, the (0,) weights placeholder
    # autograd.grad's ones_like for the 0-d grad_output
    for key in ("aten::ones_like", "aten::empty_like", "aten::empty_strided", "aten::fill_"):
        assert counts.pop(key, 0) == 1, key
    assert counts == {}, f"unexpected per-call ops: {counts}"


# ----------------------------------------------------------------------------- non-finite input, bad labels
def test_nan_and_inf_logits_give_non_finite_loss():
    for config in OP_CONFIGS.values():
        for bad in (float("nan"), float("inf"), float("-inf")):
            z, zf, y = make_inputs(9, 7)
            z[3, 2] = bad
            zf[4, 1] = bad
            loss, gz, gzf, w = op(z, zf, y, 0.5, config)
            if bad == float("-inf"):
                # one -inf logit is a valid probability 0; the rows stay finite except JSD's 0 * log 0
                continue
            assert not torch.isfinite(loss)
            assert torch.isfinite(gz[0]).all() and torch.isfinite(w[0])  # other rows untouched
    z, zf, y = make_inputs(4, 7)
    z[:] = float("nan")
    assert torch.isnan(op(z, zf, y, 0.0, NLAConfig())[0])


def test_out_of_range_targets_do_not_crash():
    z, zf, y = make_inputs(9, 7)
    for bad in (7, -1, 10**9, -(10**9)):
        yb = y.clone()
        yb[4] = bad
        for y_t in (yb, yb.to(torch.int32) if abs(bad) < 2**31 else yb):
            loss, gz, gzf, w = op(z, zf, y_t, 0.5, NLAConfig())
            assert torch.isnan(loss)
            assert torch.isnan(w[4]) and torch.isnan(gz[4]).all()
            keep = torch.arange(9) != 4
            rw = naw_weight_reference(z.double(), y.clone(), 0.5, NLAConfig())
            torch.testing.assert_close(w[keep].double(), rw[keep], rtol=1e-5, atol=1e-6)
            assert torch.isfinite(gz[keep]).all() and torch.isfinite(gzf[keep]).all()
            wn = torch.ops.nla_fast.naw_weight(z, y_t, None, 0.5, NLAConfig().constants.as_list())
            assert torch.isnan(wn[4]) and torch.isfinite(wn[keep]).all()
    # through the public API without validation
    yb = y.clone()
    yb[0] = 99
    assert torch.isnan(nla_fast.nla_loss(z, zf, yb, 0.0, backend="extension", validate=False))


def test_input_errors():
    z, zf, y = make_inputs(4, 7)
    with pytest.raises(RuntimeError, match="at least 2 classes"):
        op(z[:, :1], zf[:, :1], y * 0, 0.0, NLAConfig())
    with pytest.raises(RuntimeError, match="must match"):
        op(z, zf[:, :6], y, 0.0, NLAConfig())
    with pytest.raises(RuntimeError, match="integer class indices"):
        op(z, zf, y.float(), 0.0, NLAConfig())
    with pytest.raises(RuntimeError, match="constants"):
        torch.ops.nla_fast.nla_loss_fwd(z, zf, y, None, 0.0, [1.0] * 5, False, False, False, False)


# ----------------------------------------------------------------------------- torch.library / autograd / compile
def test_opcheck():
    z, zf, y = make_inputs(6, 7, torch.float64)
    consts = NLAConfig().constants.as_list()
    zr, zfr = z.clone().requires_grad_(), zf.clone().requires_grad_()
    cases = [
        (torch.ops.nla_fast.nla_loss_fwd.default, (zr, zfr, y, None, 0.37, consts, False, False, True, True)),
        (torch.ops.nla_fast.nla_loss_fwd.default,
         (zr, zfr, y.to(torch.int32), torch.tensor(0.5, dtype=torch.float64), 0.0, consts, True, True, True, False)),
        (torch.ops.nla_fast.nla_loss_fwd.default,
         (z.float(), zf.float(), y, None, 1.0, consts, False, False, False, True)),
        (torch.ops.nla_fast.naw_weight.default, (z, y, None, 0.37, consts)),
        (torch.ops.nla_fast.naw_weight.default, (z.float(), y, torch.tensor(0.2), 0.0, consts)),
        (torch.ops.nla_fast.nla_scale_grads.default, (torch.tensor(2.5, dtype=torch.float64), z, zf)),
    ]
    for fn, args in cases:
        torch.library.opcheck(fn, args)


@pytest.mark.parametrize("config_name", ["paper", "paper-jsd"])
def test_gradcheck_float64(config_name):
    config = OP_CONFIGS[config_name]
    z, zf, y = make_inputs(4, 5, torch.float64, scale=1.5, seed=3)
    c = config.constants

    def f(a, b):
        return torch.ops.nla_fast.nla_loss_fwd(a, b, y, None, 0.37, c.as_list(), c.jsd, c.reg_mean, True, False)[0]

    assert torch.autograd.gradcheck(f, (z.requires_grad_(), zf.requires_grad_()), eps=1e-6, atol=1e-7, rtol=1e-5)


@pytest.mark.parametrize("eps_kind", ["float", "tensor"])
def test_torch_compile_matches_eager(eps_kind):
    """torch.compile(fullgraph=True) over nla_loss(backend="extension"): forward and backward match
    eager, eps a Python float or a 0-d tensor (a new eps value reuses the compiled graph)."""
    torch._dynamo.reset()
    config = NLAConfig()

    def step(a, b, y, eps):
        loss, w = nla_fast.nla_loss(a, b, y, eps, config, backend="extension", return_weights=True)
        return loss * 2.0, w

    compiled = torch.compile(step, fullgraph=True)
    for batch, value in ((7, 0.37), (9, 0.8)):
        z, zf, y = make_inputs(batch, 8)
        eps = value if eps_kind == "float" else torch.tensor(value)
        outs = []
        for fn in (step, compiled):
            a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
            loss, w = fn(a, b, y, eps)
            loss.backward()
            outs.append((loss.detach(), w, a.grad, b.grad))
        for e, c in zip(*outs):
            torch.testing.assert_close(c, e, rtol=1e-6, atol=1e-7)
        rloss = reference(z, zf, y, value if eps_kind == "float" else torch.tensor(value), config)[0]
        torch.testing.assert_close(outs[1][0].double(), 2.0 * rloss, rtol=2e-5, atol=1e-5)


# ----------------------------------------------------------------------------- every CPU row path
# C = 7 and 8 run nla_row_fixed (the GPU tile kernel's row code), C <= 6 nla_row, C > 8 the
# vectorised rows (at::vec): the cases below reach each of them.
def _tie_rows(classes):
    """test_cpu_exact_ties's four tie rows, padded with logits -1.5 up to `classes` columns."""
    z = torch.full((4, classes), -1.5, dtype=torch.float64)
    z[:, :6] = torch.tensor([
        [2.0, 1.0, 2.0, 0.0, -1.0, 0.5],  # y=0 ties with negative 2
        [0.0, 3.0, 1.0, 3.0, 3.0, 0.0],   # y=2 below three tied negatives: nearest is index 1
        [1.0, 1.0, 1.0, 1.0, 1.0, 1.0],   # true case at g == n, the nearest is the first j != y
        [5.0, 5.0, -2.0, 0.0, 0.0, 0.0],  # y=1 ties with negative 0
    ], dtype=torch.float64)
    z[2, 6:] = 1.0
    return z, torch.tensor([0, 2, 3, 1])


@pytest.mark.parametrize("classes", [7, 8, 13, 40])
def test_cpu_exact_ties_on_fixed_and_vector_rows(classes):
    z, y = _tie_rows(classes)
    zf = z.flip(1).clone()
    for config in CONFIGS.values():
        for dtype in (torch.float64, torch.float32):
            for eps in EPS_VALUES:
                zd, zfd = z.to(dtype), zf.to(dtype)
                assert_op_matches(op(zd, zfd, y, eps, config), reference(zd, zfd, y, eps, config), dtype)


@pytest.mark.parametrize("classes", [7, 13])
@pytest.mark.parametrize("name", ["official", "paper-jsd"])
def test_minus_inf_on_fixed_and_vector_rows(classes, name):
    config = CONFIGS[name]
    g = torch.Generator().manual_seed(5)
    z = torch.randn(9, classes, generator=g, dtype=torch.float64) * 2
    zf = z + torch.randn(9, classes, generator=g, dtype=torch.float64)
    y = torch.arange(9) % (classes - 2)
    z[:, classes - 1] = -math.inf
    zf[::2, classes - 1] = -math.inf
    zf[3, classes - 2] = -math.inf
    ref = reference(z, zf, y, 0.5, config)
    for dtype in (torch.float64, torch.float32):
        out = op(z.to(dtype), zf.to(dtype), y, 0.5, config)
        assert all(torch.isfinite(t).all() for t in out)
        assert_op_matches(out, ref, dtype)


@pytest.mark.parametrize("classes", [8, 13])
def test_non_finite_logits_and_bad_targets_on_fixed_and_vector_rows(classes):
    for config in CONFIGS.values():
        for bad in (float("nan"), float("inf")):
            z, zf, y = make_inputs(9, classes)
            z[3, 2] = bad
            zf[4, 1] = bad
            loss, gz, gzf, w = op(z, zf, y, 0.5, config)
            assert not torch.isfinite(loss)
            assert torch.isfinite(gz[0]).all() and torch.isfinite(gzf[0]).all() and torch.isfinite(w[0])
        z, zf, y = make_inputs(9, classes)
        yb = y.clone()
        yb[4], yb[6] = classes, -1
        loss, gz, gzf, w = op(z, zf, yb, 0.5, config)
        assert torch.isnan(loss) and torch.isnan(w[4]) and torch.isnan(w[6]) and torch.isnan(gz[4]).all()
        keep = torch.tensor([i not in (4, 6) for i in range(9)])
        assert torch.isfinite(gz[keep]).all() and torch.isfinite(gzf[keep]).all()
        torch.testing.assert_close(w[keep].double(), reference(z, zf, y, 0.5, config)[3][keep], rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- OpenMP
def _library_bytes() -> bytes:
    """The loaded extension library's file (found among this process's mapped files)."""
    name = native_build.load()["library"]
    assert name and name != "already loaded", name
    maps = Path("/proc/self/maps").read_text().split()
    path = next(p for p in maps if p.endswith(f"/{name}.so"))
    return Path(path).read_bytes()


def test_cpu_library_is_built_with_openmp_and_vector_code():
    assert "-fopenmp" in native_build._EXTRA_CFLAGS and "-fopenmp" in native_build._EXTRA_LDFLAGS
    lib = _library_bytes()
    assert b"libgomp.so.1" in lib and b"GOMP_parallel" in lib  # links the OpenMP runtime, opens regions
    if "-mavx2" in native_build._EXTRA_CFLAGS:
        assert b"Sleef_expf8_u10" in lib  # the wide rows' exponentials: 8 floats per AVX2 instruction


@pytest.mark.parametrize("batch, classes", [(8192, 7), (4096, 13), (300, 1000), (4000, 5)])
def test_cpu_results_do_not_depend_on_the_thread_count(batch, classes):
    """Batches big enough to be split over threads: 1, 2 and 3 threads give bit-identical results
    (fixed chunks of rows, summed in order), and they match the float64 oracle."""
    z32, zf32, y = make_inputs(batch, classes, torch.float32, seed=11)
    before = torch.get_num_threads()
    try:
        for dtype in (torch.float32, torch.bfloat16):
            z, zf = z32.to(dtype), zf32.to(dtype)
            outs = []
            for n in (1, 2, 3):
                torch.set_num_threads(n)
                outs.append(op(z, zf, y, 0.37, NLAConfig()))
            for other in outs[1:]:
                for a, b in zip(outs[0], other):
                    assert torch.equal(a, b)
            assert_op_matches(outs[-1], reference(z.float(), zf.float(), y, 0.37, NLAConfig()), dtype)
    finally:
        torch.set_num_threads(before)


def test_cpu_pool_wakes_for_big_batches_only():
    """With 4 threads allowed, small batches (a training batch of 32, 4096 x 7, 1000 x 13) never
    start the OpenMP team (the process's thread count stays put); a big batch does (so the kernel
    really runs on several threads). Checked in a child process, whose threads are its own."""
    code = textwrap.dedent("""
        import os, torch
        from nla_fast import extension
        from nla_fast.config import NLAConfig
        assert extension.unavailable_reason("cpu") is None
        c = NLAConfig().constants.as_list()
        torch.set_num_threads(1)  # the inputs are made on this thread (torch's own ops split big ones)
        shapes = ((32, 7), (4096, 7), (1000, 13), (64, 1000), (2**16, 7))
        inputs = {s: (torch.randn(*s), torch.randn(*s), torch.randint(0, s[1], (s[0],))) for s in shapes}
        def run(s):
            z, zf, y = inputs[s]
            torch.ops.nla_fast.nla_loss_fwd(z, zf, y, None, 0.5, c, False, False, True, True)
        tasks = lambda: len(os.listdir("/proc/self/task"))
        run((32, 7))
        torch.set_num_threads(4)
        start = tasks()
        for s in shapes[:-1]:
            for _ in range(5):
                run(s)
        small = tasks()
        run(shapes[-1])
        print(start, small, tasks())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="4"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    start, small, big = (int(v) for v in proc.stdout.split()[-3:])
    assert small == start, (start, small)
    assert big > small, (small, big)


# ----------------------------------------------------------------------------- build plumbing
def test_unavailable_reasons():
    assert native_build.unavailable_reason("cpu") is None
    assert "CPU and CUDA" in native_build.unavailable_reason(torch.device("meta"))
    if not torch.cuda.is_available():
        assert native_build.unavailable_reason("cuda") is not None
        with pytest.raises(nla_fast.BackendUnavailable):
            nla_fast.nla_loss(*make_inputs(2, 3, device="meta"), backend="extension", validate=False)
    assert (native_build.source_dir() / "nla_loss_cuda.cu").is_file()


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="nvcc is not installed")
def test_cuda_sources_compile(tmp_path):
    """nla_loss_cuda.cu with nvcc (sm_90) and nla_loss.cpp's CUDA glue (-DNLA_WITH_CUDA), in parallel.

    A success is remembered (a marker named after the hash of the sources and both commands, in
    the torch extensions dir), so unchanged sources are not recompiled on the next run.
    """
    nvcc = native_build.nvcc_compile_command(tmp_path / "nla_loss_cuda.o", arch="90") + ["-Xcicc", "-O0", "-Xptxas", "-O0"]
    cxx = native_build.cxx_compile_command(tmp_path / "nla_loss.o", with_cuda=True, syntax_only=True)
    digest = hashlib.sha256()
    for name in ("nla_loss.h", "nla_loss.cpp", "nla_loss_cuda.cu"):
        digest.update((native_build.source_dir() / name).read_bytes())
    for cmd in (nvcc, cxx):
        digest.update(" ".join(cmd).replace(str(tmp_path), "TMP").encode())
    marker = Path(get_default_build_root()) / f"nla_fast_compile_check_{digest.hexdigest()[:16]}.ok"
    if marker.is_file():
        return
    procs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True) for cmd in (nvcc, cxx)]
    for cmd, proc in zip((nvcc, cxx), procs):
        out, _ = proc.communicate(timeout=600)
        assert proc.returncode == 0, f"{' '.join(cmd)}\n{out[-6000:]}"
    assert (tmp_path / "nla_loss_cuda.o").stat().st_size > 0
    try:
        marker.parent.mkdir(parents=True, exist_ok=True)
        marker.write_text(" ".join(nvcc) + "\n" + " ".join(cxx) + "\n")
    except OSError:
        pass


def test_find_cuda_home_resolves_a_toolkit(monkeypatch):
    """With CUDA_HOME unset, nvcc on PATH (a wrapper script here) leads to the real toolkit root."""
    if shutil.which("nvcc") is None:
        pytest.skip("nvcc is not installed")
    monkeypatch.delenv("CUDA_HOME", raising=False)
    monkeypatch.delenv("CUDA_PATH", raising=False)
    root = native_build.find_cuda_home()
    assert root is not None and native_build._is_toolkit_root(Path(root)), root


# ----------------------------------------------------------------------------- CUDA (run on the GPU machine)
# every kernel path: tile kernel with 4..32 columns (one tile, several tiles, grid-stride), warp
# kernel in registers (33..1024) and in chunks (over 1024 columns)
CUDA_SHAPES = [(1, 2), (2, 7), (7, 8), (33, 13), (257, 1000), (64, 1024), (1000, 33), (4097, 8), (300, 100),
               (70, 600), (600, 32), (1500, 17), (5, 1025), (3, 4096), (9, 3000)]


@pytest.mark.gpu
def test_cuda_available():
    assert native_build.unavailable_reason("cuda") is None, native_build.unavailable_reason("cuda")


@pytest.mark.gpu
@pytest.mark.parametrize("config_name", list(OP_CONFIGS))
def test_cuda_matches_reference(config_name):
    """Every dtype on the same values (bfloat16-representable, so exact in all four dtypes)."""
    config = OP_CONFIGS[config_name]
    consts = config.constants.as_list()
    for batch, classes in CUDA_SHAPES:
        z, zf, y = make_inputs(batch, classes, torch.float32, device="cuda")
        z, zf = (torch.where(t.abs() < 1e-2, 0.0, t).to(torch.bfloat16).float() for t in (z, zf))
        for eps in (0.0, 0.37, torch.tensor(1.0, device="cuda")):
            ref = reference(z, zf, y, eps, config)
            for dtype in (torch.float32, torch.float64, torch.float16, torch.bfloat16):
                zd, zfd = z.to(dtype), zf.to(dtype)
                out = op(zd, zfd, y, eps, config)
                assert out[0].device.type == "cuda"
                assert_op_matches(out, ref, dtype)
                eps_args = (eps, 0.0) if isinstance(eps, torch.Tensor) else (None, eps)
                w = torch.ops.nla_fast.naw_weight(zd, y, *eps_args, consts)
                torch.testing.assert_close(w, out[3], rtol=0, atol=0)


@pytest.mark.gpu
def test_cuda_large_logits_ties_strides_int32():
    for config in OP_CONFIGS.values():
        z, zf, y = make_inputs(257, 13, torch.float32, scale=3000.0, device="cuda")
        assert_op_matches(op(z, zf, y, 1.0, config), reference(z, zf, y, 1.0, config), torch.float32)
        zt = torch.tensor([[2.0, 1.0, 2.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 3.0, 1.0, 3.0]], device="cuda")
        yt = torch.tensor([0, 3, 2], device="cuda")
        assert_op_matches(op(zt, zt.flip(1), yt, 0.5, config), reference(zt, zt.flip(1), yt, 0.5, config),
                          torch.float32)
        zb = torch.randn(40, 70, device="cuda").t()                  # (70, 40), strides (1, 70)
        zfb = torch.randn(70, 80, device="cuda")[:, ::2]
        yb = torch.randint(0, 40, (140,), device="cuda")[::2].to(torch.int32)
        assert_op_matches(op(zb, zfb, yb, 0.37, config), reference(zb, zfb, yb, 0.37, config), torch.float32)


@pytest.mark.gpu
def test_cuda_deterministic_and_matches_cpu():
    z, zf, y = make_inputs(100_003, 7, device="cuda")
    first = op(z, zf, y, 0.37, NLAConfig())
    second = op(z, zf, y, 0.37, NLAConfig())
    for a, b in zip(first, second):
        assert torch.equal(a, b)
    cpu = op(z.cpu(), zf.cpu(), y.cpu(), 0.37, NLAConfig())
    torch.testing.assert_close(first[0].cpu(), cpu[0], rtol=1e-5, atol=1e-3)
    for i in (1, 2, 3):
        torch.testing.assert_close(first[i].cpu(), cpu[i], rtol=1e-5, atol=1e-6)


@pytest.mark.gpu
def test_cuda_huge_batch():
    batch = 2**24 + 5
    z, zf, y = make_inputs(batch, 3, device="cuda", scale=1.0)
    for config in (NLAConfig(), NLAConfig(consistency="jsd")):
        loss = op(z, zf, y, 0.5, config, need_grad=False, need_weights=False)[0]
        ref = nla_loss_reference(z.double(), zf.double(), y, 0.5, config)
        torch.testing.assert_close(loss.double(), ref, rtol=1e-4, atol=1e-4)


@pytest.mark.gpu
def test_cuda_autograd_graph_capture_and_compile():
    config = NLAConfig()
    z, zf, y = make_inputs(32, 7, device="cuda")
    eps = torch.tensor(0.0, device="cuda")
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    # warm up on a side stream, then capture forward + backward with eps read from memory
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            a.grad = b.grad = None
            (2.5 * nla_fast.nla_loss(a, b, y, eps, config, backend="extension")).backward()
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    a.grad = b.grad = None
    with torch.cuda.graph(graph):
        static_loss = nla_fast.nla_loss(a, b, y, eps, config, backend="extension")
        (2.5 * static_loss).backward()
    for value in (0.37, 1.0):
        eps.fill_(value)
        graph.replay()
        torch.cuda.synchronize()
        rloss, rgz, rgzf, _ = reference(z, zf, y, value, config)
        torch.testing.assert_close(static_loss.double().cpu(), rloss, rtol=2e-5, atol=1e-5)
        torch.testing.assert_close(a.grad.double().cpu(), 2.5 * rgz, rtol=0, atol=1e-5)
        torch.testing.assert_close(b.grad.double().cpu(), 2.5 * rgzf, rtol=0, atol=1e-5)
    # torch.compile on CUDA
    torch._dynamo.reset()

    def step(p, q, e):
        return nla_fast.nla_loss(p, q, y, e, config, backend="extension")

    compiled = torch.compile(step, fullgraph=True)
    for e in (eps, 0.37):
        results = []
        for fn in (step, compiled):
            p, q = z.clone().requires_grad_(), zf.clone().requires_grad_()
            loss = fn(p, q, e)
            loss.backward()
            results.append((loss.detach(), p.grad, q.grad))
        for want, got in zip(*results):
            torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-7)


@pytest.mark.gpu
def test_cuda_bad_inputs():
    z, zf, y = make_inputs(9, 7, device="cuda")
    yb = y.clone()
    yb[4] = 7
    yb[5] = -3
    loss, gz, gzf, w = op(z, zf, yb, 0.5, NLAConfig())
    torch.cuda.synchronize()
    assert torch.isnan(loss) and torch.isnan(w[4]) and torch.isnan(gz[5]).all()
    assert torch.isfinite(w[:4]).all() and torch.isfinite(gz[:4]).all()
    zn = z.clone()
    zn[2, 3] = float("nan")
    assert not torch.isfinite(op(zn, zf, y, 0.5, NLAConfig())[0])
    zi = z.clone()
    zi[2, 3] = float("inf")
    assert not torch.isfinite(op(zi, zf, y, 0.5, NLAConfig())[0])
    torch.cuda.synchronize()
    loss, gz, gzf, w = op(*make_inputs(0, 7, device="cuda"), 0.0, NLAConfig())
    assert torch.isnan(loss.cpu())


@pytest.mark.gpu
def test_cuda_opcheck():
    z, zf, y = make_inputs(6, 7, torch.float32, device="cuda")
    consts = NLAConfig().constants.as_list()
    zr, zfr = z.clone().requires_grad_(), zf.clone().requires_grad_()
    torch.library.opcheck(torch.ops.nla_fast.nla_loss_fwd.default,
                          (zr, zfr, y, torch.tensor(0.5, device="cuda"), 0.0, consts, False, False, True, True))
    torch.library.opcheck(torch.ops.nla_fast.naw_weight.default, (z, y, None, 0.37, consts))
    torch.library.opcheck(torch.ops.nla_fast.nla_scale_grads.default, (torch.tensor(2.5, device="cuda"), z, zf))


@pytest.mark.gpu
@pytest.mark.parametrize("classes", [1025, 4096])
def test_cuda_more_than_1024_classes(classes):
    for config in (CONFIGS["official"], CONFIGS["paper-jsd"]):
        z, zf, y = make_inputs(6, classes, device="cuda")
        y[0] = classes - 1
        for eps in (0.37, torch.tensor(0.37, device="cuda")):
            assert_op_matches(op(z, zf, y, eps, config), reference(z, zf, y, eps, config), torch.float32)
        # through the public API and the eager autograd path
        a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
        loss, w = nla_fast.nla_loss(a, b, y, 0.37, config, backend="extension", return_weights=True)
        ga, gb = torch.autograd.grad(loss, (a, b))
        assert_op_matches((loss, ga, gb, w), reference(z, zf, y, 0.37, config), torch.float32)


@pytest.mark.gpu
def test_cuda_input_errors_raise_and_do_not_crash():
    """Bad arguments to the raw op on CUDA raise RuntimeError, checked in a child process so a
    crash (the first GPU run died on one) fails this test instead of killing the session."""
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent("""
        import torch
        from nla_fast import extension
        from nla_fast.config import NLAConfig
        assert extension.unavailable_reason("cuda") is None
        c = NLAConfig().constants
        z = torch.randn(4, 7, device="cuda")
        y = torch.zeros(4, dtype=torch.long, device="cuda")
        cases = [
            (z, z[:, :6], y),                       # shape mismatch
            (z, z, y.float()),                      # float labels
            (z, z, y.to(torch.int16)),              # unsupported integer dtype
            (z, z.double(), y),                     # dtype mismatch
            (z[:, :1], z[:, :1], y),                # one class
            (z, z, y.cpu()),                        # labels on the CPU
        ]
        for args in cases:
            try:
                torch.ops.nla_fast.nla_loss_fwd(*args, None, 0.0, c.as_list(), False, False, True, True)
            except RuntimeError as err:
                assert "nla_fast" in str(err), err
            else:
                raise AssertionError("no error for a bad input")
        torch.cuda.synchronize()
        print("ok")
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0 and proc.stdout.strip().endswith("ok"), (proc.returncode, proc.stdout[-2000:],
                                                                         proc.stderr[-4000:])


@pytest.mark.gpu
@pytest.mark.parametrize("name", list(REDUCTION_CONFIGS))
def test_cuda_consistency_reduction(name):
    config = REDUCTION_CONFIGS[name]
    for batch, classes in ((32, 7), (1000, 7), (70, 100)):
        z, zf, y = make_inputs(batch, classes, device="cuda")
        assert_op_matches(op(z, zf, y, 0.37, config), reference(z, zf, y, 0.37, config), torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("classes", [5, 40])
def test_cuda_minus_inf_on_a_non_target_class(classes):
    for config in (CONFIGS["official"], CONFIGS["paper-jsd"]):
        z, zf, y = make_inputs(300, classes, device="cuda")
        y[y == classes - 1] = 0
        z[:, classes - 1] = -math.inf
        zf[::2, classes - 1] = -math.inf
        out = op(z, zf, y, 0.5, config)
        assert all(torch.isfinite(t).all() for t in out)
        assert_op_matches(out, reference(z, zf, y, 0.5, config), torch.float32)


@pytest.mark.gpu
def test_cuda_tile_staging_misaligned_and_strided():
    """The tile kernel's fallbacks: a base pointer off 16-byte alignment, column strides, and the
    vector path, all against the oracle, in every dtype."""
    config = CONFIGS["paper-jsd"]
    for dtype in (torch.float32, torch.bfloat16, torch.float64):
        base = torch.randn(1000 * 7 + 1, device="cuda").to(dtype)
        z = base[1:].view(1000, 7)                      # misaligned start
        zf = torch.randn(1000, 14, device="cuda").to(dtype)[:, ::2]  # column stride 2
        y = torch.randint(0, 7, (1000,), device="cuda")
        ref = reference(z.float(), zf.float(), y, 0.37, config)
        assert_op_matches(op(z, zf, y, 0.37, config), ref, dtype)
        assert_op_matches(op(z.contiguous(), zf.contiguous(), y, 0.37, config), ref, dtype)


@pytest.mark.gpu
@pytest.mark.parametrize("classes", [7, 8])
def test_cuda_fixed_width_tiles_full_and_partial(classes):
    """The fixed-width tile kernel (C = 7, 8): one partial tile, exactly one full tile, full tiles
    and a partial last one, a grid that strides over tiles; every dtype (double takes the generic
    kernel), every consistency variant, with and without gradients, against the oracle."""
    for batch in (1, 127, 128, 129, 1000, 2**20 + 77):
        z, zf, y = make_inputs(batch, classes, torch.float32, device="cuda")
        z, zf = (t.to(torch.bfloat16).float() for t in (z, zf))
        for config in CONFIGS.values():
            ref = reference(z, zf, y, 0.37, config)
            for dtype in (torch.float32, torch.float16, torch.bfloat16):
                zd, zfd = z.to(dtype), zf.to(dtype)
                out = op(zd, zfd, y, 0.37, config)
                assert_op_matches(out, ref, dtype)
                no_grad = op(zd, zfd, y, 0.37, config, need_grad=False)
                torch.testing.assert_close(no_grad[0], out[0], rtol=1e-6, atol=1e-6 * batch)
                w = torch.ops.nla_fast.naw_weight(zd, y, None, 0.37, config.constants.as_list())
                torch.testing.assert_close(w, out[3], rtol=0, atol=0)
            if batch > 2**20:
                break  # the big batch: one config is enough


@pytest.mark.gpu
def test_cuda_eager_backward_in_place_and_retain_graph():
    config = NLAConfig()
    z, zf, y = make_inputs(4096, 7, device="cuda")
    _, rgz, rgzf, _ = reference(z, zf, y, 0.37, config)
    a, b = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_fast.nla_loss(a, b, y, torch.tensor(0.37, device="cuda"), config, backend="extension")
    g1 = torch.autograd.grad(loss, (a, b), retain_graph=True)
    g2 = torch.autograd.grad(loss, (a, b), torch.tensor(-3.0, device="cuda"))
    for got, want in zip(g1, (rgz, rgzf)):
        torch.testing.assert_close(got.double().cpu(), want, rtol=0, atol=1e-6)
    for got, want in zip(g2, (rgz, rgzf)):
        torch.testing.assert_close(got.double().cpu(), -3.0 * want, rtol=0, atol=3e-6)
