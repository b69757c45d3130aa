"""Training throughput ladder: from the reference-style loop to the captured step, in one run.

    python bench/train_bench.py            # on a GPU: the full ladder, batch 32, 224 px
    python bench/train_bench.py --quick    # CPU smoke run (< 1 min): tiny sizes, no graphs
    python bench/train_bench.py --rungs 0,6,7,8,5 --epochs 7   # what make gpu-check measures

Rungs (a sample = an image and its flip; samples/s = batch / median step time):
  0  reference-style loop: JPEGs in the RAF-DB layout, DataLoader (4 and 12 workers) + PIL
     transforms, two float32 forwards, the reference-style loss, .item()/.cpu() every step
  1  nla_fast step in float32 eager (one forward over both views, eager reference loss),
     fed by that DataLoader (4 workers)
  2  + dataset resident on the device, batched on-device augmentation
  3  + bf16 autocast and channels_last
  4  + the fused loss (backend auto)
  5  + the whole step captured as one CUDA graph (uncompiled: the trainer with --no-compile)
  6  ceiling: bare ResNet-18 forward+backward+Adam on device-resident random tensors of the
     same shapes (2 x batch images), bf16 channels_last, captured as one CUDA graph
  7  + torch.compile: forward, loss and statistics compiled by Inductor, inside the captured
     step (the trainer's default on CUDA); its first step (compilation) is reported apart
  8  compiled ceiling: rung 6 with torch.compile(model), captured as one CUDA graph
Adam is the trainer's (``--adam``, default fused and capturable) in rungs 5-8. Rungs 5, 7
and 8 need CUDA (skipped on the CPU, where Inductor's C++ compilation takes minutes).
Also one full epoch on RAF-DB-shaped data (12,271 train + 3,068 test with evaluation) for
rungs 0, 5 and 7 (``--epochs``) and the projected 60-epoch time (rung 7: compile time added
once, shown apart). ``--rungs`` picks the rungs and their order; ratios to a rung not measured
are left empty.

Step times are medians over blocks of steps (synchronised at each block's end), after warm-up.
Writes train_bench-<device>[-quick].json under bench/out/ (not tracked; ``--save``: the
reference copy in bench/results/<date>-<device>/; ``--out-dir`` elsewhere; copies under $OUT
when set), rewritten after every row, and a .png chart at the end; prints the table last.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import statistics
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH))
import result_files  # noqa: E402
import spec_targets  # noqa: E402
from loss_bench import device_slug, versions  # noqa: E402
from timing import capture_cuda_graph, seconds_per_call, sync  # noqa: E402
from reference_loop import (make_loader, make_model, reference_step, run_reference_epoch,  # noqa: E402
                            run_reference_eval)

from nla_fast import NLAConfig, atomic, nla_loss  # noqa: E402
from nla_fast.augment import EvalTransform  # noqa: E402
from nla_fast.data import load_dataset  # noqa: E402
from nla_fast.data.fixtures import make_rafdb_tree  # noqa: E402
from nla_fast.engine import (StepOptions, autocast_context, build_train_step, compile_function,  # noqa: E402
                             make_optimizer)
from nla_fast.model import build_resnet18  # noqa: E402
from nla_fast.placement import DeviceResident  # noqa: E402
from nla_fast.threads import use_cpu_threads  # noqa: E402

RAFDB_TRAIN, RAFDB_TEST = 12271, 3068
NUM_CLASSES = 7


@dataclass
class Plan:
    batch: int
    image_size: int
    warmup: int
    blocks: int
    block_steps: int
    workers: tuple
    epoch: bool
    source_images: int
    adam: str = "auto"  # make_optimizer's implementation, rungs 5-8
    compile_mode: str = "default"  # torch.compile mode of rungs 7-8
    quick: bool = False

    @property
    def timed_steps(self) -> int:
        return self.blocks * self.block_steps


FULL = Plan(batch=32, image_size=224, warmup=10, blocks=12, block_steps=10, workers=(4, 12), epoch=True,
            source_images=2000)
QUICK = Plan(batch=4, image_size=32, warmup=1, blocks=2, block_steps=1, workers=(0,), epoch=False,
             source_images=64, quick=True)


def time_blocks(step, plan: Plan, device) -> list[float]:
    """Seconds per step of each block of ``plan.block_steps`` steps, after ``plan.warmup`` steps."""
    for _ in range(plan.warmup):
        step()
    return seconds_per_call(step, device, plan.blocks, plan.block_steps)


def reset_memory(device):
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory_mb(device):
    return torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else None


def row(name, rung, per_step, batch, device, **extra):
    median = statistics.median(per_step)
    return {"rung": rung, "name": name, "median_step_ms": 1e3 * median, "samples_per_s": batch / median,
            "peak_memory_mb": peak_memory_mb(device), **extra}


# -- data ---------------------------------------------------------------------------------------
def rafdb_shaped_data(plan: Plan, root: Path):
    """A RAF-DB tree of RAF-DB's split sizes: ``plan.source_images`` synthetic 100x100 faces
    written by the data package's fixture writer, repeated by hard links (no encoding) up to
    12,271 train + 3,068 test files; the uint8 tensors are read back by the RAF-DB loader."""
    n_train = int(0.8 * plan.source_images)
    tree = make_rafdb_tree(root, n_train=n_train, n_test=plan.source_images - n_train, size=100, seed=0)
    if plan.epoch:
        repeat_rafdb_tree(root, tree, {"train": RAFDB_TRAIN, "test": RAFDB_TEST})
    splits = [load_dataset("rafdb", root, split, cache=False, verbose=False) for split in ("train", "test")]
    return splits[0].images, splits[0].labels, splits[1].images, splits[1].labels


def repeat_rafdb_tree(root: Path, tree: dict, sizes: dict) -> None:
    """Grow each split of a fixture tree to ``sizes[split]`` files by linking its images in turn."""
    aligned = root / "Image" / "aligned"
    lines = []
    for split, size in sizes.items():
        source = tree[split]
        for index in range(size):
            name, label = source[index % len(source)]
            if index >= len(source):
                target = aligned / f"{split}_{index + 1:05d}_aligned.jpg"
                try:
                    os.link(aligned / name.replace(".jpg", "_aligned.jpg"), target)
                except OSError:  # no hard links here: copy
                    shutil.copyfile(aligned / name.replace(".jpg", "_aligned.jpg"), target)
            lines.append(f"{split}_{index + 1:05d}.jpg {label}")
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")


def endless(loader):
    """Batches of the loader, epoch after epoch (the timed steps may outlast one pass)."""
    while True:
        yield from loader


# -- rungs --------------------------------------------------------------------------------------
def rung_reference(plan, device, root, workers):
    torch.manual_seed(0)
    loader = make_loader(root, "train", plan.image_size, plan.batch, workers, train=True)
    model = make_model(NUM_CLASSES, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    batches = endless(loader)

    def step():
        images, labels = next(batches)
        reference_step(model, optimizer, images, labels, 0.5, device)

    return time_blocks(step, plan, device)


def rung_dataloader_nla(plan, device, root):
    """Rung 1: the package's step maths (one concat forward, eager loss) on DataLoader batches."""
    torch.manual_seed(0)
    loader = make_loader(root, "train", plan.image_size, plan.batch, plan.workers[0], train=True)
    model = build_resnet18(NUM_CLASSES).to(device)
    optimizer = make_optimizer(model, 1e-4, 1e-4, device, capturable=False)
    eps = torch.tensor(0.5, device=device)
    batches = endless(loader)

    def step():
        images, labels = next(batches)
        images = images.to(device, non_blocking=True)
        labels = labels.to(device, non_blocking=True)
        logits, logits_flip = model(torch.cat([images, images.flip(3)])).chunk(2)
        loss = nla_loss(logits, logits_flip, labels, eps, backend="reference", validate=False)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    return time_blocks(step, plan, device)


