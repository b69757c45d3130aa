"""Parallel image decoding into one preallocated uint8 array.

Pillow releases the GIL while it decodes and resamples, so a thread pool scales over
cores without pickling pixels between processes. Every failure names the file.
Every image becomes 8-bit RGB the same way (:func:`to_rgb8`), here and in
:mod:`nla_fast.inference`: 16-bit PNGs keep their high byte, as Pillow already does for
16-bit colour, so they give the same pixels as their 8-bit twin.
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


# Pillow modes holding 16-bit grey samples (a 16-bit grey PNG opens as I;16, or as I in old Pillow)
_GREY16_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def to_rgb8(im):
    """A Pillow image as 8-bit RGB (grey replicated, alpha dropped).

    ``convert("RGB")`` clips 16-bit grey at 255, so a 16-bit grey face would turn white:
    those samples are scaled down to their high byte first (v >> 8, exact for the 8-bit
    twin's v * 257), which is what Pillow itself does with 16-bit colour PNGs.
    """
    from PIL import Image

    if im.mode in _GREY16_MODES or (im.mode == "I" and im.format == "PNG"):
        grey = np.asarray(im).astype(np.int64).clip(0, 65535) >> 8
        im = Image.fromarray(grey.astype(np.uint8))  # mode L
    return im.convert("RGB")  # a copy even when already RGB: the caller may close the file


def open_rgb(path, box=None):
    """Decode one image file (optionally cropping ``box`` = (x, y, w, h)) to an 8-bit RGB Pillow image."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if not path.is_file():
        raise DatasetNotFoundError(f"image file missing: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            im = to_rgb8(im)  # before the crop: it needs the file's format to read mode I
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
            return im
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
        first = open_rgb(Path(paths[0]), None if boxes is None else boxes[0])
        size = (first.height, first.width)
    h, w = size
    out = np.empty((n, h, w, 3), np.uint8)
    resized = np.zeros(n, bool)

    def work(i: int) -> None:
        im = open_rgb(Path(paths[i]), None if boxes is None else boxes[i])
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
