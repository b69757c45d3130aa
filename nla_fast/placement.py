"""Where the training images live, decided here and nowhere else.

Three placements, one interface for ``TrainStep``:

* ``DeviceResident``: the whole training set on the device (a one-process run whose set
  fits in ``DEVICE_DATA_SHARE`` of free GPU memory; any CPU run). The step gathers its batch
  with one index on the device.
* ``EpochShard``: a distributed run keeps on each device only the samples its rank trains on
  this epoch, refilled between epochs; the full set stays in host memory, shared by the
  ranks of a machine through the loader's memory-mapped cache.
* ``HostStaged``: not even that fits. The images stay in host memory; before each step its
  batch is gathered on the host into one of two pinned buffers and copied into a static
  device buffer, which the (possibly captured) step reads.

Each is a :class:`Placement`, the interface the step reads.
"""
from __future__ import annotations

from typing import Callable, Protocol, runtime_checkable

import torch

from .distributed import contiguous_slice

# Stay below this share of free GPU memory with the training images, else keep them in host memory.
DEVICE_DATA_SHARE = 0.5


@runtime_checkable
class Placement(Protocol):
    """What ``TrainStep`` reads of the training set, wherever its images live."""

    labels: torch.Tensor  # on the device
    soft_labels: torch.Tensor | None  # N x C target distributions on the device, indexed like labels; or None

    def start_epoch(self, order: torch.Tensor) -> torch.Tensor:
        """The epoch's sample order (indices into the set) -> the positions the step reads, on the device."""

    def before_step(self, step: int) -> None:
        """Host work before step ``step`` of the epoch (outside any captured graph)."""

    def batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        """The batch's uint8 images; called inside the step: device work only, so a CUDA graph can capture it."""


def _row_bytes(images: torch.Tensor) -> int:
    return images[0].numel() * images.element_size() if len(images) else 0


def choose(nbytes: int, device: torch.device, sharded: bool, free_bytes: int | None = None) -> str:
    """"device", "shard" or "host": where training images of ``nbytes`` (the set, or a rank's
    epoch shard when ``sharded``) go. ``free_bytes``: free device memory (queried when None)."""
    if device.type == "cuda":
        if free_bytes is None:
            free_bytes = torch.cuda.mem_get_info(device)[0]
        if nbytes > DEVICE_DATA_SHARE * free_bytes:
            return "host"
    return "shard" if sharded else "device"


def place_training_set(images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int,
                       shard_length: int | None = None, say: Callable[[str], None] = print,
                       soft_labels: torch.Tensor | None = None) -> Placement:
    """The placement of a training set. ``shard_length``: a distributed run's samples per rank
    and epoch (None: one process trains on the whole set). ``soft_labels``: per-sample target
    distributions (soft-label training), kept beside the labels."""
    placed = _place(images, labels, device, batch_size, shard_length, say)
    if soft_labels is not None:
        placed.set_soft_labels(soft_labels.float())
    return placed


def _place(images, labels, device, batch_size, shard_length, say):
    sharded = shard_length is not None
    nbytes = shard_length * _row_bytes(images) if sharded else images.numel() * images.element_size()
    where = choose(nbytes, device, sharded)
    if where == "device":
        return DeviceResident(images, labels, device)
    if where == "shard":
        return EpochShard(images, labels, shard_length, device)
    what = "this rank's shard" if sharded else "the images"
    say(f"nla_fast: {what} ({nbytes / 2**30:.1f} GiB) stay in host memory (more than "
        f"{DEVICE_DATA_SHARE:.0%} of free GPU memory); batches are copied per step")
    # one process: pinned, so each batch's host gather reads fast memory; several ranks share
    # the memory-mapped cache instead (pinning would copy the set once per rank)
    return HostStaged(images if sharded else images.pin_memory(), labels, device, batch_size)