def make_train_step(plan, device, images, labels, options: StepOptions, steps_per_epoch: int):
    """The trainer's step (``engine.build_train_step``) over images already on the device."""
    torch.manual_seed(0)
    model = build_resnet18(NUM_CLASSES).to(device)
    if options.channels_last:
        model = model.to(memory_format=torch.channels_last)
    step = build_train_step(model, DeviceResident(images, labels, device), options, image_size=plan.image_size,
                            lr=1e-4, weight_decay=1e-4, seed=0, nla_config=NLAConfig(), num_classes=NUM_CLASSES,
                            steps_per_epoch=steps_per_epoch, adam=plan.adam)
    return model, step


def epoch_order(num_samples, steps, batch, seed=0):
    g = torch.Generator().manual_seed(seed)
    reps = -(-steps * batch // num_samples)
    return torch.cat([torch.randperm(num_samples, generator=g) for _ in range(reps)])[: steps * batch]


def rung_device_step(plan, device, images, labels, options: StepOptions):
    steps = plan.warmup + plan.timed_steps
    _, step = make_train_step(plan, device, images, labels, options, steps)
    step.start_epoch(epoch_order(len(labels), steps, plan.batch).to(device), lr=1e-4, eps=0.5)
    per_step = time_blocks(step, plan, device)
    info = {"mode": step.mode, "compiled": step.compiled, "first_step_s": step.first_step_s}
    if step.note:
        info["note"] = step.note
    return per_step, info


def rung_ceiling(plan, device, compiled: bool = False):
    """Rung 6: bare ResNet-18 + Adam on random device tensors, one CUDA graph (eager on the CPU).
    Rung 8 (``compiled``): the same with ``torch.compile(model)`` inside the graph (the pattern
    of bench/results/2026-11-29-nvidia-h200/compile_ceiling.py). Returns (seconds per step, info)."""
    torch.manual_seed(0)
    model = build_resnet18(NUM_CLASSES).to(device).to(memory_format=torch.channels_last)
    on_cuda = device.type == "cuda"
    optimizer = make_optimizer(model, 1e-4, 1e-4, device, capturable=on_cuda, implementation=plan.adam)
    network = compile_function(model, plan.compile_mode) if compiled else model
    x = torch.randn(2 * plan.batch, 3, plan.image_size, plan.image_size, device=device)
    x = x.contiguous(memory_format=torch.channels_last)
    y = torch.randint(0, NUM_CLASSES, (2 * plan.batch,), device=device)

    def body():
        with autocast_context(device, "bf16"):
            loss = torch.nn.functional.cross_entropy(network(x).float(), y)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()

    if not on_cuda:
        return time_blocks(body, plan, device), {"mode": "eager"}
    t0 = time.perf_counter()
    graph = capture_cuda_graph(body, warmup=3)
    sync(device)
    prepare_s = time.perf_counter() - t0  # warm-up (compilation included) and capture
    return time_blocks(graph.replay, plan, device), {"mode": "cuda-graph", "compiled": compiled,
                                                     "prepare_s": prepare_s}


def epoch_reference(plan, device, root):
    torch.manual_seed(0)
    train_loader = make_loader(root, "train", plan.image_size, plan.batch, plan.workers[0], train=True)
    test_loader = make_loader(root, "test", plan.image_size, 256, plan.workers[0], train=False)
    model = make_model(NUM_CLASSES, device)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-4, weight_decay=1e-4)
    train_s, steps, _ = run_reference_epoch(model, optimizer, train_loader, 0.5, device)
    eval_s, _ = run_reference_eval(model, test_loader, device)
    return {"train_s": train_s, "eval_s": eval_s, "steps": steps}


