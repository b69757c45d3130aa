#!/usr/bin/env python3
"""Data pipeline benchmark: batched on-device augmentation vs the reference-style loader.

Reference style (as the NLA/EAC code): JPEG files in RAF-DB layout, a ``Dataset`` that
decodes each file with PIL, adds Gaussian noise with p=0.5 in numpy, then torchvision
``ToPILImage, Resize(224), ToTensor, Normalize, RandomHorizontalFlip, RandomErasing`` and a
flipped second view, through a ``DataLoader`` with 4 and 12 workers (copied to the device
as the reference training loop does).

Ours: the split decoded once into a uint8 tensor on the device, a random batch gathered
with ``index_select`` and :class:`nla_fast.augment.TrainAugment` (both views), eager and,
on CUDA, captured in a CUDA graph.

On CUDA it also times one ResNet-18 training step at batch 32 (two views, bf16 autocast,
channels_last, Adam; eager and CUDA-graph captured) to express the augmentation cost as a
fraction of a step, and measures the device memory of the RAF-DB cache. A "sample" is one
image and its flipped view. Every figure is the median of several timed windows.

    python bench/data_bench.py            # full run (CUDA if present, and CPU)
    python bench/data_bench.py --quick    # small CPU-only run (< 30 s), used by the tests

Writes a table to stdout and JSON to data_bench[_quick].json under bench/out/ (not tracked;
``--save``: bench/results/<date>-<device>/; ``--out-dir`` or ``--out FILE`` elsewhere),
rewritten after every figure, so a run cut short keeps what it measured.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from nla_fast import atomic  # noqa: E402
from nla_fast.augment import MEAN, STD, TrainAugment  # noqa: E402
from nla_fast.data import load_dataset  # noqa: E402
from nla_fast.data.fixtures import make_rafdb_tree  # noqa: E402
from nla_fast.engine import make_optimizer  # noqa: E402
from nla_fast.model import build_resnet18  # noqa: E402
from nla_fast.threads import use_cpu_threads  # noqa: E402

sys.path.insert(0, str(ROOT / "bench"))
import result_files  # noqa: E402
from timing import capture_cuda_graph, seconds_per_call  # noqa: E402

RAF_TRAIN, RAF_TEST = 12271, 3068


# ----------------------------------------------------------------------------- reference style
def add_g(image_array, mean=0.0, var=30):
    std = var ** 0.5
    image_add = image_array + np.random.normal(mean, std, image_array.shape)
    return np.clip(image_add, 0, 255).astype(np.uint8)


class RefRafDataset(torch.utils.data.Dataset):
    """The reference code's RAF-DB dataset (PIL decode instead of cv2)."""

    def __init__(self, root, image_size=224):
        from torchvision import transforms

        self.items = []
        with open(Path(root) / "EmoLabel" / "list_patition_label.txt") as f:
            for line in f:
                name, lab = line.split()
                if name.startswith("train"):
                    stem = name.rsplit(".", 1)[0]
                    self.items.append((Path(root) / "Image" / "aligned" / f"{stem}_aligned.jpg", int(lab) - 1))
        self.transform = transforms.Compose([
            transforms.ToPILImage(),
            transforms.Resize((image_size, image_size)),
            transforms.ToTensor(),
            transforms.Normalize(mean=MEAN, std=STD),
            transforms.RandomHorizontalFlip(),
            transforms.RandomErasing(scale=(0.02, 0.3)),
        ])
        self.flip = transforms.RandomHorizontalFlip(p=1)

    def __len__(self):
        return len(self.items)

    def __getitem__(self, idx):
        from PIL import Image

        path, label = self.items[idx]
        image = np.asarray(Image.open(path).convert("RGB"))
        if random.uniform(0, 1) > 0.5:
            image = add_g(image)
        image = self.transform(image)
        return image, label, self.flip(image)


def _seed_worker(worker_id):
    s = torch.initial_seed() % 2**32
    np.random.seed(s)
    random.seed(s)


def bench_dataloader(root, workers, device, batch, windows, image_size):
    ds = RefRafDataset(root, image_size)
    loader = torch.utils.data.DataLoader(
        ds, batch_size=batch, shuffle=True, num_workers=workers, pin_memory=device.type == "cuda",
        drop_last=True, worker_init_fn=_seed_worker, persistent_workers=workers > 0,
    )
    rates = []
    for w in range(windows + 1):  # the first epoch warms the workers up and is not counted
        t0 = time.perf_counter()
        n = 0
        for img, lab, img1 in loader:
            img, img1, lab = (t.to(device, non_blocking=True) for t in (img, img1, lab))
            n += img.shape[0]
        if device.type == "cuda":
            torch.cuda.synchronize()
        if w:
            rates.append(n / (time.perf_counter() - t0))
    del loader
    return statistics.median(rates)


