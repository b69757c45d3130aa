"""Evaluate a checkpoint on a dataset split: ``python -m nla_fast.evaluate`` (also ``nla-evaluate``).

    python -m nla_fast.evaluate --checkpoint runs/x/best.pt --dataset rafdb --data-root DATA/RAF-DB [--tta flip]

Prints overall, mean-class, top-2 and per-class accuracy as a table and writes the confusion
matrix as PNG and JSON (next to the checkpoint unless ``--out`` says otherwise).
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from . import arg_types, atomic
from . import checkpoint as ckpt
from .backbones import ModelError
from .class_map import ClassMapError, map_classes
from .cli import HelpFormatter
from .console import say
from .disk import FolderUnusable, usable_folder
from .data import DATASETS, default_cache_size
from .data.errors import DatasetError
from .data.splits import load_split
from .device import DEVICE_CHOICES, DeviceError, pick_device
from .evaluation import evaluate, load_model, predict_logits
from .metrics import MetricCounts, as_record, format_table, json_safe


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nla_fast.evaluate",
        description="Evaluate an nla_fast checkpoint: accuracy, mean class accuracy, per-class and top-2 "
        "accuracy, confusion matrix (printed as a table, written as PNG + JSON).",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="a checkpoint written by nla_fast.train (last.pt, best.pt, ...)")
    p.add_argument("--dataset", choices=DATASETS, default=None,
                   help="dataset to evaluate on (default: the one the checkpoint was trained on)")
    p.add_argument("--data-root", default=None, metavar="DIR", help="folder of the dataset (default: the training run's)")
    p.add_argument("--split", default="test",
                   help="split to evaluate: test, train, or valid (FERPlus's, or the run's --val-fraction hold-out)")
    p.add_argument("--tta", choices=("none", "flip"), default="none",
                   help="flip: average the log-probabilities of each image and its horizontal flip")
    p.add_argument("--batch-size", type=arg_types.positive_int, default=256, metavar="N", help="evaluation batch size")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where to run")
    p.add_argument("--amp", choices=("bf16", "fp16", "off"), default=None,
                   help="autocast precision (default: bf16 on CUDA, off on CPU)")
    p.add_argument("--limit", type=arg_types.positive_int, default=None, metavar="N", help="evaluate a fixed, seeded subset of N samples")
    p.add_argument("--label-mode", choices=("majority", "argmax", "soft"), default=None,
                   help="FERPlus labels (default: the training run's)")
    p.add_argument("--num-classes", type=int, choices=(7, 8), default=None,
                   help="FERPlus / AffectNet: 7 or 8 classes (default: the training run's)")
    p.add_argument("--out", default=None, metavar="DIR", help="folder for the confusion matrix files (default: the checkpoint's)")
    p.add_argument("--json", action="store_true", help="print the metrics as JSON instead of a table")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        device = pick_device(args.device)
        state = ckpt.load(args.checkpoint)
        # before the work: a folder it could not write into
        out = usable_folder(report_folder(args), "--out" if args.out else "the checkpoint's folder (the default --out)")
    except (DeviceError, FileNotFoundError, ckpt.CheckpointError, FolderUnusable) as err:
        return _error(err)
    classes = list(state["model_info"]["classes"])
    arguments = split_arguments(args, state["config"]["train"])
    dataset = arguments["dataset"]
    try:
        data = load_split(split=args.split, **arguments)
    except (FileNotFoundError, DatasetError, ValueError) as err:
        return _error(err)
    class_map = None
    if list(data.classes) != classes:
        try:
            class_map = map_classes(data.classes, classes)
        except ClassMapError as err:
            return _error(f"the checkpoint's classes {classes} differ from {dataset}'s {list(data.classes)}: {err}")
        # printed once, before the figures (on stderr when stdout carries the JSON)
        say(f"{dataset}'s classes matched to the checkpoint's by meaning:\n{class_map.table()}",
            file=sys.stderr if args.json else None)
    try:
        model = load_model(args.checkpoint, device=device)
    except ModelError as err:  # a timm network without timm installed
        return _error(f"{args.checkpoint}: {err}")
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    tta = None if args.tta == "none" else args.tta
    if class_map is None:
        metrics = evaluate(model, data.images, data.labels, model.eval_transform, len(classes), classes,
                           batch_size=args.batch_size, amp=amp, tta=tta)
        extra = {}
    else:
        metrics, extra = evaluate_mapped(model, data, class_map, args.batch_size, amp, tta)
    record = {"checkpoint": str(args.checkpoint), "dataset": dataset, "split": args.split, "tta": args.tta,
              "epoch": state["epoch"], "classes": classes, **as_record(metrics, classes), **extra}
    try:
        write_report(args, record, metrics, classes, dataset, state["epoch"], out)
    except OSError as err:  # a full disk: disk.WriteFailed names the file and the free space
        print(f"nla_fast.evaluate: error: {err}", file=sys.stderr)
        return 1
    return 0


def evaluate_mapped(model, data, class_map, batch_size: int, amp: str, tta) -> tuple[dict, dict]:
    """Metrics in the checkpoint's classes of the samples whose class it has (labels mapped by
    meaning), and, for each data class it cannot predict, how many samples it has and what the
    checkpoint predicted for them: ``(metrics, {"class_map", "unpredictable"})``."""
    scores = predict_logits(model, data.images, model.eval_transform, batch_size, amp, tta).cpu()
    to_model = torch.tensor([-1 if index is None else index for index in class_map.to_model])
    labels = to_model[data.labels.cpu()]
    scored = labels >= 0
    counts = MetricCounts(len(class_map.model_classes))
    if bool(scored.any()):
        counts.update(scores[scored], labels[scored])
    metrics = counts.summarise(list(class_map.model_classes))
    predicted = scores.argmax(dim=1) if len(scores) else torch.zeros(0, dtype=torch.int64)
    unpredictable = {}
    for index, name in enumerate(class_map.data_classes):
        if class_map.to_model[index] is None:
            mine = predicted[data.labels.cpu() == index]
            votes = torch.bincount(mine, minlength=len(class_map.model_classes)).tolist()
            unpredictable[name] = {"samples": len(mine), "predicted_as": dict(zip(class_map.model_classes, votes))}
    mapping = {name: class_map.model_classes[index] if index is not None else None
               for name, index in zip(class_map.data_classes, class_map.to_model)}
    return metrics, {"class_map": mapping, "unpredictable": unpredictable}


def split_arguments(args, trained: dict) -> dict:
    """The data to evaluate on: the dataset and its options as typed, else the training run's
    (``trained``: its saved settings) when it is the run's dataset. Never the run's label noise
    or imbalance: evaluation is against the clean labels."""
    dataset = args.dataset or trained["dataset"]
    same = dataset == trained["dataset"]

    def typed_or_trained(name):
        typed = getattr(args, name)
        return typed if typed is not None else (trained.get(name) if same else None)

    # the cache size the run used (its files are found again), else the one a run at its input size would use
    cache_size = (trained.get("cache_size") if same else None) or default_cache_size(dataset, trained.get("image_size"))
    arguments = {"dataset": dataset, "data_root": typed_or_trained("data_root"),
                 "label_mode": typed_or_trained("label_mode"), "num_classes": typed_or_trained("num_classes"),
                 "num_samples": trained.get("num_samples") if same else None, "cache_size": cache_size,
                 "limit": args.limit}
    if same and trained.get("val_fraction") is not None:  # the run's own held-out split (--split valid)
        arguments.update(val_fraction=trained["val_fraction"], val_seed=trained.get("val_seed", 0))
    return arguments


def report_folder(args) -> Path:
    """Where the confusion matrix files go: ``--out``, else the checkpoint's folder."""
    return Path(args.out) if args.out else Path(args.checkpoint).resolve().parent


