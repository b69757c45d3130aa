"""Datasets: RAF-DB, FERPlus, AffectNet and an embedded synthetic FER set.

::

    from nla_fast.data import load_dataset
    ds = load_dataset("rafdb", "~/data/RAF-DB/basic", "train", noise_rate=0.3)
    ds.images   # torch.uint8, N x H x W x 3
    ds.labels   # torch.int64, N
    ds.classes  # class names in the dataset's own order

Every loader decodes once into a uint8 cache (see :mod:`nla_fast.data.cache`) and never
downloads anything. Augmentation runs batched on the device: :mod:`nla_fast.augment`.
"""
from __future__ import annotations

import torch

from . import affectnet, ferplus, rafdb, synthetic
from .dataset import FERDataset
from .errors import CorruptImageError, DatasetError, DatasetNotFoundError, LabelFormatError, LabelRangeError
from .protocols import apply_protocols, imbalance_counts, imbalance_indices, read_noise_file, symmetric_noise

RAFDB_CLASSES = rafdb.CLASSES
RAFDB_TRAIN_COUNTS = rafdb.TRAIN_COUNTS
RAFDB_TEST_COUNTS = rafdb.TEST_COUNTS
FERPLUS_CLASSES = ferplus.CLASSES8
FERPLUS_CLASSES7 = ferplus.CLASSES7
AFFECTNET_CLASSES = affectnet.CLASSES8
AFFECTNET_CLASSES7 = affectnet.CLASSES7
SYNTHETIC_CLASSES = synthetic.CLASSES

DATASETS = ("rafdb", "ferplus", "affectnet", "synthetic")
SPLITS = {"rafdb": ("train", "test"), "ferplus": ("train", "valid", "test"),
          "affectnet": ("train", "test"), "synthetic": ("train", "test", "valid")}
_ALIASES = {"raf": "rafdb", "rafdb": "rafdb", "rafdbbasic": "rafdb", "ferplus": "ferplus", "fer+": "ferplus",
            "fer2013plus": "ferplus", "affectnet": "affectnet", "synthetic": "synthetic", "synth": "synthetic"}
_LOADERS = {"rafdb": rafdb.load, "ferplus": ferplus.load, "affectnet": affectnet.load, "synthetic": synthetic.load}

COMMON_OPTIONS = ("noise_rate", "noise_seed", "noise_file", "noise_label_base", "imbalance_factor",
                  "imbalance_seed", "cache", "cache_dir", "workers", "verbose")
DATASET_OPTIONS = {
    "rafdb": ("cache_size",),
    "ferplus": ("label_mode", "num_classes", "cache_size"),
    "affectnet": ("num_classes", "csv_file", "cache_size"),
    "synthetic": ("num_samples", "seed", "resolution", "blend_fraction", "num_identities", "cache_size"),
}
# The size images are cached at when no cache_size is given: the source's own where the
# source is small (RAF-DB's aligned 100 px faces, FERPlus's 48 px), the size the run trains
# at where it is larger (AffectNet's face crops; 224 px, the paper's input, when unknown).
SOURCE_SIZES = {"rafdb": rafdb.SOURCE_SIZE, "ferplus": ferplus.SOURCE_SIZE, "synthetic": None}


def default_cache_size(name: str, image_size=None):
    """The cache size of dataset ``name`` for a run that trains at ``image_size`` (None: the
    loader's own default, the source size where the dataset has one)."""
    dname = canonical_name(name)
    if dname == "affectnet":
        return image_size or affectnet.DEFAULT_SIZE
    return None


def canonical_name(name: str) -> str:
    key = str(name).lower().replace("-", "").replace("_", "").replace(" ", "")
    if key not in _ALIASES:
        raise ValueError(f"unknown dataset {name!r}; choose one of {DATASETS}")
    return _ALIASES[key]