# ----------------------------------------------------------------------------- ours
def bench_ours(images, device, batch, steps, windows, image_size, graph=False):
    g = torch.Generator(device=device).manual_seed(0)
    if graph and not hasattr(torch.cuda.CUDAGraph, "register_generator_state"):
        g = None  # older torch: only the default generator is graph-safe
    aug = TrainAugment(image_size)
    n = images.shape[0]

    def step():
        idx = torch.randint(0, n, (batch,), device=device, generator=g)
        return aug(images.index_select(0, idx), g)

    for _ in range(1 if device.type == "cpu" else 3):
        step()
    run = step
    if graph:
        run = capture_cuda_graph(step, warmup=3, generator=g).replay
        run()
    ms = statistics.median(seconds_per_call(run, device, windows, steps)) * 1e3
    return {"ms_per_batch": ms, "samples_per_s": batch / ms * 1e3}


def bench_train_step(device, batch, image_size, steps, windows):
    """One ResNet-18 step on two views (bf16 autocast, channels_last, the trainer's Adam): eager and graphed."""
    out = {}
    for mode in ("eager", "graph"):
        torch.manual_seed(0)
        model = build_resnet18(7).to(device).to(memory_format=torch.channels_last)
        opt = make_optimizer(model, 1e-4, 1e-4, device, capturable=(mode == "graph"))
        x = torch.randn(2 * batch, 3, image_size, image_size, device=device).contiguous(memory_format=torch.channels_last)
        y = torch.randint(0, 7, (2 * batch,), device=device)

        def step():
            with torch.autocast("cuda", dtype=torch.bfloat16, cache_enabled=False):
                loss = torch.nn.functional.cross_entropy(model(x), y)
            loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=False)

        run = step
        if mode == "graph":
            try:
                run = capture_cuda_graph(step, warmup=5).replay
            except Exception as err:  # keep the benchmark going; report why
                out["graph_error"] = f"{type(err).__name__}: {err}"
                continue
        else:
            for _ in range(5):
                step()
        times = seconds_per_call(run, device, windows, steps)
        out[f"{mode}_ms"] = statistics.median(times) * 1e3
        del model, opt
    return out


def cache_memory(device, shape):
    before = torch.cuda.memory_allocated(device)
    t = torch.empty(shape, dtype=torch.uint8, device=device)
    used = torch.cuda.memory_allocated(device) - before
    del t
    return used


# ----------------------------------------------------------------------------- main
def targets(fig: dict, device_types: list[str], workers: list[int], batch: int) -> dict:
    """Ratios inside this run, from whichever figures are measured so far."""
    t = {}
    for tag in device_types:
        loaders = [fig[k] for k in (f"{tag}_dataloader_w{w}_samples_per_s" for w in workers) if k in fig]
        ours = fig.get(f"{tag}_ours_b{batch}_samples_per_s")
        if loaders and ours:
            t[f"{tag}_speedup_vs_best_dataloader"] = ours / max(loaders)
    if "cuda_speedup_vs_best_dataloader" in t:
        t["cuda_speedup_vs_best_dataloader_ge_20x"] = t["cuda_speedup_vs_best_dataloader"] >= 20
    eager_aug, graph_aug = fig.get(f"cuda_ours_b{batch}_ms_per_batch"), fig.get(f"cuda_ours_graph_b{batch}_ms_per_batch")
    eager_step, graph_step = fig.get(f"cuda_train_step_b{batch}_eager_ms"), fig.get(f"cuda_train_step_b{batch}_graph_ms")
    if eager_aug and eager_step:
        t["cuda_aug_fraction_of_eager_step"] = eager_aug / eager_step
    if graph_aug and graph_step:
        t["cuda_graph_aug_fraction_of_graph_step"] = graph_aug / graph_step
        t["cuda_eager_aug_fraction_of_graph_step"] = eager_aug / graph_step
        t["cuda_aug_under_10pct_of_step"] = t["cuda_graph_aug_fraction_of_graph_step"] < 0.10
    if "cuda_rafdb_cache_bytes_measured" in fig:
        t["cuda_rafdb_cache_le_0.5GB"] = fig["cuda_rafdb_cache_bytes_measured"] <= 0.5e9
    return t


