"""One split of a dataset as a run or an evaluation uses it: at native resolution, with the
options its loader has, the training protocols (label noise, imbalance) on the training split
only, and a seeded subset for smoke runs."""
from __future__ import annotations

import torch

from . import DATASET_OPTIONS, canonical_name, load_dataset

# the synthetic set's other splits are this share of --num-samples (at least SMALLEST_SPLIT)
SYNTHETIC_SPLIT_SHARE = 4
SMALLEST_SPLIT = 64


def load_split(dataset: str, data_root, split: str, *, label_mode: str | None = None, num_classes: int | None = None,
               num_samples: int | None = None, limit: int | None = None, noise_rate: float = 0.0, noise_seed: int = 0,
               noise_file: str | None = None, imbalance_factor: float | None = None, imbalance_seed: int = 0):
    """``split`` of ``dataset`` at native resolution (the augmentation adds its noise to the raw
    image, then resizes: SPEC 1.2).

    ``label_mode``, ``num_classes``, ``num_samples``: passed to the loader when set and among
    its options (``nla_fast.data.DATASET_OPTIONS``; a run's settings are shared by every
    dataset). A synthetic split other than ``train`` gets a quarter of ``num_samples``.
    ``noise_*`` / ``imbalance_*``: the training split's protocols; given for another split
    they are refused (ValueError), so an evaluation always sees the clean labels.
    ``limit``: keep a fixed, seeded subset of that many samples (``subset_indices``).
    """
    accepted = DATASET_OPTIONS[canonical_name(dataset)]
    given = {"label_mode": label_mode, "num_classes": num_classes, "num_samples": num_samples}
    options = {name: value for name, value in given.items() if value is not None and name in accepted}
    if "num_samples" in options and split != "train":
        options["num_samples"] = max(SMALLEST_SPLIT, options["num_samples"] // SYNTHETIC_SPLIT_SHARE)
    protocols = {}
    if noise_rate:
        protocols.update(noise_rate=noise_rate, noise_seed=noise_seed)
    if noise_file:
        protocols["noise_file"] = noise_file
    if imbalance_factor is not None:
        protocols.update(imbalance_factor=imbalance_factor, imbalance_seed=imbalance_seed)
    if protocols and split != "train":
        raise ValueError(f"label noise and imbalance ({', '.join(protocols)}) apply to the training split only, "
                         f"not to {split!r}")
    loaded = load_dataset(dataset, data_root, split, image_size=None, **options, **protocols)
    index = subset_indices(len(loaded.labels), limit)
    if index is not None:
        loaded.images, loaded.labels = loaded.images[index], loaded.labels[index]
        if getattr(loaded, "soft_labels", None) is not None:
            loaded.soft_labels = loaded.soft_labels[index]
    return loaded


def subset_indices(num_samples: int, limit: int | None, seed: int = 0) -> torch.Tensor | None:
    """A deterministic subset of ``limit`` samples (sorted), or None for all; for smoke runs."""
    if limit is None or limit >= num_samples:
        return None
    if limit <= 0:
        raise ValueError(f"a sample limit must be positive, got {limit}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[:limit].sort().values
