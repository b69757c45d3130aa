"""Where a run's per-epoch numbers go besides ``metrics.jsonl``: ``metrics.csv`` (always) and
TensorBoard (``--tensorboard``). Both are written at epoch ends on the writing rank only, from
the values ``metrics.jsonl`` holds: nothing here touches the training step."""
from __future__ import annotations

import csv
import io
import math
from pathlib import Path

from . import atomic

TENSORBOARD_EXTRA = "tensorboard"
# metrics.jsonl key -> TensorBoard tag, for the scalars drawn per epoch
SCALARS = {
    "train_loss": "loss/train",
    "train_acc": "accuracy/train",
    "test_acc": "accuracy/test",
    "test_mean_acc": "mean_class_accuracy/test",
    "test_macro_f1": "macro_f1/test",
    "test_loss": "loss/test",
    "top2_acc": "top2_accuracy/test",
    "valid_acc": "accuracy/valid",
    "valid_mean_acc": "mean_class_accuracy/valid",
    "valid_macro_f1": "macro_f1/valid",
    "valid_loss": "loss/valid",
    "valid_top2_acc": "top2_accuracy/valid",
    "lr": "schedule/lr",
    "eps": "schedule/eps",
    "samples_per_s": "speed/samples_per_s",
}


class MissingExtra(RuntimeError):
    """An optional package a flag needs is not installed."""


def flatten(row: dict, prefix: str = "") -> dict:
    """One metrics row as flat columns: nested dicts become ``key/name`` columns
    (``per_class_acc/Happiness``), lists ``key/index`` (``confusion/3/4``: true 3, predicted 4)."""
    flat = {}
    items = row.items() if isinstance(row, dict) else enumerate(row)
    for key, value in items:
        name = f"{prefix}{key}"
        if isinstance(value, (dict, list, tuple)):
            flat.update(flatten(value, name + "/"))
        else:
            flat[name] = value
    return flat


def _cell(value) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return ""
    return repr(value) if isinstance(value, float) else str(value)  # repr: floats read back exactly


def write_csv(path, history: list[dict]) -> None:
    """``metrics.csv``: one row per epoch, the columns of the first row (a later row's extra
    keys are left out, its missing ones empty). Rewritten atomically from the whole history,
    so a resumed run continues the same file with the same header."""
    if not history:
        atomic.write_text(path, "")
        return
    header = list(flatten(history[0]))
    text = io.StringIO()
    writer = csv.writer(text, lineterminator="\n")
    writer.writerow(header)
    for row in history:
        flat = flatten(row)
        writer.writerow([_cell(flat.get(column)) for column in header])
    atomic.write_text(path, text.getvalue())


def summary_writer_class():
    """``torch.utils.tensorboard.SummaryWriter``, or MissingExtra naming the extra to install."""
    try:
        import tensorboard  # noqa: F401  (torch.utils.tensorboard needs it; its own error names no fix)
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as err:
        raise MissingExtra(f"--tensorboard needs the tensorboard package ({err}); install it with "
                           f"pip install 'nla_fast[{TENSORBOARD_EXTRA}]'") from None
    return SummaryWriter


class TensorBoardLog:
    """Per-epoch scalars and the run's figures in ``<out>/tensorboard``."""

    def __init__(self, folder: Path):
        self.writer = summary_writer_class()(log_dir=str(Path(folder) / "tensorboard"))

    def epoch(self, row: dict) -> None:
        step = row["epoch"]
        for key, tag in SCALARS.items():
            value = row.get(key)
            if isinstance(value, (int, float)) and math.isfinite(value):
                self.writer.add_scalar(tag, value, step)
        for key, tag in (("per_class_acc", "per_class_accuracy_test"),
                         ("valid_per_class_acc", "per_class_accuracy_valid"), ("naw_weight_mean", "naw_weight_mean")):
            for name, value in (row.get(key) or {}).items():
                if value is not None:
                    self.writer.add_scalar(f"{tag}/{name}", value, step)
        self.writer.flush()

    def train_steps(self, epoch: int, losses: list) -> None:
        """Each step's training loss, ``loss/train_step`` at the global step ``epoch * steps + i``
        (steps trained by an earlier process before a mid-epoch resume are NaN and left out)."""
        for index, value in enumerate(losses):
            if math.isfinite(value):
                self.writer.add_scalar("loss/train_step", value, epoch * len(losses) + index)
        self.writer.flush()

    def figure(self, name: str, fig, epoch: int) -> None:
        self.writer.add_figure(name, fig, epoch, close=False)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()
