"""Decode-once uint8 cache, built as a stream and read back as a memory map.

Each loader describes its split: the images as a source that decodes any range of rows
(:class:`nla_fast.data.decode.ImageFiles`, or an in-memory array) and small entries
(labels, votes, names). A build decodes about ``CHUNK_BYTES`` of images at a time and
writes each chunk to the cache file while the next one decodes, so it holds two chunks
in memory whatever the number of images (AffectNet at 224 px: a 42.7 GB file, about 0.2 GB
of memory). The file is written under a temporary name in the cache folder, checksummed
as it is written, flushed and renamed (atomic on POSIX): an interrupted build never leaves
a file a later run would read. A folder that cannot take the file (full or read-only disk,
any write error) costs the cache, not the run: the split is decoded into memory, with one
line saying so. Training reads the finished file: ``images`` is mapped from it (nothing is
read until used), the other entries are read into memory.

The file name carries a key hashed from the dataset, the split, the options that change
the decoded pixels (the cache size among them), the *contents* of the label files
(SHA-256) and the size and modification time of every image file: any change of an input
gives a new key, hence a rebuild. Label rules, noise and imbalance protocols are applied
after loading and are not part of the file.

Layout (format 2)::

    MAGIC (8 bytes), zero padding up to DATA_OFFSET
    the entries' bytes, ``images`` first, each starting on a 64-byte boundary
    a JSON header: each array's dtype, shape and offset, the other entries, the key, the checksum
    the header's length (8 bytes, little-endian), END_MAGIC (8 bytes)

Checksum: the CRC-32 of every ``BLOCK_BYTES`` block of the data region, folded with the
header's description into one SHA-256, checked whenever a file is opened (threads reading
blocks at memory speed: ~0.3 s per GB on 2 cores), so a file damaged in place (same size,
same name) is rebuilt instead of training on wrong pixels. Under torchrun the first rank
of each machine checks it and the others trust that check (:func:`trust`).
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import sys
import threading
import time
import weakref
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Iterable, Optional

import numpy as np
import torch

from .. import atomic

CACHE_FORMAT = 2  # bump when the file layout or a decoder changes
SUFFIX = ".cache"
MAGIC = b"NLAFC\x002\n"
END_MAGIC = b"NLAFCEND"
DATA_OFFSET = 4096  # page-aligned start of the images, so they map without a copy
ALIGN = 64
BLOCK_BYTES = 16 << 20  # bytes per CRC-32; part of the checksum's definition
CHECKSUM_NAME = "crc32-16MiB-blocks+sha256"
CHUNK_BYTES = 64 << 20  # decoded images held per chunk during a build (two chunks at a time)
CHECK_THREADS = 8  # at most this many blocks (16 MiB each) are read at once when checking
SAY_CHECKS_OVER_S = 1.0  # a check that takes longer is reported (large sets: where the start-up time goes)


class CacheFileError(ValueError):
    """A cache file that cannot be used (damaged, truncated, another format): it is rebuilt."""


class CacheWriteError(Exception):
    """The cache file could not be written (full or read-only disk, ...): the run goes on without it."""


class _SourceFailed(Exception):
    """Carries an error of the image source (``__cause__``) out of the writer unchanged."""


def cache_dir(override=None) -> Path:
    if override is not None:
        return Path(override).expanduser()
    env = os.environ.get("NLA_FAST_CACHE")
    return Path(env).expanduser() if env else Path("~/.cache/nla_fast").expanduser()


def file_digest(path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's contents."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while True:
            block = f.read(chunk)
            if not block:
                break
            h.update(block)
    return h.hexdigest()


def stat_digest(paths: Iterable) -> str:
    """Hash of (path, size, mtime_ns) of many files: detects replaced images cheaply."""
    h = hashlib.sha256()
    for p in paths:
        try:
            st = os.stat(p)
            h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
        except OSError:
            h.update(f"{p}\0missing\n".encode())
    return h.hexdigest()


def make_key(parts: dict) -> str:
    blob = json.dumps({"format": CACHE_FORMAT, **parts}, sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:24]


def cache_path(dataset: str, split: str, key: str, directory=None) -> Path:
    return cache_dir(directory) / f"{dataset}-{split}-{key}{SUFFIX}"


# ----------------------------------------------------------------------------------------------
# Image sources
# ----------------------------------------------------------------------------------------------
def _is_image_source(value) -> bool:
    return hasattr(value, "fill") and hasattr(value, "count") and hasattr(value, "shape")


def _as_source(value):
    from .decode import ArrayImages

    return value if _is_image_source(value) else ArrayImages(value)


def in_memory(source) -> np.ndarray:
    """All of ``source``'s images in one in-memory array (a split built without a cache)."""
    source = _as_source(source)
    out = np.empty((source.count, *source.shape, 3), np.uint8)
    source.fill(0, source.count, out)
    return out


