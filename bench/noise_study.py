"""Label-noise study on the embedded synthetic set: cross-entropy against NLA at 0-30 % flipped labels.

    python bench/noise_study.py            # on a GPU: 3 losses x 4 noise rates x 2 seeds, < 8 min on an H200
    python bench/noise_study.py --quick    # CPU smoke run: tiny images, few samples and epochs (a few minutes)

The paper reports RAF-DB with 10/20/30 % of the training labels flipped; RAF-DB is licensed,
so this produces the same kind of table on data anyone has. For each noise rate in
``--rates`` and each loss in ``--losses`` (``ce``: plain cross-entropy; ``nla-paper``,
``nla-official``: NLA with the paper's / the public code's constants) it trains one run per
seed in ``--seeds``. Seed k draws the noisy labels (``--noise-rate r --noise-seed k``, the
trainer's own protocol: each label replaced with probability r by a uniformly drawn other
class) and seeds the run (initialisation, order, augmentation), so the losses see the same
labels and the same start. The data is loaded (and cached on disk) once; each run reuses the
trainer's phases in this process (``nla_fast.train``: set_up, place_data, build, then per
epoch train_epoch, evaluate_epoch, record).

Per run it records the realised noise rate, the test accuracy and mean class accuracy of
every epoch (the table reports the last epoch: no model selection on the test split), and
per epoch the mean NAW weight of the training samples whose label was flipped and of those
whose label was kept (plus the kept samples that the set renders as blends of two
expressions, its known ambiguous ones). The weight of each sample is computed from its
(p_gt, p_nn) that epoch (``RunningTotals.points``, under the noisy label, as the step saw
it) with the epoch's eps and the run's constants (``naw_weight_from_probs``). ``ce`` runs
get the weight NLA would have assigned (paper constants); their loss does not use it.

Writes ``bench/results/noise_study-<device>[-quick].json``, ``.md`` (the table: mean and
sample standard deviation over seeds), ``.png`` (accuracy against noise rate per loss) and
``-naw.png`` (NAW weight of flipped and kept samples per epoch), and copies under ``$OUT``
when it is set.

How the GPU defaults are sized (``FULL``): 5,000 training faces (1,250 test) at 64 px,
15 epochs of batch 32 (156 steps), lr 1e-3 (no pre-trained backbone: the synthetic demo's
rate), i.e. 75,000 training samples per run. Budgeted at 5,000 samples/s, the captured
step's rate at 224 px on an H200 (SPEC 3; 64 px is not slower): an nla run trains in
~15 s, a ce run (one view) in ~8 s; with ~3 s per run for the model, warm-up, graph capture
and 15 evaluations, 24 runs take ~16x15 + 8x8 + 24x3 = ~380 s, plus rendering the data once
(~6,250 faces, well under a minute on 16 cores): under 8 minutes. ``QUICK``: 256 faces at
16 px, batch 64, 3 epochs: 24 runs took 327-506 s on 2 CPU cores shared with other jobs (one
intra-op thread: tiny convolutions gain nothing from more).
"""
from __future__ import annotations

import argparse
import copy
import dataclasses
import gc
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
from loss_bench import device_slug, versions  # noqa: E402

from nla_fast import atomic, train  # noqa: E402
from nla_fast.data.protocols import symmetric_noise  # noqa: E402
from nla_fast.placement import EpochShard  # noqa: E402
from nla_fast.reference import naw_weight_from_probs  # noqa: E402
from nla_fast.device import pick_device  # noqa: E402
from nla_fast.settings import TrainSettings  # noqa: E402

RESULTS = BENCH / "results"
RATES = (0.0, 0.1, 0.2, 0.3)
# name -> (the trainer's --loss, --preset)
LOSSES = {"ce": ("ce", "paper"), "nla-paper": ("nla", "paper"), "nla-official": ("nla", "official")}


@dataclass(frozen=True)
class Plan:
    image_size: int
    num_samples: int  # training faces; the test split gets a quarter (data.splits.load_split)
    epochs: int
    batch_size: int
    lr: float


