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
"""
from __future__ import annotations

import json
from pathlib import Path

import torch

from . import atomic
from . import checkpoint as ckpt
from .metrics import json_safe


class RunFolder:
    def __init__(self, path, writer: bool = True):
        self.path, self.writer = Path(path), writer
        self.last = self.path / "last.pt"
        self.tensorboard = None  # a run_log.TensorBoardLog once open_tensorboard is called

    def open_tensorboard(self) -> None:
        if self.writer:
            from .run_log import TensorBoardLog

            self.tensorboard = TensorBoardLog(self.path)

    def log_epoch(self, row: dict) -> None:
        """The epoch's scalars to TensorBoard (metrics.jsonl / .csv are written by write_metrics)."""
        if self.tensorboard is not None:
            self.tensorboard.epoch(json_safe(row))

    def close(self) -> None:
        if self.tensorboard is not None:
            self.tensorboard.close()
            self.tensorboard = None

    def start(self) -> None:
        """Create the folder and remove temporary files of writers that were killed outright."""
        if self.writer:
            self.path.mkdir(parents=True, exist_ok=True)
            atomic.remove_stale_temps(self.path)

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
