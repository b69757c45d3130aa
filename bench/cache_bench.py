#!/usr/bin/env python3
"""Dataset cache benchmark: what building a cache costs in time and memory as the set grows.

An AffectNet-layout set (``training.csv`` with face boxes; photos 400-900 px with a face of
40-80% of the short side, JPEG quality 90) of N rows is cached at ``--cache-size`` by the
loader itself, each build in a fresh process that reports its peak resident memory above
what it held before the build (Linux ``VmHWM`` - ``VmRSS``), seconds per image and the
file's size. Two ways for each N:

* ``streamed``: the cache as the trainer builds it (``nla_fast.data.cache``): decoded a
  chunk at a time straight into the file; then the finished file is opened and checked as
  a later run does (``open_check_s``).
* ``in-memory``: the same decode into one array (``cache=False``): the memory a build that
  holds the set needs (what the cache did before it was streamed), for comparison.

The rows reuse 64 distinct photos (``--photos``), so writing the set is quick and the page
cache holds them: the figures are decode + write, not the disk's read speed. Seconds per image and
memory per image do not depend on N, so they extrapolate to AffectNet's 283,901 training
images. A last section checks whether JPEG draft decoding (DCT-domain downscaling) gives
the same pixels as a full decode within the stated tolerance; it is used only if it does.

    python bench/cache_bench.py                        # 1,000 and 4,000 images at 224 px
    python bench/cache_bench.py --images 20000 100000  # larger (GBs of disk; in-memory rows up to --in-memory-up-to)
    python bench/cache_bench.py --quick                # 200 and 800 images at 112 px, used by the tests

Writes a table to stdout and JSON cache_bench-<device>[-quick].json (bench/out/; --save: bench/results/<date>-<device>/), rewritten
after each row.
"""
from __future__ import annotations

import argparse
import csv
import json
import math
import os
import platform
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
import result_files  # noqa: E402

AFFECTNET_TRAIN = 283_901  # SPEC 2: AffectNet's 7-class training split
DISTINCT_PHOTOS = 64
# JPEG draft decoding would be used only if, against a full decode, its pixels differ by at
# most this much (levels of 255): on average, and at the 99.9th percentile.
DRAFT_TOLERANCE = {"mean_abs": 0.5, "p99_9_abs": 2.0}