FULL = Plan(image_size=64, num_samples=5000, epochs=15, batch_size=32, lr=1e-3)
QUICK = Plan(image_size=16, num_samples=256, epochs=3, batch_size=64, lr=1e-3)


class _NeverStop:
    """train_epoch's Ctrl-C flag: a study has no checkpoint to save, so Ctrl-C simply aborts it."""

    requested = False


def run_settings(plan: Plan, device: str, loss: str, seed: int, out: str) -> TrainSettings:
    trainer_loss, preset = LOSSES[loss]
    # compile pinned off: every run builds a new network, and compiling it 24 times would cost
    # more than it saves on these small images (the captured CUDA graph is kept). The consistency
    # term is summed as published on every device (the CPU demo's own default averages it).
    return TrainSettings(dataset="synthetic", num_samples=plan.num_samples, image_size=plan.image_size,
                         epochs=plan.epochs, batch_size=plan.batch_size, lr=plan.lr, device=device, seed=seed,
                         loss=trainer_loss, preset=preset, out=out, progress=False, plot_every=0, compile=False,
                         consistency_reduction="sum")


def noisy_labels(clean: torch.Tensor, num_classes: int, rate: float, seed: int) -> torch.Tensor:
    """The labels ``--noise-rate rate --noise-seed seed`` gives the trainer (the same protocol call)."""
    return symmetric_noise(clean, num_classes, rate, seed) if rate > 0 else clean.clone()


def group_weights(parts, data, eps: float, flipped: torch.Tensor, ambiguous: torch.Tensor) -> dict:
    """Mean NAW weight of the epoch's flipped, kept and kept-ambiguous training samples, from
    each position's (p_gt, p_nn) in the epoch order (NaN rows: positions not trained)."""
    if isinstance(data.train, EpochShard):  # its epoch order holds shard positions, not sample indices
        raise RuntimeError("noise_study runs one process; an epoch shard has no sample indices")
    step = parts.step
    points = step.totals.points.float()
    samples = step.epoch_order  # sample index of each position (DeviceResident, HostStaged)
    trained = ~torch.isnan(points).any(dim=1)
    weights = naw_weight_from_probs(points[:, 0], points[:, 1], eps, parts.nla_config.constants)
    was_flipped = flipped.to(samples.device)[samples]
    was_ambiguous = ambiguous.to(samples.device)[samples]

    def mean(mask):
        mask = mask & trained
        count = int(mask.sum())
        return (float(weights[mask].double().mean()) if count else None), count

    out = {}
    out["naw_flipped"], out["n_flipped"] = mean(was_flipped)
    out["naw_kept"], out["n_kept"] = mean(~was_flipped)
    out["naw_kept_ambiguous"], out["n_kept_ambiguous"] = mean(~was_flipped & was_ambiguous)
    # checks of the position -> sample mapping and of the weights: the mean per (noisy) label
    # of these weights, and of the weights the step itself used (summed per label inside it)
    labels = data.train.labels[samples]
    out["naw_per_label"] = [mean(labels == k)[0] for k in range(len(data.classes))]
    out["naw_per_label_step"] = step.totals.naw_means()
    out["naw_all_step"] = float(step.totals.naw_sum.sum() / step.totals.naw_count.sum().clamp(min=1))
    return out


