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

from . import arg_types, atomic
from . import checkpoint as ckpt
from .cli import HelpFormatter
from .data import DATASETS
from .data.errors import DatasetError
from .data.splits import load_split
from .device import DEVICE_CHOICES, DeviceError, pick_device
from .evaluation import evaluate, load_model
from .metrics import format_table, json_safe


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
    p.add_argument("--split", default="test", help="split to evaluate: test (or valid for FERPlus, train)")
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
    except (DeviceError, FileNotFoundError, ckpt.CheckpointError) as err:
        return _error(err)
    classes = list(state["model_info"]["classes"])
    arguments = split_arguments(args, state["config"]["train"])
    dataset = arguments["dataset"]
    try:
        data = load_split(split=args.split, **arguments)
    except (FileNotFoundError, DatasetError, ValueError) as err:
        return _error(err)
    if list(data.classes) != classes:
        return _error(f"the checkpoint's classes {classes} differ from {dataset}'s {list(data.classes)}")
    model = load_model(args.checkpoint, device=device)
    amp = args.amp or ("bf16" if device.type == "cuda" else "off")
    metrics = evaluate(model, data.images, data.labels, model.eval_transform, len(classes), classes,
                       batch_size=args.batch_size, amp=amp, tta=None if args.tta == "none" else args.tta)
    metrics.update(checkpoint=str(args.checkpoint), dataset=dataset, split=args.split, tta=args.tta,
                   epoch=state["epoch"])
    write_report(args, metrics, classes, dataset, state["epoch"])
    return 0


def split_arguments(args, trained: dict) -> dict:
    """The data to evaluate on: the dataset and its options as typed, else the training run's
    (``trained``: its saved settings) when it is the run's dataset. Never the run's label noise
    or imbalance: evaluation is against the clean labels."""
    dataset = args.dataset or trained["dataset"]
    same = dataset == trained["dataset"]

    def typed_or_trained(name):
        typed = getattr(args, name)
        return typed if typed is not None else (trained.get(name) if same else None)

    return {"dataset": dataset, "data_root": typed_or_trained("data_root"),
            "label_mode": typed_or_trained("label_mode"), "num_classes": typed_or_trained("num_classes"),
            "num_samples": trained.get("num_samples") if same else None, "limit": args.limit}


def write_report(args, metrics: dict, classes: list, dataset: str, epoch: int) -> None:
    """The confusion matrix as JSON and PNG, and the metrics on stdout (a table, or JSON)."""
    out = Path(args.out) if args.out else Path(args.checkpoint).resolve().parent
    out.mkdir(parents=True, exist_ok=True)
    stem = f"eval-{Path(args.checkpoint).stem}-{dataset}-{args.split}" + ("-flip" if args.tta == "flip" else "")
    atomic.write_text(out / f"{stem}-confusion.json", json.dumps(json_safe(metrics), indent=2) + "\n")
    from .plots import plot_confusion

    plot_confusion(metrics["confusion"], classes, out / f"{stem}-confusion.png",
                   title=f"{dataset}/{args.split} (acc {100 * metrics['acc']:.2f}%)")
    if args.json:
        print(json.dumps(json_safe(metrics)))
        return
    print(f"{args.checkpoint} (epoch {epoch}) on {dataset}/{args.split}"
          f"{' with flip TTA' if args.tta == 'flip' else ''}:")
    print(format_table(metrics, classes))
    print(f"confusion matrix: {out / (stem + '-confusion.png')}, {out / (stem + '-confusion.json')}")


def _error(err) -> int:
    print(f"nla_fast.evaluate: error: {err}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
