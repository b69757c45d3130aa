"""Label-noise and class-imbalance protocols for the training split (SPEC §2).

- Symmetric noise: with probability ``p`` each label is replaced by a class drawn
  uniformly from the *other* C-1 classes (seeded); the realised rate is reported.
- Noise file: labels read from a file in RAF-DB's own format, ``name label`` per line,
  labels 1..C (RAF-DB's 1-based convention) in the dataset's class order.
- Imbalance: exponential long tail with factor rho = n_max / n_min. Classes are ranked by
  their original frequency (ties by class index); the class of rank k (0-based) keeps
  ``floor(n_max * rho ** (-k / (C - 1)))`` samples (never more than it has), drawn
  without replacement (seeded).
"""
from __future__ import annotations

import math
import re
from pathlib import Path
from typing import Optional, Sequence

import torch

from .errors import DatasetNotFoundError, LabelFormatError
from .rafdb import read_name_label_lines


def symmetric_noise(labels: torch.Tensor, num_classes: int, rate: float, seed: int = 0) -> torch.Tensor:
    """Labels with each one replaced, with probability ``rate``, by a uniformly drawn different class."""
    if not 0.0 <= rate <= 1.0:
        raise ValueError(f"noise_rate must lie in [0, 1], got {rate}")
    if num_classes < 2:
        raise ValueError("label noise needs at least two classes")
    g = torch.Generator().manual_seed(int(seed))
    labels = labels.cpu()
    flip = torch.rand(labels.shape, generator=g) < rate
    shift = torch.randint(1, num_classes, labels.shape, generator=g)
    return torch.where(flip, (labels + shift) % num_classes, labels)


def _normalise_name(name: str) -> str:
    stem = Path(name.strip()).name
    stem = re.sub(r"\.[A-Za-z0-9]+$", "", stem)
    return re.sub(r"_aligned$", "", stem)


def read_noise_file(
    path, names: Sequence[str], num_classes: int, label_base: int = 1
) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``name label`` lines; returns ``(labels, found)`` aligned with ``names``.

    ``found`` marks the samples the file lists; lines naming samples outside ``names``
    (e.g. the test split in a full partition file) are skipped. Names are compared without
    folders, extensions and RAF-DB's ``_aligned`` suffix.
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise DatasetNotFoundError(
            f"noise file {path} does not exist (expected lines 'name label', labels "
            f"{label_base}..{num_classes - 1 + label_base}, as RAF-DB's list_patition_label.txt)"
        )
    index = {_normalise_name(n): i for i, n in enumerate(names)}
    labels = torch.full((len(names),), -1, dtype=torch.int64)
    for _, name, value in read_name_label_lines(path, label_base, label_base + num_classes - 1):
        i = index.get(_normalise_name(name))
        if i is not None:
            labels[i] = value - label_base
    found = labels >= 0
    if not bool(found.any()):
        raise LabelFormatError(f"noise file {path} names none of the {len(names)} samples of this split")
    return labels, found


def imbalance_counts(class_counts: Sequence[int], factor: float) -> list[int]:
    """Per-class targets of the exponential long-tail protocol (in class index order)."""
    if factor < 1:
        raise ValueError(f"imbalance_factor must be >= 1 (n_max / n_min), got {factor}")
    c = len(class_counts)
    order = sorted(range(c), key=lambda k: (-class_counts[k], k))
    n_max = class_counts[order[0]]
    targets = [0] * c
    for rank, k in enumerate(order):
        t = n_max if c == 1 else math.floor(n_max * factor ** (-rank / (c - 1)) + 1e-9)
        targets[k] = min(class_counts[k], max(1, t) if class_counts[k] else 0)
    return targets


def imbalance_indices(labels: torch.Tensor, num_classes: int, factor: float, seed: int = 0) -> tuple[torch.Tensor, list[int]]:
    """Sorted indices of the kept samples and the per-class targets."""
    labels = labels.cpu()
    counts = torch.bincount(labels, minlength=num_classes).tolist()
    targets = imbalance_counts(counts, factor)
    g = torch.Generator().manual_seed(int(seed))
    keep = []
    for k in range(num_classes):
        members = (labels == k).nonzero().flatten()
        perm = torch.randperm(len(members), generator=g)[: targets[k]]
        keep.append(members[perm])
    idx = torch.cat(keep).sort().values if keep else torch.zeros(0, dtype=torch.int64)
    return idx, targets


def apply_protocols(ds, options: dict, verbose: bool = True):
    """Apply imbalance then noise to a training :class:`FERDataset`; returns the new dataset."""
    from .dataset import _fmt_counts

    noise_rate = float(options.get("noise_rate") or 0.0)
    noise_file = options.get("noise_file")
    factor = options.get("imbalance_factor")
    if noise_file is not None and noise_rate > 0:
        raise ValueError("give either noise_rate or noise_file, not both")
    if not (noise_rate > 0 or noise_file is not None or (factor is not None and float(factor) != 1.0)):
        return ds
    if ds.split != "train":
        if verbose:
            print(f"[nla_fast.data] {ds.name}/{ds.split}: noise/imbalance options apply to the training split only; ignored")
        return ds
    info = {}
    if factor is not None and float(factor) != 1.0:
        idx, targets = imbalance_indices(ds.labels, ds.num_classes, float(factor), options.get("imbalance_seed", 0) or 0)
        ds = ds.subset(idx)
        realised = ds.class_counts
        nmin = min(c for c in realised if c > 0) if any(realised) else 0
        info.update(
            imbalance_factor=float(factor),
            imbalance_targets=targets,
            imbalance_realised=(max(realised) / nmin) if nmin else float("inf"),
        )
        if verbose:
            print(
                f"[nla_fast.data] {ds.name}/train imbalance factor {float(factor):g}: kept {len(ds)} samples; "
                f"class counts {_fmt_counts(ds.classes, realised)} (realised n_max/n_min {info['imbalance_realised']:.2f})"
            )
    if noise_rate > 0:
        noisy = symmetric_noise(ds.clean_labels, ds.num_classes, noise_rate, options.get("noise_seed", 0) or 0)
        ds.labels = noisy
        info.update(noise_rate_requested=noise_rate, noise_seed=options.get("noise_seed", 0) or 0)
    elif noise_file is not None:
        if ds.names is None:
            raise ValueError(f"{ds.name} samples carry no names, so a noise file cannot be matched")
        labels, found = read_noise_file(noise_file, ds.names, ds.num_classes, options.get("noise_label_base", 1))
        ds.labels = torch.where(found, labels, ds.clean_labels)
        info.update(noise_file=str(noise_file), noise_file_unlisted=int((~found).sum()))
        if verbose and not bool(found.all()):
            print(f"[nla_fast.data] noise file {noise_file} does not list {int((~found).sum())} training samples; they keep their labels")
    if noise_rate > 0 or noise_file is not None:
        info["noise_rate"] = ds.noise_rate
        if verbose:
            print(
                f"[nla_fast.data] {ds.name}/train label noise: realised rate {ds.noise_rate:.4f} "
                f"({int(ds.is_noisy.sum())} of {len(ds)}); noisy class counts {_fmt_counts(ds.classes, ds.class_counts)}"
            )
    ds.info = {**ds.info, **info}
    return ds