def train_one(settings: TrainSettings, train_set, test_set, labels: torch.Tensor, flipped: torch.Tensor,
              ambiguous: torch.Tensor, verbose: bool) -> dict:
    """One run through the trainer's phases; per-epoch metrics and NAW weights by group."""
    closers: list = []  # what set_up opened (process group, run-folder lock), closed in reverse
    try:
        run = train.set_up(settings, None, frozenset(), closers)
        if not verbose:
            run.say = lambda *args, **kwargs: None
        noisy = copy.copy(train_set)  # shares the images; only the labels differ between runs
        noisy.labels = labels
        data = train.place_data(run, noisy, test_set)
        parts = train.build(run, data)
        progress = train.restore(run, parts)
        epochs = []
        t0 = time.perf_counter()
        for epoch in range(run.s.epochs):
            trained = train.train_epoch(run, data, parts, progress, epoch, _NeverStop())
            test, valid, eval_seconds = train.evaluate_epoch(run, data, parts)
            train.record(run, data, parts, progress, epoch, trained, test, eval_seconds, valid)
            row = progress.history[-1]
            epochs.append({"epoch": epoch, "eps": trained.eps, "lr": trained.lr, "train_loss": row["train_loss"],
                           "train_acc": row["train_acc"], "test_acc": test["acc"], "test_mean_acc": test["mean_acc"],
                           "samples_per_s": row["samples_per_s"],
                           **group_weights(parts, data, trained.eps, flipped, ambiguous)})
        return {"epochs": epochs, "seconds": time.perf_counter() - t0, "mode": parts.step.mode,
                "test_acc": epochs[-1]["test_acc"], "test_mean_acc": epochs[-1]["test_mean_acc"],
                "best_test_acc": progress.best["acc"], "best_test_mean_acc": progress.best["mean_acc"]}
    finally:
        for close in reversed(closers):
            close()


