"""A training run's output folder (``--out``): what is written there, in which format, by whom.

    config.json      the settings of the run
    metrics.jsonl    one JSON object per epoch (see ``epoch_record``)
    metrics.csv      the same rows as flat columns (``per_class_acc/<class>``, ``confusion/<true>/<pred>``)
    tensorboard/     with --tensorboard: per-epoch scalars and the figures below
    curves.png       loss and accuracies per epoch
    confusion.png    confusion matrix of the latest epoch on the test split
    naw_weights.png  NAW weight over the (p_gt, p_nn) plane at the epoch's eps, with that
                     epoch's training samples scattered on it
    last.pt          every epoch (and on Ctrl-C, mid-epoch); best.pt / best_mean.pt: the
                     epochs with the best overall / mean class accuracy on the validation
                     split where the dataset has one (FERPlus), else on the test split

Only the writer (rank 0 of a distributed run) writes; on the other ranks every method does
nothing. Every file is written atomically (``nla_fast.atomic``).

A folder is used by one run at a time: the writer holds ``.nla_fast.lock`` (created with
O_EXCL, holding ``host pid``, ``flock``ed while the run lasts) while it runs; a lock whose
process is dead on this host is stale and taken over, and so is a lock that cannot be read
(left empty by a full disk or a kill) once nobody holds it. A folder that already holds a
run's results is only written into by ``--resume`` of its own ``last.pt``, or by a new run
given ``--overwrite``, which removes the earlier run's files only once the new run has its
data and model and has written its ``config.json`` (``remove_earlier_run``).
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import torch

from . import atomic
from . import checkpoint as ckpt
from .disk import FolderUnusable, WriteFailed
from .metrics import json_safe

try:
    import fcntl
except ImportError:  # not on Windows: an unreadable lock is then judged by its age alone
    fcntl = None


LOCK_FILE = ".nla_fast.lock"
# What a run writes into its folder (what --overwrite replaces; see RunFolder.remove_earlier_run).
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "best_mean.pt", "curves.png",
             "confusion.png", "naw_weights.png")
RESULT_FILES = ("last.pt", "best.pt", "best_mean.pt")
# A lock is written right after it is created; one still unreadable this long after is not
# being written any more (its writer was killed, or the disk was full).
LOCK_WRITE_SECONDS = 2.0


class RunFolderError(RuntimeError):
    """The output folder is in use or holds another run; the message says what to do."""


def holds_a_run(folder) -> bool:
    """True when ``folder`` has a run's results: a checkpoint or at least one epoch's metrics."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    return any((folder / name).is_file() for name in RESULT_FILES) or (metrics.is_file() and metrics.stat().st_size > 0)


def resumes_in_place(folder, resume, overwrite: bool = False) -> bool:
    """Whether a run resumed from ``resume`` continues the run in ``folder``: True for that
    folder's own last.pt. Another checkpoint of the folder (best.pt, an older copy) would
    rewrite the run's metrics from an earlier epoch while last.pt stays ahead: refused with
    RunFolderError, unless ``overwrite`` (the folder's run is then replaced, not continued)."""
    if resume is None:
        return False
    folder, resume = Path(folder).resolve(), Path(resume).resolve()
    if resume.parent != folder:
        return False
    if resume == folder / "last.pt":
        return True
    if overwrite or not holds_a_run(folder):
        return False
    raise RunFolderError(
        f"{resume} is not {folder}'s last.pt: resuming it into {folder} would rewrite the run's metrics from its "
        f"epoch while last.pt stays ahead. Continue the run with --resume {folder / 'last.pt'}, continue from "
        f"{resume.name} into a new folder with --out DIR, or fine-tune from its weights with --weights {resume}")


