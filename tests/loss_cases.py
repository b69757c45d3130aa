"""The NLA loss cases every loss test shares: configurations, inputs, the float64 oracle, tolerances.

Oracle: ``nla_fast.reference.nla_loss_reference`` with float64 autograd on the same input values
(low-precision inputs are upcast exactly), and ``naw_weight_reference`` for the weights.

Tolerances, one scheme for every backend, norm-wise: max|actual - expected| <= atol + rtol *
max|expected| (a tensor is compared as a whole, so an error is measured against the scale of
the tensor it sits in):

- maths in float64 (the extension on float64 logits): rtol 1e-10; atol 1e-12 (the loss: 1e-12 B);
  float32 weights (what the public API returns) rtol 1e-7, their rounding;
- maths in float32 (every float32/bf16/fp16 input, and float64 on the Triton backend): loss,
  gradients and weights rtol 2e-5, atol 1e-7 (the loss: 1e-7 B S, S the largest |logit|, at
  least 1: float32 rounds each row's log-sum-exp to ~6e-8 S, and a loss near 0 is a difference
  of such terms);
- gradients stored in a narrower dtype than the maths: plus the dtype's rounding, rtol 8e-3
  (bfloat16), 1e-3 (float16) or 1e-7 (float32).
"""
from __future__ import annotations

import os

import torch

import nla_fast
from nla_fast.config import NLAConfig
from nla_fast.reference import naw_weight_reference, nla_loss_reference

CONFIGS = {
    "paper": NLAConfig(),  # official consistency, summed over the batch
    "official": NLAConfig.official(),  # the public reference code's constants
    "paper-jsd": NLAConfig(consistency="jsd"),  # averaged over the batch
    "official-jsd": NLAConfig.official(consistency="jsd"),
    "paper-mean": NLAConfig(consistency_reduction="mean"),
    "jsd-sum": NLAConfig(consistency="jsd", consistency_reduction="sum"),
}
EPS_KINDS = [0.0, 0.37, 1.0, "tensor"]  # "tensor": a 0-d tensor the kernels read from memory
DEVICE = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")

F64 = dict(loss=1e-10, grad=1e-10, w=1e-10, atol=1e-12)
F32 = dict(loss=2e-5, grad=2e-5, w=2e-5, atol=1e-7)
STORE_RTOL = {torch.bfloat16: 8e-3, torch.float16: 1e-3, torch.float32: 1e-7}


def fused_backends() -> list[str]:
    """The fused backends that can run here: the extension always (CPU kernels), Triton on a GPU
    or under the interpreter (tests/conftest.py sets TRITON_INTERPRET=1 without CUDA)."""
    names = ["extension"]
    if DEVICE.type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        names.insert(0, "triton")
    return names


def computes_in(backend: str, dtype: torch.dtype) -> torch.dtype:
    """The dtype a backend does its maths in for logits of ``dtype``."""
    if dtype == torch.float64 and backend in ("extension", "reference"):
        return torch.float64
    return torch.float32


def make_inputs(batch, classes, dtype=torch.float32, scale=3.0, seed=0, device=DEVICE):
    """(logits, logits of the flip: the logits plus noise, targets), reproducible per arguments."""
    gen = torch.Generator().manual_seed(seed * 1000 + batch * 7 + classes)
    z = (torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale).to(dtype)
    zf = (z.double() + torch.randn(batch, classes, generator=gen, dtype=torch.float64) * scale / 2).to(dtype)
    y = torch.randint(0, classes, (batch,), generator=gen)
    return z.to(device), zf.to(device), y.to(device)


def make_eps(kind, device=DEVICE):
    """(eps for the backend, float eps for the oracle)."""
    if kind == "tensor":
        return torch.tensor(0.61, device=device), 0.61
    return kind, kind


class Oracle(tuple):
    """(loss, d/dlogits, d/dlogits_flip, weights), and the inputs' largest finite |logit| (at
    least 1), the scale of float32's rounding of a log-sum-exp."""

    logit_scale: float = 1.0


def oracle(z, zf, y, eps, config):
    """(loss, d/dlogits, d/dlogits_flip, weights) in float64 autograd on the same values."""
    z64 = z.detach().to("cpu", torch.float64).requires_grad_()
    zf64 = zf.detach().to("cpu", torch.float64).requires_grad_()
    y64 = y.detach().to("cpu", torch.long)
    eps64 = eps.detach().to("cpu", torch.float64) if isinstance(eps, torch.Tensor) else eps
    loss = nla_loss_reference(z64, zf64, y64, eps64, config)
    gz, gzf = torch.autograd.grad(loss, (z64, zf64))
    result = Oracle((loss.detach(), gz, gzf, naw_weight_reference(z64.detach(), y64, eps64, config)))
    finite = torch.cat([z64.detach().flatten(), zf64.detach().flatten()])
    finite = finite[torch.isfinite(finite)]
    result.logit_scale = max(1.0, float(finite.abs().max())) if finite.numel() else 1.0
    return result