def epoch_captured(plan, device, train, test, compile: bool = False):
    """One epoch of the trainer's step (uncompiled, rung 5, or compiled, rung 7) and its
    evaluation. Evaluation runs twice: the second is the steady cost, the difference is the
    compilation of the evaluation forward (once per run)."""
    images, labels = train
    steps = len(labels) // plan.batch  # full batches only, as the trainer
    options = StepOptions(batch_size=plan.batch, compile=compile, compile_mode=plan.compile_mode)
    model, step = make_train_step(plan, device, images, labels, options, steps)
    step.start_epoch(epoch_order(len(labels), steps, plan.batch).to(device), lr=1e-4, eps=0.5)
    sync(device)
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    sync(device)
    train_s = time.perf_counter() - t0
    evals = []
    for _ in range(2):
        t0 = time.perf_counter()
        step.evaluate(test[0], test[1], EvalTransform(plan.image_size), NUM_CLASSES, batch_size=256, amp="bf16")
        sync(device)
        evals.append(time.perf_counter() - t0)
    return {"train_s": train_s, "eval_s": evals[1], "eval_first_s": evals[0], "steps": steps, "mode": step.mode,
            "compiled": step.compiled, "first_step_s": step.first_step_s}


# -- main ---------------------------------------------------------------------------------------
ALL_RUNGS = (0, 1, 2, 3, 4, 5, 6, 7, 8)
CUDA_ONLY = (5, 7, 8)  # CUDA graphs; Inductor takes minutes on the CPU
EPOCH_RUNGS = (0, 5, 7)
LADDER = {  # rung -> (name, the trainer's step options); rungs 0, 1, 6 and 8 are built apart
    2: ("+ data on device, batched augmentation",
        lambda p: StepOptions(p.batch, amp="off", channels_last=False, backend="reference", cuda_graphs=False)),
    3: ("+ bf16 autocast, channels_last",
        lambda p: StepOptions(p.batch, amp="bf16", channels_last=True, backend="reference", cuda_graphs=False)),
    4: ("+ fused loss", lambda p: StepOptions(p.batch, amp="bf16", channels_last=True, cuda_graphs=False)),
    5: ("+ captured step (uncompiled)", lambda p: StepOptions(p.batch, compile=False)),
    7: ("+ torch.compile (trainer default)", lambda p: StepOptions(p.batch, compile=True, compile_mode=p.compile_mode)),
}


