"""Eager PyTorch NLA loss: the oracle every fast path is tested against.

``nla_loss_reference`` is SPEC 1.1 written out with autograd: readable, device-agnostic,
batch size 1 works, no host synchronisation and no ``torch.linalg``.

``nla_forward_backward_closed_form`` is the same function with its gradient written out by
hand, row by row. It is what the Triton and native kernels compute in one sweep; it lives
here, next to the definition, so the derivation is tested against autograd in plain PyTorch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .config import NLAConfig, NLAConstants

def _eps_as_tensor(eps, like: torch.Tensor) -> torch.Tensor:
    if isinstance(eps, torch.Tensor):
        return eps.to(device=like.device, dtype=like.dtype)
    return torch.tensor(float(eps), device=like.device, dtype=like.dtype)


def ground_truth_and_nearest_negative(probs: torch.Tensor, target: torch.Tensor):
    """(p_gt, p_nn, nn_index) per row. Among tied negatives the first index is the nearest."""
    gt = probs.gather(1, target[:, None]).squeeze(1)
    negatives = probs.scatter(1, target[:, None], -1.0)
    nn_index = negatives.argmax(dim=1)  # documented to return the first maximal index
    nn = probs.gather(1, nn_index[:, None]).squeeze(1)
    return gt, nn, nn_index


def gaussian_pdf_2d(x, y, mu_x, mu_y, diag, offdiag):
    """Full normalised N((x, y); mu, [[diag, offdiag], [offdiag, diag]]), closed-form 2x2 inverse."""
    det = diag * diag - offdiag * offdiag
    dx, dy = x - mu_x, y - mu_y
    quad = (diag * (dx * dx + dy * dy) - 2.0 * offdiag * dx * dy) / det
    return torch.exp(-0.5 * quad) / (2.0 * math.pi * det**0.5)


def naw_weight_from_probs(gt, nn, eps, c: NLAConstants):
    """NAW weight w_i for the pair (p_gt, p_nn); differentiable in gt, nn and eps."""
    eps = _eps_as_tensor(eps, gt)
    w_true = c.true_scale * gaussian_pdf_2d(gt, nn, c.mu_true_gt, c.mu_true_nn, c.diag_true, -eps * c.offdiag_true)
    w_false = gaussian_pdf_2d(gt, nn, c.mu_false_gt, c.mu_false_nn, c.diag_false, c.offdiag_false)
    return torch.where(gt >= nn, w_true, w_false)


def _kl_rows(log_a, log_b):
    """KL(a || b) per row from log-probabilities, with 0 * log(0/0) = 0: a class whose logit is
    -inf in both has probability 0 in both and adds nothing (and no NaN gradient)."""
    a = log_a.exp()
    diff = torch.where(a > 0, log_a - log_b, torch.zeros_like(log_a))
    return (a * diff).sum(1)


def _log_mixture(log_p, log_pf):
    """log((p + p')/2); a class with -inf in both views (log m unused there) gets 0, so that
    logaddexp's gradient at (-inf, -inf) never makes a NaN."""
    both_zero = torch.isneginf(log_p) & torch.isneginf(log_pf)
    zero = torch.zeros_like(log_p)
    return torch.logaddexp(torch.where(both_zero, zero, log_p), torch.where(both_zero, zero, log_pf)) - math.log(2.0)


def consistency_reference(logits, logits_flip, jsd: bool, mean: bool | None = None):
    """L_reg of SPEC 1.1, written literally with KL divergences, summed or averaged over the
    batch (``mean=None``: the variant's own reduction, official: sum, jsd: mean)."""
    log_p = F.log_softmax(logits, dim=1)
    log_pf = F.log_softmax(logits_flip, dim=1)
    if not jsd:
        # "official": q = softmax of the mean LOGITS, 0.5 * (KL(q||p) + KL(q||p'))
        log_q = F.log_softmax((logits + logits_flip) / 2, dim=1)
        rows = 0.5 * (_kl_rows(log_q, log_p) + _kl_rows(log_q, log_pf))
    else:
        # Jensen-Shannon: m = (p + p')/2, log m through logaddexp so it stays finite when p underflows
        log_m = _log_mixture(log_p, log_pf)
        rows = 0.5 * _kl_rows(log_p, log_m) + 0.5 * _kl_rows(log_pf, log_m)
    if mean is None:
        mean = jsd
    return rows.mean() if mean else rows.sum()


def naw_weight_reference(logits, target, eps=0.0, config: NLAConfig | None = None):
    """(B,) NAW weight of each sample, in the logits' dtype (float32 at least)."""
    config = config or NLAConfig()
    probs = F.softmax(_upcast(logits), dim=1)
    gt, nn, _ = ground_truth_and_nearest_negative(probs, target.long())
    return naw_weight_from_probs(gt, nn, eps, config.constants)


def nla_loss_reference(logits, logits_flip, target, eps=0.0, config: NLAConfig | None = None):
    """L_total = lam * mean((1 + w) * CE) + (1 - lam) * L_reg; gradients flow through w and q."""
    config = config or NLAConfig()
    c = config.constants
    z, zf = _upcast(logits), _upcast(logits_flip)
    target = target.long()
    log_p = F.log_softmax(z, dim=1)
    ce = -log_p.gather(1, target[:, None]).squeeze(1)
    gt, nn, _ = ground_truth_and_nearest_negative(log_p.exp(), target)
    w = naw_weight_from_probs(gt, nn, eps, c)
    naw = ((1.0 + w) * ce).mean()
    reg = consistency_reference(z, zf, c.jsd, c.reg_mean)
    return c.lam * naw + (1.0 - c.lam) * reg


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """All maths in float32 or wider (SPEC 1.1)."""
    return x if x.dtype in (torch.float32, torch.float64) else x.float()


@torch.no_grad()
def nla_forward_backward_closed_form(logits, logits_flip, target, eps=0.0, config: NLAConfig | None = None):
    """(loss, d loss/d logits, d loss/d logits_flip, w) with the gradient derived by hand.

    Per row, with p = softmax(z), p' = softmax(z'), g = p_y, n = p_k (k the nearest negative),
    d = (g, n) - mu and Sigma = [[a, b], [b, a]], det = a^2 - b^2:
        w       = scale * exp(-Q/2) / (2 pi sqrt(det)),  Q = (a(d1^2 + d2^2) - 2 b d1 d2) / det
        dw/dg   = -w (a d1 - b d2) / det,  dw/dn = -w (a d2 - b d1) / det
        dg/dz   = g (e_y - p),             dn/dz = n (e_k - p)
        d[(1+w) CE]/dz = (1+w)(p - e_y) + CE (dw/dg * dg/dz + dw/dn * dn/dz)
    Official consistency: 0.5 (KL(q||p) + KL(q||p')) = (lse(z) + lse(z'))/2 - lse((z + z')/2),
        so its gradient is (p - q)/2 for z and (p' - q)/2 for z'.
    JSD: with t = log p - log m, d/dz = 0.5 p (t - sum(p t)), the same with p', t' for z'.
    """
    c = (config or NLAConfig()).constants
    z, zf = _upcast(logits), _upcast(logits_flip)
    target = target.long()
    batch = z.shape[0]
    eps = _eps_as_tensor(eps, z)
    log_p, log_pf = F.log_softmax(z, 1), F.log_softmax(zf, 1)
    p, pf = log_p.exp(), log_pf.exp()
    onehot_y = F.one_hot(target, z.shape[1]).to(z.dtype)
    ce = -log_p.gather(1, target[:, None]).squeeze(1)
    gt, nn, nn_index = ground_truth_and_nearest_negative(p, target)
    onehot_k = F.one_hot(nn_index, z.shape[1]).to(z.dtype)

    true_case = gt >= nn
    a = torch.where(true_case, torch.full_like(gt, c.diag_true), torch.full_like(gt, c.diag_false))
    b = torch.where(true_case, -eps * c.offdiag_true, torch.full_like(gt, c.offdiag_false))
    det = a * a - b * b
    d1 = gt - torch.where(true_case, torch.full_like(gt, c.mu_true_gt), torch.full_like(gt, c.mu_false_gt))
    d2 = nn - torch.where(true_case, torch.full_like(gt, c.mu_true_nn), torch.full_like(gt, c.mu_false_nn))
    quad = (a * (d1 * d1 + d2 * d2) - 2.0 * b * d1 * d2) / det
    scale = torch.where(true_case, torch.full_like(gt, c.true_scale), torch.ones_like(gt))
    w = scale * torch.exp(-0.5 * quad) / (2.0 * math.pi * torch.sqrt(det))
    dw_dg = -w * (a * d1 - b * d2) / det
    dw_dn = -w * (a * d2 - b * d1) / det

    grad_naw = (1.0 + w)[:, None] * (p - onehot_y) + ce[:, None] * (
        (dw_dg * gt)[:, None] * (onehot_y - p) + (dw_dn * nn)[:, None] * (onehot_k - p)
    )
    loss_naw = ((1.0 + w) * ce).sum() / batch

    # consistency per row (its batch reduction is applied below)
    if not c.jsd:
        u = (z + zf) / 2
        lse_u = torch.logsumexp(u, 1)
        q = torch.exp(u - lse_u[:, None])
        reg_rows = 0.5 * (torch.logsumexp(z, 1) + torch.logsumexp(zf, 1)) - lse_u
        grad_reg, grad_reg_f = 0.5 * (p - q), 0.5 * (pf - q)
    else:
        log_m = _log_mixture(log_p, log_pf)
        # 0 * log(0/0) = 0 for a class with probability 0 in both views
        t = torch.where(p > 0, log_p - log_m, torch.zeros_like(p))
        tf = torch.where(pf > 0, log_pf - log_m, torch.zeros_like(pf))
        reg_rows = 0.5 * (p * t).sum(1) + 0.5 * (pf * tf).sum(1)
        grad_reg = 0.5 * p * (t - (p * t).sum(1, keepdim=True))
        grad_reg_f = 0.5 * pf * (tf - (pf * tf).sum(1, keepdim=True))
    reg_scale = 1.0 / batch if c.reg_mean else 1.0
    loss_reg = reg_rows.sum() * reg_scale
    grad_reg, grad_reg_f = grad_reg * reg_scale, grad_reg_f * reg_scale

    loss = c.lam * loss_naw + (1.0 - c.lam) * loss_reg
    grad_z = c.lam * grad_naw / batch + (1.0 - c.lam) * grad_reg
    grad_zf = (1.0 - c.lam) * grad_reg_f
    return loss, grad_z, grad_zf, w
