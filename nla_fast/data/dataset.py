"""The in-memory dataset container every loader returns.

A :class:`FERDataset` is a handful of tensors: ``images`` (uint8, N x H x W x 3, RGB;
grey images replicated to three channels), ``labels`` (int64, N), optional
``soft_labels`` (float32, N x C, each row sums to 1), plus plain metadata. There is no
per-sample Python work anywhere: the training loop indexes the tensors directly (on the
GPU when they fit, see :mod:`nla_fast.placement`) and augments whole batches with
:mod:`nla_fast.augment`.
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch


def _fmt_counts(classes: Sequence[str], counts: Sequence[int]) -> str:
    return ", ".join(f"{c} {n}" for c, n in zip(classes, counts))


class FERDataset:
    """Images, labels and class names of one split of one dataset.

    Attributes:
        images: ``torch.uint8`` tensor ``N x H x W x 3``; loaded through the cache it is mapped
            from the cache file (read as it is used; ``.clone()`` makes a copy independent of it).
        labels: ``torch.int64`` tensor ``N`` (after any noise protocol).
        classes: class names in the dataset's own index order.
        soft_labels: ``float32`` ``N x C`` label distributions or ``None`` (FERPlus
            ``label_mode="soft"``: normalised votes; synthetic: the true mixing weights).
        clean_labels: labels before the noise protocol (same tensor as ``labels`` if none).
        names: per-sample identifiers (file names), used by noise files; may be ``None``.
        indices: row of each sample in the split before the imbalance protocol.
        name, split: dataset and split names.
        info: plain dict: source paths, cache file, protocol results (``noise_rate``,
            ``class_counts``, ...).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        classes: Sequence[str],
        name: str,
        split: str,
        soft_labels: Optional[torch.Tensor] = None,
        names: Optional[list] = None,
        clean_labels: Optional[torch.Tensor] = None,
        indices: Optional[torch.Tensor] = None,
        info: Optional[dict] = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[-1] != 3:
            raise ValueError(f"images must be uint8 N x H x W x 3, got {images.dtype} {tuple(images.shape)}")
        if labels.dtype != torch.int64 or labels.shape != (images.shape[0],):
            raise ValueError(f"labels must be int64 of shape ({images.shape[0]},), got {labels.dtype} {tuple(labels.shape)}")
        self.images = images
        self.labels = labels
        self.classes = tuple(classes)
        self.name = name
        self.split = split
        self.soft_labels = soft_labels
        self.names = names
        self.clean_labels = labels if clean_labels is None else clean_labels
        self.indices = torch.arange(len(labels)) if indices is None else indices
        self.info: dict[str, Any] = dict(info or {})

    # ------------------------------------------------------------------ basics
    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i):
        """``(image HxWx3 uint8, label)``: lets a plain DataLoader consume the set too."""
        return self.images[i], self.labels[i]

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def image_size(self) -> tuple[int, int]:
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def device(self) -> torch.device:
        return self.images.device

    @property
    def class_counts(self) -> list[int]:
        """Samples per class (of the possibly noisy ``labels``)."""
        return torch.bincount(self.labels.cpu(), minlength=self.num_classes).tolist()

    @property
    def clean_class_counts(self) -> list[int]:
        return torch.bincount(self.clean_labels.cpu(), minlength=self.num_classes).tolist()

    @property
    def is_noisy(self) -> torch.Tensor:
        """Bool mask of samples whose label differs from the clean one."""
        return self.labels != self.clean_labels

    @property
    def noise_rate(self) -> float:
        """Realised fraction of labels changed by the noise protocol (0.0 without one)."""
        if len(self) == 0:
            return 0.0
        return float(self.is_noisy.float().mean())

    @property
    def nbytes(self) -> int:
        return self.images.numel() * self.images.element_size()

    # ------------------------------------------------------------------ derived sets
    def subset(self, index: torch.Tensor) -> "FERDataset":
        """A new dataset holding the rows ``index`` (a LongTensor or bool mask)."""
        index = torch.as_tensor(index)
        if index.dtype == torch.bool:
            index = index.nonzero().flatten()
        idx_cpu = index.cpu()
        return FERDataset(
            self.images[index.to(self.images.device)],
            self.labels[index.to(self.labels.device)],
            self.classes,
            self.name,
            self.split,
            soft_labels=None if self.soft_labels is None else self.soft_labels[index.to(self.soft_labels.device)],
            names=None if self.names is None else [self.names[i] for i in idx_cpu.tolist()],
            clean_labels=self.clean_labels[index.to(self.clean_labels.device)],
            indices=self.indices[idx_cpu.to(self.indices.device)],
            info=self.info,
        )

    # ------------------------------------------------------------------ placement
    def to(self, device, non_blocking: bool = False) -> "FERDataset":
        """Move the tensors to ``device`` (in place; returns self). Where the trainer keeps its
        training images (device, epoch shard or pinned host memory) is decided in
        :mod:`nla_fast.placement`."""
        device = torch.device(device)
        self.images = self.images.to(device, non_blocking=non_blocking)
        self.labels = self.labels.to(device, non_blocking=non_blocking)
        self.clean_labels = self.clean_labels.to(device, non_blocking=non_blocking)
        if self.soft_labels is not None:
            self.soft_labels = self.soft_labels.to(device, non_blocking=non_blocking)
        return self

    # ------------------------------------------------------------------ reporting
    def summary(self) -> str:
        h, w = self.image_size
        lines = [
            f"{self.name}/{self.split}: {len(self)} images {h}x{w}, {self.num_classes} classes",
            f"  class counts: {_fmt_counts(self.classes, self.class_counts)}",
        ]
        if "noise_rate_requested" in self.info or "noise_file" in self.info:
            lines.append(f"  label noise: realised rate {self.noise_rate:.4f}")
        if "imbalance_factor" in self.info:
            lines.append(f"  imbalance factor {self.info['imbalance_factor']}: realised {self.info.get('imbalance_realised')}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        h, w = self.image_size
        return (
            f"FERDataset(name={self.name!r}, split={self.split!r}, n={len(self)}, size={h}x{w}, "
            f"classes={list(self.classes)}, device={self.images.device})"
        )