def measure_rung(rung: int, plan: Plan, device, root: Path, on_device) -> list[dict]:
    """The row(s) of one rung (rung 0: one per DataLoader worker count)."""
    if rung == 0:
        out = []
        for workers in plan.workers:
            reset_memory(device)
            out.append(row(f"reference-style loop, DataLoader {workers} workers", 0,
                           rung_reference(plan, device, root, workers), plan.batch, device, workers=workers))
        return out
    reset_memory(device)
    if rung == 1:
        return [row("nla_fast fp32 eager, DataLoader", 1, rung_dataloader_nla(plan, device, root), plan.batch, device)]
    if rung in (6, 8):
        per_step, info = rung_ceiling(plan, device, compiled=rung == 8)
        name = ("ceiling: bare ResNet-18 + Adam" if rung == 6
                else "compiled ceiling: bare ResNet-18 + Adam, compiled and captured")
        return [row(name, rung, per_step, plan.batch, device, **info)]
    name, options = LADDER[rung]
    per_step, info = rung_device_step(plan, device, *on_device, options(plan))
    return [row(name, rung, per_step, plan.batch, device, **info)]


def measure_epoch(rung: int, plan: Plan, device, root: Path, on_device, test) -> dict:
    reset_memory(device)
    if rung == 0:
        return epoch_reference(plan, device, root)
    return epoch_captured(plan, device, on_device, test, compile=rung == 7)


def finish_epochs(rows: list[dict], epochs: dict) -> None:
    """Each epoch's total and its 60-epoch projection; a compiled rung adds its compile time once."""
    for item in epochs.values():
        item["epoch_s"] = item["train_s"] + item["eval_s"]
        item["compile_s"] = 0.0
        if item.get("compiled"):
            # paid once per run: the first compiled step of this process (rung 7, before any
            # compiled code existed in it) and the evaluation's first, compiling, pass
            first = next((r["first_step_s"] for r in rows if r["rung"] == 7), item["first_step_s"])
            item["compile_s"] = first + max(0.0, item["eval_first_s"] - item["eval_s"])
        item["projected_60_epochs_min"] = (60 * item["epoch_s"] + item["compile_s"]) / 60


