"""Train ResNet-18 with the NLA loss: ``python -m nla_fast.train`` (also ``nla-train``).

Reads top to bottom, in the order a run goes:

    set_up       settings (a resumed run: its own, overridden by the flags typed), process
                 group, device, seeds, output folder
    load_data    both splits (load_run_split); the training images placed by
                 ``nla_fast.placement`` (place_data)
    build        model, optimiser and the training step (captured as a CUDA graph on CUDA)
    restore      a resumed run's weights, optimiser, random states, history
    each epoch   train_epoch (new order, lr and eps written into device tensors; steps),
                 evaluate_epoch on the test split (and the validation split where the dataset
                 has one: best.pt is then chosen on it), record (``metrics.jsonl`` /
                 ``.csv``, TensorBoard, plots, checkpoints)

These phases and what they pass along (``Run``, ``Data``, ``Parts``, ``Progress``,
``EpochTraining``) are this module's API beside ``train`` and ``main``: a study that trains
many runs on data loaded once calls them itself (``bench/noise_study.py``: ``set_up``,
``load_run_split``, ``place_data``, ``build``, ``restore``, then per epoch ``train_epoch``,
``evaluate_epoch``, ``record``). Names starting with ``_`` are the module's own.

The files written in ``--out`` are listed in ``nla_fast.run_folder``. Training batches are
always full: each epoch drops the remainder of its random order (fewer than ``--batch-size``
samples), as the reference's ``drop_last=True`` does.

With no arguments on a machine without CUDA, the run is a quick demonstration on the
synthetic set (small images, few samples and epochs, see ``settings.CPU_QUICK_RUN``); on CUDA
the same command follows the paper's recipe (``settings.PAPER_RECIPE``: 224 px, 60 epochs,
batch 32).
"""
from __future__ import annotations

import dataclasses
import random
import sys
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from . import backbones
from . import checkpoint as ckpt
from . import console, distributed
from .augment import EvalTransform
from .cli import StopRequest, Terminated, progress_bar, sigterm_raises
from .config import NLAConfig, eps_schedule
from .data.errors import DatasetError
from .data.prepare import cache_note, first_on_each_machine
from .data.splits import load_split
from .device import DeviceError, pick_device
from .disk import FolderUnusable
from .engine import (WARMUP_STEPS, NonFiniteLoss, StepOptions, TrainStep, build_train_step, inductor_cache_dir,
                     load_optimizer_state, shard)
from .loss import BackendUnavailable
from .metrics import MetricCounts, format_table, json_safe
from .model import WeightsError
from .placement import Placement, place_test_split, place_training_set
from .provenance import environment_record
from .run_folder import RunFolder, RunFolderError, epoch_record, resumes_in_place
from .run_log import MissingExtra, summary_writer_class
from .sampling import EpochOrder
from .settings import (SettingsError, TrainSettings, ResumeError, check_label_mode, check_resume, check_val_fraction,
                       check_resume_classes, model_selection_note, parse_command_line,
                       selection_split, settings_for_resume)
from .threads import ThreadsError, use_cpu_threads


@dataclass
class Run:
    """What every phase reads: the resolved settings, where this process stands, the output folder."""

    s: TrainSettings
    ctx: distributed.Context
    device: torch.device
    folder: RunFolder
    say: Callable[..., None]  # print on rank 0, silent elsewhere
    resume: str | None = None  # the checkpoint a resumed run continues from, and its contents
    state: dict | None = None
    own_state: dict | None = None  # this rank's part of it (random states, totals) when world sizes match
    command_line: list | None = None  # the arguments the run was started with (recorded in config.json)


@dataclass
class Data:
    train: Placement  # the training images and labels, wherever they live
    test_images: torch.Tensor  # this rank's slice of the test split, on the device
    test_labels: torch.Tensor
    eval_transform: EvalTransform
    classes: list
    num_train: int
    num_test: int
    steps_per_epoch: int
    valid_images: torch.Tensor | None = None  # this rank's slice of the validation split, where there is one
    valid_labels: torch.Tensor | None = None
    num_valid: int = 0
    order: EpochOrder | None = None  # each epoch's sample order (--sampler)


@dataclass
class Parts:
    model: torch.nn.Module  # the bare network (what checkpoints hold); step.model is what runs
    step: TrainStep  # with its optimiser and the augmentation's generator
    nla_config: NLAConfig


