"""The eager reference loss, the constants and the public API's argument handling.

Tolerances: float64 closed form vs autograd 1e-10 (the same maths, other order of operations).
"""
import math

import pytest
import torch

import nla_fast
from nla_fast import NLAConfig, eps_schedule, naw_weight, nla_loss
from nla_fast.config import ellipse_off_diagonal
from nla_fast.reference import (
    naw_weight_reference,
    nla_forward_backward_closed_form,
    nla_loss_reference,
)

from loss_cases import CONFIGS  # noqa: E402 - the loss cases every loss test shares


def _inputs(batch, classes, seed=0, scale=2.0, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(batch, classes, generator=g, dtype=dtype) * scale
    zf = z + 0.5 * torch.randn(batch, classes, generator=g, dtype=dtype)
    y = torch.randint(0, classes, (batch,), generator=g)
    return z, zf, y


def test_paper_constants():
    c = NLAConfig().constants
    # Sigma_T at eps=1: [[0.8, -0.48], [-0.48, 0.8]]: eigenvalues 1.28 and 0.32, axis ratio 2
    assert c.offdiag_true == pytest.approx(0.48)
    eig = (c.diag_true + c.offdiag_true, c.diag_true - c.offdiag_true)
    assert math.sqrt(eig[0] / eig[1]) == pytest.approx(2.0)
    eig_f = (c.diag_false + c.offdiag_false, c.diag_false - c.offdiag_false)
    assert math.sqrt(eig_f[0] / eig_f[1]) == pytest.approx(6.0)
    assert c.norm_false == pytest.approx(1 / (2 * math.pi * math.sqrt(1 / c.inv_det_false)))


def test_official_preset_uses_sigma_091():
    c = NLAConfig.official().constants
    assert c.diag_false == pytest.approx(0.91**2 * (1 + 1 / 36))
    assert c.diag_false == pytest.approx(0.8511, abs=1e-4)
    var = c.diag_false / (1 + 1 / 36)
    assert var == pytest.approx(0.91**2)  # the reference code's sigma^2
    assert NLAConfig.official().diag_true == NLAConfig().diag_true


def test_config_rejects_bad_values():
    with pytest.raises(ValueError, match="consistency"):
        NLAConfig(consistency="kl")
    with pytest.raises(ValueError, match="lam"):
        NLAConfig(lam=1.5)
    with pytest.raises(ValueError, match="ratio_true"):
        NLAConfig(ratio_true=0.5)


def test_eps_schedule():
    assert eps_schedule(0, 60) == 0.0
    assert eps_schedule(20, 60) == pytest.approx(1 - math.exp(-5))
    assert eps_schedule(59, 60) > 0.999
    assert eps_schedule(3, 10, slope=-1.0) == pytest.approx(1 - math.exp(-0.3))
    with pytest.raises(ValueError):
        eps_schedule(1, 0)


def test_weight_is_the_full_normalised_pdf():
    # One sample by hand: p = softmax(z), s = (p_gt, p_nn), false case at eps irrelevant.
    z = torch.tensor([[0.0, 2.0, 1.0]], dtype=torch.float64)
    y = torch.tensor([0])
    p = torch.softmax(z, 1)[0]
    s = torch.stack([p[0], p[1]])
    c = NLAConfig().constants
    o = ellipse_off_diagonal(0.8, 6.0)
    cov = torch.tensor([[0.8, o], [o, 0.8]], dtype=torch.float64)
    d = s - torch.tensor([0.30, 0.15], dtype=torch.float64)
    expected = torch.exp(-0.5 * d @ torch.linalg.inv(cov) @ d) / (2 * math.pi * torch.linalg.det(cov).sqrt())
    assert naw_weight_reference(z, y, 0.7).item() == pytest.approx(expected.item(), rel=1e-12)
    # True case with eps: covariance off-diagonal is -eps * o_T
    z = torch.tensor([[3.0, 2.0, 1.0]], dtype=torch.float64)
    p = torch.softmax(z, 1)[0]
    s = torch.stack([p[0], p[1]])
    eps = 0.37
    cov = torch.tensor([[0.8, -eps * c.offdiag_true], [-eps * c.offdiag_true, 0.8]], dtype=torch.float64)
    d = s - 0.5
    expected = torch.exp(-0.5 * d @ torch.linalg.inv(cov) @ d) / (2 * math.pi * torch.linalg.det(cov).sqrt())
    assert naw_weight_reference(z, y, eps).item() == pytest.approx(expected.item(), rel=1e-12)


def test_official_consistency_matches_literal_kl_sum():
    z, zf, y = _inputs(5, 7)
    q = torch.softmax((z + zf) / 2, 1)
    kl = lambda a, b: (a * (a.log() - b.log())).sum(1)  # noqa: E731
    literal = 0.5 * (kl(q, torch.softmax(z, 1)) + kl(q, torch.softmax(zf, 1))).sum()
    ce = torch.nn.functional.cross_entropy(z, y, reduction="none")
    w = naw_weight_reference(z, y, 0.2)
    expected = 0.5 * ((1 + w) * ce).mean() + 0.5 * literal
    assert nla_loss_reference(z, zf, y, 0.2).item() == pytest.approx(expected.item(), rel=1e-12)


def test_jsd_consistency_matches_literal():
    z, zf, y = _inputs(6, 5, seed=3)
    cfg = NLAConfig(consistency="jsd", lam=0.0)
    p, pf = torch.softmax(z, 1), torch.softmax(zf, 1)
    m = (p + pf) / 2
    kl = lambda a, b: (a * (a.log() - b.log())).sum(1)  # noqa: E731
    expected = (0.5 * kl(p, m) + 0.5 * kl(pf, m)).mean()
    assert nla_loss_reference(z, zf, y, 0.0, cfg).item() == pytest.approx(expected.item(), rel=1e-12)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("eps", [0.0, 0.37, 1.0])
def test_gradcheck_float64(name, eps):
    z, zf, y = _inputs(4, 7, seed=int(eps * 100))
    z.requires_grad_(), zf.requires_grad_()
    cfg = CONFIGS[name]
    assert torch.autograd.gradcheck(lambda a, b: nla_loss_reference(a, b, y, eps, cfg), (z, zf))


def test_gradient_flows_through_weight_and_eps_tensor():
    z, zf, y = _inputs(8, 7, seed=5)
    eps = torch.tensor(0.5, dtype=torch.float64, requires_grad=True)
    loss = nla_loss_reference(z, zf, y, eps)
    (g_eps,) = torch.autograd.grad(loss, eps)
    assert torch.isfinite(g_eps)
    # Detaching w must change the gradient: the weight is not a constant.
    z1 = z.clone().requires_grad_()
    nla_loss_reference(z1, zf, y, 0.5).backward()
    z2 = z.clone().requires_grad_()
    ce = torch.nn.functional.cross_entropy(z2, y, reduction="none")
    w = naw_weight_reference(z2, y, 0.5).detach()
    from nla_fast.reference import consistency_reference

    (0.5 * ((1 + w) * ce).mean() + 0.5 * consistency_reference(z2, zf, False)).backward()
    assert not torch.allclose(z1.grad, z2.grad)


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("shape", [(1, 7), (2, 2), (7, 8), (33, 13), (257, 7), (4, 1000)])
@pytest.mark.parametrize("eps", [0.0, 0.37, 1.0])
def test_closed_form_gradient_matches_autograd(name, shape, eps):
    cfg = CONFIGS[name]
    z, zf, y = _inputs(*shape, seed=shape[0] * 31 + shape[1])
    z.requires_grad_(), zf.requires_grad_()
    loss = nla_loss_reference(z, zf, y, eps, cfg)
    gz, gzf = torch.autograd.grad(loss, (z, zf))
    loss_cf, gz_cf, gzf_cf, w_cf = nla_forward_backward_closed_form(z, zf, y, eps, cfg)
    torch.testing.assert_close(loss_cf, loss.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(gz_cf, gz, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(gzf_cf, gzf, rtol=1e-9, atol=1e-10)
    torch.testing.assert_close(w_cf, naw_weight_reference(z.detach(), y, eps, cfg))


def test_ties_count_as_true_case():
    # Equal logits: p_gt == p_nn exactly; the true-case Gaussian applies.
    z = torch.zeros(1, 7, dtype=torch.float64)
    y = torch.tensor([3])
    c = NLAConfig().constants
    p = 1 / 7
    d = p - 0.5
    quad = (0.8 * 2 * d * d - 2 * 0.0 * d * d) / 0.64  # eps = 0: no off-diagonal
    expected = math.exp(-0.5 * quad) / (2 * math.pi * 0.8)
    assert naw_weight_reference(z, y, 0.0).item() == pytest.approx(expected, rel=1e-12)
    assert c.true_scale == 1.0


def test_batch_size_one_and_large_logits():
    z = torch.tensor([[1e4, -1e4, 0.0]])
    loss = nla_loss(z, z.flip(1), torch.tensor([1]), backend="reference")
    assert loss.shape == () and loss.dtype == torch.float32 and torch.isfinite(loss)
    loss = nla_loss(torch.randn(1, 7), torch.randn(1, 7), torch.tensor([2]), backend="reference")
    assert torch.isfinite(loss)


def test_non_finite_logits_give_non_finite_loss():
    z = torch.randn(4, 7)
    z[1, 2] = float("nan")
    assert not torch.isfinite(nla_loss(z, torch.randn(4, 7), torch.tensor([0, 1, 2, 3]), backend="reference"))


def test_bad_targets_are_named():
    z = torch.randn(3, 7)
    with pytest.raises(ValueError, match=r"target\[1\] = 9 is outside \[0, 7\)"):
        nla_loss(z, z, torch.tensor([0, 9, 2]), backend="reference")
    with pytest.raises(ValueError, match=r"target\[0\] = -1"):
        naw_weight(z, torch.tensor([-1, 0, 0]), backend="reference")
    with pytest.raises(ValueError, match="integer class indices"):
        nla_loss(z, z, torch.tensor([0.0, 1.0, 2.0]), backend="reference")
    with pytest.raises(ValueError, match="must match logits"):
        nla_loss(z, torch.randn(3, 8), torch.tensor([0, 1, 2]), backend="reference")
    with pytest.raises(ValueError, match="target is on meta"):
        nla_loss(z, z, torch.zeros(3, dtype=torch.long, device="meta"), backend="reference")
    with pytest.raises(ValueError, match="at least 2 classes"):
        nla_loss(torch.randn(3, 1), torch.randn(3, 1), torch.zeros(3, dtype=torch.long), backend="reference")


def test_unknown_backend_is_rejected():
    z = torch.randn(2, 7)
    with pytest.raises(ValueError, match="backend must be one of"):
        nla_loss(z, z, torch.tensor([0, 1]), backend="cuda")


def test_triton_on_cpu_without_interpreter_says_why(monkeypatch):
    from nla_fast import loss
    from nla_fast.loss import resolve_backend

    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(loss, "_resolved", {})  # resolved once per process: start afresh
    with pytest.raises(nla_fast.BackendUnavailable, match="TRITON_INTERPRET"):
        resolve_backend("triton", torch.device("cpu"))


def test_module_wrapper_and_return_weights():
    z, zf, y = _inputs(9, 7, dtype=torch.float32)
    crit = nla_fast.NLALoss(NLAConfig.official(), backend="reference")
    loss, w = crit(z, zf, y, 0.3, return_weights=True)
    torch.testing.assert_close(loss, nla_loss(z, zf, y, 0.3, NLAConfig.official(), backend="reference"))
    torch.testing.assert_close(w, naw_weight(z, y, 0.3, NLAConfig.official(), backend="reference"))
    assert w.shape == (9,) and not w.requires_grad


def test_reference_under_torch_compile_matches_eager():
    z, zf, y = _inputs(16, 7, dtype=torch.float32)
    eps = torch.tensor(0.4)

    def step(a, b, t, e):
        return nla_loss(a, b, t, e, backend="reference")

    compiled = torch.compile(step, backend="eager")
    torch.testing.assert_close(compiled(z, zf, y, eps), step(z, zf, y, eps), rtol=1e-5, atol=1e-6)


# ---- inputs every backend treats the same (issue 11) ----
@pytest.mark.parametrize("name", list(CONFIGS))
def test_minus_inf_logit_on_a_non_target_class_is_finite(name):
    z, zf, y = _inputs(6, 5, seed=3)
    y = torch.tensor([0, 1, 2, 3, 4, 0])
    z[:, 4][y != 4] = -math.inf  # a class masked out in one view only ...
    zf[:, 4][y != 4] = -math.inf  # ... and in both views
    zf[5, 3] = -math.inf
    z = z.requires_grad_()
    zf = zf.requires_grad_()
    loss = nla_loss_reference(z, zf, y, 0.5, CONFIGS[name])
    gz, gzf = torch.autograd.grad(loss, (z, zf))
    assert torch.isfinite(loss) and torch.isfinite(gz).all() and torch.isfinite(gzf).all()
    closed, cgz, cgzf, _ = nla_forward_backward_closed_form(z, zf, y, 0.5, CONFIGS[name])
    torch.testing.assert_close(loss, closed, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(gz, cgz, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(gzf, cgzf, rtol=1e-9, atol=1e-12)
    # the masked class carries no probability: same loss as dropping that column from the rows
    # where it is -inf in both views is not possible row-wise, so compare against a large negative
    big = z.detach().clone()
    bigf = zf.detach().clone()
    big[torch.isinf(big)] = -1e4
    bigf[torch.isinf(bigf)] = -1e4
    torch.testing.assert_close(loss, nla_loss_reference(big, bigf, y, 0.5, CONFIGS[name]), rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.int32])
def test_every_integer_target_dtype_gives_the_int64_answer(dtype):
    z, zf, y = _inputs(9, 7, seed=4)
    want = nla_loss(z, zf, y, 0.3, backend="reference")
    torch.testing.assert_close(nla_loss(z, zf, y.to(dtype), 0.3, backend="reference"), want)
    torch.testing.assert_close(naw_weight(z, y.to(dtype), 0.3, backend="reference"),
                               naw_weight(z, y, 0.3, backend="reference"))


@pytest.mark.parametrize("eps", [-0.1, 1.5, math.nan, math.inf, "x"])
def test_eps_outside_the_unit_interval_is_named(eps):
    z, zf, y = _inputs(4, 7)
    with pytest.raises(ValueError, match="eps"):
        nla_loss(z, zf, y, eps, backend="reference")
    with pytest.raises(ValueError, match="eps"):
        naw_weight(z, y, eps, backend="reference")


def test_eps_tensor_is_checked_only_when_validating():
    z, zf, y = _inputs(4, 7)
    with pytest.raises(ValueError, match="eps"):
        nla_loss(z, zf, y, torch.tensor(2.0), backend="reference", validate=True)
    with pytest.raises(ValueError, match="eps"):
        nla_loss(z, zf, y, torch.tensor([0.1, 0.2]), backend="reference", validate=False)
    # validate=False never reads a tensor eps on the host
    assert torch.isfinite(nla_loss(z, zf, y, torch.tensor(0.5), backend="reference", validate=False))


def test_empty_batch_is_a_value_error():
    z = torch.zeros(0, 7)
    with pytest.raises(ValueError, match="empty"):
        nla_loss(z, z, torch.zeros(0, dtype=torch.long), backend="reference")


@pytest.mark.parametrize("consistency", ["official", "jsd"])
def test_consistency_reduction_mean_is_independent_of_the_batch_size(consistency):
    sum_cfg = NLAConfig(consistency=consistency, consistency_reduction="sum")
    mean_cfg = NLAConfig(consistency=consistency, consistency_reduction="mean")
    z, zf, y = _inputs(8, 7, seed=5)
    reg_sum = nla_loss_reference(z, zf, y, 0.2, NLAConfig(lam=0.0, consistency=consistency, consistency_reduction="sum"))
    reg_mean = nla_loss_reference(z, zf, y, 0.2, NLAConfig(lam=0.0, consistency=consistency, consistency_reduction="mean"))
    torch.testing.assert_close(reg_mean * 8, reg_sum)
    # the same batch repeated twice: the mean loss is unchanged, the sum's consistency doubles
    z2, zf2, y2 = torch.cat([z, z]), torch.cat([zf, zf]), torch.cat([y, y])
    torch.testing.assert_close(nla_loss_reference(z2, zf2, y2, 0.2, mean_cfg), nla_loss_reference(z, zf, y, 0.2, mean_cfg))
    assert not torch.allclose(nla_loss_reference(z2, zf2, y2, 0.2, sum_cfg), nla_loss_reference(z, zf, y, 0.2, sum_cfg))
    closed = nla_forward_backward_closed_form(z, zf, y, 0.2, mean_cfg)
    zg, zfg = z.clone().requires_grad_(), zf.clone().requires_grad_()
    loss = nla_loss_reference(zg, zfg, y, 0.2, mean_cfg)
    gz, gzf = torch.autograd.grad(loss, (zg, zfg))
    torch.testing.assert_close(closed[0], loss, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(closed[1], gz, rtol=1e-9, atol=1e-12)
    torch.testing.assert_close(closed[2], gzf, rtol=1e-9, atol=1e-12)


def test_default_reductions_follow_each_variant():
    assert NLAConfig().consistency_reduction == "sum"
    assert NLAConfig(consistency="jsd").consistency_reduction == "mean"
    assert NLAConfig() == NLAConfig(consistency_reduction="sum")
    with pytest.raises(ValueError, match="consistency_reduction"):
        NLAConfig(consistency_reduction="batch")
