"""NLA hyper-parameters and the constants every backend derives from them.

The covariance matrices are 2x2 and symmetric with equal diagonals, so their inverses and
determinants have closed forms. They are computed once per config (``NLAConfig.constants``)
instead of being rebuilt and inverted with ``torch.linalg`` on every call as the reference
code does. Only the true-case off-diagonal depends on the schedule value ``eps``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

CONSISTENCY_VARIANTS = ("official", "jsd")
CONSISTENCY_REDUCTIONS = ("sum", "mean")
# Each variant's own reduction over the batch (SPEC 1.1): the reference code sums the official
# term; the Jensen-Shannon option is a batch mean.
_NATURAL_REDUCTION = {"official": "sum", "jsd": "mean"}


def ellipse_off_diagonal(diag: float, ratio: float) -> float:
    """Off-diagonal magnitude ``o`` of Sigma(d, r) (SPEC 1.1): var = d/(1+1/r^2), o = var(1-1/r^2)."""
    var = diag / (1.0 + 1.0 / ratio**2)
    return var * (1.0 - 1.0 / ratio**2)


class NLAConstants(NamedTuple):
    """Plain floats handed to every kernel; fixed for a config, so safe to freeze into a CUDA graph."""

    lam: float
    mu_true_gt: float
    mu_true_nn: float
    diag_true: float
    offdiag_true: float  # o_T; the true-case off-diagonal is -eps * o_T
    true_scale: float
    mu_false_gt: float
    mu_false_nn: float
    diag_false: float
    offdiag_false: float  # +o_F (sign +1, scale 1)
    inv_det_false: float
    norm_false: float  # 1 / (2 pi sqrt(det Sigma_F))
    jsd: bool
    reg_mean: bool  # consistency term averaged over the batch (True) or summed (False)

    def as_list(self) -> list[float]:
        """The numeric constants in a fixed order (the native extension's argument layout)."""
        return [float(v) for v in self[:12]]


@dataclass(frozen=True)
class NLAConfig:
    """The NLA loss hyper-parameters. ``NLAConfig()`` holds the paper's values (SPEC 1.1)."""

    lam: float = 0.5
    mu_true: tuple[float, float] = (0.5, 0.5)
    mu_false: tuple[float, float] = (0.30, 0.15)
    diag_true: float = 0.8
    ratio_true: float = 2.0
    diag_false: float = 0.8
    ratio_false: float = 6.0
    true_scale: float = 1.0
    slope: float = -15.0
    consistency: str = "official"
    # "sum" or "mean" over the batch; None: the variant's own (official: sum, as the reference
    # code; jsd: mean). "mean" makes the loss independent of the batch size.
    consistency_reduction: str | None = None

    def __post_init__(self):
        if self.consistency not in CONSISTENCY_VARIANTS:
            raise ValueError(
                f"NLAConfig.consistency must be one of {CONSISTENCY_VARIANTS}, got {self.consistency!r}"
            )
        if self.consistency_reduction is None:
            object.__setattr__(self, "consistency_reduction", _NATURAL_REDUCTION[self.consistency])
        if self.consistency_reduction not in CONSISTENCY_REDUCTIONS:
            raise ValueError(
                f"NLAConfig.consistency_reduction must be one of {CONSISTENCY_REDUCTIONS}, "
                f"got {self.consistency_reduction!r}"
            )
        if not 0.0 <= self.lam <= 1.0:
            raise ValueError(f"NLAConfig.lam must lie in [0, 1], got {self.lam}")
        for name in ("diag_true", "diag_false"):
            if getattr(self, name) <= 0:
                raise ValueError(f"NLAConfig.{name} must be positive, got {getattr(self, name)}")
        for name in ("ratio_true", "ratio_false"):
            if getattr(self, name) < 1:
                raise ValueError(f"NLAConfig.{name} (major:minor axis ratio) must be >= 1, got {getattr(self, name)}")
        for name in ("mu_true", "mu_false"):
            value = getattr(self, name)
            if len(value) != 2:
                raise ValueError(f"NLAConfig.{name} must be a pair (p_gt, p_nn), got {value!r}")
            object.__setattr__(self, name, (float(value[0]), float(value[1])))
        # Derived once here (not dataclass fields): plain attribute reads trace cleanly under torch.compile.
        constants = _derive_constants(self)
        object.__setattr__(self, "_constants", constants)
        object.__setattr__(self, "_kernel_args", (tuple(constants.as_list()), constants.jsd, constants.reg_mean))

    @classmethod
    def official(cls, **overrides) -> "NLAConfig":
        """The public reference code's constants: the false-case ellipse uses sigma = 0.91."""
        ratio_false = overrides.pop("ratio_false", 6.0)
        diag_false = 0.91**2 * (1.0 + 1.0 / ratio_false**2)
        return cls(diag_false=diag_false, ratio_false=ratio_false, **overrides)

    @property
    def constants(self) -> NLAConstants:
        return self._constants

    @property
    def kernel_args(self) -> tuple[tuple[float, ...], bool, bool]:
        """(the 12 numeric constants, jsd, reg_mean) as every fused kernel takes them."""
        return self._kernel_args


def _derive_constants(config: NLAConfig) -> NLAConstants:
    o_true = ellipse_off_diagonal(config.diag_true, config.ratio_true)
    o_false = ellipse_off_diagonal(config.diag_false, config.ratio_false)
    det_false = config.diag_false**2 - o_false**2
    return NLAConstants(
        lam=float(config.lam),
        mu_true_gt=config.mu_true[0],
        mu_true_nn=config.mu_true[1],
        diag_true=float(config.diag_true),
        offdiag_true=o_true,
        true_scale=float(config.true_scale),
        mu_false_gt=config.mu_false[0],
        mu_false_nn=config.mu_false[1],
        diag_false=float(config.diag_false),
        offdiag_false=o_false,
        inv_det_false=1.0 / det_false,
        norm_false=1.0 / (2.0 * math.pi * math.sqrt(det_false)),
        jsd=config.consistency == "jsd",
        reg_mean=config.consistency_reduction == "mean",
    )


def eps_schedule(epoch: int, total_epochs: int, slope: float = -15.0) -> float:
    """eps(epoch) = 1 - exp(slope * epoch / total_epochs), epoch 0-based: 0 at the first epoch."""
    if total_epochs <= 0:
        raise ValueError(f"total_epochs must be positive, got {total_epochs}")
    if epoch < 0:
        raise ValueError(f"epoch is 0-based and must be >= 0, got {epoch}")
    return 1.0 - math.exp(slope * epoch / total_epochs)