@dataclass
class Progress:
    start_epoch: int = 0
    start_step: int = 0
    history: list = field(default_factory=list)
    best: dict = field(default_factory=lambda: {"acc": -1.0, "mean_acc": -1.0})
    totals: dict | None = None  # running sums of a resumed, partly trained epoch
    first_step_reported: bool = False  # the first epoch trained by this process records first_step_s


def train(settings: TrainSettings, resume: str | None = None, explicit=None, overwrite: bool = False,
          command_line=None) -> dict:
    """Run (or continue) a training run; returns a summary dict. Raises NonFiniteLoss on a NaN loss.

    Launched by ``torchrun`` (RANK / WORLD_SIZE in the environment), each process joins the
    process group and trains its shard under DistributedDataParallel; the group is left at the
    end, on errors and on Ctrl-C alike, and so is the output folder's lock.

    ``overwrite``: a new run may replace the results of an earlier run in its ``--out``
    (otherwise that is refused, see ``nla_fast.run_folder``)."""
    closers: list = []  # what to release at the end, last opened first
    try:
        run = set_up(settings, resume, explicit or frozenset(), closers, overwrite)
        run.command_line = list(command_line) if command_line is not None else None
        if _nothing_left(run):
            return {"out": str(run.folder.path), "interrupted": False, "history": run.state["history"],
                    "best": run.state["best"], "nothing_left": True}
        data = load_data(run)
        if run.state is not None:
            _check_resume_fits(run, data)
        parts = build(run, data)
        progress = restore(run, parts)
        run.folder.write_config(_run_config(run, parts))
        run.folder.remove_earlier_run()  # --overwrite: only now, with data, model and a first file written
        run.folder.write_metrics(progress.history)
        _announce(run, data, parts)
        summary = train_epochs(run, data, parts, progress)
        # every rank done with rank 0's last writes before any leaves the group: a gloo rank that
        # tears down its connections while a peer still holds them can abort at exit
        distributed.barrier(run.ctx)
        return summary
    finally:
        for close in reversed(closers):
            close()


# ----------------------------------------------------------------------------------------------
# Phases
# ----------------------------------------------------------------------------------------------
def set_up(settings: TrainSettings, resume: str | None, explicit, closers: list, overwrite: bool = False) -> Run:
    state, notes = None, []
    if resume is not None:
        state = ckpt.load(resume)
        settings, notes = settings_for_resume(settings, state["config"], resume, explicit)
        check_resume(settings, state, resume)
    ctx, dist_device = distributed.setup(settings.device)
    closers.append(lambda: distributed.cleanup(ctx))
    say = console.say if ctx.is_main else (lambda *args, **kwargs: None)  # only rank 0 talks; `| head` stops no run
    for note in notes:
        say(note)
    device = dist_device if dist_device is not None else pick_device(settings.device)
    s = settings.resolve(device)
    check_label_mode(s)
    check_val_fraction(s)
    s = _with_model_checked(s, state)
    if s.tensorboard:
        summary_writer_class()  # a missing package fails here, before any data is loaded
    run = Run(s, ctx, device, RunFolder(s.out, writer=ctx.is_main), say, resume, state)
    if state is not None:
        run.own_state = _own_resume_state(run)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True  # fixed shapes: pick the fastest kernels once
    closers.append(run.folder.close)
    run.folder.start(resumes_this_folder=resumes_in_place(run.folder.path, resume, overwrite), overwrite=overwrite)
    if s.tensorboard:
        run.folder.open_tensorboard()
    torch.manual_seed(s.seed)
    np.random.seed(s.seed % 2**32)
    random.seed(s.seed)
    return run


def _with_model_checked(s: TrainSettings, state: dict | None) -> TrainSettings:
    """``--model`` and ``--weights`` checked before any data is loaded (an unknown model, a
    weights file that cannot be read or does not fit, timm weights missing from the cache), and
    the input normalisation filled in: ``--mean``/``--std``, else the one that goes with the
    model and its weights (a resumed run keeps its checkpoint's)."""
    backbones.check_model_name(s.model)
    if state is None:
        backbones.check_weights(s.model, s.weights)
    if s.mean is None or s.std is None:
        if state is not None:
            mean, std = state["model_info"]["mean"], state["model_info"]["std"]
        else:
            mean, std, _ = backbones.normalisation(s.model, s.weights)
        s = dataclasses.replace(s, mean=list(mean) if s.mean is None else s.mean,
                                std=list(std) if s.std is None else s.std)
    return s