class FolderLock:
    """``.nla_fast.lock`` in a run folder: created with O_EXCL, holding ``host pid``, and
    ``flock``ed by its writer until released. A lock left by a killed run is stale once its
    process is dead on this host (``nla_fast.atomic``'s check) and is taken over; so is a lock
    that cannot be read, once it is older than ``LOCK_WRITE_SECONDS`` and nobody holds it. A
    lock of a live process, or of another host, refuses."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self.held = False
        self.mine = f"{atomic.this_host()} {os.getpid()}\n"
        self._fd = None

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock removed, then one more try (a racing run may win it)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._owner()
                if (owner is not None and atomic.owner_is_dead(*owner)) or (owner is None and self._abandoned()):
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                who = f"process {owner[1]} on {owner[0]}" if owner else "another run (lock being written)"
                raise RunFolderError(
                    f"{self.path.parent} is in use by {who} (lock file {self.path}); wait for it to finish or "
                    f"choose another --out")
            except OSError as err:  # read-only, full, or not a folder
                raise FolderUnusable("--out", self.path.parent, err) from err
            self._write(fd)
            return
        raise RunFolderError(f"{self.path.parent}: could not take the lock {self.path}; another run is starting there")

    def _write(self, fd: int) -> None:
        """Hold the new lock file ``fd`` and write ``host pid`` into it; on a full disk remove it
        (an empty lock would refuse the next run) and raise WriteFailed."""
        try:
            if fcntl is not None:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            data = self.mine.encode()
            if os.write(fd, data) != len(data):
                raise OSError(28, "No space left on device")
        except OSError as err:
            os.close(fd)
            self.path.unlink(missing_ok=True)
            raise WriteFailed(self.path, err) from err
        self._fd, self.held = fd, True

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):  # being written, or left empty or damaged
            return None

    def _abandoned(self) -> bool:
        """An unreadable lock that nobody writes any more: old enough, and not held."""
        try:
            if time.time() - self.path.stat().st_mtime < LOCK_WRITE_SECONDS:
                return False
            if fcntl is None:
                return True
            fd = os.open(self.path, os.O_RDONLY)
        except FileNotFoundError:
            return True  # removed meanwhile: try again
        except OSError:
            return False
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # released by the close below
            return True
        except OSError:  # held by a live writer
            return False
        finally:
            os.close(fd)

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self.path.read_text() == self.mine:
                    self.path.unlink()
            except OSError:
                pass
        if self._fd is not None:
            os.close(self._fd)  # drops the flock
            self._fd = None


class RunFolder:
    def __init__(self, path, writer: bool = True):
        self.path, self.writer = Path(path), writer
        self.last = self.path / "last.pt"
        self.lock = FolderLock(self.path)
        self.tensorboard = None  # a run_log.TensorBoardLog once open_tensorboard is called
        self.earlier_run = False  # --overwrite: an earlier run's files wait for remove_earlier_run

    def open_tensorboard(self) -> None:
        if self.writer:
            from .run_log import TensorBoardLog

            self.tensorboard = TensorBoardLog(self.path)

    def log_epoch(self, row: dict) -> None:
        """The epoch's scalars to TensorBoard (metrics.jsonl / .csv are written by write_metrics)."""
        if self.tensorboard is not None:
            self.tensorboard.epoch(json_safe(row))

    def start(self, resumes_this_folder: bool = False, overwrite: bool = False) -> None:
        """Create the folder, take its lock, make sure no other run's results get replaced
        (``resumes_this_folder``: a resumed run continuing from this folder's last.pt;
        ``overwrite``: an earlier run's files are to be replaced, see ``remove_earlier_run``),
        and remove temporary files of killed writers."""
        if not self.writer:
            return
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as err:  # a file, under a file, a name too long, read-only
            raise FolderUnusable("--out", self.path, err) from err
        self.lock.acquire()
        try:
            if not resumes_this_folder and holds_a_run(self.path):
                if not overwrite:
                    raise RunFolderError(
                        f"{self.path} already holds a run (its checkpoints and metrics.jsonl would be replaced): "
                        f"continue it with --resume {self.last}, or pass --overwrite to start a new run there")
                self.earlier_run = True
            atomic.remove_stale_temps(self.path)
        except BaseException:
            self.lock.release()
            raise

    def remove_earlier_run(self) -> None:
        """With ``--overwrite``: remove the earlier run's files, once the new run has loaded its
        data, built its model and written its config.json (the files it replaces; nothing else)."""
        if self.writer and self.earlier_run:
            for name in RUN_FILES:
                if name != "config.json":
                    (self.path / name).unlink(missing_ok=True)
            self.earlier_run = False

    def close(self) -> None:
        """Close the TensorBoard log and release the folder's lock (on success, errors and Ctrl-C alike)."""
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None
        self.lock.release()

    def write_config(self, run_config: dict) -> None:
        if self.writer:
            atomic.write_text(self.path / "config.json", json.dumps(run_config, indent=2) + "\n")

    def write_metrics(self, history: list[dict]) -> None:
        if self.writer:
            atomic.write_text(self.path / "metrics.jsonl", "".join(json.dumps(json_safe(row)) + "\n" for row in history))
            from .run_log import write_csv

            write_csv(self.path / "metrics.csv", [json_safe(row) for row in history])

    def save_last(self, blob: dict) -> None:
        if self.writer:
            ckpt.save(blob, self.last)

    def keep_best(self, best_acc: bool, best_mean_acc: bool) -> None:
        """Copy last.pt to best.pt / best_mean.pt when its epoch is the best so far."""
        for improved, name in ((best_acc, "best.pt"), (best_mean_acc, "best_mean.pt")):
            if improved and self.writer:
                atomic.copy(self.last, self.path / name)

    def draw_plots(self, history, test: dict, classes, eps: float, nla_config, points: torch.Tensor,
                   epoch: int) -> None:
        """Curves, confusion matrix and NAW weight map; ``points``: (p_gt, p_nn) per training
        sample of the epoch (NaN rows, for samples not trained, are left out)."""
        if not self.writer:
            return
        from . import plots

        keep = self.tensorboard is not None  # the figures stay open for TensorBoard
        figures = {"curves": plots.plot_curves(history, self.path / "curves.png", close=not keep)}
        figures["confusion"] = plots.plot_confusion(
            test["confusion"], classes, self.path / "confusion.png", close=not keep,
            title=f"test confusion, epoch {epoch} (acc {100 * test['acc']:.2f}%)")
        points = points.cpu()
        points = points[~torch.isnan(points).any(dim=1)]
        figures["naw_weights"] = plots.plot_naw_weights(eps, nla_config, points, self.path / "naw_weights.png",
                                                        epoch=epoch, close=not keep)
        if keep:
            import matplotlib.pyplot as plt

            for name, fig in figures.items():
                self.tensorboard.figure(name, fig, epoch)
                plt.close(fig)

    def summary(self) -> str:
        p = self.path
        checkpoints = [str(p / name) for name in RESULT_FILES if (p / name).is_file()]
        return (f"metrics: {p / 'metrics.jsonl'}, {p / 'metrics.csv'}"
                + (f", {p / 'tensorboard'}" if self.tensorboard is not None else "") + f"; plots: {p / 'curves.png'}, {p / 'confusion.png'}, "
                f"{p / 'naw_weights.png'}; checkpoints: {', '.join(checkpoints) or 'none'}")


