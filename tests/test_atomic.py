"""nla_fast.atomic: the one way files are written (checkpoints, metrics, plots, caches, copies)."""
import os
import stat
import subprocess
import sys

import pytest
import torch

from nla_fast import atomic
from nla_fast import checkpoint as ckpt


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def mode(path) -> int:
    return stat.S_IMODE(os.stat(path).st_mode)


def test_written_files_get_the_umask_mode(tmp_path, umask_022):
    atomic.write_text(tmp_path / "metrics.jsonl", "{}\n")
    atomic.torch_save({"x": torch.arange(2)}, tmp_path / "last.pt")
    atomic.copy(tmp_path / "last.pt", tmp_path / "best.pt")
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    fig, _ = plt.subplots()
    atomic.save_figure(fig, tmp_path / "curves.png")
    plt.close(fig)
    for name in ("metrics.jsonl", "last.pt", "best.pt", "curves.png"):
        assert mode(tmp_path / name) == 0o644, name
    assert (tmp_path / "curves.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["best.pt", "curves.png", "last.pt", "metrics.jsonl"]


def test_a_program_written_through_target_stays_executable_and_a_0600_file_gets_the_umask_mode(tmp_path,
                                                                                               umask_022):
    """A compiler linking into atomic.target's path makes an executable (0755 under umask 022),
    a library writing its own file 0600 (safetensors) gets the usual 0644."""
    with atomic.target(tmp_path / "program") as tmp:
        tmp.write_bytes(b"#!/bin/sh\necho ok\n")
        os.chmod(tmp, 0o700)
    with atomic.target(tmp_path / "weights") as tmp:
        tmp.write_bytes(b"x")
        os.chmod(tmp, 0o600)
    assert mode(tmp_path / "program") == 0o755 and mode(tmp_path / "weights") == 0o644
    assert subprocess.run([str(tmp_path / "program")], capture_output=True, text=True).stdout == "ok\n"


def test_copy_is_independent_of_a_later_rewrite_of_the_source(tmp_path):
    atomic.write_text(tmp_path / "last.pt", "epoch 1")
    atomic.copy(tmp_path / "last.pt", tmp_path / "best.pt")
    atomic.write_text(tmp_path / "last.pt", "epoch 2")
    assert (tmp_path / "best.pt").read_text() == "epoch 1"


def test_interrupted_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    ckpt.save({"format": ckpt.FORMAT, "epoch": 1}, path)

    def dying_save(obj, handle, *args, **kwargs):
        handle.write(b"partial garbage")
        raise KeyboardInterrupt  # Ctrl-C in the middle of writing

    monkeypatch.setattr(torch, "save", dying_save)
    with pytest.raises(KeyboardInterrupt):
        ckpt.save({"format": ckpt.FORMAT, "epoch": 2}, path)
    monkeypatch.undo()
    assert ckpt.load(path)["epoch"] == 1
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]  # no temporary file left behind

    def half_then_error(handle):
        handle.write(b"half of the new conte")
        raise OSError("No space left on device")

    atomic.write_text(tmp_path / "metrics.jsonl", "old\n")
    with pytest.raises(OSError, match="No space"):
        atomic.write(tmp_path / "metrics.jsonl", half_then_error)
    assert (tmp_path / "metrics.jsonl").read_text() == "old\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "metrics.jsonl"]


def dead_pid() -> int:
    """The id of a process that has exited (and been reaped)."""
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    return child.pid


def test_stale_temp_files_of_dead_writers_are_removed(tmp_path):
    target = tmp_path / "last.pt"
    live = atomic.temp_path(target)  # named by this (live) process
    assert live.name.startswith(".last.pt.") and live.name.endswith(".tmp") and str(os.getpid()) in live.name
    dead = live.with_name(live.name.replace(f"-{os.getpid()}-", f"-{dead_pid()}-"))
    other_host = tmp_path / f".last.pt.some_other_machine-{dead_pid()}-0.tmp"
    unrelated = tmp_path / "notes.tmp"
    for path in (live, dead, other_host, unrelated, target):
        path.write_bytes(b"x")
    assert atomic.remove_stale_temps(tmp_path) == [dead]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in (live, other_host, unrelated, target))
    assert atomic.remove_stale_temps(tmp_path / "missing") == []


def test_using_a_cache_folder_removes_stale_temps(tmp_path):
    from nla_fast.data import cache

    stale = tmp_path / "cache" / f".synthetic-train-x.pt.{atomic._host()}-{dead_pid()}-0.tmp"
    stale.parent.mkdir()
    stale.write_bytes(b"partial")
    cache.load_or_build("synthetic", "train", {"n": 1}, lambda: {"v": torch.zeros(1)},
                        directory=tmp_path / "cache", verbose=False)
    assert not stale.exists()


def test_a_run_folder_removes_stale_temps_when_a_run_starts(tmp_path):
    from nla_fast.run_folder import RunFolder

    stale = tmp_path / f".last.pt.{atomic._host()}-{dead_pid()}-3.tmp"
    stale.write_bytes(b"partial")
    RunFolder(tmp_path, writer=False).start()  # another rank: touches nothing
    assert stale.exists()
    RunFolder(tmp_path).start()
    assert not stale.exists()