def _nothing_left(run: Run) -> bool:
    """A resumed run that has trained all its epochs says so (and loads no data)."""
    state = run.state
    if state is None or not state["epoch_done"] or state["epoch"] + 1 < run.s.epochs:
        return False
    run.say(f"nla_fast: {run.resume} has trained all {state['epoch'] + 1} of its epochs: nothing left to train "
            f"(pass --epochs N with N > {state['epoch'] + 1} to train further; its results are in {run.folder.path})")
    return True


def _own_resume_state(run: Run) -> dict | None:
    """This rank's random states and totals in the checkpoint; None when it was written by a
    run of another world size (allowed between epochs only: the run continues, not exactly)."""
    state, world_size = run.state, run.ctx.world_size
    saved_world = int(state["config"].get("world_size", 1))
    if saved_world == world_size:
        rank_states = state.get("rank_states")  # written by a distributed run
        return rank_states[run.ctx.rank] if rank_states is not None else state
    if not state["epoch_done"]:
        raise ckpt.CheckpointError(
            f"{run.resume} was written mid-epoch by a run of world size {saved_world}; this run has world "
            f"size {world_size}. An exact mid-epoch resume needs the same world size: relaunch with "
            f"{saved_world} process(es) (torchrun --nproc_per_node ... --nnodes ...)")
    run.say(f"nla_fast: resume: the checkpoint was written with world size {saved_world}, this run has "
            f"{world_size}: the global batch and the per-rank shards change, so the run continues from "
            "the saved state but not as the original run would have")
    return state if run.ctx.rank == 0 else None


def _check_resume_fits(run: Run, data: Data) -> None:
    """The resumed checkpoint's classes and, mid-epoch, its epoch size are this run's."""
    check_resume_classes(data.classes, run.state, run.resume, run.s.dataset)
    state = run.state
    if not state["epoch_done"] and state["step"] > 0 and run.own_state is not None:
        saved = len(run.own_state["totals"]["points"])  # the samples of this rank's epoch when it was saved
        if saved != data.steps_per_epoch * run.s.batch_size:
            raise ResumeError(
                f"{run.resume} was written mid-epoch with {saved} samples per epoch and process; this run has "
                f"{data.steps_per_epoch * run.s.batch_size} (the training set changed): resume with the same data, "
                "or from a checkpoint written at the end of an epoch")


def load_data(run: Run) -> Data:
    s = run.s

    def load():
        split = selection_split(s.dataset, s.val_fraction)
        if split != "test":
            load_run_split(s, split)  # cached here too, before the other ranks read it
        return load_run_split(s, "train"), load_run_split(s, "test")

    # under torchrun the first rank of each machine builds or checks the caches while the others wait
    train_set, test_set = first_on_each_machine(run.ctx, load)
    run.say(cache_note(train_set, s.image_size))
    return place_data(run, train_set, test_set)


def load_run_split(s: TrainSettings, split: str):
    """One split of the run's dataset: its loader options, limits and (training split) protocols."""
    return load_split(s.dataset, s.data_root, split, **s.split_arguments(split))