def resize_images(images: torch.Tensor, image_size) -> torch.Tensor:
    """Bilinear (antialiased) resize of an N x H x W x 3 uint8 tensor, rounded back to uint8.

    Same arithmetic as :func:`nla_fast.augment.resize_uint8` (float interpolation, round),
    done in chunks on the tensor's device.
    """
    from ..augment import resize_uint8

    size = (image_size, image_size) if isinstance(image_size, int) else tuple(image_size)
    if tuple(images.shape[1:3]) == size:
        return images
    out = torch.empty((images.shape[0], *size, 3), dtype=torch.uint8, device=images.device)
    for start in range(0, images.shape[0], 1024):
        batch = images[start:start + 1024].permute(0, 3, 1, 2)
        out[start:start + 1024] = resize_uint8(batch, size).permute(0, 2, 3, 1)
    return out


def load_dataset(name: str, root=None, split: str = "train", image_size=None, **options) -> FERDataset:
    """Load one split of a dataset as uint8 tensors.

    Args:
        name: ``"rafdb"``, ``"ferplus"``, ``"affectnet"`` or ``"synthetic"``.
        root: dataset folder (ignored by ``synthetic``).
        split: ``"train"`` or ``"test"`` (FERPlus and synthetic also ``"valid"``).
        image_size: int or (H, W): resize (bilinear, antialiased) after loading; the cache
            size when ``None``. AffectNet's face crops are decoded straight to it.

    Options:
        ferplus: ``label_mode`` ("majority" | "argmax" | "soft"), ``num_classes`` (7 | 8).
        affectnet: ``num_classes`` (7 | 8), ``csv_file``.
        synthetic: ``num_samples``, ``seed``, ``resolution``, ``blend_fraction``, ``num_identities``.
        rafdb, ferplus, affectnet, synthetic: ``cache_size`` (int or (H, W)): the size the
            images are cached at (see :func:`default_cache_size`; synthetic: drawn at).
        all, training split only: ``noise_rate`` + ``noise_seed``, or ``noise_file`` (RAF-DB
            format ``name label``, labels 1..C; ``noise_label_base`` to change),
            ``imbalance_factor`` + ``imbalance_seed``. Imbalance is applied first, then noise.
        all: ``cache`` (default True), ``cache_dir`` (default ``$NLA_FAST_CACHE`` or
            ``~/.cache/nla_fast``), ``workers`` (decode threads), ``verbose`` (default True).
    """
    dname = canonical_name(name)
    allowed = set(COMMON_OPTIONS) | set(DATASET_OPTIONS[dname])
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise TypeError(f"load_dataset({dname!r}) got unknown option(s) {unknown}; valid: {sorted(allowed)}")
    if split not in SPLITS[dname]:
        raise ValueError(f"{dname} has splits {SPLITS[dname]}, got {split!r}")
    verbose = options.get("verbose", True)
    loader_opts = {k: v for k, v in options.items() if k in DATASET_OPTIONS[dname]}
    raw = _LOADERS[dname](
        root, split, use_cache=options.get("cache", True), cache_dir=options.get("cache_dir"),
        workers=options.get("workers"), verbose=verbose,
        **({"image_size": image_size} if dname == "affectnet" else {}), **loader_opts,
    )
    images = raw["images"]
    if image_size is not None:
        images = resize_images(images, image_size)
    info = dict(raw.get("info", {}))
    info.update({k: v for k, v in loader_opts.items()})
    ds = FERDataset(
        images, raw["labels"].to(torch.int64), raw["classes"], dname, split,
        soft_labels=raw.get("soft_labels"), names=raw.get("names"), info=info,
    )
    ds = apply_protocols(ds, options, verbose=verbose)
    ds.info["class_counts"] = ds.class_counts
    return ds


__all__ = [
    "load_dataset", "FERDataset", "resize_images", "canonical_name", "default_cache_size",
    "DatasetError", "DatasetNotFoundError", "CorruptImageError", "LabelFormatError", "LabelRangeError",
    "symmetric_noise", "read_noise_file", "imbalance_counts", "imbalance_indices", "apply_protocols",
    "DATASETS", "SPLITS", "RAFDB_CLASSES", "RAFDB_TRAIN_COUNTS", "RAFDB_TEST_COUNTS", "FERPLUS_CLASSES",
    "FERPLUS_CLASSES7", "AFFECTNET_CLASSES", "AFFECTNET_CLASSES7", "SYNTHETIC_CLASSES",
]
