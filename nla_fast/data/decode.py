"""Parallel image decoding into preallocated uint8 arrays, a chunk at a time.

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
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as err:
        # DecompressionBombError: more pixels than Pillow's safety limit (a crafted or broken file)
        raise CorruptImageError(f"cannot decode image {path}: {err}") from err


class ImageFiles:
    """Image files (optionally face boxes to crop) decoded to one ``size`` = (H, W): the image
    source a cache is built from (:mod:`nla_fast.data.cache`).

    ``fill(lo, hi, out)`` decodes rows ``lo..hi`` into ``out`` on ``workers`` threads, so a
    build holds only the chunk it is writing, whatever the number of files. Images of
    another size are resized (bilinear, Pillow's antialiased filter); :meth:`note` counts them.
    """

    ROWS_PER_TASK = 16  # images per thread-pool task: small enough to balance, large enough to amortise

    def __init__(self, paths: Sequence, size: tuple[int, int], boxes: Optional[Sequence] = None,
                 workers: Optional[int] = None, desc: str = ""):
        self.paths, self.boxes, self.desc = list(paths), boxes, desc
        self.shape = (int(size[0]), int(size[1]))
        self.workers = workers or default_workers()
        self.resized = np.zeros(len(self.paths), bool)

    @property
    def count(self) -> int:
        return len(self.paths)

    def decode(self, i: int, out: np.ndarray) -> None:
        """Image ``i`` into ``out`` (H x W x 3 uint8)."""
        from PIL import Image

        h, w = self.shape
        im = open_rgb(Path(self.paths[i]), None if self.boxes is None else self.boxes[i])
        if (im.height, im.width) != (h, w):
            im = im.resize((w, h), Image.BILINEAR)
            self.resized[i] = True
        out[...] = np.asarray(im)

    def fill(self, lo: int, hi: int, out: np.ndarray) -> None:
        """Rows ``lo..hi`` into ``out[:hi - lo]``; an undecodable file raises an error naming it."""
        def work(a: int, b: int) -> None:
            for i in range(a, b):
                self.decode(i, out[i - lo])

        if self.workers <= 1 or hi - lo <= self.ROWS_PER_TASK:
            work(lo, hi)
            return
        pool = ThreadPoolExecutor(self.workers)
        try:
            step = self.ROWS_PER_TASK
            futures = [pool.submit(work, a, min(hi, a + step)) for a in range(lo, hi, step)]
            for future in futures:
                future.result()  # re-raises a worker's exception (it names the file)
        finally:
            pool.shutdown(wait=True, cancel_futures=True)  # on an error, stop at once

    def note(self) -> Optional[str]:
        """How many images were resized to the cache size (None when none was, or when every
        image is a face box cropped out of a larger photo and so resized by design)."""
        count = int(self.resized.sum())
        if not count or self.boxes is not None:
            return None
        h, w = self.shape
        return f"{self.desc}: {count} of {self.count} images were not {h}x{w} and were resized to it"


class ArrayImages:
    """Images already in memory (an ``N x h x w x 3`` uint8 array or tensor) as an image source,
    resized to ``size`` = (H, W) the way :class:`ImageFiles` resizes (None: as they are)."""

    def __init__(self, array, size: Optional[tuple[int, int]] = None, desc: str = ""):
        self.array = array.numpy() if hasattr(array, "numpy") else np.asarray(array)
        self.shape = tuple(self.array.shape[1:3]) if size is None else (int(size[0]), int(size[1]))
        self.desc = desc

    @property
    def count(self) -> int:
        return int(self.array.shape[0])

    def fill(self, lo: int, hi: int, out: np.ndarray) -> None:
        if tuple(self.array.shape[1:3]) == self.shape:
            out[...] = self.array[lo:hi]
            return
        from PIL import Image

        h, w = self.shape
        for i in range(lo, hi):
            out[i - lo] = np.asarray(Image.fromarray(self.array[i]).resize((w, h), Image.BILINEAR))

    def note(self) -> Optional[str]:
        return None


def square(size) -> tuple[int, int]:
    """``(H, W)`` from an int (a square) or a pair."""
    return (int(size), int(size)) if isinstance(size, (int, np.integer)) else (int(size[0]), int(size[1]))


def decode_images(
    paths: Sequence[Path],
    boxes: Optional[Sequence] = None,
    size: Optional[tuple[int, int]] = None,
    workers: Optional[int] = None,
    desc: str = "",
    verbose: bool = True,
) -> np.ndarray:
    """Decode ``paths`` (optionally cropping ``boxes`` = (x, y, w, h)) into one in-memory
    ``N x H x W x 3`` uint8 array.

    ``size`` = (H, W) resizes every image (bilinear, Pillow's antialiased filter); without it
    the first image's size is used. The dataset loaders never rely on that: they give the
    size and stream into their cache (:class:`ImageFiles`).
    """
    n = len(paths)
    if size is None:
        if n == 0:
            return np.zeros((0, 1, 1, 3), np.uint8)
        first = open_rgb(Path(paths[0]), None if boxes is None else boxes[0])
        size = (first.height, first.width)
    files = ImageFiles(paths, size, boxes, workers, desc)
    out = np.empty((n, *files.shape, 3), np.uint8)
    files.fill(0, n, out)
    if verbose and boxes is None and files.note():
        print(f"[nla_fast.data] {files.note()}", file=sys.stderr)
    return out