def place_data(run: Run, train_set, test_set) -> Data:
    """Both loaded splits placed for training and evaluation (``bench/noise_study.py`` loads
    them once and calls this for each run with other training labels)."""
    s, ctx = run.s, run.ctx
    num_train = len(train_set.labels)
    steps_per_epoch = num_train // ctx.world_size // s.batch_size
    if steps_per_epoch == 0:
        fits = max(1, num_train // ctx.world_size)
        raise SettingsError(f"{num_train} training samples make no full batch of {s.batch_size}"
                            + (f" on each of {ctx.world_size} processes" if ctx.world_size > 1 else "")
                            + f": use --batch-size {fits} or less, or more training samples (--limit-train, "
                            "--num-samples, --imbalance-factor and --val-fraction change how many there are)")
    shard_length = steps_per_epoch * s.batch_size if ctx.distributed else None
    soft = train_set.soft_labels if s.label_mode == "soft" else None  # FERPlus votes (check_label_mode)
    placed = place_training_set(train_set.images, train_set.labels, run.device, s.batch_size, shard_length, run.say,
                                soft_labels=soft)
    test_images, test_labels = place_test_split(test_set.images, test_set.labels, run.device, ctx.rank,
                                                ctx.world_size)
    data = Data(placed, test_images, test_labels, EvalTransform(s.image_size, s.mean, s.std), list(train_set.classes),
                num_train, len(test_set.labels), steps_per_epoch,
                order=EpochOrder(s.sampler, train_set.labels, len(train_set.classes), s.seed))
    split = selection_split(s.dataset, s.val_fraction)
    if split != "test":
        valid_set = load_run_split(s, split)
        data.valid_images, data.valid_labels = place_test_split(valid_set.images, valid_set.labels, run.device,
                                                                ctx.rank, ctx.world_size)
        data.num_valid = len(valid_set.labels)
    return data


def build(run: Run, data: Data) -> Parts:
    s, ctx, device = run.s, run.ctx, run.device
    # a resumed run's weights come from its checkpoint (restore)
    model, report = backbones.create(s.model, len(data.classes), s.image_size,
                                     s.weights if run.state is None else backbones.RANDOM)
    if run.state is None:
        run.say(report)  # same seed on every rank; DDP also broadcasts rank 0's
    if s.sync_bn and ctx.distributed:
        if device.type != "cuda":
            raise SystemExit("error: --sync-bn needs CUDA (PyTorch's SyncBatchNorm has no CPU implementation)")
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
    elif s.sync_bn:
        run.say("nla_fast: --sync-bn has no effect in a one-process run")
    model = model.to(device, memory_format=torch.channels_last)
    wrapped = distributed.wrap_ddp(model, device) if ctx.enabled else model
    nla_config = s.nla_config()
    # a summed consistency term over the global batch under DDP (the kernels see a local batch)
    step_config, loss_scale = (distributed.global_batch_loss(nla_config, ctx.world_size) if s.loss == "nla"
                               else (nla_config, 1.0))
    graphs = bool(s.cuda_graphs) and device.type == "cuda"
    options = StepOptions(batch_size=s.batch_size, views=s.views, loss=s.loss, amp=s.amp, backend=s.backend,
                          channels_last=True, cuda_graphs=s.cuda_graphs, compile=bool(s.compile),
                          warmup_steps=distributed.DDP_WARMUP_STEPS if ctx.enabled and graphs else WARMUP_STEPS,
                          loss_scale=loss_scale)
    agree = (lambda ok: distributed.all_agree(ok, ctx, device)) if ctx.enabled else None
    step = build_train_step(model, data.train, options, image_size=s.image_size, lr=s.lr,
                            weight_decay=s.weight_decay, seed=distributed.rank_seed(s.seed, ctx.rank),
                            nla_config=step_config, num_classes=len(data.classes),
                            steps_per_epoch=data.steps_per_epoch, mean=s.mean, std=s.std,
                            network=wrapped, agree=agree,
                            verbose=ctx.is_main)
    return Parts(model, step, nla_config)


def restore(run: Run, parts: Parts) -> Progress:
    """Where the run starts: epoch 0, or a resumed run's saved place, weights and random states."""
    state = run.state
    if state is None:
        return Progress()
    parts.model.load_state_dict(state["model"])
    load_optimizer_state(parts.step.optimizer, state["optimizer"])  # keeps the lr tensor, the one the step reads
    if run.own_state is not None:
        ckpt.restore_rng_states(run.own_state["rng"], parts.step.generator)
    done = state["epoch_done"]
    progress = Progress(
        start_epoch=state["epoch"] + 1 if done else state["epoch"],
        start_step=0 if done else state["step"],
        history=[row for row in state["history"] if row["epoch"] < state["epoch"] + done],
        best=dict(state["best"]),
        totals=None if done or state["step"] == 0 else run.own_state["totals"],
    )
    run.say(f"nla_fast: resuming {run.resume} at epoch {progress.start_epoch}, step {progress.start_step}")
    return progress


def _announce(run: Run, data: Data, parts: Parts) -> None:
    s, ctx = run.s, run.ctx
    valid = f" / {data.num_valid} valid" if data.valid_images is not None else ""
    run.say(f"nla_fast: {s.dataset}: {data.num_train} train{valid} / {data.num_test} test images, "
            f"{len(data.classes)} classes, {s.image_size}px; {data.steps_per_epoch} steps of {s.batch_size} per "
            f"epoch; device {run.device}, amp {s.amp}, views {s.views}, loss {_loss_description(parts)}; "
            f"writing to {run.folder.path}")
    if s.sampler == "balanced":
        run.say(f"nla_fast: balanced sampler: each epoch draws {data.num_train} samples with replacement, every class "
                "equally likely (train_class_counts in metrics.jsonl)")
    run.say(f"nla_fast: best.pt is chosen on the {model_selection_note(s.dataset, s.val_fraction, s.val_seed)}")
    if ctx.enabled:
        run.say(f"nla_fast: distributed: {ctx.world_size} process(es), backend {ctx.backend}; batch {s.batch_size} "
                f"per process, global batch {s.batch_size * ctx.world_size}; "
                f"{'SyncBatchNorm' if s.sync_bn else 'per-process BatchNorm'}")
    if parts.step.options.loss_scale != 1.0:
        run.say(f"nla_fast: the consistency term is summed over the global batch: each rank's loss is "
                f"{parts.step.options.loss_scale:g} x the loss with lam {parts.step.nla_config.lam:.4g}, so the averaged "
                f"gradient is one process's on {s.batch_size * ctx.world_size} images (train_loss: the global batch's)")
    if parts.step.note:
        run.say(f"nla_fast: {parts.step.note}")


def _loss_description(parts: Parts) -> str:
    """``nla (consistency official, summed)``: the loss and how its consistency term is reduced."""
    options, config = parts.step.options, parts.step.nla_config
    if options.loss != "nla":
        return options.loss
    reduction = {"sum": "summed", "mean": "averaged"}[config.consistency_reduction]
    return f"nla (consistency {config.consistency}, {reduction})"


# ----------------------------------------------------------------------------------------------
# Epochs
# ----------------------------------------------------------------------------------------------
@dataclass
class EpochTraining:
    lr: float
    eps: float
    progress: dict  # RunningTotals.progress() at the end of the epoch (over every rank)
    naw_means: list
    seconds: float
    timed_steps: int  # steps run in this process (fewer than the epoch's after a mid-epoch resume)
    stopped_at: int | None = None  # steps done when Ctrl-C stopped the epoch early
    step_losses: list | None = None  # each step's training loss (NaN for steps of an earlier process)
    class_counts: list | None = None  # training samples of each class in the epoch's order (every rank's)


def train_epochs(run: Run, data: Data, parts: Parts, progress: Progress) -> dict:
    """For each epoch: train, evaluate, record. Returns the run's summary."""
    s = run.s
    test = None
    with StopRequest() as stop:
        for epoch in range(progress.start_epoch, s.epochs):
            trained = train_epoch(run, data, parts, progress, epoch, stop)
            if trained.stopped_at is not None:  # Ctrl-C or SIGTERM mid-epoch: save where the step stands, stop
                run.folder.save_last(_checkpoint_state(run, data, parts, progress, epoch,
                                                       int(parts.step.step_in_epoch), False))
                run.say(f"nla_fast: {stop.name}: stopped at epoch {epoch}, step {trained.stopped_at}; wrote "
                        f"{run.folder.last}; continue with: python -m nla_fast.train --resume {run.folder.last}",
                        file=sys.stderr)
                return {"out": str(run.folder.path), "interrupted": True, "epoch": epoch, "step": trained.stopped_at,
                        "exit_code": stop.exit_code}
            test, valid, eval_seconds = evaluate_epoch(run, data, parts)
            record(run, data, parts, progress, epoch, trained, test, eval_seconds, valid)
            run.folder.save_last(_checkpoint_state(run, data, parts, progress, epoch, data.steps_per_epoch, True))
            run.folder.keep_best(progress.best.get("acc_epoch") == epoch, progress.best.get("mean_acc_epoch") == epoch)
            stop_after = distributed.any_rank(stop.requested, run.ctx, run.device)
            if epoch == s.epochs - 1 or stop_after or (s.plot_every and (epoch + 1) % s.plot_every == 0):
                run.folder.draw_plots(progress.history, test, data.classes, trained.eps, parts.nla_config,
                                      parts.step.totals.points, epoch)
            if stop_after:
                run.say(f"nla_fast: {stop.name}: stopped after epoch {epoch}; wrote {run.folder.last}; continue with: "
                        f"python -m nla_fast.train --resume {run.folder.last}", file=sys.stderr)
                return {"out": str(run.folder.path), "interrupted": True, "epoch": epoch,
                        "step": data.steps_per_epoch, "exit_code": stop.exit_code}
    return finish(run, data, progress, test)


def train_epoch(run: Run, data: Data, parts: Parts, progress: Progress, epoch: int, stop) -> EpochTraining:
    """The steps of one epoch (from ``progress.start_step``), with progress read back every
    ``--log-every`` steps; stops early on Ctrl-C, raises NonFiniteLoss on a NaN loss."""
    s, step, steps = run.s, parts.step, data.steps_per_epoch
    lr, eps = s.lr * s.gamma**epoch, eps_schedule(epoch, s.epochs, parts.nla_config.slope)
    order = data.order(epoch)
    drawn = data.order.class_counts(order, run.ctx.world_size, s.batch_size)
    order = shard(order, run.ctx.rank, run.ctx.world_size, s.batch_size)
    start = progress.start_step
    step.start_epoch(order, lr, eps, start)
    if progress.totals is not None:
        step.totals.load_state_dict(progress.totals)
    progress.start_step, progress.totals = 0, None  # the next epoch starts at its beginning
    # a bar only on a terminal; into a file or pipe the epoch's line (record) is the progress report
    bar = progress_bar(steps, epoch, s.epochs, s.progress and run.ctx.is_main and sys.stderr.isatty(), initial=start)
    t0 = time.perf_counter()
    for index in range(start, steps):
        step()
        done = index + 1
        # distributed: log points are the same on every rank (they agree on NaN and Ctrl-C there)
        log_point = done % s.log_every == 0 or done == steps
        stop_now = stop.requested and not run.ctx.distributed  # one process stops at once
        if log_point or stop_now:
            so_far = step.totals.progress(stop.requested)
            stop_now = so_far["stop"]
            if so_far["first_bad_step"] >= 0:
                bar.close()
                raise NonFiniteLoss(epoch, so_far["first_bad_step"])
            rate = (done - start) * s.batch_size / max(time.perf_counter() - t0, 1e-9)
            bar.set_postfix_str(f"loss {so_far['loss']:.4f}, {rate:.0f} samples/s")
            bar.update(done - bar.n)
        if stop_now and done < steps:
            bar.close()
            return EpochTraining(lr, eps, so_far, [], time.perf_counter() - t0, done - start, stopped_at=done,
                                 class_counts=drawn)
    final = step.totals.progress()
    naw_means = step.totals.naw_means()
    step_losses = step.totals.step_losses() if s.tensorboard else None  # a collective: every rank calls it
    seconds = time.perf_counter() - t0
    bar.close()
    return EpochTraining(lr, eps, final, naw_means, seconds, steps - start, step_losses=step_losses,
                         class_counts=drawn)


def evaluate_epoch(run: Run, data: Data, parts: Parts) -> tuple[dict, dict | None, float]:
    """Test-split and validation-split (None where there is none) metrics, exact over all
    ranks, and the seconds they took."""
    t0 = time.perf_counter()
    distributed.broadcast_buffers(parts.model, run.ctx)  # every rank evaluates the model rank 0 saves

    def on(images, labels):
        return parts.step.evaluate(images, labels, data.eval_transform, len(data.classes), data.classes,
                                   batch_size=run.s.eval_batch_size, amp=run.s.amp,
                                   reduce=MetricCounts.all_reduce if run.ctx.distributed else None)

    test = on(data.test_images, data.test_labels)
    valid = on(data.valid_images, data.valid_labels) if data.valid_images is not None else None
    return test, valid, time.perf_counter() - t0


def record(run: Run, data: Data, parts: Parts, progress: Progress, epoch: int, trained: EpochTraining,
           test: dict, eval_seconds: float, valid: dict | None = None) -> None:
    """The epoch's line of metrics.jsonl (.csv, TensorBoard) and of the log, and the best
    accuracies so far: on the validation split where there is one, else on the test split."""
    s, world_size = run.s, run.ctx.world_size
    samples = trained.timed_steps * s.batch_size * world_size
    row = epoch_record(epoch, trained.progress, test, trained.naw_means, data.classes, trained.lr, trained.eps,
                       data.steps_per_epoch * s.batch_size * world_size, samples / trained.seconds,
                       trained.seconds, eval_seconds, world_size, parts.step.mode, valid=valid)
    row["compiled"] = parts.step.compiled
    row["train_class_counts"] = dict(zip(data.classes, trained.class_counts)) if trained.class_counts else None
    for prefix, split in (("test_", test), ("valid_", valid)):
        if split is not None:
            row.update({f"{prefix}macro_f1": split["macro_f1"], f"{prefix}loss": split["loss"],
                        f"{prefix}per_class_f1": dict(zip(data.classes, split["per_class_f1"]))})
    # in every row (one column set for metrics.csv), set in the first epoch this process trained:
    # its first step includes compiling (and warm-up)
    row["first_step_s"] = None
    if not progress.first_step_reported:
        row["first_step_s"] = parts.step.first_step_s
        progress.first_step_reported = True
        run.say(f"nla_fast: first step {parts.step.first_step_s:.1f} s"
                + (f" (compiling with Inductor, cache {inductor_cache_dir()})" if parts.step.compiled else ""))
    progress.history.append(row)
    run.folder.write_metrics(progress.history)
    run.folder.log_epoch(row)
    if run.folder.tensorboard is not None and trained.step_losses is not None:
        run.folder.tensorboard.train_steps(epoch, trained.step_losses)
    p = trained.progress
    on_valid = (f"valid acc {100 * valid['acc']:.2f}% mean {100 * valid['mean_acc']:.2f}% "
                f"F1 {100 * valid['macro_f1']:.2f}% loss {valid['loss']:.4f} | " if valid is not None else "")
    run.say(f"epoch {epoch} ({epoch + 1}/{s.epochs}): train loss {p['loss']:.4f} "
            f"acc {100 * p['acc']:.2f}% | {on_valid}test acc {100 * test['acc']:.2f}% mean {100 * test['mean_acc']:.2f}% "
            f"F1 {100 * test['macro_f1']:.2f}% top-2 {100 * test['top2_acc']:.2f}% loss {test['loss']:.4f} | "
            f"lr {trained.lr:.3g} eps {trained.eps:.3f} | "
            f"{row['samples_per_s']:.0f} samples/s ({parts.step.mode}{', compiled' if parts.step.compiled else ''})",
            flush=True)
    _update_best(progress.best, epoch, test, valid)


def _update_best(best: dict, epoch: int, test: dict, valid: dict | None) -> None:
    """``best["acc"]`` / ``["mean_acc"]``: the best so far on the selection split (``best["split"]``);
    ``["test_acc_at_acc_epoch"]`` etc.: the test split's numbers at those epochs."""
    chosen = valid if valid is not None else test
    best["split"] = "valid" if valid is not None else "test"
    for key in ("acc", "mean_acc"):
        if chosen[key] > best[key]:
            best[key], best[f"{key}_epoch"] = chosen[key], epoch
            best[f"test_acc_at_{key}_epoch"], best[f"test_mean_acc_at_{key}_epoch"] = test["acc"], test["mean_acc"]


def finish(run: Run, data: Data, progress: Progress, test: dict | None) -> dict:
    best = progress.best
    run.say(f"nla_fast: done. {run.folder.summary()}")
    if progress.history and best.get("split", "test") == "test":
        run.say(f"nla_fast: best test accuracy {100 * best['acc']:.2f}% (epoch {best.get('acc_epoch')}), "
                f"best mean class accuracy {100 * best['mean_acc']:.2f}% (epoch {best.get('mean_acc_epoch')}); "
                "chosen on the test split (the dataset has no validation split; as the reference code)")
    elif progress.history:
        for key, name, file in (("acc", "accuracy", "best.pt"), ("mean_acc", "mean class accuracy", "best_mean.pt")):
            if f"test_acc_at_{key}_epoch" not in best:  # never improved (e.g. NaN: a split without some class)
                continue
            run.say(f"nla_fast: best {best['split']} {name} {100 * best[key]:.2f}% (epoch {best.get(key + '_epoch')}, "
                    f"{file}): test accuracy there {100 * best[f'test_acc_at_{key}_epoch']:.2f}%, mean class "
                    f"accuracy {100 * best[f'test_mean_acc_at_{key}_epoch']:.2f}%")
    if test is not None:
        run.say(format_table(test, data.classes))
    return {"out": str(run.folder.path), "interrupted": False, "history": progress.history, "best": best}


def _run_config(run: Run, parts: Parts) -> dict:
    """config.json, also saved in every checkpoint."""
    config = {"train": dataclasses.asdict(run.s), "nla": dataclasses.asdict(parts.nla_config),
              "device_type": run.device.type,
              "model_selection": model_selection_note(run.s.dataset, run.s.val_fraction, run.s.val_seed),
              "environment": environment_record(),
              "command_line": ["python", "-m", "nla_fast.train", *run.command_line]
              if run.command_line is not None else None}
    if run.ctx.enabled:
        config["world_size"] = run.ctx.world_size
    return config


def _checkpoint_state(run: Run, data: Data, parts: Parts, progress: Progress, epoch: int, steps_done: int,
                     epoch_done: bool) -> dict:
    """Called on every rank (a distributed run gathers each rank's random states and sums)."""
    s, step = run.s, parts.step
    own = {"rng": ckpt.capture_rng_states(parts.step.generator), "totals": step.totals.state_dict()}
    gathered = distributed.gather_objects(own, run.ctx) if run.ctx.enabled else None
    blob = {
        "format": ckpt.FORMAT,
        "model": {k: v.detach().cpu() for k, v in parts.model.state_dict().items()},
        "model_info": {"arch": s.model, "num_classes": len(data.classes), "classes": data.classes,
                       "image_size": s.image_size, "mean": list(s.mean), "std": list(s.std), "dataset": s.dataset},
        "optimizer": parts.step.optimizer.state_dict(),
        "schedule": {"base_lr": s.lr, "gamma": s.gamma, "lr": float(step.lr), "slope": parts.nla_config.slope,
                     "epochs": s.epochs, "eps": float(step.eps)},
        "epoch": epoch,
        "step": steps_done,
        "epoch_done": epoch_done,
        "rng": own["rng"],
        "config": _run_config(run, parts),
        "totals": own["totals"],
        "best": progress.best,
        "history": [json_safe(row) for row in progress.history],
    }
    if gathered is not None:
        blob["rank_states"] = gathered
    return blob


def main(argv=None) -> int:
    args = sys.argv[1:] if argv is None else list(argv)
    command = parse_command_line(args)
    if command.seeds is not None:
        from .seeds import run_seeds

        return run_seeds(command, args)
    return _report(lambda: train(command.settings, resume=command.resume, explicit=command.explicit,
                                 overwrite=command.overwrite, command_line=args))


def _report(run_training) -> int:
    """``run_training()``'s exit status: 0 done, 130 interrupted (Ctrl-C), 143 SIGTERM, 1 a non-finite
    loss or a full disk, 2 an error (each told in one line). ``--seeds`` reports each seed's run so."""
    try:
        use_cpu_threads()  # a shared host's cores, not oversubscribed (nla_fast.threads)
        with sigterm_raises():
            result = run_training()
    except KeyboardInterrupt:
        print("nla_fast: interrupted", file=sys.stderr)
        return 130
    except Terminated:
        print("nla_fast: SIGTERM outside the training steps: stopped; the checkpoints written so far are kept",
              file=sys.stderr)
        return 143
    except NonFiniteLoss as err:
        print(f"nla_fast: error: {err}", file=sys.stderr)
        return 1
    except (WeightsError, backbones.ModelError, DatasetError, FileNotFoundError, ckpt.CheckpointError,
            BackendUnavailable, RunFolderError, SettingsError, MissingExtra, DeviceError, FolderUnusable,
            ThreadsError) as err:
        print(f"nla_fast: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk (disk.WriteFailed names the file and the free space), an I/O error
        print(f"nla_fast: error: {err}", file=sys.stderr)
        return 1
    return result.get("exit_code", 130) if result.get("interrupted") else 0


if __name__ == "__main__":
    sys.exit(main())