def place_test_split(images: torch.Tensor, labels: torch.Tensor, device: torch.device, rank: int = 0,
                     world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's contiguous slice of the test split on the device (evaluation sums the counts)."""
    mine = contiguous_slice(len(labels), rank, world_size)
    return images[mine].to(device), labels[mine].to(device)


class _Placement:
    soft_labels = None

    def set_soft_labels(self, soft: torch.Tensor) -> None:
        # small (N x C floats): the whole set on the device, indexed by sample like the labels
        self.soft_labels = soft.to(self.device)


class DeviceResident(_Placement):
    """The whole training set on ``device``."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device):
        self.device = device
        self.images, self.labels = images.to(device), labels.to(device)

    def start_epoch(self, order: torch.Tensor) -> torch.Tensor:
        return order.to(self.device)

    def before_step(self, step: int) -> None:
        pass

    def batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]


class EpochShard(_Placement):
    """This rank's training samples of the current epoch, held on its device.

    Why a per-epoch shard and not the whole set: each rank trains on 1/world_size of the set
    per epoch, so its device holds only that (AffectNet at its 112 px cache is 10.7 GB; on
    8 GPUs each holds 1.3 GB), while the full uint8 set stays in host memory, memory-mapped
    from the loader's cache file and so shared by all ranks of a machine (nothing is pinned
    but two small staging buffers). Refilling costs one host gather and one copy of the
    shard per epoch (RAF-DB on 8 GPUs: 46 MB). The device buffers keep their address, so a
    captured CUDA graph that gathers its batch from them stays valid across epochs; the
    epoch order the step sees is then simply ``arange(len(shard))``.
    """

    CHUNK_BYTES = 64 << 20

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, length: int, device: torch.device):
        self.host_images, self.host_labels = images, labels.cpu()
        self.device = device
        self.images = torch.empty((length,) + tuple(images.shape[1:]), dtype=images.dtype, device=device)
        self.labels = torch.empty(length, dtype=labels.dtype, device=device)
        self.chunk = max(1, min(length, self.CHUNK_BYTES // max(1, _row_bytes(images))))
        self.staging = ([torch.empty((self.chunk,) + tuple(images.shape[1:]), dtype=images.dtype).pin_memory()
                         for _ in range(2)] if device.type == "cuda" else None)

    def start_epoch(self, order: torch.Tensor) -> torch.Tensor:
        self.fill(order)
        if self.host_soft_labels is not None:
            self.soft_labels.copy_(self.host_soft_labels[order.cpu()])
        return torch.arange(len(order), device=self.device)

    host_soft_labels = None

    def set_soft_labels(self, soft: torch.Tensor) -> None:
        # the shard's positions index the device buffers: its soft labels are refilled with it
        self.host_soft_labels = soft.cpu()
        self.soft_labels = torch.empty((len(self.labels),) + tuple(soft.shape[1:]), dtype=soft.dtype,
                                       device=self.device)

    def before_step(self, step: int) -> None:
        pass

    def batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        return self.images[indices]

    def fill(self, rows: torch.Tensor) -> None:
        """Load the samples ``rows`` (indices into the full set) into the device buffers."""
        rows = rows.cpu()
        if len(rows) != len(self.labels):
            raise ValueError(f"shard of {len(rows)} samples, the buffers hold {len(self.labels)}")
        self.labels.copy_(self.host_labels[rows])
        if self.staging is None:
            torch.index_select(self.host_images, 0, rows, out=self.images)
            return
        done = [None, None]
        for index, start in enumerate(range(0, len(rows), self.chunk)):
            part = rows[start:start + self.chunk]
            slot = index % 2
            if done[slot] is not None:
                done[slot].synchronize()  # the copy out of this buffer two chunks ago has finished
            buffer = self.staging[slot][: len(part)]
            torch.index_select(self.host_images, 0, part, out=buffer)
            self.images[start:start + len(part)].copy_(buffer, non_blocking=True)
            done[slot] = torch.cuda.Event()
            done[slot].record()
        for event in done:
            if event is not None:
                event.synchronize()


class HostStaged(_Placement):
    """Images in host memory; each step's batch staged into a static device buffer first."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, device: torch.device, batch_size: int):
        self.device, self.batch_size = device, batch_size
        self.host_images, self.labels = images, labels.to(device)
        shape = (batch_size,) + tuple(images.shape[1:])
        on_cuda = device.type == "cuda"
        self.staging = [torch.empty(shape, dtype=images.dtype, pin_memory=on_cuda) for _ in range(2)]
        self.staging_done = [None, None]
        self.staged = torch.empty(shape, dtype=images.dtype, device=device)
        self.host_order = None

    def start_epoch(self, order: torch.Tensor) -> torch.Tensor:
        self.host_order = order.cpu()
        return order.to(self.device)

    def before_step(self, step: int) -> None:
        """Gather step ``step``'s batch on the host and start its copy to the device buffer."""
        slot = step % 2
        if self.staging_done[slot] is not None:
            self.staging_done[slot].synchronize()  # the copy from this buffer two steps ago is done
        rows = self.host_order[step * self.batch_size:(step + 1) * self.batch_size]
        torch.index_select(self.host_images, 0, rows, out=self.staging[slot])
        self.staged.copy_(self.staging[slot], non_blocking=True)
        event = torch.cuda.Event() if self.device.type == "cuda" else None
        if event is not None:
            event.record()
        self.staging_done[slot] = event

    def batch_images(self, indices: torch.Tensor) -> torch.Tensor:
        return self.staged
