"""Where a benchmark writes its results.

By default under ``bench/out/``, which git ignores: running a benchmark never dirties the
checkout (every training run records a dirty checkout in its provenance). Reference results,
the ones the README cites, are written only when asked (``--save``), into the tracked
``bench/results/<date>-<device>/``: one folder per day and device, so a later run never
overwrites the figures an earlier text quotes. ``--out-dir`` writes anywhere else
(``make gpu-check`` gives each benchmark its run folder).
"""
from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
SCRATCH = BENCH / "out"
REFERENCE = BENCH / "results"


def slug(name: str) -> str:
    """A device name as a file-name part: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--out-dir", type=Path, default=None,
                       help=f"where the results go (default: {SCRATCH.relative_to(BENCH.parent)}/, not tracked by git)")
    group.add_argument("--save", action="store_true",
                       help="write the reference copy the README cites: bench/results/<date>-<device>/ (tracked)")


def output_dir(args: argparse.Namespace, device_slug: str, day: str | None = None) -> Path:
    """The folder chosen by ``--out-dir`` / ``--save`` / neither (see the module docstring)."""
    if getattr(args, "out_dir", None) is not None:
        return Path(args.out_dir)
    if getattr(args, "save", False):
        return REFERENCE / f"{day or time.strftime('%Y-%m-%d')}-{device_slug}"
    return SCRATCH
