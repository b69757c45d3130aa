"""Classify facial expressions with a trained checkpoint: ``python -m nla_fast.predict`` (also ``nla-predict``).

    python -m nla_fast.predict --checkpoint runs/x/best.pt face1.jpg face2.png [--top 3] [--json]

From Python: ``nla_fast.load_model`` / ``nla_fast.predict`` (``nla_fast.inference``).
"""
from __future__ import annotations

import argparse
import json
import sys
import types

from . import arg_types
from .cli import HelpFormatter
from .inference import load_model, predict


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nla_fast.predict",
        description="Classify the facial expression of aligned face crops with an nla_fast checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by nla_fast.train (e.g. best.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (aligned face crops, any size)")
    p.add_argument("--top", type=arg_types.positive_int, default=3, metavar="K", help="how many classes to show per image")
    p.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: average with the mirrored image")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.checkpoint, device=args.device)
        results = predict(model, list(args.images), top_k=args.top, tta=None if args.tta == "none" else args.tta)
    except (FileNotFoundError, ValueError) as err:  # missing or unreadable image or checkpoint
        print(f"nla_fast.predict: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": str(path), **result} for path, result in zip(args.images, results)], indent=2))
        return 0
    for path, result in zip(args.images, results):
        shown = ", ".join(f"{entry['label']} {100 * entry['probability']:.1f}%" for entry in result["top"])
        print(f"{path}: {shown}")
    return 0


class _CallableModule(types.ModuleType):
    """``nla_fast.predict`` names both this module and the function the package exports; once
    this module is imported, ``nla_fast.predict`` is the module, so calling it still predicts."""

    def __call__(self, *args, **kwargs):
        return predict(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule

if __name__ == "__main__":
    sys.exit(main())
