"""``type=`` functions of the command-line programs: each number is checked when it is parsed,
so a bad value is reported as ``argument --flag: ...`` (argparse names the flag) before any
data is loaded or any file is written.
"""
from __future__ import annotations

import argparse
import math

# ResNet-18 down-samples by 32 (stride-2 stem, max-pool and three stride-2 stages): at 32 px the
# last stage sees a 1 x 1 map; below that its stride-2 convolutions would only read padding.
MIN_IMAGE_SIZE = 32


def _number(text: str, kind):
    try:
        return kind(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected {'an integer' if kind is int else 'a number'}, got {text!r}")


def positive_int(text: str) -> int:
    """An integer >= 1."""
    value = _number(text, int)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    """An integer >= 0."""
    value = _number(text, int)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def image_size(text: str) -> int:
    """A square input side ResNet-18 can take (at least ``MIN_IMAGE_SIZE``)."""
    value = _number(text, int)
    if value < MIN_IMAGE_SIZE:
        raise argparse.ArgumentTypeError(
            f"must be at least {MIN_IMAGE_SIZE} px (ResNet-18 down-samples by 32), got {value}")
    return value


def _finite(text: str) -> float:
    value = _number(text, float)
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be a finite number, got {text!r}")
    return value


def positive_float(text: str) -> float:
    """A finite number > 0 (a learning rate)."""
    value = _finite(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be greater than 0, got {value:g}")
    return value


def non_negative_float(text: str) -> float:
    """A finite number >= 0 (a weight decay)."""
    value = _finite(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value:g}")
    return value


def decay_factor(text: str) -> float:
    """A factor in (0, 1] (ExponentialLR's gamma: 1 keeps the learning rate)."""
    value = _finite(text)
    if not 0 < value <= 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1], got {value:g}")
    return value


def probability_below_one(text: str) -> float:
    """A probability in [0, 1) (a label-noise rate: at 1 no label would be right)."""
    value = _finite(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"must lie in [0, 1), got {value:g}")
    return value


def at_least_one(text: str) -> float:
    """A finite number >= 1 (an imbalance ratio n_max / n_min)."""
    value = _finite(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value:g}")
    return value


def _triple(text: str) -> list:
    parts = [part for part in text.replace(" ", "").split(",")]
    if len(parts) != 3:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers R,G,B, got {text!r}")
    return [_finite(part) for part in parts]


def rgb_triple(text: str) -> list:
    """Three finite numbers ``R,G,B`` (a normalisation mean)."""
    return _triple(text)


def positive_rgb_triple(text: str) -> list:
    """Three numbers ``R,G,B`` > 0 (a normalisation standard deviation)."""
    values = _triple(text)
    if min(values) <= 0:
        raise argparse.ArgumentTypeError(f"every value must be greater than 0, got {text!r}")
    return values


def open_fraction(text: str) -> float:
    """A share in (0, 1) (a held-out fraction)."""
    value = _finite(text)
    if not 0 < value < 1:
        raise argparse.ArgumentTypeError(f"must lie in (0, 1), got {value:g}")
    return value


def seed_list(text: str) -> tuple:
    """Distinct integer seeds, comma-separated (``0,1,2``)."""
    seeds = tuple(_number(part.strip(), int) for part in text.split(",") if part.strip())
    if not seeds:
        raise argparse.ArgumentTypeError(f"expected seeds like 0,1,2, got {text!r}")
    if len(set(seeds)) != len(seeds):
        raise argparse.ArgumentTypeError(f"a seed is given twice in {text!r}")
    return seeds
