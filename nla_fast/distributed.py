"""Multi-process training under ``torchrun``: PyTorch's own distributed stack, nothing home-made.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or several CPU
processes) and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in its environment. :func:`setup` reads them, picks the device (``cuda:LOCAL_RANK``,
never a hard-coded id) and joins the process group: NCCL on CUDA, gloo on the CPU. Without
those variables the run is a single process and nothing here touches ``torch.distributed``.

The trainer's division of work (see ``nla_fast.train``):

* every rank draws the same seeded global permutation each epoch and takes a disjoint shard
  (``engine.shard``); ``--batch-size`` is per process, the global batch is it × world size;
* gradients are averaged by ``DistributedDataParallel``;
* evaluation is sharded in contiguous slices; confusion-matrix counts are summed with
  ``all_reduce``, so the accuracies are exact;
* rank 0 alone writes ``metrics.jsonl``, plots and checkpoints (gathering the other ranks'
  random states, so a resume with the same world size is exact).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# torchrun sets all of these; RANK and WORLD_SIZE alone decide that the run is distributed.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")


@dataclass(frozen=True)
class Context:
    """Where this process stands: rank, world size, its device. ``world_size == 1`` and
    ``enabled == False`` for a plain single-process run."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    enabled: bool = False  # a process group was initialised (torchrun, even with one process)
    backend: str | None = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        """More than one process shares the work."""
        return self.enabled and self.world_size > 1


def launched_by_torchrun() -> bool:
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup(device_name: str) -> tuple[Context, torch.device | None]:
    """Join the process group when launched by torchrun; ``(Context(), None)`` otherwise.

    The device: ``cuda:LOCAL_RANK`` (made the current device) for ``--device cuda``/``auto``
    with CUDA present, with NCCL; the CPU with gloo otherwise.
    """
    if not launched_by_torchrun():
        return Context(), None
    rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local_rank = int(os.environ.get("LOCAL_RANK", rank))
    use_cuda = device_name == "cuda" or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise SystemExit("error: --device cuda but torch sees no CUDA device")
        if local_rank >= torch.cuda.device_count():
            raise SystemExit(f"error: LOCAL_RANK {local_rank} but this machine has {torch.cuda.device_count()} "
                             "CUDA device(s): use --nproc_per_node no larger than the GPU count")
        device = torch.device("cuda", local_rank)
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    if not dist.is_initialized():
        kwargs = {"device_id": device} if device.type == "cuda" else {}
        try:
            dist.init_process_group(backend=backend, **kwargs)
        except TypeError:  # a torch without device_id
            dist.init_process_group(backend=backend)
    return Context(rank, world_size, local_rank, True, backend), device


def cleanup(ctx: Context) -> None:
    """Leave the process group (called on success, errors and Ctrl-C alike)."""
    if ctx.enabled and dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def rank_seed(seed: int, rank: int) -> int:
    """The augmentation seed of ``rank``: the run's seed on rank 0 (a one-process run is
    unchanged), an independent stream derived from (seed, rank) on the others."""
    if rank == 0:
        return int(seed)
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(rank)]).generate_state(2, dtype=np.uint32)
    return int(state[0]) << 31 | int(state[1]) >> 1


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, ctx: Context, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over ranks; a no-op for one process."""
    if ctx.distributed:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM)
    return tensor


def all_agree(flag: bool, ctx: Context, device: torch.device) -> bool:
    """True when ``flag`` is True on every rank."""
    if not ctx.distributed:
        return flag
    value = torch.tensor([0 if flag else 1], dtype=torch.int64, device=device)
    dist.all_reduce(value, op=dist.ReduceOp.MAX)
    return int(value.item()) == 0


def any_rank(flag: bool, ctx: Context, device: torch.device) -> bool:
    """True when ``flag`` is True on at least one rank."""
    return not all_agree(not flag, ctx, device)


def gather_objects(obj, ctx: Context) -> list:
    """``[obj of rank 0, obj of rank 1, ...]`` on every rank (picklable objects)."""
    if not ctx.distributed:
        return [obj]
    objects = [None] * ctx.world_size
    dist.all_gather_object(objects, obj)
    return objects


def broadcast_buffers(module: torch.nn.Module, ctx: Context) -> None:
    """Rank 0's buffers (BatchNorm running statistics) on every rank."""
    if ctx.distributed:
        for buffer in module.buffers():
            dist.broadcast(buffer, src=0)


def contiguous_slice(length: int, rank: int, world_size: int) -> slice:
    """Rank ``rank``'s contiguous part of ``range(length)``; the parts tile it exactly
    (sizes differ by at most one; a part may be empty when length < world_size)."""
    base, extra = divmod(length, world_size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (1 if rank < extra else 0))


class EpochShard:
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
        row_bytes = max(1, images[0].numel() * images.element_size()) if len(images) else 1
        self.chunk = max(1, min(length, self.CHUNK_BYTES // row_bytes))
        self.staging = ([torch.empty((self.chunk,) + tuple(images.shape[1:]), dtype=images.dtype).pin_memory()
                         for _ in range(2)] if device.type == "cuda" else None)

    @staticmethod
    def nbytes(images: torch.Tensor, length: int) -> int:
        return length * (images[0].numel() * images.element_size() if len(images) else 0)

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