def run_study(plan: Plan, device: str, rates, losses, seeds, log, verbose: bool = False) -> dict:
    runs = []
    base = run_settings(plan, device, losses[0], seeds[0], out="unused")
    t_data = time.perf_counter()
    train_set, test_set = train.load_run_split(base, "train"), train.load_run_split(base, "test")  # loaded once, clean labels
    torch_device = pick_device(device)
    if torch_device.type == "cuda":  # on the device once; every run's placement then reuses them
        train_set.images, test_set.images = train_set.images.to(torch_device), test_set.images.to(torch_device)
    data_seconds = time.perf_counter() - t_data
    num_classes = len(train_set.classes)
    ambiguous = (train_set.soft_labels.max(dim=1).values < 1) if train_set.soft_labels is not None \
        else torch.zeros(len(train_set.labels), dtype=torch.bool)
    log(f"data: {len(train_set.labels)} train / {len(test_set.labels)} test faces, "
        f"{int(ambiguous.sum())} training faces blended (ambiguous), ready in {data_seconds:.1f} s")
    with tempfile.TemporaryDirectory(prefix="nla_noise_study_") as tmp:
        for rate in rates:
            for seed in seeds:
                labels = noisy_labels(train_set.clean_labels, num_classes, rate, seed)
                flipped = labels != train_set.clean_labels
                for loss in losses:
                    out = str(Path(tmp) / f"{loss}-{rate:g}-{seed}")
                    result = train_one(run_settings(plan, device, loss, seed, out), train_set, test_set, labels,
                                       flipped, ambiguous, verbose)
                    last = result["epochs"][-1]
                    runs.append({"loss": loss, "noise_rate": rate, "seed": seed,
                                 "realised_noise_rate": float(flipped.float().mean()),
                                 "flipped": int(flipped.sum()), **result})
                    log(f"noise {rate:.0%} (realised {runs[-1]['realised_noise_rate']:.3f}) {loss:<12} seed {seed}: "
                        f"test acc {100 * last['test_acc']:.2f}%, mean {100 * last['test_mean_acc']:.2f}%; "
                        f"NAW flipped {_fmt(last['naw_flipped'])} kept {_fmt(last['naw_kept'])}; "
                        f"{result['seconds']:.1f} s ({result['mode']})")
                    gc.collect()
                    if torch_device.type == "cuda":
                        torch.cuda.empty_cache()  # the finished run's graph pool and activations
    dev = torch_device
    return {"benchmark": "noise_study", "device": device_slug(dev),
            "device_name": torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
            "versions": versions(), "plan": dataclasses.asdict(plan),
            "num_train": len(train_set.labels), "num_test": len(test_set.labels),
            "rates": list(rates), "losses": list(losses), "seeds": list(seeds), "data_seconds": data_seconds,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"), "runs": runs, "cells": summarise(runs)}


def _mean_sd(values):
    values = [v for v in values if v is not None]
    if not values:
        return None, None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def summarise(runs: list[dict]) -> list[dict]:
    """One cell per (noise rate, loss): mean and sample standard deviation over the seeds of the
    last epoch's accuracies and realised noise, and the per-epoch NAW series averaged over seeds."""
    cells = {}
    for r in runs:
        cells.setdefault((r["noise_rate"], r["loss"]), []).append(r)
    out = []
    for (rate, loss), group in cells.items():
        cell = {"noise_rate": rate, "loss": loss, "seeds": [r["seed"] for r in group]}
        for key in ("test_acc", "test_mean_acc", "realised_noise_rate"):
            cell[key], cell[key + "_sd"] = _mean_sd([r[key] for r in group])
        for key in ("naw_flipped", "naw_kept", "naw_kept_ambiguous"):
            per_epoch = zip(*[[e[key] for e in r["epochs"]] for r in group])
            cell[key + "_per_epoch"] = [_mean_sd(values)[0] for values in per_epoch]
        out.append(cell)
    return out


def _fmt(value, digits=3):
    return "-" if value is None else f"{value:.{digits}f}"


def _pct(mean, sd):
    return f"{100 * mean:.1f} ± {100 * sd:.1f}"


def markdown(result) -> str:
    v, p = result["versions"], result["plan"]
    n_seeds = len(result["seeds"])
    lines = [
        f"Noise study on {result['device_name']} ({result['time']}; torch {v['torch']}, python {v['python']}"
        + (f", triton {v['triton']}" if v.get("triton") else "") + ")"
        + (" — **tiny CPU smoke run (`--quick`)**" if result["quick"] else ""),
        f"synthetic set, {result['num_train']} train / {result['num_test']} test faces at {p['image_size']} px, "
        f"{p['epochs']} epochs, batch {p['batch_size']}, lr {p['lr']:g}, random init; "
        f"last epoch, mean ± sd over {n_seeds} seed(s) {result['seeds']}",
        "",
        "| noise (asked) | realised | loss | test acc % | mean class acc % | NAW flipped / kept (last epoch) |",
        "|---|---|---|---|---|---|",
    ]
    for c in result["cells"]:
        lines.append(f"| {c['noise_rate']:.0%} | {c['realised_noise_rate']:.3f} | {c['loss']} | "
                     f"{_pct(c['test_acc'], c['test_acc_sd'])} | {_pct(c['test_mean_acc'], c['test_mean_acc_sd'])} | "
                     f"{_fmt(c['naw_flipped_per_epoch'][-1])} / {_fmt(c['naw_kept_per_epoch'][-1])} |")
    return "\n".join(lines) + "\n"


def plot_accuracy(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4), sharex=True)
    for ax, key, title in ((axes[0], "test_acc", "test accuracy"), (axes[1], "test_mean_acc", "mean class accuracy")):
        for loss in result["losses"]:
            cells = sorted((c for c in result["cells"] if c["loss"] == loss), key=lambda c: c["noise_rate"])
            ax.errorbar([100 * c["noise_rate"] for c in cells], [100 * c[key] for c in cells],
                        yerr=[100 * c[key + "_sd"] for c in cells], marker="o", capsize=3, label=loss)
        ax.set_xlabel("training labels flipped (%)")
        ax.set_ylabel(f"{title} (%)")
        ax.set_title(title)
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.suptitle(f"noise study, {result['device_name']}{' (--quick)' if result['quick'] else ''}, "
                 f"last epoch, mean ± sd over {len(result['seeds'])} seed(s)")
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120)
    plt.close(fig)


