"""Every file nla_fast writes (checkpoints, metrics, plots, dataset caches, copies) is written
here, in one way: into a temporary file in the target's folder, flushed to disk, then renamed
over the target. A crash, Ctrl-C or full disk mid-write leaves the previous file untouched
and never a partial one.

Files get the mode the user's umask gives (0644 under umask 022), not ``mkstemp``'s 0600.
Temporary files are named ``.<name>.<host>-<pid>-<n>.tmp``: when a writer is killed outright
(SIGKILL, power loss) its temporary file stays, and ``remove_stale_temps`` removes it later
once its writer is provably dead (same host, process id no longer alive). On a folder shared
between machines, another host's temporary files are never touched.

A write that the file system refuses (disk full, quota, read-only) raises
``nla_fast.disk.WriteFailed`` (an ``OSError``) naming the file and the free space, whichever
writer (``torch.save``, matplotlib, ONNX) met the error first.
"""
from __future__ import annotations

import contextlib
import itertools
import os
import re
import shutil
import socket
from pathlib import Path
from typing import Callable, IO

from .disk import write_failure

_counter = itertools.count()  # distinct names for concurrent writes of one file by one process
_TEMP_NAME = re.compile(r"^\.(?P<name>.+)\.(?P<host>[^.]+)-(?P<pid>\d+)-\d+\.tmp$")


def _host() -> str:
    # no dots (the temp name is parsed at its last dot) and nothing odd in a file name
    return re.sub(r"[^A-Za-z0-9_-]", "_", socket.gethostname()) or "host"


def temp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{_host()}-{os.getpid()}-{next(_counter)}.tmp")


@contextlib.contextmanager
def target(path):
    """A temporary path beside ``path``, flushed to disk and renamed over ``path`` when the
    block succeeds, removed when it fails. For writers that want a file name (ONNX) and for
    ``write``. A failure of the file system is raised as ``WriteFailed`` naming ``path``."""
    path = Path(path)
    tmp = temp_path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        yield tmp
        with open(tmp, "rb") as handle:
            os.fsync(handle.fileno())
        # a writer that made its own file (safetensors: 0600) gets the usual mode; a program a
        # compiler linked there stays executable
        executable = os.stat(tmp).st_mode & 0o111
        os.chmod(tmp, _umask_mode(0o777 if executable else 0o666))
        os.replace(tmp, path)
    except BaseException as err:
        try:
            os.unlink(tmp)
        except OSError:  # never created, or its folder is gone
            pass
        failure = write_failure(path, err)
        if failure is None or failure is err:
            raise
        raise failure from err


def _open_new(tmp: Path) -> IO[bytes]:
    """The temporary file, opened for writing. O_EXCL: never write into somebody else's file;
    0o666 & ~umask is the mode users expect. (The tests put a full disk here.)"""
    return os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666), "wb")


def _umask_mode(base: int = 0o666) -> int:
    """``base`` (0o666: the mode ``open()`` gives a new file) less the process's umask."""
    mask = os.umask(0o022)  # reading the umask means setting it: put it straight back
    os.umask(mask)
    return base & ~mask


def write(path, fill: Callable[[IO[bytes]], None]) -> None:
    """Write ``path`` atomically: ``fill(handle)`` writes the content into a binary handle."""
    with target(path) as tmp:
        with _open_new(tmp) as handle:
            fill(handle)


def write_bytes(path, data: bytes) -> None:
    write(path, lambda handle: handle.write(data))


def write_text(path, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def torch_save(obj, path) -> None:
    """``torch.save(obj)`` to ``path``, atomically."""
    import torch

    write(path, lambda handle: torch.save(obj, handle))


def save_figure(fig, path, **savefig_kwargs) -> None:
    """A matplotlib figure to ``path`` (format from the suffix), atomically."""
    path = Path(path)
    write(path, lambda handle: fig.savefig(handle, format=path.suffix.lstrip(".") or None, **savefig_kwargs))


def copy(src, dst) -> None:
    """``dst`` becomes a copy of ``src`` in one rename: a hard link (no data copied; files
    written here are replaced, never rewritten, so the two stay independent), else a real copy."""
    src, dst = Path(src), Path(dst)
    with target(dst) as tmp:
        try:
            os.link(src, tmp)
        except OSError:  # no hard links on this file system: copy the bytes
            shutil.copyfile(src, tmp)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by another user
        return True
    return True


def owner_is_dead(host: str, pid: int) -> bool:
    """True when process ``pid`` of ``host`` provably no longer exists: it ran on this host and
    is gone. A process of another host is never declared dead (it cannot be checked from here)."""
    return host == _host() and not _alive(pid)


def this_host() -> str:
    """This machine's name as temporary and lock files record it."""
    return _host()


def remove_stale_temps(folder) -> list[Path]:
    """Remove the temporary files in ``folder`` whose writer is dead (written on this host by
    a process that no longer exists); returns what was removed. Missing folder: nothing."""
    folder = Path(folder)
    removed = []
    try:
        entries = list(folder.iterdir())
    except (FileNotFoundError, NotADirectoryError):
        return removed
    host = _host()
    for entry in entries:
        match = _TEMP_NAME.match(entry.name)
        if match is None or match["host"] != host or _alive(int(match["pid"])):
            continue
        try:
            entry.unlink()
            removed.append(entry)
        except FileNotFoundError:  # another process cleaned it up first
            pass
        except OSError:  # not ours to remove (permissions): leave it
            pass
    return removed