# ----------------------------------------------------------------------------------------------
# Checksum
# ----------------------------------------------------------------------------------------------
class BlockCRC:
    """CRC-32 of each ``BLOCK_BYTES`` block of a byte stream fed in pieces of any size."""

    def __init__(self):
        self.crcs: list[int] = []
        self.crc, self.filled = 0, 0

    def update(self, data) -> None:
        data = memoryview(data).cast("B")
        while len(data):
            part = data[:BLOCK_BYTES - self.filled]
            self.crc = zlib.crc32(part, self.crc)
            self.filled += len(part)
            data = data[len(part):]
            if self.filled == BLOCK_BYTES:
                self.crcs.append(self.crc)
                self.crc, self.filled = 0, 0

    def finish(self) -> list[int]:
        if self.filled:
            self.crcs.append(self.crc)
            self.crc, self.filled = 0, 0
        return self.crcs


def _digest(header: dict, crcs: list[int]) -> str:
    described = {k: header[k] for k in ("key", "arrays", "values", "data_end")}
    blob = json.dumps([CHECKSUM_NAME, described, crcs], sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def file_crcs(fd: int, start: int, end: int) -> list[int]:
    """CRC-32 of each block of bytes ``start..end`` of an open file, on threads (``os.pread``
    and ``zlib.crc32`` release the GIL); at most ``CHECK_THREADS`` blocks are in memory."""
    from .decode import default_workers

    starts = range(start, end, BLOCK_BYTES)

    def crc(at: int) -> int:
        data = os.pread(fd, min(BLOCK_BYTES, end - at), at)
        if len(data) != min(BLOCK_BYTES, end - at):
            raise CacheFileError(f"the file ends inside its data (at byte {at + len(data)})")
        return zlib.crc32(data)

    threads = min(CHECK_THREADS, default_workers(), max(1, len(starts)))
    if threads <= 1:
        return [crc(at) for at in starts]
    with ThreadPoolExecutor(threads) as pool:
        return list(pool.map(crc, starts))


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------
def _array(value) -> np.ndarray:
    if isinstance(value, torch.Tensor):
        return value.detach().cpu().contiguous().numpy()
    return np.ascontiguousarray(value)


def _aligned(offset: int) -> int:
    return -(-offset // ALIGN) * ALIGN


class _Writer:
    """Sequential writes to the cache file with the data region's block CRCs."""

    def __init__(self, handle):
        self.handle, self.position, self.crc = handle, 0, BlockCRC()

    def write(self, data) -> None:
        data = memoryview(data).cast("B")
        if self.position >= DATA_OFFSET:
            self.crc.update(data)
        while len(data):  # a raw file may write less than asked
            done = self.handle.write(data)
            data = data[done:]
            self.position += done

    def pad_to(self, offset: int) -> None:
        if offset > self.position:
            self.write(bytes(offset - self.position))


class BuildProgress:
    """A line on stderr every ``every`` seconds of a long build: images done, rate, time left."""

    def __init__(self, what: str, count: int, every: float = 30.0):
        self.what, self.count, self.every = what, count, every
        self.started = self.last = time.perf_counter()

    def __call__(self, done: int) -> None:
        now = time.perf_counter()
        if now - self.last < self.every or done >= self.count:
            return
        self.last = now
        per_image = (now - self.started) / done
        print(f"[nla_fast.data] {self.what}: {done} of {self.count} images ({100 * done / self.count:.0f}%), "
              f"{1e3 * per_image:.2f} ms per image, about {per_image * (self.count - done) / 60:.0f} min left",
              file=sys.stderr, flush=True)


def _stream_images(writer: _Writer, source, progress: Optional[Callable[[int], None]]) -> None:
    """Decode ``source`` a chunk at a time; each chunk is written (on a thread) while the next decodes."""
    count, (h, w) = source.count, source.shape
    rows = max(1, min(count, CHUNK_BYTES // max(1, h * w * 3)))
    buffers = [np.empty((rows, h, w, 3), np.uint8) for _ in range(2 if count > rows else 1)]
    with ThreadPoolExecutor(1) as write_thread:
        pending = None
        for index, lo in enumerate(range(0, count, rows)):
            hi = min(count, lo + rows)
            chunk = buffers[index % len(buffers)][:hi - lo]
            try:
                source.fill(lo, hi, chunk)  # the previous chunk is being written meanwhile
            except Exception as err:  # a missing or corrupt image: not a write error
                raise _SourceFailed() from err
            if pending is not None:
                pending.result()
            pending = write_thread.submit(writer.write, chunk)
            if progress is not None:
                progress(hi)
        if pending is not None:
            pending.result()


def write_cache(path: Path, key: str, payload: dict, progress: Optional[Callable[[int], None]] = None) -> None:
    """Write ``payload`` (``images``: an image source or array; other arrays; JSON values) to
    ``path``: temporary name, checksum computed as the bytes go out, flushed, renamed.

    Raises :class:`CacheWriteError` for any failure to write (the temporary file is gone);
    the image source's own errors (a corrupt image) pass unchanged. Ctrl-C passes too."""
    try:
        _write_cache(path, key, payload, progress)
    except _SourceFailed as failed:
        raise failed.__cause__ from None
    except Exception as err:
        raise CacheWriteError(f"{type(err).__name__}: {err}") from err


def _write_cache(path: Path, key: str, payload: dict, progress) -> None:
    images = payload.get("images")
    arrays = {name: _array(v) for name, v in payload.items()
              if name != "images" and isinstance(v, (torch.Tensor, np.ndarray))}
    values = {name: v for name, v in payload.items() if name != "images" and name not in arrays}
    header = {"format": CACHE_FORMAT, "key": key, "arrays": {}, "values": values}
    with atomic.target(path) as tmp:
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb", buffering=0) as handle:
            writer = _Writer(handle)
            writer.write(MAGIC)
            writer.pad_to(DATA_OFFSET)
            if images is not None:
                source = _as_source(images)
                header["arrays"]["images"] = {"dtype": "uint8", "shape": [source.count, *source.shape, 3],
                                              "offset": DATA_OFFSET}
                _stream_images(writer, source, progress)
            for name, array in arrays.items():
                writer.pad_to(_aligned(writer.position))
                header["arrays"][name] = {"dtype": array.dtype.str, "shape": list(array.shape),
                                          "offset": writer.position}
                writer.write(array.reshape(-1).view(np.uint8))
            header["data_end"] = writer.position
            crcs = writer.crc.finish()
            header["checksum"] = {"name": CHECKSUM_NAME, "block": BLOCK_BYTES, "crcs": crcs,
                                  "digest": _digest(header, crcs)}
            text = json.dumps(header).encode()
            writer.write(text)
            writer.write(len(text).to_bytes(8, "little") + END_MAGIC)


def expected_bytes(payload: dict) -> int:
    """About how many bytes ``payload``'s cache file takes (to check the free space first)."""
    total = DATA_OFFSET + (1 << 20)
    for name, value in payload.items():
        if name == "images" and value is not None:
            source = _as_source(value)
            total += source.count * source.shape[0] * source.shape[1] * 3
        elif isinstance(value, (torch.Tensor, np.ndarray)):
            total += _array(value).nbytes + ALIGN
    return total


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------
# Tensors mapped from cache files: storage address -> file, so that ``mapped_file`` can tell
# a placement that a tensor still reads a file (entries leave with their map).
_MAPPED: dict[int, str] = {}
# Files checked by another process of this machine (``trust``): path -> identity
_TRUSTED: dict[str, tuple] = {}
# Files this process checked or wrote: path -> identity (``checked_files``)
_CHECKED: dict[str, tuple] = {}
_LOCK = threading.Lock()


def _identity(stat: os.stat_result) -> tuple:
    return (stat.st_dev, stat.st_ino, stat.st_size, stat.st_mtime_ns)


def checked_files() -> list:
    """``[(path, identity)]`` of the cache files this process has checked or written."""
    with _LOCK:
        return sorted(_CHECKED.items())


def trust(records: Iterable) -> None:
    """Skip the checksum of these files (``checked_files()`` of another process of this
    machine, which has just checked them) while their identity (device, inode, size,
    modification time) stays the same."""
    with _LOCK:
        _TRUSTED.update((str(path), tuple(identity)) for path, identity in records)


def mapped_file(tensor: torch.Tensor) -> Optional[str]:
    """The cache file ``tensor``'s memory is mapped from (a view of it too), or None."""
    try:
        address = tensor.untyped_storage().data_ptr()
    except (AttributeError, RuntimeError):
        return None
    return _MAPPED.get(address)


def _read_header(handle, size: int) -> dict:
    if size < DATA_OFFSET + 16:
        raise CacheFileError(f"{size} bytes: too short to be a cache file")
    handle.seek(0)
    if handle.read(len(MAGIC)) != MAGIC:
        raise CacheFileError("not an nla_fast cache file of this format")
    handle.seek(size - 16)
    tail = handle.read(16)
    length = int.from_bytes(tail[:8], "little")
    if tail[8:] != END_MAGIC or not 0 < length <= size - DATA_OFFSET - 16:
        raise CacheFileError("its end is missing: the file was truncated or is still being written")
    handle.seek(size - 16 - length)
    try:
        header = json.loads(handle.read(length))
    except ValueError as err:
        raise CacheFileError(f"its header is not readable ({err})") from None
    if header.get("format") != CACHE_FORMAT or header.get("data_end") != size - 16 - length:
        raise CacheFileError("its header does not describe this file")
    return header


def _check(handle, header: dict) -> None:
    check = header["checksum"]
    if check.get("name") != CHECKSUM_NAME or check.get("block") != BLOCK_BYTES:
        raise CacheFileError(f"checksum {check.get('name')!r} is not {CHECKSUM_NAME!r}")
    crcs = file_crcs(handle.fileno(), DATA_OFFSET, header["data_end"])
    if crcs != check["crcs"]:
        differ = [i for i, (got, stored) in enumerate(zip(crcs, check["crcs"])) if got != stored]
        bad = differ[0] if differ and len(crcs) == len(check["crcs"]) else 0
        start = DATA_OFFSET + bad * BLOCK_BYTES
        end = min(start + BLOCK_BYTES, header["data_end"])
        raise CacheFileError(f"payload checksum mismatch in bytes {start}..{end}: the file was damaged on disk")
    if _digest(header, crcs) != check["digest"]:
        raise CacheFileError("payload checksum mismatch in its header: the file was damaged on disk")


def verify_file(path) -> float:
    """Read ``path`` back and check it against its checksum (raises :class:`CacheFileError`);
    the seconds it took."""
    started = time.perf_counter()
    try:
        with open(path, "rb") as handle:
            _check(handle, _read_header(handle, os.fstat(handle.fileno()).st_size))
    except CacheFileError as err:
        raise CacheFileError(f"cache file {path}: {err}") from None
    return time.perf_counter() - started


def _map_images(handle, spec: dict, path: Path) -> torch.Tensor:
    shape = tuple(spec["shape"])
    if shape[0] == 0:
        return torch.empty(shape, dtype=torch.uint8)
    # copy-on-write map: an in-place edit of the tensor stays in this process and never reaches the file
    array = np.memmap(handle, dtype=np.uint8, mode="c", offset=spec["offset"], shape=shape)
    tensor = torch.from_numpy(array)
    address = tensor.untyped_storage().data_ptr()
    _MAPPED[address] = str(path)
    weakref.finalize(array, _MAPPED.pop, address, None)
    return tensor


def _read_array(handle, spec: dict) -> torch.Tensor:
    dtype = np.dtype(spec["dtype"])
    count = int(np.prod(spec["shape"], dtype=np.int64))
    data = os.pread(handle.fileno(), count * dtype.itemsize, spec["offset"])
    if len(data) != count * dtype.itemsize:
        raise CacheFileError("the file ends inside its data")
    return torch.from_numpy(np.frombuffer(bytearray(data), dtype=dtype).reshape(spec["shape"]))


def open_cache(path: Path, key: str, check: bool = True, verbose: bool = False) -> dict:
    """The payload stored in ``path`` (raises :class:`CacheFileError` when it cannot be used).
    ``check``: verify the checksum unless another process of this machine just did (``trust``)."""
    with open(path, "rb") as handle:
        stat = os.fstat(handle.fileno())
        header = _read_header(handle, stat.st_size)
        if header.get("key") != key:
            raise CacheFileError("key mismatch")
        identity = _identity(stat)
        if check and _TRUSTED.get(str(path)) != identity:
            started = time.perf_counter()
            _check(handle, header)
            seconds = time.perf_counter() - started
            if verbose and seconds >= SAY_CHECKS_OVER_S:
                _say(True, f"checked {path} ({stat.st_size / 1e9:.2f} GB in {seconds:.1f} s)")
        with _LOCK:
            _CHECKED[str(path)] = identity
        payload = dict(header["values"])
        for name, spec in header["arrays"].items():
            payload[name] = _map_images(handle, spec, path) if name == "images" else _read_array(handle, spec)
    return payload


# ----------------------------------------------------------------------------------------------
# The loaders' entry point
# ----------------------------------------------------------------------------------------------
def _say(verbose: bool, text: str) -> None:
    if verbose:
        print(f"[nla_fast.data] {text}", file=sys.stderr)


def _materialise(payload: dict) -> dict:
    out = dict(payload)
    if out.get("images") is not None:
        out["images"] = torch.from_numpy(in_memory(out["images"]))
    return out


def _room_for(path: Path, payload: dict) -> Optional[str]:
    """Why ``path``'s folder cannot take the file (None when it can, as far as can be told)."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        free = shutil.disk_usage(path.parent).free
    except OSError as err:
        return f"{type(err).__name__}: {err}"
    need = expected_bytes(payload)
    if need > free:
        return f"it needs {need / 1e9:.2f} GB, {free / 1e9:.2f} GB are free in {path.parent}"
    return None


def load_or_build(
    dataset: str,
    split: str,
    key_parts: dict,
    build: Callable[[], dict],
    use_cache: bool = True,
    directory=None,
    verbose: bool = True,
) -> tuple[dict, Optional[Path], bool]:
    """``(payload, cache_file or None, was_built)``: the cached payload for ``key_parts`` or a fresh build.

    ``build()`` returns a dict: ``images`` (an image source such as
    :class:`nla_fast.data.decode.ImageFiles`, or an array), other arrays or tensors, and
    JSON values (lists of names, numbers). The returned payload holds tensors: ``images``
    mapped from the finished file (or in memory without a cache), the rest in memory.
    An existing file's checksum is verified (unless :func:`trust` says it just was).
    """
    if not use_cache:
        return _materialise(build()), None, True
    key = make_key({"dataset": dataset, "split": split, **key_parts})
    path = cache_path(dataset, split, key, directory)
    atomic.remove_stale_temps(path.parent)  # left by a build that was killed outright
    if path.exists():
        try:
            return open_cache(path, key, True, verbose), path, False
        except Exception as err:  # damaged, truncated, another format: rebuilt below
            _say(verbose, f"cache file {path} not used ({err}); rebuilding")
    payload = build()
    problem = _room_for(path, payload)
    if problem is None:
        started = time.perf_counter()
        progress = BuildProgress(f"caching {dataset}/{split}", _images_in(payload)) if verbose else None
        built, problem = _write_and_open(path, key, payload, progress)
        if built is not None:
            _say(verbose, f"cached {dataset}/{split} -> {path} ({_built_note(built, time.perf_counter() - started)})")
            _say_note(verbose, payload)
            return built, path, True
    _say(verbose, f"could not write cache {path} ({problem}); going on without a cache (decoding into memory)")
    built = _materialise(payload)
    _say_note(verbose, payload)
    return built, None, True


def _images_in(payload: dict) -> int:
    return _as_source(payload["images"]).count if payload.get("images") is not None else 0


def _write_and_open(path: Path, key: str, payload: dict, progress=None) -> tuple[Optional[dict], Optional[str]]:
    """``(the written file's payload, None)``, or ``(None, why not)`` when it could not be
    written (any write error: OSError, RuntimeError, ...) or read back. A corrupt image raises."""
    try:
        write_cache(path, key, payload, progress)
    except CacheWriteError as err:
        return None, str(err)
    try:
        return open_cache(path, key, check=False), None  # checksummed as it was written
    except (CacheFileError, OSError) as err:  # replaced or removed at once by another process
        return None, f"it could not be read back: {err}"


def _built_note(payload: dict, seconds: float) -> str:
    count = len(payload["images"]) if "images" in payload else 0
    per_image = f", {1e3 * seconds / count:.2f} ms per image" if count else ""
    return f"{count} images in {seconds:.1f} s{per_image}"


def _say_note(verbose: bool, payload: dict) -> None:
    note = getattr(payload.get("images"), "note", lambda: None)()
    if note:
        _say(verbose, note)
