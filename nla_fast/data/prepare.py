"""Build and check a dataset's caches once, before training: ``python -m nla_fast.data.prepare``.

::

    python -m nla_fast.data.prepare --dataset affectnet --data-root DATA/AffectNet
    python -m nla_fast.data.prepare --dataset affectnet --data-root DATA/AffectNet --image-size 112

Each split is decoded on every core, a chunk at a time, into its cache file
(:mod:`nla_fast.data.cache`; memory stays bounded whatever the number of images), then read
back and checked against the checksum written with it; a split whose file exists is
checked. One line per split gives the file, the cache size and the time per image. The
cache size is the trainer's default for the same ``--image-size`` (AffectNet: the size the
run trains at; RAF-DB, FERPlus: their source size), so the trainer finds these files.

The trainer does the same when it starts. Under torchrun the first process of each
machine does it while the others wait in a process group whose timeout covers the build
(:func:`first_on_each_machine`); they then trust its check instead of repeating it.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import timedelta
from typing import Callable, TypeVar

from . import DATASETS, SOURCE_SIZES, SPLITS, canonical_name, default_cache_size, load_dataset
from . import cache as _cache
from .errors import DatasetError

T = TypeVar("T")
# How long the other processes of a torchrun job wait for the first process of their machine
# to build the caches (AffectNet's 283,901 images at 224 px: minutes on 16 cores; ~20 min on 2).
PREPARE_TIMEOUT = timedelta(hours=3)


# ----------------------------------------------------------------------------------------------
# Under torchrun
# ----------------------------------------------------------------------------------------------
def machine_of(ctx) -> int:
    """The index of this process's machine (torchrun's GROUP_RANK; else the first rank on it)."""
    group_rank = os.environ.get("GROUP_RANK")
    return int(group_rank) if group_rank is not None else ctx.rank - ctx.local_rank


def first_on_each_machine(ctx, load: Callable[[], T], timeout: timedelta = PREPARE_TIMEOUT) -> T:
    """``load()`` on every process, the first process of each machine (local rank 0) first.

    It builds or checks the caches while the machine's other processes wait in a gloo
    group with ``timeout`` (the run's own process group keeps its timeout: no collective of
    it is pending meanwhile); they then trust its checks (:func:`nla_fast.data.cache.trust`)
    and load from the finished files without checking them again. When a first process
    fails, every process stops: that one with its own error, the first processes of the
    other machines with one line naming it, the rest quietly. One process: just ``load()``.
    """
    if not ctx.distributed:
        return load()
    import torch.distributed as dist

    result, failure = None, None
    group = dist.new_group(backend="gloo", timeout=timeout)
    try:
        if ctx.local_rank == 0:
            try:
                result = load()
            except Exception as err:  # every process must learn of it, not wait for the timeout
                failure = err
        mine = (machine_of(ctx), ctx.local_rank == 0, _cache.checked_files() if ctx.local_rank == 0 else [],
                None if failure is None else str(failure))
        everyone = [None] * ctx.world_size
        dist.all_gather_object(everyone, mine, group=group)
    finally:
        dist.destroy_process_group(group)
    if failure is not None:
        raise failure
    failed = [(machine, message) for machine, first, _, message in everyone if first and message is not None]
    if failed:
        if ctx.local_rank == 0:
            raise DatasetError(f"the first process of machine {failed[0][0]} could not load the data: {failed[0][1]}")
        raise SystemExit(2)  # the first process of this machine says why
    _cache.trust(record for machine, first, records, _ in everyone if first and machine == machine_of(ctx)
                 for record in records)
    return result if ctx.local_rank == 0 else load()


# ----------------------------------------------------------------------------------------------
# What a run says about its data
# ----------------------------------------------------------------------------------------------
def cache_note(dataset, image_size: int) -> str:
    """One line: where and at what size ``dataset``'s images are cached, and at what size the run trains."""
    h, w = dataset.image_size
    file = dataset.info.get("cache_file")
    where = f"cached in {file}" if file else "not cached (decoded into memory)"
    if SOURCE_SIZES.get(dataset.name) == h == w:
        where += " (the source size)"
    trained = f"trained at {image_size} px" + (" (resized on the device)" if (h, w) != (image_size, image_size) else "")
    return f"nla_fast: {dataset.name}/{dataset.split} images at {h}x{w} px, {where}; {trained}"


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m nla_fast.data.prepare",
                                description="Build (or check) a dataset's uint8 caches once, before training.")
    p.add_argument("--dataset", required=True, choices=DATASETS)
    p.add_argument("--data-root", metavar="DIR", help="folder holding the dataset in its original layout")
    p.add_argument("--split", dest="splits", action="append", metavar="SPLIT",
                   help="a split to prepare (repeatable; default: all of the dataset's)")
    p.add_argument("--image-size", type=int, default=224, metavar="PX",
                   help="the size the run will train at (default 224, the trainer's on a GPU): AffectNet is cached at "
                   "it unless --cache-size is given")
    p.add_argument("--cache-size", type=int, metavar="PX",
                   help="side of the cached images (default: the trainer's default for --image-size)")
    p.add_argument("--num-classes", type=int, choices=(7, 8),
                   help="AffectNet: 7 or 8 classes (the trainer's default: 7)")
    p.add_argument("--workers", type=int, metavar="N", help="decoding threads (default: every core)")
    p.add_argument("--cache-dir", metavar="DIR",
                   help="where the caches go (default: $NLA_FAST_CACHE or ~/.cache/nla_fast)")
    return p


def prepare_split(args, name: str, split: str) -> str:
    """Build or check one split's cache; the line that reports it."""
    options = {"cache_dir": args.cache_dir, "workers": args.workers}
    cache_size = args.cache_size or default_cache_size(name, args.image_size)
    if cache_size is not None:
        options["cache_size"] = cache_size
    if args.num_classes is not None:
        options["num_classes"] = args.num_classes
    started = time.perf_counter()
    data = load_dataset(name, args.data_root, split, **options)
    path = data.info.get("cache_file")
    if path is None:
        return f"{name}/{split}: {len(data)} images; no cache could be written (see above)"
    check_s = _cache.verify_file(path) if data.info.get("cache_built") else 0.0  # an existing file was checked on load
    seconds = time.perf_counter() - started
    h, w = data.image_size
    what = "built and checked" if data.info.get("cache_built") else "checked"
    count = data.info.get("rows_total", len(data))  # FERPlus caches every row, its label rule drops some after
    return (f"{name}/{split}: {count} images at {h}x{w} px, {what} in {seconds:.1f} s "
            f"({1e3 * seconds / max(1, count):.2f} ms per image; the check {check_s:.1f} s): "
            f"{path} ({os.path.getsize(path) / 1e9:.2f} GB)")


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    name = canonical_name(args.dataset)
    splits = args.splits or list(SPLITS[name])
    unknown = [split for split in splits if split not in SPLITS[name]]
    if unknown:
        print(f"nla_fast.data.prepare: error: {name} has splits {SPLITS[name]}, not {unknown[0]!r}", file=sys.stderr)
        return 2
    try:
        for split in splits:
            print(prepare_split(args, name, split), flush=True)
    except (DatasetError, FileNotFoundError, ValueError, _cache.CacheFileError) as err:
        print(f"nla_fast.data.prepare: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("nla_fast.data.prepare: interrupted (no partial cache file is left)", file=sys.stderr)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
