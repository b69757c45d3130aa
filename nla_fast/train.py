"""Train ResNet-18 with the NLA loss: ``python -m nla_fast.train`` (also ``nla-train``).

Reads top to bottom: settings -> data on the device -> model, optimiser, step -> (resume) ->
for each epoch: new order, lr and eps written into device tensors; steps; evaluation on the
test split; ``metrics.jsonl``, plots and checkpoints in ``--out``.

Outputs in ``--out``:
    config.json      the settings of the run
    metrics.jsonl    one JSON object per epoch (see ``epoch_record``)
    curves.png       loss and accuracies per epoch
    confusion.png    confusion matrix of the latest epoch on the test split
    naw_weights.png  NAW weight over the (p_gt, p_nn) plane at the epoch's eps, with that
                     epoch's training samples scattered on it
    last.pt          every epoch (and on Ctrl-C, mid-epoch); best.pt / best_mean.pt: the
                     epochs with the best overall / mean class test accuracy

Training batches are always full: each epoch drops the remainder of its random order
(fewer than ``--batch-size`` samples), as the reference's ``drop_last=True`` does.

With no arguments on a machine without CUDA, the run is a quick demonstration on the
synthetic set (small images, few samples and epochs, see ``CPU_QUICK_RUN``); on CUDA the
same command follows the paper's recipe (224 px, 60 epochs, batch 32).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import math
import signal
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import atomic
from . import checkpoint as ckpt
from . import distributed
from .config import eps_schedule
from .data.errors import DatasetError
from .loss import BackendUnavailable
from .engine import (WARMUP_STEPS, NonFiniteLoss, StepOptions, TrainStep, augmentation_generator,
                     epoch_permutation, evaluate, load_optimizer_state, make_optimizer, shard)
from .metrics import MetricCounts, format_table, json_safe
from .model import WeightsError, build_resnet18, initialise_weights
from .settings import TrainSettings, load_split, parse_command_line, pick_device, settings_for_resume

# Stay below this share of free GPU memory with the dataset, else keep images in host memory.
DEVICE_DATA_SHARE = 0.5
# Eager DDP steps before the CUDA-graph capture: PyTorch's CUDA-graph notes ask for 11 so that
# DDP has finished its first-iteration bookkeeping (static graph, bucket rebuild) first.
DDP_WARMUP_STEPS = 11


# ----------------------------------------------------------------------------------------------
# Pieces of the run
# ----------------------------------------------------------------------------------------------
def place_images(images: torch.Tensor, device: torch.device) -> torch.Tensor:
    """The dataset on the device when it fits in a share of free memory, else pinned host memory."""
    if device.type != "cuda":
        return images
    free, _ = torch.cuda.mem_get_info(device)
    nbytes = images.numel() * images.element_size()
    if nbytes <= DEVICE_DATA_SHARE * free:
        return images.to(device)
    print(f"nla_fast: the images ({nbytes / 2**30:.1f} GiB) stay in pinned host memory "
          f"(more than {DEVICE_DATA_SHARE:.0%} of free GPU memory); batches are copied per step")
    return images.pin_memory()


def epoch_record(epoch, progress, test, naw_means, classes, lr, eps, samples, samples_per_s, train_seconds,
                 eval_seconds, world_size, mode) -> dict:
    """One line of metrics.jsonl."""
    return {
        "epoch": epoch,
        "train_loss": progress["loss"],
        "train_acc": progress["acc"],
        "test_acc": test["acc"],
        "test_mean_acc": test["mean_acc"],
        "top2_acc": test["top2_acc"],
        "per_class_acc": dict(zip(classes, test["per_class_acc"])),
        "naw_weight_mean": dict(zip(classes, naw_means)),
        "lr": lr,
        "eps": eps,
        "samples_per_s": samples_per_s,
        "train_samples": samples,
        "test_samples": test["num_samples"],
        "world_size": world_size,
        "seconds": train_seconds + eval_seconds,
        "train_seconds": train_seconds,
        "eval_seconds": eval_seconds,
        "step_mode": mode,
        "confusion": test["confusion"],
    }


def write_metrics(path: Path, history: list[dict]) -> None:
    atomic.write_text(path, "".join(json.dumps(json_safe(row)) + "\n" for row in history))


class StopRequest:
    """First Ctrl-C: finish the current step, write last.pt and stop. A second one aborts at once."""

    def __init__(self):
        self.requested = False
        self._previous = None

    def _handle(self, signum, frame):
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        print("\nnla_fast: Ctrl-C: stopping after this step and writing last.pt "
              "(press Ctrl-C again to abort without saving)", file=sys.stderr, flush=True)

    def __enter__(self):
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
        return False


def progress_bar(total: int, epoch: int, epochs: int, enabled: bool, initial: int = 0):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc=f"epoch {epoch} ({epoch + 1}/{epochs})", unit="step",
                disable=not enabled, dynamic_ncols=True, leave=True, file=sys.stderr)


# ----------------------------------------------------------------------------------------------
# The run
# ----------------------------------------------------------------------------------------------
def train(settings: TrainSettings, resume: str | None = None, explicit: set[str] | None = None) -> dict:
    """Run (or continue) a training run; returns a summary dict. Raises NonFiniteLoss on a NaN loss.

    Launched by ``torchrun`` (RANK / WORLD_SIZE in the environment), each process joins the
    process group and trains its shard under DistributedDataParallel; the group is left at the
    end, on errors and on Ctrl-C alike."""
    contexts: list = []
    try:
        return _train(settings, resume, explicit, contexts)
    finally:
        for ctx in contexts:
            distributed.cleanup(ctx)


def _train(settings: TrainSettings, resume: str | None, explicit: set[str] | None, contexts: list) -> dict:
    # --- settings (a resumed run takes its own, overridden by flags given explicitly) ---------
    state, notes = None, []
    if resume is not None:
        state = ckpt.load(resume)
        settings, notes = settings_for_resume(settings, state["config"], resume, explicit or set())
    ctx, dist_device = distributed.setup(settings.device)
    contexts.append(ctx)
    world_size, rank = ctx.world_size, ctx.rank
    say = print if ctx.is_main else (lambda *args, **kwargs: None)  # only rank 0 talks
    for note in notes:
        say(note)
    device = dist_device if dist_device is not None else pick_device(settings.device)
    rank_states = None
    if state is not None:
        saved_world = int(state["config"].get("world_size", 1))
        if saved_world != world_size:
            if not state["epoch_done"]:
                raise ckpt.CheckpointError(
                    f"{resume} was written mid-epoch by a run of world size {saved_world}; this run has world "
                    f"size {world_size}. An exact mid-epoch resume needs the same world size: relaunch with "
                    f"{saved_world} process(es) (torchrun --nproc_per_node ... --nnodes ...)")
            say(f"nla_fast: resume: the checkpoint was written with world size {saved_world}, this run has "
                f"{world_size}: the global batch and the per-rank shards change, so the run continues from "
                "the saved state but not as the original run would have")
        else:
            rank_states = state.get("rank_states")
    s = settings.resolve(device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    out = Path(s.out)
    if ctx.is_main:
        out.mkdir(parents=True, exist_ok=True)
        atomic.remove_stale_temps(out)  # left by a run that was killed outright
    nla_config = s.nla_config()
    torch.manual_seed(s.seed)
    np.random.seed(s.seed % 2**32)
    import random
    random.seed(s.seed)

    # --- data on the device ----------------------------------------------------------------
    from . import augment

    if ctx.distributed and ctx.local_rank != 0:
        distributed.barrier(ctx)  # the machine's first rank decodes (and caches) the data first
    train_set, test_set = load_split(s, "train"), load_split(s, "test")
    if ctx.distributed and ctx.local_rank == 0:
        distributed.barrier(ctx)
    classes = list(train_set.classes)
    num_classes = len(classes)
    num_train = len(train_set.labels)
    steps_per_epoch = num_train // world_size // s.batch_size
    if steps_per_epoch == 0:
        raise SystemExit(f"error: {num_train} training samples make no full batch of {s.batch_size}"
                         + (f" on each of {world_size} processes" if world_size > 1 else ""))
    epoch_shard = None
    if not ctx.distributed:
        # one process: the whole set on the device when it fits, else pinned host memory
        train_images = place_images(train_set.images, device)
        train_labels = train_set.labels.to(device)
    else:
        shard_len = steps_per_epoch * s.batch_size
        shard_bytes = distributed.EpochShard.nbytes(train_set.images, shard_len)
        fits = device.type != "cuda" or shard_bytes <= DEVICE_DATA_SHARE * torch.cuda.mem_get_info(device)[0]
        if fits:  # this epoch's shard on the device, refilled each epoch (see EpochShard)
            epoch_shard = distributed.EpochShard(train_set.images, train_set.labels, shard_len, device)
            train_images, train_labels = epoch_shard.images, epoch_shard.labels
        else:  # not even the shard fits: host memory, each step's batch copied (TrainStep)
            say(f"nla_fast: this rank's shard ({shard_bytes / 2**30:.1f} GiB) stays in host memory; "
                "batches are copied per step")
            train_images, train_labels = train_set.images, train_set.labels.to(device)
    # evaluation: each rank keeps its contiguous slice of the test split; counts are summed
    mine = distributed.contiguous_slice(len(test_set.labels), rank, world_size)
    test_images, test_labels = test_set.images[mine].to(device), test_set.labels[mine].to(device)
    num_test = len(test_set.labels)
    augment_fn = augment.TrainAugment(s.image_size)
    eval_transform = augment.EvalTransform(s.image_size)

    # --- model, optimiser, step ------------------------------------------------------------
    model = build_resnet18(num_classes)
    if state is None:
        say(initialise_weights(model, s.weights))  # same seed on every rank; DDP also broadcasts rank 0's
    if s.sync_bn and ctx.distributed:
        if device.type != "cuda":
            raise SystemExit("error: --sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU implementation)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif s.sync_bn:
        say("nla_fast: --sync-bn has no effect in a one-process run")
    model = model.to(device, memory_format=torch.channels_last)
    wrapped = model
    if ctx.enabled:
        wrapped = wrap_ddp(model, device)
    network = torch.compile(wrapped) if s.compile else wrapped
    optimizer = make_optimizer(model, s.lr, s.weight_decay, device, capturable=s.cuda_graphs)
    lr_tensor = optimizer.param_groups[0]["lr"]
    generator = augmentation_generator(device, distributed.rank_seed(s.seed, rank))
    graphs = bool(s.cuda_graphs) and device.type == "cuda"
    options = StepOptions(batch_size=s.batch_size, views=s.views, loss=s.loss, amp=s.amp, backend=s.backend,
                          channels_last=True, cuda_graphs=s.cuda_graphs,
                          warmup_steps=DDP_WARMUP_STEPS if ctx.enabled and graphs else WARMUP_STEPS)
    step = TrainStep(network, optimizer, train_images, train_labels, augment_fn, generator, options,
                     nla_config, num_classes, steps_per_epoch)
    step.verbose = ctx.is_main
    if ctx.enabled:
        step.agree = lambda ok: distributed.all_agree(ok, ctx, device)

    # --- resume ----------------------------------------------------------------------------
    start_epoch, start_step, history = 0, 0, []
    best = {"acc": -1.0, "mean_acc": -1.0}
    if state is not None:
        model.load_state_dict(state["model"])
        load_optimizer_state(optimizer, state["optimizer"])  # keeps lr_tensor, the one the step reads
        if rank_states is not None:  # written by a distributed run of this world size
            ckpt.restore_rng_states(rank_states[rank]["rng"], generator)
        elif rank == 0:
            ckpt.restore_rng_states(state["rng"], generator)
        history = [row for row in state["history"] if row["epoch"] < state["epoch"] + state["epoch_done"]]
        best = dict(state["best"])
        if state["epoch_done"]:
            start_epoch, start_step = state["epoch"] + 1, 0
        else:
            start_epoch, start_step = state["epoch"], state["step"]
        say(f"nla_fast: resuming {resume} at epoch {start_epoch}, step {start_step}")

    run_config = {"train": dataclasses.asdict(s), "nla": dataclasses.asdict(nla_config), "device_type": device.type}
    if ctx.enabled:
        run_config["world_size"] = world_size
    if ctx.is_main:
        atomic.write_text(out / "config.json", json.dumps(run_config, indent=2) + "\n")
        write_metrics(out / "metrics.jsonl", history)
    model_info = {"arch": "resnet18", "num_classes": num_classes, "classes": classes,
                  "image_size": s.image_size, "mean": list(augment.MEAN), "std": list(augment.STD),
                  "dataset": s.dataset}
    say(f"nla_fast: {s.dataset}: {num_train} train / {num_test} test images, "
        f"{num_classes} classes, {s.image_size}px; {steps_per_epoch} steps of {s.batch_size} per epoch; "
        f"device {device}, amp {s.amp}, views {s.views}, loss {s.loss}; writing to {out}")
    if ctx.enabled:
        say(f"nla_fast: distributed: {world_size} process(es), backend {ctx.backend}; batch {s.batch_size} per "
            f"process, global batch {s.batch_size * world_size}; {'SyncBatchNorm' if s.sync_bn else 'per-process BatchNorm'}")
    if step.note:
        say(f"nla_fast: {step.note}")

    def checkpoint_state(epoch: int, steps_done: int, epoch_done: bool) -> dict:
        """Called on every rank (a distributed run gathers each rank's random states and sums)."""
        own = {"rng": ckpt.capture_rng_states(generator), "totals": step.totals.state_dict()}
        gathered = distributed.gather_objects(own, ctx) if ctx.enabled else None
        blob = {
            "format": ckpt.FORMAT,
            "model": {k: v.detach().cpu() for k, v in model.state_dict().items()},
            "model_info": model_info,
            "optimizer": optimizer.state_dict(),
            "schedule": {"base_lr": s.lr, "gamma": s.gamma, "lr": float(lr_tensor), "slope": nla_config.slope,
                         "epochs": s.epochs, "eps": float(step.eps)},
            "epoch": epoch,
            "step": steps_done,
            "epoch_done": epoch_done,
            "rng": own["rng"],
            "config": run_config,
            "totals": own["totals"],
            "best": best,
            "history": [json_safe(row) for row in history],
        }
        if gathered is not None:
            blob["rank_states"] = gathered
        return blob

    def save_last(blob: dict) -> None:
        if ctx.is_main:
            ckpt.save(blob, out / "last.pt")

    # --- epochs ----------------------------------------------------------------------------
    last_test = None
    with StopRequest() as stop:
        for epoch in range(start_epoch, s.epochs):
            lr = s.lr * s.gamma**epoch
            eps = eps_schedule(epoch, s.epochs, nla_config.slope)
            order = shard(epoch_permutation(num_train, s.seed, epoch), rank, world_size, s.batch_size)
            if epoch_shard is not None:
                epoch_shard.fill(order)
                order = torch.arange(len(order))
            step.start_epoch(order.to(device), lr, eps, start_step)
            if start_step > 0 and state is not None and not state["epoch_done"]:
                step.totals.load_state_dict(rank_states[rank]["totals"] if rank_states is not None
                                            else state["totals"])
            bar = progress_bar(steps_per_epoch, epoch, s.epochs, s.progress and ctx.is_main, initial=start_step)
            t0 = time.perf_counter()
            for index in range(start_step, steps_per_epoch):
                step()
                done = index + 1
                # distributed: log points are the same on every rank (they agree on NaN and Ctrl-C there)
                log_point = done % s.log_every == 0 or done == steps_per_epoch
                stop_now = stop.requested and not ctx.distributed  # one process stops at once
                if log_point or stop_now:
                    progress = global_progress(step, ctx, device, stop.requested)
                    stop_now = progress["stop"]
                    if progress["first_bad_step"] >= 0:
                        bar.close()
                        raise NonFiniteLoss(epoch, progress["first_bad_step"])
                    elapsed = time.perf_counter() - t0
                    bar.set_postfix_str(f"loss {progress['loss']:.4f}, "
                                        f"{(done - start_step) * s.batch_size / max(elapsed, 1e-9):.0f} samples/s")
                    bar.update(done - bar.n)
                if stop_now and done < steps_per_epoch:
                    bar.close()
                    save_last(checkpoint_state(epoch, int(step.step_in_epoch), False))
                    say(f"nla_fast: interrupted at epoch {epoch}, step {done}; wrote {out / 'last.pt'}; "
                        f"continue with: python -m nla_fast.train --resume {out / 'last.pt'}")
                    return {"out": str(out), "interrupted": True, "epoch": epoch, "step": done}
            progress = global_progress(step, ctx, device, False)
            naw_means = global_naw_means(step, ctx)
            train_seconds = time.perf_counter() - t0
            bar.close()

            t1 = time.perf_counter()
            distributed.broadcast_buffers(model, ctx)  # every rank evaluates the model rank 0 saves
            test = evaluate(network, test_images, test_labels, eval_transform, num_classes, classes,
                            batch_size=s.eval_batch_size, amp=s.amp,
                            reduce=MetricCounts.all_reduce if ctx.distributed else None)
            eval_seconds = time.perf_counter() - t1
            last_test = test
            timed_samples = (steps_per_epoch - start_step) * s.batch_size * world_size
            row = epoch_record(epoch, progress, test, naw_means, classes, lr, eps,
                               steps_per_epoch * s.batch_size * world_size, timed_samples / train_seconds,
                               train_seconds, eval_seconds, world_size, step.mode)
            history.append(row)
            if ctx.is_main:
                write_metrics(out / "metrics.jsonl", history)
            say(f"epoch {epoch} ({epoch + 1}/{s.epochs}): train loss {progress['loss']:.4f} "
                f"acc {100 * progress['acc']:.2f}% | test acc {100 * test['acc']:.2f}% "
                f"mean {100 * test['mean_acc']:.2f}% "
                f"top-2 {100 * test['top2_acc']:.2f}% | lr {lr:.3g} eps {eps:.3f} | "
                f"{row['samples_per_s']:.0f} samples/s ({step.mode})", flush=True)

            improved_acc, improved_mean = test["acc"] > best["acc"], test["mean_acc"] > best["mean_acc"]
            if improved_acc:
                best["acc"], best["acc_epoch"] = test["acc"], epoch
            if improved_mean:
                best["mean_acc"], best["mean_acc_epoch"] = test["mean_acc"], epoch
            save_last(checkpoint_state(epoch, steps_per_epoch, True))
            if improved_acc and ctx.is_main:
                atomic.copy(out / "last.pt", out / "best.pt")
            if improved_mean and ctx.is_main:
                atomic.copy(out / "last.pt", out / "best_mean.pt")

            stop_after = distributed.any_rank(stop.requested, ctx, device)
            final = epoch == s.epochs - 1 or stop_after
            if ctx.is_main and (final or (s.plot_every and (epoch + 1) % s.plot_every == 0)):
                draw_plots(out, history, test, classes, eps, nla_config, step, epoch)
            start_step, state, rank_states = 0, None, None
            if stop_after:
                say(f"nla_fast: interrupted after epoch {epoch}; wrote {out / 'last.pt'}")
                return {"out": str(out), "interrupted": True, "epoch": epoch, "step": steps_per_epoch}

    say(f"nla_fast: done. metrics: {out / 'metrics.jsonl'}; plots: {out / 'curves.png'}, "
          f"{out / 'confusion.png'}, {out / 'naw_weights.png'}; checkpoints: {out / 'last.pt'}, "
          f"{out / 'best.pt'}, {out / 'best_mean.pt'}")
    if history:
        say(f"nla_fast: best test accuracy {100 * best['acc']:.2f}% (epoch {best.get('acc_epoch')}), "
              f"best mean class accuracy {100 * best['mean_acc']:.2f}% (epoch {best.get('mean_acc_epoch')})")
    if last_test is not None:
        say(format_table(last_test, classes))
    return {"out": str(out), "interrupted": False, "history": history, "best": best}


def wrap_ddp(model: torch.nn.Module, device: torch.device) -> torch.nn.Module:
    """DistributedDataParallel around ``model``.

    static_graph: the step's graph is the same every iteration, which lets DDP skip its
    per-iteration graph analysis and is what CUDA-graph capture of a DDP step requires (with
    DDP built on a side stream and 11 eager warm-up iterations, PyTorch's CUDA-graph notes).
    gradient_as_bucket_view: gradients live in the all-reduce buckets (no copy, less memory).
    broadcast_buffers=False: no extra collective per forward; BatchNorm running statistics
    only matter for evaluation, before which rank 0's are broadcast (``broadcast_buffers``),
    so every rank evaluates, and rank 0 saves, the same model.
    """
    from torch.nn.parallel import DistributedDataParallel as DDP

    kwargs = {"broadcast_buffers": False, "gradient_as_bucket_view": True, "static_graph": True}
    import warnings

    with warnings.catch_warnings():
        # newer torch renames broadcast_buffers; the old name keeps exactly this meaning (torch 2.11 too)
        warnings.filterwarnings("ignore", message=".*broadcast_buffers.*", category=FutureWarning)
        if device.type != "cuda":
            return DDP(model, **kwargs)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            wrapped = DDP(model, device_ids=[device.index], output_device=device.index, **kwargs)
        torch.cuda.current_stream(device).wait_stream(side)
        return wrapped


def global_progress(step: TrainStep, ctx, device: torch.device, stop_requested: bool) -> dict:
    """Training loss / accuracy so far over all ranks, the first non-finite step of any rank,
    and whether any rank was asked to stop. One process: ``RunningTotals.progress()``."""
    if not ctx.distributed:
        progress = step.totals.progress()
        progress["stop"] = stop_requested
        return progress
    t = step.totals
    sums = torch.stack([t.loss_sum, t.correct.double(), t.seen.double(), t.steps.double()])
    # MAX of (steps_per_epoch - first bad step) finds the earliest bad step of any rank
    bad = torch.where(t.first_bad_step >= 0, step.steps_per_epoch - t.first_bad_step, 0)
    flags = torch.stack([bad.double(), torch.tensor(float(stop_requested), dtype=torch.float64, device=device)])
    distributed.all_reduce_(sums, ctx)
    distributed.all_reduce_(flags, ctx, op="max")
    loss_sum, correct, seen, steps = sums.cpu().tolist()
    bad_max, stop = flags.cpu().tolist()
    return {
        "loss": loss_sum / steps if steps else math.nan,  # mean over every rank's steps
        "acc": correct / seen if seen else math.nan,
        "seen": int(seen),
        "steps": int(steps),
        "first_bad_step": step.steps_per_epoch - int(bad_max) if bad_max > 0 else -1,
        "stop": bool(stop),
    }


def global_naw_means(step: TrainStep, ctx) -> list:
    """Mean NAW weight per class over every rank's samples of the epoch."""
    if not ctx.distributed:
        return step.totals.naw_means()
    sums, counts = step.totals.naw_sum.clone(), step.totals.naw_count.clone()
    distributed.all_reduce_(sums, ctx)
    distributed.all_reduce_(counts, ctx)
    return [a / n if n else None for a, n in zip(sums.cpu().tolist(), counts.cpu().tolist())]


def draw_plots(out: Path, history, test, classes, eps, nla_config, step: TrainStep, epoch: int) -> None:
    from . import plots

    plots.plot_curves(history, out / "curves.png")
    plots.plot_confusion(test["confusion"], classes, out / "confusion.png",
                         title=f"test confusion, epoch {epoch} (acc {100 * test['acc']:.2f}%)")
    points = step.totals.points.cpu()
    points = points[~torch.isnan(points).any(dim=1)]
    plots.plot_naw_weights(eps, nla_config, points, out / "naw_weights.png", epoch=epoch)


def main(argv=None) -> int:
    command = parse_command_line(sys.argv[1:] if argv is None else list(argv))
    try:
        result = train(command.settings, resume=command.resume, explicit=command.explicit)
    except KeyboardInterrupt:
        print("nla_fast: interrupted", file=sys.stderr)
        return 130
    except NonFiniteLoss as err:
        print(f"nla_fast: error: {err}", file=sys.stderr)
        return 1
    except (WeightsError, DatasetError, FileNotFoundError, ckpt.CheckpointError, BackendUnavailable) as err:
        print(f"nla_fast: error: {err}", file=sys.stderr)
        return 2
    return 130 if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
