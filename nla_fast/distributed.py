"""Multi-process training under ``torchrun``: PyTorch's own distributed stack, nothing home-made.

``torchrun`` (``python -m torch.distributed.run``) starts one process per GPU (or several CPU
processes) and gives each ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK`` and the rendezvous
address in its environment. :func:`setup` reads them, picks the device (``cuda:LOCAL_RANK``,
never a hard-coded id) and joins the process group: NCCL on CUDA, gloo on the CPU. Without
those variables the run is a single process and nothing here touches ``torch.distributed``.

The trainer's division of work (see ``nla_fast.train``):

* every rank draws the same seeded global permutation each epoch and takes a disjoint shard
  (``engine.shard``), held on its device (``placement.EpochShard``); ``--batch-size`` is per
  process, the global batch is it × world size;
* gradients are averaged by ``DistributedDataParallel``;
* evaluation is sharded in contiguous slices; confusion-matrix counts are summed with
  ``all_reduce``, so the accuracies are exact;
* rank 0 alone writes ``metrics.jsonl``, plots and checkpoints (gathering the other ranks'
  random states, so a resume with the same world size is exact).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# torchrun sets all of these; RANK and WORLD_SIZE alone decide that the run is distributed.
ENV_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
# Eager DDP steps before the CUDA-graph capture: PyTorch's CUDA-graph notes ask for 11 so that
# DDP has finished its first-iteration bookkeeping (static graph, bucket rebuild) first.
DDP_WARMUP_STEPS = 11


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


def processes_on_this_machine() -> int:
    """How many processes torchrun started on this machine (1 outside torchrun)."""
    return max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))


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


def global_batch_loss(config, world_size: int) -> tuple:
    """``(config, scale)`` for each rank's step so that DDP's gradient is that of the global batch.

    DDP averages the ranks' gradients. The NAW term is a batch mean, so the average of the
    ranks' means is the global mean; a consistency term summed over the batch
    (``consistency_reduction="sum"``, the official variant) covers only the rank's own batch,
    and its averaged gradient is ``world_size`` times too small. Each rank therefore minimises
    ``scale * loss(config with lam / scale)`` = ``lam * naw + world_size * (1 - lam) * consistency``
    with ``scale = lam + (1 - lam) * world_size``: averaged over the ranks, exactly the loss of
    one process on the global batch (the kernels are unchanged). One process, or a mean
    reduction: the config as it is and scale 1."""
    import dataclasses

    if world_size <= 1 or config.consistency_reduction != "sum":
        return config, 1.0
    scale = config.lam + (1.0 - config.lam) * world_size
    return dataclasses.replace(config, lam=config.lam / scale), scale


def barrier(ctx: Context) -> None:
    if ctx.distributed:
        dist.barrier()


def all_reduce_(tensor: torch.Tensor, op: str = "sum") -> torch.Tensor:
    """In-place sum (or max) over the ranks of the process group; nothing for one process."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
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


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model``.

    static_graph: the step's graph is the same every iteration, which lets DDP skip its
    per-iteration graph analysis and is what CUDA-graph capture of a DDP step requires (with
    DDP built on a side stream and 11 eager warm-up iterations, PyTorch's CUDA-graph notes).
    gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy, less memory).
    broadcast_buffers=False: no extra collective per forward; BatchNorm running statistics
    only matter for evaluation, before which rank 0's are broadcast (``broadcast_buffers``),
    so every rank evaluates, and rank 0 saves, the same model.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"broadcast_buffers": False, "gradient_as_bucket_view": True, "static_graph": True}
    with warnings.catch_warnings():
        # newer torch renames broadcast_buffers; the old name keeps exactly this meaning (torch 2.11 too)
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        if device.type != "cuda":
            return DDP(model, **kwargs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            wrapped = DDP(model, device_ids=[device.index], output_device=device.index, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        return wrapped
