"""What a failed write tells the user, in one line: which file or folder, why, and (disk
full) how much room is left. ``nla_fast.atomic`` raises :class:`WriteFailed` for every file
it cannot write; the programs print it and exit non-zero, the previous file untouched.
"""
from __future__ import annotations

import errno
import os
import shutil
from pathlib import Path

# errno values that mean "the bytes could not be stored here" (as opposed to a bug)
_NO_ROOM = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
_WRITE_ERRNOS = _NO_ROOM + (errno.EIO, errno.EROFS, errno.EACCES, errno.EPERM)


def _existing_ancestor(path: Path) -> Path:
    path = Path(os.path.abspath(path))
    while not path.exists() and path != path.parent:
        path = path.parent
    return path if path.is_dir() else path.parent


def free_space(path) -> str:
    """The free space of the file system holding ``path`` (or its nearest existing folder), in words."""
    try:
        free = shutil.disk_usage(_existing_ancestor(Path(path))).free
    except OSError:
        return "free space unknown"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if free < 1024 or unit == "TiB":
            return f"{free:.0f} {unit} free" if unit == "B" else f"{free:.1f} {unit} free"
        free /= 1024
    return f"{free} free"  # unreachable


def _reason(err: OSError) -> str:
    if err.errno == errno.ENAMETOOLONG:
        return "the name is too long for the file system"
    if err.errno == errno.EROFS:
        return "the file system is read-only"
    if err.errno in (errno.EACCES, errno.EPERM):
        return "permission denied"
    if err.errno == errno.ENOTDIR:
        return "a folder on its path is a file"
    if err.errno == errno.ENOSPC:
        return "no space left on the device"
    if err.errno == errno.EDQUOT:
        return "disk quota exceeded"
    return err.strerror or str(err) or type(err).__name__


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a name too long, say
        return False


class WriteFailed(OSError):
    """A file that could not be written (full disk, read-only or missing folder). Its message
    names the file and, when space ran out, how much is free; the previous file is kept."""

    def __init__(self, path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.path, self.cause = Path(path), cause

    def __str__(self) -> str:
        room = f" ({free_space(self.path)})" if self.cause.errno in _NO_ROOM else ""
        kept = "the previous file is kept" if _is_file(self.path) else "nothing was written"
        return f"cannot write {self.path}: {_reason(self.cause)}{room}; {kept}"


def write_failure(path, err: BaseException) -> WriteFailed | None:
    """``err`` (raised while writing ``path``) as a :class:`WriteFailed`, or None when it is not
    a failure of the file system (a bug, Ctrl-C). Writers such as ``torch.save`` report a full
    disk as their own error with the ``OSError`` as its context: that chain is followed."""
    if isinstance(err, WriteFailed):
        return err
    if isinstance(err, OSError):
        return WriteFailed(path, err)
    seen = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        if isinstance(err, OSError) and err.errno in _WRITE_ERRNOS:
            return WriteFailed(path, err)
        err = err.__cause__ or err.__context__
    return None


class FolderUnusable(OSError):
    """An output folder that cannot be created or written into; the message says why."""

    def __init__(self, what: str, path, cause: OSError):
        super().__init__(cause.errno, cause.strerror or str(cause), str(path))
        self.what, self.path, self.cause = what, Path(path), cause

    def __str__(self) -> str:
        path, err = self.path, self.cause
        if isinstance(err, FileExistsError) or err.errno == errno.EEXIST:  # mkdir of an existing file
            reason = "it is a file, not a folder"
        else:
            reason = _reason(err)
            if err.errno in _NO_ROOM:
                reason += f" ({free_space(path)})"
        return f"{self.what} {path} cannot be used as an output folder: {reason}"


def usable_folder(path, what: str = "--out") -> Path:
    """Create the folder ``path`` (and its parents) and prove a file can be written in it;
    :class:`FolderUnusable` naming ``what`` (the flag) otherwise. Before the work, not after it."""
    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / f".nla_fast-write-probe-{os.getpid()}"
        fd = os.open(probe, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as err:
        raise FolderUnusable(what, path, err) from err
    return path