def run(plan: Plan, device: torch.device, log, rungs=ALL_RUNGS, epoch_rungs=EPOCH_RUNGS,
        on_row=lambda result: None) -> dict:
    """The rungs in the order given, then a full epoch of each of ``epoch_rungs``;
    ``on_row(result)`` after each row and epoch (the caller rewrites the files)."""
    if device.type != "cuda":
        for rung in [r for r in (*rungs, *epoch_rungs) if r in CUDA_ONLY]:
            log(f"rung {rung} needs CUDA (graphs; Inductor takes minutes on the CPU): skipped on the CPU")
        rungs = [r for r in rungs if r not in CUDA_ONLY]
        epoch_rungs = [r for r in epoch_rungs if r not in CUDA_ONLY]
    plan = dataclasses.replace(plan, epoch=plan.epoch and bool(epoch_rungs))
    result = {"benchmark": "train_bench", "device": device_slug(device),
              "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
              "versions": versions(), "quick": plan.quick, "plan": plan.__dict__ | {"workers": list(plan.workers)},
              "rungs": list(rungs), "time": time.strftime("%Y-%m-%d %H:%M:%S"), "rows": [], "epochs": {},
              "targets": {}}

    def update(logged):
        log(logged)
        finish_epochs(result["rows"], result["epochs"])
        result["targets"] = add_ratios(result["rows"], result["epochs"])
        on_row(result)

    with tempfile.TemporaryDirectory(prefix="nla_train_bench_") as tmp:
        root = Path(tmp)
        t0 = time.perf_counter()
        train_images, train_labels, test_images, test_labels = rafdb_shaped_data(plan, root)
        log(f"data ready: {len(train_labels)} train / {len(test_labels)} test JPEGs in {time.perf_counter() - t0:.0f} s")
        on_device = (train_images.to(device), train_labels.to(device))
        for rung in rungs:
            for measured in measure_rung(rung, plan, device, root, on_device):
                result["rows"].append(measured)
                update(measured)
        if plan.epoch:
            for rung in epoch_rungs:
                result["epochs"][f"rung{rung}"] = measure_epoch(rung, plan, device, root, on_device,
                                                                (test_images, test_labels))
                update({f"epoch rung {rung}": result["epochs"][f"rung{rung}"]})
    return result


def add_ratios(rows: list[dict], epochs: dict) -> dict:
    """Each row's ratios to rung 0, the ceiling (rung 6) and the compiled ceiling (rung 8), each
    None when that rung was not measured in this run; returns SPEC 4's training targets
    measured so far ({label: value}; bench/spec_targets.py defines them)."""
    speed = spec_targets.rung_speeds(rows)
    for r in rows:
        for key, rung in (("x_rung0", 0), ("fraction_of_ceiling", 6), ("fraction_of_compiled_ceiling", 8)):
            r[key] = r["samples_per_s"] / speed[rung] if rung in speed else None
    return spec_targets.as_dict(spec_targets.train_targets({"rows": rows, "epochs": epochs}))


def table(result) -> str:
    lines = [f"train_bench on {result['device_name']}: torch {result['versions']['torch']}, "
             f"batch {result['plan']['batch']} x 2 views, {result['plan']['image_size']} px",
             f"{'rung':>4}  {'samples/s':>10}  {'x rung0':>8}  {'% ceiling':>9}  {'% c.ceil':>8}  {'peak MB':>8}  name"]
    for r in result["rows"]:
        mem = f"{r['peak_memory_mb']:.0f}" if r["peak_memory_mb"] is not None else "-"
        compiled = r.get("fraction_of_compiled_ceiling")
        compiled = f"{100 * compiled:>7.1f}%" if compiled is not None else f"{'-':>8}"
        first = f" (first step {r['first_step_s']:.1f} s)" if r.get("compiled") and r.get("first_step_s") else ""
        x_rung0 = f"{r['x_rung0']:>8.2f}" if r["x_rung0"] is not None else f"{'-':>8}"
        ceiling = f"{100 * r['fraction_of_ceiling']:>8.1f}%" if r["fraction_of_ceiling"] is not None else f"{'-':>9}"
        lines.append(f"{r['rung']:>4}  {r['samples_per_s']:>10.0f}  {x_rung0}  {ceiling}  {compiled}  {mem:>8}  "
                     f"{r['name']}{first}")
    for name, e in result["epochs"].items():
        compile_note = f" + compile {e['compile_s']:.1f} s once" if e.get("compile_s") else ""
        lines.append(f"epoch {name}: train {e['train_s']:.1f} s + eval {e['eval_s']:.1f} s{compile_note}; "
                     f"60 epochs ~ {e['projected_60_epochs_min']:.1f} min")
    for name, value in result.get("targets", {}).items():
        lines.append(f"target {name}: {value:.3f}" if value is not None else f"target {name}: -")
    return "\n".join(lines)


