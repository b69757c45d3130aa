"""Classify facial expressions with a trained checkpoint: ``python -m nla_fast.classify`` (also ``nla-classify``).

    python -m nla_fast.classify --checkpoint runs/x/best.pt face1.jpg faces/ 'more/**/*.png' [--json | --csv]

Inputs are files, folders (searched recursively for images by extension) and glob patterns.
Images that cannot be read are reported on stderr, one line each, and skipped. Exit status:
0 when every image was classified, 1 when some could not be read, 2 for usage errors and an
unreadable checkpoint.

The model expects aligned face crops like its training set's: a whole photo is resized whole,
the face becomes a small part of the input and the prediction is unreliable.

From Python: ``nla_fast.load_model`` / ``nla_fast.predict`` (``nla_fast.inference``); this command is
named apart from that function, so importing it leaves ``nla_fast.predict`` the function.
"""
from __future__ import annotations

import argparse
import csv
import glob
import json
import pickle
import sys
from pathlib import Path

from . import arg_types
from .cli import HelpFormatter
from .device import DEVICE_CHOICES, DeviceError, pick_device
from .evaluation import load_model
from .inference import predict, read_image

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff")
EXIT_OK, EXIT_SOME_FAILED, EXIT_USAGE = 0, 1, 2


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nla_fast.classify",
        description="Classify the facial expression of aligned face crops with an nla_fast checkpoint. "
        "Exit status: 0 all images classified, 1 some could not be read (named on stderr), 2 usage error "
        "or unreadable checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH",
                   help="checkpoint written by nla_fast.train (e.g. best.pt) or an exported safetensors folder")
    p.add_argument("images", nargs="+", metavar="IMAGE",
                   help="image files, folders (searched recursively for " + ", ".join(e[1:] for e in IMAGE_EXTENSIONS)
                   + ") or glob patterns (quote them; ** matches folders recursively); aligned face crops, any size")
    p.add_argument("--top", type=arg_types.positive_int, default=3, metavar="K", help="how many classes to show per image (text output)")
    p.add_argument("--batch-size", type=arg_types.positive_int, default=64, metavar="N", help="images read and classified at a time")
    p.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: average with the mirrored image")
    p.add_argument("--device", choices=DEVICE_CHOICES, default="auto", help="where to run")
    output = p.add_mutually_exclusive_group()
    output.add_argument("--json", action="store_true",
                        help="print one JSON list: per image its label, probability and every class's probability")
    output.add_argument("--csv", action="store_true",
                        help="print CSV: image, label, probability, then one probability column per class")
    return p


def expand_inputs(inputs: list[str]) -> tuple[list[Path], list[str]]:
    """(image files in order, one message per input that names no image). A file is taken
    whatever its extension (reading it says whether it is an image); a folder gives its image
    files, recursively and sorted; a pattern with ``* ? [`` is expanded with glob."""
    files, problems = [], []

    def from_folder(folder: Path) -> list[Path]:
        return sorted(path for path in folder.rglob("*")
                      if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS)

    for text in inputs:
        path = Path(text)
        if path.is_dir():
            found = from_folder(path)
            files += found
            if not found:
                problems.append(f"{text}: no image files ({', '.join(IMAGE_EXTENSIONS)}) in this folder")
        elif path.exists() or not glob.has_magic(text):
            files.append(path)  # a missing file is reported when it is read
        else:
            matches = sorted(glob.glob(text, recursive=True))
            found = []
            for match in map(Path, matches):
                if match.is_dir():
                    found += from_folder(match)
                elif match.suffix.lower() in IMAGE_EXTENSIONS:
                    found.append(match)
            files += found
            if not found:
                problems.append(f"{text}: no image file matches this pattern")
    unique = list(dict.fromkeys(files))  # a file named twice (a folder and a pattern) once
    return unique, problems


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.batch_size < 1:
        parser.error(f"--batch-size must be at least 1, got {args.batch_size}")
    if args.top < 1:
        parser.error(f"--top must be at least 1, got {args.top}")
    try:
        device = pick_device(args.device)
    except DeviceError as err:
        print(f"nla_fast.classify: error: {err}", file=sys.stderr)
        return EXIT_USAGE
    try:
        model = load_model(args.checkpoint, device=device)
    except (OSError, ValueError, RuntimeError, EOFError, KeyError, pickle.UnpicklingError) as err:
        # missing, truncated or foreign checkpoint
        print(f"nla_fast.classify: error: cannot load checkpoint {args.checkpoint}: {err}", file=sys.stderr)
        return EXIT_USAGE
    files, problems = expand_inputs(args.images)
    for problem in problems:
        print(f"nla_fast.classify: {problem}", file=sys.stderr)
    failed = len(problems)
    out = Output(args, model.classes)
    tta = None if args.tta == "none" else args.tta
    for start in range(0, len(files), args.batch_size):
        readable, images = [], []
        for path in files[start:start + args.batch_size]:
            try:
                images.append(read_image(path))
                readable.append(path)
            except (OSError, ValueError) as err:  # missing, not an image, truncated
                print(f"nla_fast.classify: skipped {path}: {err}", file=sys.stderr)
                failed += 1
        if images:
            out.write(readable, predict(model, images, top_k=args.top, tta=tta))
    out.close()
    if failed:
        print(f"nla_fast.classify: {failed} input(s) could not be classified; {out.count} image(s) were",
              file=sys.stderr)
    return EXIT_SOME_FAILED if failed else EXIT_OK


class Output:
    """Text lines, CSV rows (written as they come) or one JSON list (written at the end) on stdout."""

    def __init__(self, args, classes: list[str]):
        self.mode = "json" if args.json else "csv" if args.csv else "text"
        self.classes, self.count, self.entries = list(classes), 0, []
        if self.mode == "csv":
            self.csv = csv.writer(sys.stdout, lineterminator="\n")
            self.csv.writerow(["image", "label", "probability", *self.classes])

    def write(self, paths, results) -> None:
        self.count += len(results)
        for path, result in zip(paths, results):
            if self.mode == "json":
                self.entries.append({"image": str(path), **result})
            elif self.mode == "csv":
                self.csv.writerow([str(path), result["label"], repr(result["probability"]),
                                   *(repr(result["probabilities"][name]) for name in self.classes)])
            else:
                shown = ", ".join(f"{entry['label']} {100 * entry['probability']:.1f}%" for entry in result["top"])
                print(f"{path}: {shown}")
        sys.stdout.flush()

    def close(self) -> None:
        if self.mode == "json":
            print(json.dumps(self.entries, indent=2))


if __name__ == "__main__":
    sys.exit(main())
