"""A validation split held out of the training split (``--val-fraction``): stratified by class
and seeded, so the same fraction and seed give the same images on any machine and in any run.

RAF-DB and AffectNet publish no validation split; choosing ``best.pt`` on the test split makes
its test accuracy optimistic. Holding out a share of each class of the training split gives a
selection split with the training set's class balance; the label-noise and imbalance protocols
then apply to the rest only (``nla_fast.data.splits.load_split``).
"""
from __future__ import annotations

import torch


def stratified_holdout(labels: torch.Tensor, fraction: float, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, held_out)``: sorted indices. Each class gives ``round(fraction * n)`` of its ``n``
    samples, drawn with a generator seeded by ``seed``, but keeps at least one for training (a
    class of one sample stays whole in training)."""
    if not 0 < fraction < 1:
        raise ValueError(f"the held-out fraction must lie in (0, 1), got {fraction}")
    labels = labels.cpu()
    generator = torch.Generator().manual_seed(int(seed))
    held = []
    for label in torch.unique(labels).tolist():  # ascending: the same draws whatever the class names
        members = (labels == label).nonzero().flatten()
        count = min(len(members) - 1, int(fraction * len(members) + 0.5))
        held.append(members[torch.randperm(len(members), generator=generator)[:count]])
    held_out = torch.cat(held).sort().values if held else torch.zeros(0, dtype=torch.int64)
    keep = torch.ones(len(labels), dtype=torch.bool)
    keep[held_out] = False
    return keep.nonzero().flatten(), held_out


def split_off_validation(dataset, fraction: float, seed: int = 0):
    """``(training part, validation part)`` of a clean training :class:`FERDataset` (before
    any protocol), split by ``stratified_holdout`` on its labels."""
    kept, held_out = stratified_holdout(dataset.labels, fraction, seed)
    train, valid = dataset.subset(kept), dataset.subset(held_out)
    valid.split = "valid"
    note = {"held_out_fraction": float(fraction), "held_out_seed": int(seed)}
    train.info = {**dataset.info, **note, "class_counts": train.class_counts}
    valid.info = {**dataset.info, **note, "class_counts": valid.class_counts}
    return train, valid
