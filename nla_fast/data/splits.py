"""One split of a dataset as a run or an evaluation uses it: at native resolution, with the
options its loader has, the training protocols (label noise, imbalance) on the training split
only, and a seeded subset for smoke runs."""
from __future__ import annotations

import torch

from . import DATASET_OPTIONS, canonical_name, load_dataset
from .errors import LabelFormatError
from .protocols import apply_protocols

# the synthetic set's other splits are this share of --num-samples (at least SMALLEST_SPLIT)
SYNTHETIC_SPLIT_SHARE = 4
SMALLEST_SPLIT = 64


def load_split(dataset: str, data_root, split: str, *, label_mode: str | None = None, num_classes: int | None = None,
               num_samples: int | None = None, cache_size: int | None = None, limit: int | None = None,
               noise_rate: float = 0.0, noise_seed: int = 0, noise_file: str | None = None,
               imbalance_factor: float | None = None, imbalance_seed: int = 0, val_fraction: float | None = None,
               val_seed: int = 0):
    """``split`` of ``dataset`` at native resolution (the augmentation adds its noise to the raw
    image, then resizes: SPEC 1.2).

    ``label_mode``, ``num_classes``, ``num_samples``, ``cache_size`` (the size the images are
    cached at, see ``nla_fast.data.default_cache_size``): passed to the loader when set and among
    its options (``nla_fast.data.DATASET_OPTIONS``; a run's settings are shared by every
    dataset). A synthetic split other than ``train`` gets a quarter of ``num_samples``.
    ``noise_*`` / ``imbalance_*``: the training split's protocols; given for another split
    they are refused (ValueError), so an evaluation always sees the clean labels.
    ``limit``: keep a fixed, seeded subset of that many samples (``subset_indices``).
    ``val_fraction``: ``train`` and ``valid`` are the two parts of the dataset's training split
    held out by ``nla_fast.data.holdout`` (stratified, seeded with ``val_seed``); the protocols
    then apply to the training part only.
    A split left without samples (every row dropped by a label rule) raises LabelFormatError:
    a run would otherwise report NaN accuracies and choose no best checkpoint.
    """
    accepted = DATASET_OPTIONS[canonical_name(dataset)]
    given = {"label_mode": label_mode, "num_classes": num_classes, "num_samples": num_samples, "cache_size": cache_size}
    options = {name: value for name, value in given.items() if value is not None and name in accepted}
    held_out = val_fraction is not None and split in ("train", "valid")  # both parts of the training split
    if "num_samples" in options and split != "train" and not held_out:
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
    if held_out:
        from .holdout import split_off_validation

        whole = load_dataset(dataset, data_root, "train", image_size=None, **options)  # clean labels
        train_part, valid_part = split_off_validation(whole, val_fraction, val_seed)
        loaded = apply_protocols(train_part, protocols) if split == "train" else valid_part
    else:
        loaded = load_dataset(dataset, data_root, split, image_size=None, **options, **protocols)
    if len(loaded.labels) == 0:
        raise LabelFormatError(_empty_split(loaded, dataset, split))
    index = subset_indices(len(loaded.labels), limit)
    if index is not None:
        loaded.images, loaded.labels = loaded.images[index], loaded.labels[index]
        if getattr(loaded, "soft_labels", None) is not None:
            loaded.soft_labels = loaded.soft_labels[index]
    return loaded


def _empty_split(loaded, dataset: str, split: str) -> str:
    info = loaded.info
    source = info.get("label_file") or ", ".join(info.get("label_files") or []) or info.get("root") or dataset
    if info.get("rows_total"):  # FERPlus: rows read, then dropped by the label rule
        why = (f"all {info['rows_total']} of its rows were dropped by the {info.get('label_mode', 'label')} rule "
               "(no majority, unknown, not a face, or a class left out)")
    elif "rows_total" in info:
        why = "the label files have no row of this split"
    else:
        why = "its label file lists no image of a class this run keeps (see --num-classes)"
    return f"{dataset} {split} split is empty ({source}): {why}"


def subset_indices(num_samples: int, limit: int | None, seed: int = 0) -> torch.Tensor | None:
    """A deterministic subset of ``limit`` samples (sorted), or None for all; for smoke runs."""
    if limit is None or limit >= num_samples:
        return None
    if limit <= 0:
        raise ValueError(f"a sample limit must be positive, got {limit}")
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed))
    return order[:limit].sort().values