def write_report(args, record: dict, metrics: dict, classes: list, dataset: str, epoch: int,
                 out: Path | None = None) -> None:
    """The record (``metrics.as_record``'s shape) and confusion matrix as JSON and PNG, and the
    metrics on stdout (a table, or the record as JSON; a reader that closes the pipe early,
    ``| head``, ends no more than the printing)."""
    out = out if out is not None else report_folder(args)
    stem = f"eval-{Path(args.checkpoint).stem}-{dataset}-{args.split}" + ("-flip" if args.tta == "flip" else "")
    atomic.write_text(out / f"{stem}-confusion.json", json.dumps(json_safe(record), indent=2) + "\n")
    from .plots import plot_confusion

    plot_confusion(metrics["confusion"], classes, out / f"{stem}-confusion.png",
                   title=f"{dataset}/{args.split} (acc {100 * metrics['acc']:.2f}%)")
    if args.json:
        say(json.dumps(json_safe(record)))
        return
    say(f"{args.checkpoint} (epoch {epoch}) on {dataset}/{args.split}"
        f"{' with flip TTA' if args.tta == 'flip' else ''}:")
    say(format_table(metrics, classes))
    for name, seen in (record.get("unpredictable") or {}).items():
        shown = ", ".join(f"{label} {count}" for label, count in sorted(seen["predicted_as"].items(),
                                                                         key=lambda item: -item[1]) if count)
        say(f"{name}: {seen['samples']} image(s) of a class the checkpoint cannot predict, left out of the figures "
            f"above" + (f"; predicted as {shown}" if shown else ""))
    say(f"confusion matrix: {out / (stem + '-confusion.png')}, {out / (stem + '-confusion.json')}")


def _error(err) -> int:
    print(f"nla_fast.evaluate: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