# ----------------------------------------------------------------------------------------------
# The set
# ----------------------------------------------------------------------------------------------
def write_photos(folder: Path, count: int, seed: int = 0) -> list[tuple[str, tuple]]:
    """``count`` photo-like JPEGs with a synthetic face pasted in; their names and face boxes."""
    from PIL import Image

    from nla_fast.data.synthetic import generate

    rng = np.random.default_rng(seed)
    faces = generate("train", num_samples=count, seed=seed, resolution=256)["images"].numpy()
    folder.mkdir(parents=True, exist_ok=True)
    photos = []
    for k in range(count):
        width, height = (int(v) for v in rng.integers(400, 900, 2))
        side = int(rng.integers(int(0.4 * min(width, height)), int(0.8 * min(width, height))))
        x, y = int(rng.integers(0, width - side)), int(rng.integers(0, height - side))
        noise = rng.normal(120, 40, (height // 8, width // 8, 3)).clip(0, 255).astype(np.uint8)
        photo = np.array(Image.fromarray(noise).resize((width, height), Image.BILINEAR))
        photo[y:y + side, x:x + side] = np.asarray(Image.fromarray(faces[k]).resize((side, side), Image.BICUBIC))
        name = f"{k % 8}/photo_{k:03d}.jpg"
        (folder / name).parent.mkdir(exist_ok=True)
        Image.fromarray(photo).save(folder / name, quality=90)
        photos.append((name, (x, y, side, side)))
    return photos


def write_training_csv(root: Path, photos, rows: int) -> None:
    with open(root / "training.csv", "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                      "facial_landmarks", "expression", "valence", "arousal"])
        for i in range(rows):
            name, (x, y, w, h) = photos[i % len(photos)]
            out.writerow([name, x, y, w, h, "", i % 7, 0.0, 0.0])


# ----------------------------------------------------------------------------------------------
# One build, in its own process
# ----------------------------------------------------------------------------------------------
def memory_kib(field: str) -> int | None:
    try:
        with open("/proc/self/status") as status:
            for line in status:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def build_in_this_process(root: str, cache_dir: str, mode: str, size: int, workers: int | None) -> dict:
    import torch

    from nla_fast.data import load_dataset
    from nla_fast.data.cache import verify_file

    torch.set_num_threads(1)
    before = memory_kib("VmRSS")
    started = time.perf_counter()
    data = load_dataset("affectnet", root, "train", cache_size=size, cache=(mode == "streamed"),
                        cache_dir=cache_dir, workers=workers, verbose=False)
    seconds = time.perf_counter() - started
    peak = memory_kib("VmHWM")
    row = {"mode": mode, "images": len(data), "seconds": seconds, "ms_per_image": 1e3 * seconds / len(data),
           "rss_before_mib": before / 1024 if before else None,
           "peak_rss_growth_mib": (peak - before) / 1024 if before and peak else None}
    if mode == "streamed":
        path = data.info["cache_file"]
        row["file_gb"] = os.path.getsize(path) / 1e9
        started = time.perf_counter()
        verify_file(path)
        row["open_check_s"] = time.perf_counter() - started
    return row


def measure(root: Path, cache_dir: Path, mode: str, size: int, workers: int | None) -> dict:
    command = [sys.executable, __file__, "--child", str(root), str(cache_dir), mode, str(size), str(workers or 0)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if done.returncode != 0:
        raise SystemExit(f"cache_bench: a {mode} build failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------
# JPEG draft decoding against a full decode
# ----------------------------------------------------------------------------------------------
def decode_full(path: Path, box, size: int) -> np.ndarray:
    from PIL import Image

    from nla_fast.data.decode import open_rgb

    return np.asarray(open_rgb(path, box).resize((size, size), Image.BILINEAR))


def decode_draft(path: Path, box, size: int) -> np.ndarray:
    """Let libjpeg scale by 1/2, 1/4 or 1/8 while decoding (never below the face's target size)."""
    from PIL import Image

    x, y, w, h = box
    with Image.open(path) as im:
        width = im.width
        scale = min(w, h) / size
        if scale >= 2:
            im.draft("RGB", (math.ceil(im.width / scale), math.ceil(im.height / scale)))
        f = width / im.width
        im = im.convert("RGB").crop((round(x / f), round(y / f), round((x + w) / f), round((y + h) / f)))
        return np.asarray(im.resize((size, size), Image.BILINEAR))


def draft_check(folder: Path, photos, size: int) -> dict:
    diffs, full_s, draft_s = [], 0.0, 0.0
    for name, box in photos:
        started = time.perf_counter()
        full = decode_full(folder / name, box, size)
        full_s += time.perf_counter() - started
        started = time.perf_counter()
        draft = decode_draft(folder / name, box, size)
        draft_s += time.perf_counter() - started
        diffs.append(np.abs(full.astype(np.int16) - draft.astype(np.int16)).ravel())
    d = np.concatenate(diffs)
    result = {"size": size, "photos": len(photos), "mean_abs": float(d.mean()),
              "p99_9_abs": float(np.percentile(d, 99.9)), "max_abs": int(d.max()), "speedup": full_s / draft_s,
              "tolerance": DRAFT_TOLERANCE}
    result["within_tolerance"] = all(result[k] <= v for k, v in DRAFT_TOLERANCE.items())
    return result


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------
def device_name() -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", f"cpu-{platform.machine()}").strip("-").lower()


def environment() -> dict:
    import PIL
    import torch

    return {"torch": torch.__version__, "python": platform.python_version(), "pillow": PIL.__version__,
            "numpy": np.__version__, "cpu": platform.processor() or platform.machine(), "cpu_count": os.cpu_count(),
            "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()}


def print_row(row: dict) -> None:
    growth = row["peak_rss_growth_mib"]
    file_gb = f"{row['file_gb']:.3f}" if "file_gb" in row else "-"
    check = f"{row['open_check_s']:.2f}" if "open_check_s" in row else "-"
    print(f"{row['images']:>8} {row['mode']:>10} {row['seconds']:>9.1f} {row['ms_per_image']:>9.2f} "
          f"{growth if growth is None else f'{growth:.0f}':>10} {file_gb:>9} {check:>8}", flush=True)


def summary(result: dict) -> dict:
    """Per-image figures of the largest streamed build, extrapolated to AffectNet's training split."""
    streamed = [r for r in result["rows"] if r["mode"] == "streamed"]
    if not streamed:
        return {}
    big = max(streamed, key=lambda r: r["images"])
    side = result["cache_size"]
    return {"affectnet_train_images": AFFECTNET_TRAIN,
            "affectnet_file_gb": AFFECTNET_TRAIN * side * side * 3 / 1e9,
            "affectnet_build_min_at_measured_rate": AFFECTNET_TRAIN * big["ms_per_image"] / 6e4,
            "streamed_peak_rss_growth_mib_max": max(r["peak_rss_growth_mib"] or 0 for r in streamed),
            "in_memory_would_need_gb": AFFECTNET_TRAIN * side * side * 3 / 1e9}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="200 and 800 images at 112 px (about a minute on 2 cores)")
    ap.add_argument("--images", type=int, nargs="+", help="set sizes N (default 1000 4000; quick 200 800)")
    ap.add_argument("--cache-size", type=int, help="side of the cached images (default 224; quick 112)")
    ap.add_argument("--in-memory-up-to", type=int, default=4000,
                    help="build in memory (for comparison) only up to this N (default 4000)")
    ap.add_argument("--workers", type=int, help="decoding threads (default: every core)")
    ap.add_argument("--photos", type=int, default=DISTINCT_PHOTOS, help="distinct photos the rows reuse (default 64)")
    ap.add_argument("--out", help="JSON path (default: cache_bench-<device>[-quick].json in the results folder)")
    result_files.add_arguments(ap)
    ap.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        root, cache_dir, mode, size, workers = args.child
        print(json.dumps(build_in_this_process(root, cache_dir, mode, int(size), int(workers) or None)))
        return None

    sizes = args.images or ([200, 800] if args.quick else [1000, 4000])
    side = args.cache_size or (112 if args.quick else 224)
    stem = f"cache_bench-{device_name()}{'-quick' if args.quick else ''}"
    out = Path(args.out) if args.out else result_files.output_dir(args, result_files.slug(device_name())) / f"{stem}.json"
    from nla_fast import atomic

    result = {"benchmark": "cache_bench", "device": device_name(), "quick": args.quick, **environment(),
              "date": time.strftime("%Y-%m-%d"), "cache_size": side, "distinct_photos": args.photos,
              "rows": [], "jpeg_draft": None, "summary": {}}
    started = time.perf_counter()
    print(f"cache_bench  {result['cpu']} ({result['usable_cores']} cores)  torch {result['torch']}  "
          f"pillow {result['pillow']}  cache {side}x{side} px")
    print(f"{'images':>8} {'mode':>10} {'seconds':>9} {'ms/image':>9} {'peak MiB':>10} {'file GB':>9} {'check s':>8}")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp) / "affectnet"
        photos = write_photos(root / "Manually_Annotated_Images", args.photos)
        for n in sorted(sizes):
            write_training_csv(root, photos, n)
            modes = ["streamed"] + (["in-memory"] if n <= args.in_memory_up_to else [])
            for mode in modes:
                cache_dir = Path(tmp) / f"cache-{n}-{mode}"
                row = measure(root, cache_dir, mode, side, args.workers)
                result["rows"].append(row)
                print_row(row)
                result["summary"] = summary(result)
                result["wall_s"] = time.perf_counter() - started
                atomic.write_text(out, json.dumps(result, indent=2))  # after each row: a cut run keeps its rows
                for file in cache_dir.glob("*"):
                    file.unlink()  # free the disk before the next, larger build
        result["jpeg_draft"] = draft_check(root / "Manually_Annotated_Images", photos, side)
    draft = result["jpeg_draft"]
    print(f"JPEG draft decoding vs full decode at {side} px ({draft['photos']} photos): mean |diff| "
          f"{draft['mean_abs']:.2f}, 99.9th percentile {draft['p99_9_abs']:.0f}, max {draft['max_abs']} levels; "
          f"{draft['speedup']:.2f}x faster; tolerance {DRAFT_TOLERANCE}: "
          f"{'within: usable' if draft['within_tolerance'] else 'exceeded: not used'}")
    for key, value in result["summary"].items():
        print(f"{key:<44}{value:>12.4g}")
    result["wall_s"] = time.perf_counter() - started
    atomic.write_text(out, json.dumps(result, indent=2))
    print(f"wrote {out}  ({result['wall_s']:.0f} s)")
    return result


if __name__ == "__main__":
    main()