def plot_naw(result, path: Path) -> None:
    """Per noise rate above 0: mean NAW weight of flipped (solid) and kept (dashed) samples per epoch."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    rates = [r for r in result["rates"] if r > 0] or list(result["rates"])
    fig, axes = plt.subplots(1, len(rates), figsize=(max(7.0, 4.5 * len(rates)), 4), squeeze=False, sharey=True)
    colours = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, rate in zip(axes[0], rates):
        for index, loss in enumerate(result["losses"]):
            cell = next(c for c in result["cells"] if c["loss"] == loss and c["noise_rate"] == rate)
            for key, style, what in (("naw_flipped", "-", "flipped"), ("naw_kept", "--", "kept")):
                series = cell[key + "_per_epoch"]
                epochs = [e for e, value in enumerate(series) if value is not None]
                ax.plot(epochs, [series[e] for e in epochs], style, color=colours[index % len(colours)],
                        marker="o", markersize=3, label=f"{loss}, {what}")
        ax.set_title(f"{rate:.0%} of labels flipped")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("mean NAW weight w")
    axes[0][0].legend(fontsize=7)
    fig.suptitle(f"mean NAW weight of flipped vs kept training labels, {result['device_name']}"
                 f"{' (--quick)' if result['quick'] else ''}\n(ce runs: the weight NLA would assign)", fontsize=10)
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120)
    plt.close(fig)


def _list(kind):
    def parse(text):
        try:
            return [kind(item) for item in text.split(",") if item.strip()]
        except ValueError as err:
            raise argparse.ArgumentTypeError(f"expected a comma-separated list, got {text!r} ({err})") from None
    return parse


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run: tiny images, few samples and epochs")
    parser.add_argument("--device", default="auto", choices=("auto", "cuda", "cpu"))
    parser.add_argument("--seeds", type=int, default=2, help="runs per cell, seeds 0..N-1 (labels and run)")
    parser.add_argument("--rates", type=_list(float), default=list(RATES), help="noise rates, e.g. 0,0.1,0.2,0.3")
    parser.add_argument("--losses", type=_list(str), default=list(LOSSES), help=f"among {', '.join(LOSSES)}")
    parser.add_argument("--epochs", type=int, help="override the plan's epochs")
    parser.add_argument("--num-samples", type=int, help="override the plan's training faces")
    parser.add_argument("--image-size", type=int, help="override the plan's image size")
    parser.add_argument("--out-dir", type=Path, default=RESULTS)
    parser.add_argument("--verbose", action="store_true", help="print every epoch of every run")
    args = parser.parse_args(argv)
    unknown = [loss for loss in args.losses if loss not in LOSSES]
    if unknown or not args.losses:
        parser.error(f"--losses: unknown {unknown or 'empty list'}; choose among {', '.join(LOSSES)}")
    bad = [r for r in args.rates if not 0 <= r < 1]
    if bad or not args.rates:
        parser.error(f"--rates: each rate must lie in [0, 1), got {args.rates}")
    if args.seeds < 1:
        parser.error(f"--seeds must be at least 1, got {args.seeds}")
    plan = QUICK if args.quick else FULL
    overrides = {k: v for k, v in (("epochs", args.epochs), ("num_samples", args.num_samples),
                                   ("image_size", args.image_size)) if v is not None}
    if overrides:
        plan = dataclasses.replace(plan, **overrides)
    threads = torch.get_num_threads()
    if args.quick and pick_device(args.device).type == "cpu":
        # tiny convolutions gain nothing from more threads, and spinning ones stall a busy machine
        torch.set_num_threads(1)
    t0 = time.perf_counter()
    try:
        result = run_study(plan, args.device, args.rates, args.losses, list(range(args.seeds)),
                           lambda msg: print(f"[noise_study] {msg}", flush=True), verbose=args.verbose)
    finally:
        torch.set_num_threads(threads)
    result.update(quick=args.quick, total_seconds=time.perf_counter() - t0)
    stem = f"noise_study-{result['device']}{'-quick' if args.quick else ''}"
    table = markdown(result)
    out_dirs = [args.out_dir] + ([Path(os.environ["OUT"])] if os.environ.get("OUT") else [])
    for out in out_dirs:
        out.mkdir(parents=True, exist_ok=True)
        atomic.write_text(out / f"{stem}.json", json.dumps(result, indent=2, allow_nan=False) + "\n")
        atomic.write_text(out / f"{stem}.md", table)
        plot_accuracy(result, out / f"{stem}.png")
        plot_naw(result, out / f"{stem}-naw.png")
    print(table)
    print(f"[noise_study] {len(result['runs'])} runs in {result['total_seconds']:.0f} s; wrote "
          f"{args.out_dir / stem}.json, .md, .png, -naw.png")
    return result


if __name__ == "__main__":
    main()
