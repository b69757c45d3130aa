"""The order of the training samples in an epoch (``--sampler``).

``uniform``: a seeded permutation of the whole set (``engine.epoch_permutation``), as the
reference's shuffling ``DataLoader`` does. ``balanced``: the epoch draws as many samples as the
set has, with replacement, each sample with weight ``1 / (samples of its class)``, so every
class is drawn equally often on average (for long-tailed sets such as AffectNet, whose largest
class has ~25 times the samples of its smallest). Both orders depend on (seed, epoch) only: a
resumed run draws the same order again, every rank of a distributed run draws the same global
order and trains on its shard of it (``engine.shard``), and the order is made on the host once
per epoch, so it changes nothing in the (captured) step.
"""
from __future__ import annotations

import numpy as np
import torch

from .engine import epoch_permutation, shard

SAMPLERS = ("uniform", "balanced")
_BALANCED_SALT = 0x5A3D  # a balanced epoch's draws are independent of the uniform permutation's


def class_balanced_weights(labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """float64 weight of each sample: 1 / (number of samples of its class)."""
    counts = torch.bincount(labels.cpu(), minlength=num_classes).double()
    return (1.0 / counts.clamp(min=1))[labels.cpu()]


def balanced_order(weights: torch.Tensor, seed: int, epoch: int) -> torch.Tensor:
    """``len(weights)`` sample indices drawn with replacement in proportion to ``weights``;
    depends only on (seed, epoch)."""
    entropy = [int(seed) & 0xFFFFFFFF, int(epoch), _BALANCED_SALT]
    state = np.random.SeedSequence(entropy).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.multinomial(weights, len(weights), replacement=True, generator=generator)


class EpochOrder:
    """The sample order of each epoch of a run, for ``--sampler uniform|balanced``."""

    def __init__(self, sampler: str, labels: torch.Tensor, num_classes: int, seed: int):
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {sampler!r}")
        self.sampler, self.seed, self.num_classes = sampler, int(seed), num_classes
        self.labels = labels.cpu()
        self.weights = class_balanced_weights(self.labels, num_classes) if sampler == "balanced" else None

    def __call__(self, epoch: int) -> torch.Tensor:
        """The global order of ``epoch`` (indices into the training set)."""
        if self.weights is None:
            return epoch_permutation(len(self.labels), self.seed, epoch)
        return balanced_order(self.weights, self.seed, epoch)

    def class_counts(self, order: torch.Tensor, world_size: int, batch_size: int) -> list[int]:
        """Samples of each class the epoch trains on, over every rank's shard (the remainder dropped)."""
        trained = torch.cat([shard(order, rank, world_size, batch_size) for rank in range(world_size)])
        return torch.bincount(self.labels[trained], minlength=self.num_classes).tolist()
