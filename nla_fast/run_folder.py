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
O_EXCL, holding ``host pid``) while it runs; a lock whose process is dead on this host is
stale and taken over. A folder that already holds a run's results is only written into by
``--resume`` of that run, or by a new run given ``--overwrite`` (which first removes them).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from . import atomic
from . import checkpoint as ckpt
from .metrics import json_safe


LOCK_FILE = ".nla_fast.lock"
# What a run writes into its folder (removed by --overwrite before a new run starts).
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "best_mean.pt", "curves.png",
             "confusion.png", "naw_weights.png")
RESULT_FILES = ("last.pt", "best.pt", "best_mean.pt")


class RunFolderError(RuntimeError):
    """The output folder is in use or holds another run; the message says what to do."""


def holds_a_run(folder) -> bool:
    """True when ``folder`` has a run's results: a checkpoint or at least one epoch's metrics."""
    folder = Path(folder)
    metrics = folder / "metrics.jsonl"
    return any((folder / name).is_file() for name in RESULT_FILES) or (metrics.is_file() and metrics.stat().st_size > 0)


class FolderLock:
    """``.nla_fast.lock`` in a run folder: created with O_EXCL, holding ``host pid``. A lock
    left by a killed run is stale once its process is dead on this host (``nla_fast.atomic``'s
    check) and is taken over; a lock of a live process, or of another host, refuses."""

    def __init__(self, folder):
        self.path = Path(folder) / LOCK_FILE
        self.held = False
        self.mine = f"{atomic.this_host()} {os.getpid()}\n"

    def acquire(self) -> None:
        for _ in range(3):  # a stale lock removed, then one more try (a racing run may win it)
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and atomic.owner_is_dead(*owner):
                    try:
                        self.path.unlink()
                    except FileNotFoundError:
                        pass
                    continue
                who = f"process {owner[1]} on {owner[0]}" if owner else "another run (lock being written)"
                raise RunFolderError(
                    f"{self.path.parent} is in use by {who} (lock file {self.path}); wait for it to finish or "
                    f"choose another --out")
            with os.fdopen(fd, "w") as handle:
                handle.write(self.mine)
            self.held = True
            return
        raise RunFolderError(f"{self.path.parent}: could not take the lock {self.path}; another run is starting there")

    def _owner(self) -> tuple[str, int] | None:
        try:
            host, pid = self.path.read_text().split()
            return host, int(pid)
        except (OSError, ValueError):  # just created by another process, not yet written
            return None

    def release(self) -> None:
        if self.held:
            self.held = False
            try:
                if self.path.read_text() == self.mine:
                    self.path.unlink()
            except OSError:
                pass


class RunFolder:
    def __init__(self, path, writer: bool = True):
        self.path, self.writer = Path(path), writer
        self.last = self.path / "last.pt"
        self.lock = FolderLock(self.path)
        self.tensorboard = None  # a run_log.TensorBoardLog once open_tensorboard is called

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
        (``resumes_this_folder``: a resumed run continuing in its own folder; ``overwrite``:
        remove an earlier run's files), and remove temporary files of killed writers."""
        if not self.writer:
            return
        self.path.mkdir(parents=True, exist_ok=True)
        self.lock.acquire()
        try:
            if not resumes_this_folder and holds_a_run(self.path):
                if not overwrite:
                    raise RunFolderError(
                        f"{self.path} already holds a run (its checkpoints and metrics.jsonl would be replaced): "
                        f"continue it with --resume {self.last}, or pass --overwrite to start a new run there")
                for name in RUN_FILES:
                    (self.path / name).unlink(missing_ok=True)
            atomic.remove_stale_temps(self.path)
        except BaseException:
            self.lock.release()
            raise

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
        return (f"metrics: {p / 'metrics.jsonl'}, {p / 'metrics.csv'}"
                + (f", {p / 'tensorboard'}" if self.tensorboard is not None else "") + f"; plots: {p / 'curves.png'}, {p / 'confusion.png'}, "
                f"{p / 'naw_weights.png'}; checkpoints: {p / 'last.pt'}, {p / 'best.pt'}, {p / 'best_mean.pt'}")


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