def plot(result, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, ax = plt.subplots(figsize=(9, 0.5 * len(rows) + 1.5))
    labels = [f"{r['rung']}: {r['name']}" for r in rows]
    ax.barh(labels[::-1], [r["samples_per_s"] for r in rows][::-1], color="tab:blue")
    ax.set_xlabel("training samples/s (image + flip)")
    ax.set_title(f"train_bench, {result['device_name']}, torch {result['versions']['torch']}")
    fig.tight_layout()
    atomic.save_figure(fig, path, dpi=120)
    plt.close(fig)


def rung_list(text: str) -> list[int]:
    """'0,6,7' -> [0, 6, 7] (the order kept); 'none' -> []."""
    if text.strip().lower() == "none":
        return []
    try:
        rungs = [int(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected rung numbers separated by commas, got {text!r}") from None
    bad = [r for r in rungs if r not in ALL_RUNGS]
    if bad:
        raise argparse.ArgumentTypeError(f"no rung {bad[0]}: rungs are 0-8")
    return rungs


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="CPU smoke run, < 1 min")
    parser.add_argument("--device", default="auto", help="auto, cuda or cpu")
    parser.add_argument("--rungs", type=rung_list, default=list(ALL_RUNGS),
                        help="rungs to measure, in this order (default: all, 0-8)")
    parser.add_argument("--epochs", type=rung_list, default=list(EPOCH_RUNGS),
                        help="rungs (among 0, 5, 7) timed over one full RAF-DB-shaped epoch, or 'none' (default 0,5,7)")
    parser.add_argument("--no-plot", action="store_true", help="write no chart")
    result_files.add_arguments(parser)
    parser.add_argument("--adam", choices=("auto", "fused", "foreach"), default="auto",
                        help="Adam of rungs 5-8 on CUDA: fused (auto) or the multi-tensor foreach, both capturable")
    parser.add_argument("--compile-mode", choices=("default", "max-autotune-no-cudagraphs"), default="default",
                        help="torch.compile mode of rungs 7-8 (max-autotune tunes convolutions: minutes more)")
    args = parser.parse_args(argv)
    if any(r not in EPOCH_RUNGS for r in args.epochs):
        parser.error(f"--epochs: only rungs {', '.join(map(str, EPOCH_RUNGS))} have an epoch, got {args.epochs}")
    device = torch.device(args.device if args.device != "auto" else ("cuda" if torch.cuda.is_available() else "cpu"))
    plan = dataclasses.replace(QUICK if args.quick else FULL, adam=args.adam, compile_mode=args.compile_mode)
    out_dirs = [result_files.output_dir(args, device_slug(device))]
    out_dirs += [Path(os.environ["OUT"])] if os.environ.get("OUT") else []

    def stem(result):
        return f"train_bench-{result['device']}{'-quick' if result['quick'] else ''}"

    def save(result):  # after every row: a run cut short keeps what it measured
        for out in out_dirs:
            atomic.write_text(out / f"{stem(result)}.json", json.dumps(result, indent=2))

    result = run(plan, device, lambda msg: print(f"[train_bench] {msg}", flush=True), args.rungs, args.epochs, save)
    save(result)
    if not args.no_plot and result["rows"]:
        for out in out_dirs:
            plot(result, out / f"{stem(result)}.png")
    print(table(result))
    return result


if __name__ == "__main__":
    use_cpu_threads()  # a shared host's cores, not oversubscribed (nla_fast.threads)
    main()