def measure_device(device, ds, root: Path, args, workers, fig: dict, save) -> None:
    """Every figure of one device into ``fig``; ``save()`` after each."""
    tag = device.type
    quick = args.quick
    images = ds.images.to(device)
    for w in workers:
        fig[f"{tag}_dataloader_w{w}_samples_per_s"] = bench_dataloader(
            root, w, device, args.batch, 2 if device.type == "cuda" else 1, args.image_size)
        save()
    steps, windows = (2, 3) if quick else ((50, 7) if device.type == "cuda" else (5, 5))
    for b in sorted({args.batch, 256} if not quick else {args.batch}):
        r = bench_ours(images, device, b, steps if b == args.batch else max(3, steps // 4), windows, args.image_size)
        fig[f"{tag}_ours_b{b}_samples_per_s"] = r["samples_per_s"]
        fig[f"{tag}_ours_b{b}_ms_per_batch"] = r["ms_per_batch"]
        save()
    if device.type == "cuda":
        r = bench_ours(images, device, args.batch, 200, windows, args.image_size, graph=True)
        fig[f"cuda_ours_graph_b{args.batch}_samples_per_s"] = r["samples_per_s"]
        fig[f"cuda_ours_graph_b{args.batch}_ms_per_batch"] = r["ms_per_batch"]
        save()
        step = bench_train_step(device, args.batch, args.image_size, 30, 5)
        for k, v in step.items():
            fig[f"cuda_train_step_b{args.batch}_{k}"] = v
        fig["cuda_rafdb_cache_bytes_computed"] = (RAF_TRAIN + RAF_TEST) * 100 * 100 * 3
        fig["cuda_rafdb_cache_bytes_measured"] = cache_memory(device, (RAF_TRAIN + RAF_TEST, 100, 100, 3))
        save()
    del images


def print_table(results: dict, args, n_images: int) -> None:
    print(f"data_bench  device={results['device']}  torch={results['torch']}  "
          f"image={args.image_size}  batch={args.batch}  jpegs={n_images}{'  (quick)' if args.quick else ''}")
    print(f"{'figure':<48}{'median':>14}")
    for k, v in results["figures"].items():
        print(f"{k:<48}{v:>14.4g}" if isinstance(v, float) else f"{k:<48}{v:>14}")
    print(f"{'target':<48}{'value':>14}")
    for k, v in results["targets"].items():
        print(f"{k:<48}{v!s:>14}" if isinstance(v, bool) else f"{k:<48}{v:>14.4g}")


def environment() -> dict:
    out = {"torch": torch.__version__, "python": platform.python_version(), "cpu_count": os.cpu_count()}
    for name in ("torchvision", "triton"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--quick", action="store_true", help="small CPU-only run (< 30 s)")
    ap.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    ap.add_argument("--n-images", type=int, default=None, help="JPEGs written for the benchmark (default 2000; quick 64)")
    ap.add_argument("--workers", type=int, nargs="+", default=None, help="DataLoader workers (default 4 12; quick 2)")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--image-size", type=int, default=None, help="default 224 (quick: 112)")
    ap.add_argument("--out", default=None, help="the JSON file (default: data_bench[_quick].json in the results folder)")
    result_files.add_arguments(ap)
    args = ap.parse_args(argv)

    quick = args.quick
    args.image_size = args.image_size or (112 if quick else 224)
    n_images = args.n_images or (64 if quick else 2000)
    workers = args.workers or ([2] if quick else [4, 12])
    devices = []
    if args.device in ("auto", "cuda") and torch.cuda.is_available() and not quick:
        devices.append(torch.device("cuda"))
    if args.device in ("auto", "cpu") or quick or not devices:
        devices.append(torch.device("cpu"))
    device_name = torch.cuda.get_device_name(0) if devices[0].type == "cuda" else f"cpu-{platform.machine()}"
    out_path = Path(args.out) if args.out else (result_files.output_dir(args, result_files.slug(device_name))
                                                / ("data_bench_quick.json" if quick else "data_bench.json"))

    t_start = time.perf_counter()
    results = {
        "benchmark": "data_bench", "quick": quick,
        "device": torch.cuda.get_device_name(0) if devices[0].type == "cuda" else platform.processor() or platform.machine(),
        **environment(), "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        "image_size": args.image_size, "batch": args.batch, "n_images": n_images, "figures": {}, "targets": {},
    }
    fig = results["figures"]

    def save():  # after every figure: a run cut short keeps what it measured
        results["targets"] = targets(fig, [d.type for d in devices], workers, args.batch)
        results["wall_s"] = time.perf_counter() - t_start
        atomic.write_text(out_path, json.dumps(results, indent=2))

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        make_rafdb_tree(Path(tmp) / "raf", n_train=n_images, n_test=0, size=100, seed=0)
        fig["write_jpegs_s"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        ds = load_dataset("rafdb", Path(tmp) / "raf", "train", cache_dir=Path(tmp) / "cache", verbose=False)
        fig["decode_cache_images_per_s"] = n_images / (time.perf_counter() - t0)
        save()
        for device in devices:
            measure_device(device, ds, Path(tmp) / "raf", args, workers, fig, save)
    save()
    print_table(results, args, n_images)
    print(f"wrote {out_path}  ({results['wall_s']:.1f} s)")
    return results


if __name__ == "__main__":
    use_cpu_threads()  # a shared host's cores, not oversubscribed (nla_fast.threads)
    main()