def run(backend, z, zf, y, eps, config, grad_scale=1.0, weights=True):
    """(loss, d/dlogits, d/dlogits_flip, weights) through the public API, gradients on leaf copies
    of the inputs in their own dtype and layout (weights None unless asked for)."""
    a = z.detach().clone().requires_grad_()
    b = zf.detach().clone().requires_grad_()
    out = nla_fast.nla_loss(a, b, y, eps, config, backend=backend, validate=False, return_weights=weights)
    loss, w = out if weights else (out, None)
    (loss * grad_scale).backward() if grad_scale != 1.0 else loss.backward()
    return loss.detach(), a.grad, b.grad, w


def assert_close(actual, expected, rtol, atol=1e-7, what=""):
    """Norm-wise: max|actual - expected| <= atol + rtol * max|expected|."""
    actual = actual.detach().double().cpu()
    expected = expected.detach().double().cpu()
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    bound = atol + rtol * (expected.abs().max().item() if expected.numel() else 0.0)
    assert err <= bound, f"{what}: max error {err:.3e} > {bound:.3e}"


def assert_matches(out, ref, computed: torch.dtype, stored: torch.dtype = torch.float32, grad_scale=1.0):
    """``out`` = (loss, gz, gzf, w) against the oracle ``ref`` with the tolerances above."""
    loss, gz, gzf, w = out
    rloss, rgz, rgzf, rw = ref
    tol = F64 if computed == torch.float64 else F32
    batch = max(1, rgz.shape[0])
    # the loss sums B rows, each rounded to about its largest logit times the unit roundoff
    loss_atol = tol["atol"] * batch * (1.0 if computed == torch.float64 else getattr(ref, "logit_scale", 1.0))
    assert_close(loss, rloss, tol["loss"], loss_atol, "loss")
    grad_rtol = tol["grad"] + STORE_RTOL.get(stored, 0.0)
    assert_close(gz, rgz * grad_scale, grad_rtol, tol["atol"], "d/dlogits")
    assert_close(gzf, rgzf * grad_scale, grad_rtol, tol["atol"], "d/dlogits_flip")
    if w is not None:
        # the public API returns float32 weights whatever the maths: their rounding, 6e-8, is the floor
        w_rtol = tol["w"] if w.dtype == torch.float64 else max(tol["w"], 1e-7)
        assert_close(w, rw, w_rtol, tol["atol"], "weights")


def check(backend, z, zf, y, eps_kind, config, grad_scale=1.0, weights=True):
    """Run ``backend`` on the inputs and compare everything with the oracle; also the dtypes:
    a float32 loss (float64 where the maths is), gradients in each input's dtype, float32 weights
    (``weights=False``: a call without them, which may launch another kernel)."""
    eps, eps_ref = make_eps(eps_kind, z.device)
    out = run(backend, z, zf, y, eps, config, grad_scale, weights)
    computed = computes_in(backend, torch.promote_types(z.dtype, zf.dtype))
    loss, gz, gzf, w = out
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if computed == torch.float64 else torch.float32)
    assert gz.dtype == z.dtype and gzf.dtype == zf.dtype
    assert (w is None) if not weights else (w.dtype == torch.float32 and w.shape == y.shape)
    assert_matches(out, oracle(z, zf, y, eps_ref, config), computed, z.dtype, grad_scale)
    return out


def compile_matches_eager(backend, compiler, batches, eps_kind, classes=7):
    """torch.compile(fullgraph=True) of a step calling nla_loss against eager: loss, both gradients
    and weights per batch size (a second size makes dynamo retrace with a symbolic batch), eps a
    0-d device tensor or a float; a new eps value reaches the compiled graph."""
    eps = torch.tensor(0.37, device=DEVICE) if eps_kind == "tensor" else 0.37

    def step(a, b, t, e):
        loss, w = nla_fast.nla_loss(a, b, t, e, backend=backend, validate=False, return_weights=True)
        return 2.0 * loss, w

    torch._dynamo.reset()
    compiled = torch.compile(step, backend=compiler, fullgraph=True)
    for batch in batches:
        z, zf, y = make_inputs(batch, classes, seed=16)
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
        new_eps = eps.fill_(0.9) if eps_kind == "tensor" else 0.9
        assert_close(compiled(z, zf, y, new_eps)[0], step(z, zf, y, new_eps)[0], 1e-6, what="new eps")
