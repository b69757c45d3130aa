"""Parallel image decoding into one preallocated uint8 array.

Pillow releases the GIL while it decodes and resamples, so a thread pool scales over
cores without pickling pixels between processes. Every failure names the file.
"""
from __future__ import annotations

import os
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from .errors import CorruptImageError, DatasetNotFoundError


def default_workers() -> int:
    try:
        n = len(os.sched_getaffinity(0))
    except AttributeError:
        n = os.cpu_count() or 1
    return max(1, min(32, n))


def _open_rgb(path: Path, box=None):
    from PIL import Image, UnidentifiedImageError

    if not path.is_file():
        raise DatasetNotFoundError(f"image file missing: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            if box is not None:
                x, y, w, h = box
                x0, y0 = max(0, int(x)), max(0, int(y))
                x1, y1 = min(im.width, int(x) + int(w)), min(im.height, int(y) + int(h))
                if x1 <= x0 or y1 <= y0:
                    raise CorruptImageError(
                        f"face box (x={x}, y={y}, w={w}, h={h}) lies outside image {path} "
                        f"({im.width}x{im.height})"
                    )
                im = im.crop((x0, y0, x1, y1))
            return im.convert("RGB")
    except CorruptImageError:
        raise
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as err:
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


def decode_images(
    paths: Sequence[Path],
    boxes: Optional[Sequence] = None,
    size: Optional[tuple[int, int]] = None,
    workers: Optional[int] = None,
    desc: str = "",
    verbose: bool = True,
) -> np.ndarray:
    """Decode ``paths`` (optionally cropping ``boxes`` = (x, y, w, h)) into ``N x H x W x 3`` uint8.

    ``size`` = (H, W) resizes every image (bilinear, Pillow's antialiased filter). Without
    it the first image's size is used and any image of another size is resized to it
    (the number is reported).
    """
    from PIL import Image

    n = len(paths)
    if size is None:
        if n == 0:
            return np.zeros((0, 1, 1, 3), np.uint8)
        first = _open_rgb(Path(paths[0]), None if boxes is None else boxes[0])
        size = (first.height, first.width)
    h, w = size
    out = np.empty((n, h, w, 3), np.uint8)
    resized = np.zeros(n, bool)

    def work(i: int) -> None:
        im = _open_rgb(Path(paths[i]), None if boxes is None else boxes[i])
        if (im.height, im.width) != (h, w):
            im = im.resize((w, h), Image.BILINEAR)
            resized[i] = True
        out[i] = np.asarray(im)

    def work_range(lo: int, hi: int) -> None:
        for i in range(lo, hi):
            work(i)

    workers = workers or default_workers()
    if workers <= 1 or n < 64:
        work_range(0, n)
    else:
        pool = ThreadPoolExecutor(workers)
        try:
            step = 256
            futures = [pool.submit(work_range, lo, min(n, lo + step)) for lo in range(0, n, step)]
            for fut in futures:
                fut.result()  # re-raises a worker's exception (it names the file)
        finally:
            # on an error, stop at once instead of decoding the rest
            pool.shutdown(wait=True, cancel_futures=True)
    if verbose and resized.any() and boxes is None:
        print(
            f"[nla_fast.data] {desc}: {int(resized.sum())} of {n} images were not {h}x{w} and were resized",
            file=sys.stderr,
        )
    return out