def epoch_record(epoch, progress, test, naw_means, classes, lr, eps, samples, samples_per_s, train_seconds,
                 eval_seconds, world_size, mode, valid: dict | None = None) -> dict:
    """One line of metrics.jsonl; ``valid``: the validation split's metrics, where the dataset has one."""
    row = {
        "epoch": epoch,
        "train_loss": progress["loss"],
        "train_acc": progress["acc"],
        "test_acc": test["acc"],
        "test_mean_acc": test["mean_acc"],
        "top2_acc": test["top2_acc"],
        "per_class_acc": dict(zip(classes, test["per_class_acc"])),
        "naw_weight_mean": dict(zip(classes, naw_means)),
        "lr": lr,
        "eps": eps,
        "samples_per_s": samples_per_s,
        "train_samples": samples,
        "test_samples": test["num_samples"],
        "world_size": world_size,
        "seconds": train_seconds + eval_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "step_mode": mode,
        "confusion": test["confusion"],
    }
    if valid is not None:
        row.update({"valid_acc": valid["acc"], "valid_mean_acc": valid["mean_acc"], "valid_top2_acc": valid["top2_acc"],
                    "valid_per_class_acc": dict(zip(classes, valid["per_class_acc"])),
                    "valid_samples": valid["num_samples"]})
    return row
