"""The training step and the evaluation pass.

``TrainStep`` is one optimisation step that reads everything it needs from device tensors:

    batch indices   epoch_order[step_in_epoch * B + arange(B)]   (gathered on the device)
    images, labels  data.batch_images(indices), data.labels[indices]  (where the images live,
                    on the device or staged from host memory: ``nla_fast.placement``)
    views           augment(images, generator) -> (view1, view2 = hflip(view1))
    forward         one pass over cat(view1, view2) (``views="concat"``) or two (``"separate"``),
                    channels_last, under bf16/fp16 autocast or in float32
    loss            the fused NLA loss (eps read from a device tensor) or plain cross-entropy
    update          backward, Adam (learning rate read from a device tensor)
    bookkeeping     running sums of loss, correct, NAW weight per class, (p_gt, p_nn) per sample,
                    the first step whose loss was not finite; step_in_epoch += 1

Nothing in it reads a value back to the host, so on CUDA the whole step is captured once as a
CUDA graph and each later step is one ``graph.replay()``.

With ``StepOptions.compile`` (the trainer's default on CUDA) the forward over both views, the
loss and the per-sample statistics (``TrainStep._forward_loss``) are one ``torch.compile``d
function (Inductor, fixed shapes); its backward is AOTAutograd's. Augmentation, Adam and the
running sums stay outside it, and on CUDA the whole step, compiled kernels included, is still
captured as one CUDA graph by this module (not by Inductor's ``reduce-overhead`` mode, whose
graphs would cover the compiled region only and leave Adam and the augmentation to eager
launches). Compiling happens at the first step; if it fails (old torch, no Triton, an Inductor
error) the step says so in one line and runs uncompiled from then on. The learning rate and eps are
changed between epochs by writing into their tensors, never by re-capturing. On the CPU (or
with ``cuda_graphs=False``) the same function runs eagerly.

The per-epoch order is a seeded global permutation (``epoch_permutation``) from which each rank
of a distributed run takes its shard (``shard``). Under ``DistributedDataParallel`` the step is
the same function; the gradient all-reduce happens inside its backward (and is captured with
it on CUDA, see ``agree`` in ``TrainStep``). ``RunningTotals.progress()`` and ``naw_means()``
sum over the ranks themselves, as ``evaluate`` does.
"""
from __future__ import annotations

import math
import os
import time
import warnings
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
import torch.nn.functional as F

from .augment import TrainAugment
from .config import NLAConfig
from .distributed import all_reduce_
from .evaluation import AMP_DTYPES, Transform, autocast_context, evaluate
from .loss import naw_weight, nla_loss, resolve_backend
from .messages import short_error
from .metrics import MetricCounts
from .placement import Placement
from .reference import ground_truth_and_nearest_negative

WARMUP_STEPS = 3  # eager steps (real training steps) on a side stream before the capture
COMPILE_MODES = ("default", "max-autotune-no-cudagraphs")  # torch.compile modes without Inductor's own graphs

Augment = Callable[[torch.Tensor, torch.Generator], "tuple[torch.Tensor, torch.Tensor]"]


# --------------------------------------------------------------------------------------------
# Epoch order
# --------------------------------------------------------------------------------------------
def epoch_permutation(num_samples: int, seed: int, epoch: int) -> torch.Tensor:
    """The global sample order of ``epoch``: a permutation that depends only on (seed, epoch)."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, int(epoch)]).generate_state(2, dtype=np.uint32)
    generator = torch.Generator().manual_seed(int(state[0]) << 32 | int(state[1]))
    return torch.randperm(num_samples, generator=generator)


def shard(order: torch.Tensor, rank: int, world_size: int, batch_size: int) -> torch.Tensor:
    """The samples rank ``rank`` trains on: every ``world_size``-th of ``order``, cut to full batches.

    Training batches are always full: the remainder of an epoch (fewer than ``batch_size``
    samples per rank) is dropped, a different remainder every epoch.
    """
    mine = order[rank::world_size]
    steps = len(order) // world_size // batch_size
    return mine[: steps * batch_size]


# --------------------------------------------------------------------------------------------
# Running sums kept on the device
# --------------------------------------------------------------------------------------------
class RunningTotals:
    """Sums over the steps of an epoch, updated inside the step; read on the host every N steps."""

    def __init__(self, num_classes: int, capacity: int, device):
        self.loss_sum = torch.zeros((), dtype=torch.float64, device=device)
        self.correct = torch.zeros((), dtype=torch.int64, device=device)
        self.seen = torch.zeros((), dtype=torch.int64, device=device)
        self.naw_sum = torch.zeros(num_classes, dtype=torch.float64, device=device)
        self.naw_count = torch.zeros(num_classes, dtype=torch.int64, device=device)
        self.steps = torch.zeros((), dtype=torch.int64, device=device)
        # (p_gt, p_nn) of every training sample of the epoch, by its position in the epoch order
        self.points = torch.full((capacity, 2), math.nan, dtype=torch.float32, device=device)
        self.first_bad_step = torch.full((), -1, dtype=torch.int64, device=device)

    def tensors(self) -> dict[str, torch.Tensor]:
        return {name: value for name, value in vars(self).items() if isinstance(value, torch.Tensor)}

    def reset(self) -> None:
        for name, value in self.tensors().items():
            if name == "points":
                value.fill_(math.nan)
            elif name == "first_bad_step":
                value.fill_(-1)
            else:
                value.zero_()

    def progress(self, stop_requested: bool = False) -> dict:
        """Loss and accuracy so far, the first non-finite step and whether to stop: one small
        device-to-host copy. In a distributed run the sums are over every rank, the bad step is
        the earliest of any rank, and ``stop`` is True when any rank asked (it rides along in
        the same reduction, so all ranks stop at the same step)."""
        sums = torch.stack([self.loss_sum, self.correct.double(), self.seen.double(), self.steps.double()])
        first_bad = torch.where(self.first_bad_step >= 0, self.first_bad_step.double(), math.inf)
        stop = torch.tensor(float(stop_requested), dtype=torch.float64, device=sums.device)
        flags = torch.stack([-first_bad, stop])  # the MAX of -first_bad is the earliest bad step
        all_reduce_(sums, "sum")
        all_reduce_(flags, "max")
        loss_sum, correct, seen, steps, minus_first_bad, stop = torch.cat([sums, flags]).cpu().tolist()
        return {
            "loss": loss_sum / steps if steps else math.nan,  # mean over every rank's steps
            "acc": correct / seen if seen else math.nan,
            "seen": int(seen),
            "steps": int(steps),
            "first_bad_step": int(-minus_first_bad) if math.isfinite(minus_first_bad) else -1,
            "stop": bool(stop),
        }

    def naw_means(self) -> list[float | None]:
        """Mean NAW weight per class over the epoch's samples (of every rank)."""
        sums, counts = all_reduce_(self.naw_sum.clone(), "sum"), all_reduce_(self.naw_count.clone(), "sum")
        return [s / n if n else None for s, n in zip(sums.cpu().tolist(), counts.cpu().tolist())]

    def state_dict(self) -> dict:
        return {name: value.detach().cpu().clone() for name, value in self.tensors().items()}

    def load_state_dict(self, state: dict) -> None:
        for name, value in self.tensors().items():
            value.copy_(state[name])


# --------------------------------------------------------------------------------------------
# The step
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StepOptions:
    batch_size: int
    views: str = "concat"  # one forward over both views, or "separate" (two, like the reference)
    loss: str = "nla"  # or "ce": cross-entropy on view 1 only (baseline)
    amp: str = "bf16"  # "bf16", "fp16" or "off"
    backend: str = "auto"  # loss backend
    channels_last: bool = True
    cuda_graphs: bool = True  # ignored off CUDA
    warmup_steps: int = WARMUP_STEPS  # eager steps before the capture (DDP wants more, see train.py)
    loss_scale: float = 1.0  # the NLA loss is multiplied by it (distributed.global_batch_loss)
    compile: bool = False  # torch.compile forward + loss (and the evaluation forward)
    compile_mode: str = "default"  # torch.compile's mode; "max-autotune-no-cudagraphs" tunes more

    def __post_init__(self):
        if self.views not in ("concat", "separate"):
            raise ValueError(f"views must be 'concat' or 'separate', got {self.views!r}")
        if self.loss not in ("nla", "ce"):
            raise ValueError(f"loss must be 'nla' or 'ce', got {self.loss!r}")
        if self.amp not in AMP_DTYPES:
            raise ValueError(f"amp must be one of {tuple(AMP_DTYPES)}, got {self.amp!r}")
        if self.compile_mode not in COMPILE_MODES:
            raise ValueError(f"compile_mode must be one of {COMPILE_MODES} (the step captures its CUDA graph itself; "
                             f"Inductor's own graph modes would nest in it), got {self.compile_mode!r}")


ADAM_IMPLEMENTATIONS = ("auto", "fused", "foreach")


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float, device: torch.device,
                   capturable: bool | None = None, implementation: str = "auto"):
    """Adam with L2 weight decay (not AdamW) and its learning rate held in a device tensor.

    CUDA graphs (``capturable``, the default on CUDA): the fused kernel, made capturable (its
    step counts live on the device; one pass over parameters, gradients and moments instead of
    the dozen multi-tensor passes of ``foreach``), or with ``implementation="foreach"`` the
    capturable multi-tensor Adam. Otherwise the fused kernel (CPU or CUDA), which also reads a
    tensor learning rate; the per-parameter loop where fused is unavailable.
    """
    if implementation not in ADAM_IMPLEMENTATIONS:
        raise ValueError(f"implementation must be one of {ADAM_IMPLEMENTATIONS}, got {implementation!r}")
    lr_tensor = torch.tensor(float(lr), dtype=torch.float32, device=device)
    params = list(model.parameters())
    if capturable is None:
        capturable = device.type == "cuda"
    if capturable and device.type == "cuda":
        if implementation == "foreach":
            return torch.optim.Adam(params, lr=lr_tensor, weight_decay=weight_decay, capturable=True, foreach=True)
        return torch.optim.Adam(params, lr=lr_tensor, weight_decay=weight_decay, capturable=True, fused=True)
    try:
        return torch.optim.Adam(params, lr=lr_tensor, weight_decay=weight_decay, fused=True)
    except (RuntimeError, ValueError):
        return torch.optim.Adam(params, lr=lr_tensor, weight_decay=weight_decay, foreach=False)


def inductor_cache_dir() -> str:
    """Where Inductor keeps its compiled kernels: ``$TORCHINDUCTOR_CACHE_DIR`` when the user set
    it, else set to ``<nla_fast cache>/inductor`` (``$NLA_FAST_CACHE`` or ``~/.cache/nla_fast``),
    a folder that outlives reboots, so a second run of the same shapes starts in seconds.
    Must run before the first compilation (Inductor fixes its folder then)."""
    current = os.environ.get("TORCHINDUCTOR_CACHE_DIR")
    if current:
        return current
    from .data.cache import cache_dir

    folder = str(cache_dir() / "inductor")
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = folder
    return folder


def compile_function(fn, mode: str = "default"):
    """``torch.compile(fn)`` with fixed shapes: the step's shapes never change, and a dynamic
    first guess would cost a recompilation. Nothing is compiled until the first call."""
    inductor_cache_dir()
    return torch.compile(fn, dynamic=False, mode=None if mode == "default" else mode)


def augmentation_generator(device: torch.device, seed: int) -> torch.Generator:
    """The generator the augmentation draws from, seeded. On CUDA this is the device's default
    generator, which every CUDA-graph capture tracks by itself (no registration needed)."""
    if device.type == "cuda":
        generator = torch.cuda.default_generators[device.index if device.index is not None
                                                  else torch.cuda.current_device()]
    else:
        generator = torch.Generator(device=device)
    generator.manual_seed(int(seed))
    return generator


def load_optimizer_state(optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Load Adam's state but keep this run's learning-rate tensor and implementation flags
    (a checkpoint written on the CPU, fused, can continue on CUDA, capturable, and back)."""
    kept = [{key: group[key] for key in ("lr", "capturable", "fused", "foreach", "differentiable") if key in group}
            for group in optimizer.param_groups]
    optimizer.load_state_dict(state)
    for group, own in zip(optimizer.param_groups, kept):
        group.update(own)


class NonFiniteLoss(RuntimeError):
    def __init__(self, epoch: int, step: int):
        super().__init__(
            f"the training loss became NaN or infinite at epoch {epoch}, step {step} "
            f"(both 0-based); stopping. last.pt keeps the last good state (end of epoch {epoch - 1})"
            if epoch > 0 else
            f"the training loss became NaN or infinite at epoch {epoch}, step {step} (both 0-based); "
            "stopping before any checkpoint was written"
        )
        self.epoch, self.step = epoch, step


class TrainStep:
    """One training step over device-resident data; call it once per step (see module docstring)."""

    def __init__(self, model, optimizer, data: Placement, augment: Augment, generator: torch.Generator,
                 options: StepOptions, nla_config: NLAConfig, num_classes: int, steps_per_epoch: int,
                 agree: Callable[[bool], bool] | None = None, verbose: bool = True,
                 eval_model: torch.nn.Module | None = None):
        """``data``: where the training images live (``nla_fast.placement``): its labels, the
        device order of an epoch and each step's batch. ``agree(ok) -> bool`` (distributed
        runs): True when the CUDA-graph capture succeeded on every rank (a captured NCCL
        collective must be captured on all ranks or none). ``verbose``: print notes.
        ``eval_model``: what ``evaluate`` runs (default ``model``; the bare network when
        ``model`` is a DDP wrapper: evaluation needs no gradient synchronisation)."""
        self.model, self.optimizer, self.data = model, optimizer, data
        self.augment, self.generator = augment, generator
        self.options, self.nla_config = options, nla_config
        self.agree, self.verbose = agree, verbose
        self.device = data.labels.device
        # a placement's soft_labels (N x C distributions) are the targets of cross-entropy
        self.soft_targets = getattr(data, "soft_labels", None) is not None
        if self.soft_targets and options.loss != "ce":
            raise ValueError("soft label targets need loss='ce': the NLA loss takes one label per sample")
        batch = options.batch_size
        self.host_step = 0  # the host's count of this epoch's steps (the device keeps its own)
        self.steps_per_epoch = steps_per_epoch
        self.epoch_order = torch.zeros(steps_per_epoch * batch, dtype=torch.int64, device=self.device)
        self.step_in_epoch = torch.zeros((), dtype=torch.int64, device=self.device)
        self.offsets = torch.arange(batch, dtype=torch.int64, device=self.device)
        self.eps = torch.zeros((), dtype=torch.float32, device=self.device)
        self.lr = optimizer.param_groups[0]["lr"]
        self.totals = RunningTotals(num_classes, steps_per_epoch * batch, self.device)
        self.scaler = None
        if options.amp == "fp16":
            self.scaler = torch.amp.GradScaler(self.device.type)
        self.use_graph = options.cuda_graphs and self.device.type == "cuda" and self.scaler is None
        self.graph = None
        self.eager_steps_done = 0
        self.mode = "cuda-graph (after warm-up)" if self.use_graph else "eager"
        self.note = None
        if options.cuda_graphs and self.device.type == "cuda" and self.scaler is not None:
            self.note = "fp16 needs GradScaler, whose inf check reads back every step: running without CUDA graphs"
        self.eval_model = model if eval_model is None else eval_model
        self.first_step_s = None  # wall time of the first step (compilation included), set by it
        self.forward_loss = self._forward_loss
        self.eval_forward = None  # the compiled evaluation forward, when compiling
        self.compiled = options.compile
        self.compile_unverified = options.compile  # until the first compiled step has run
        self.loss_backend = options.backend
        if options.compile:
            # resolved outside the traced region: the first resolution may build the extension or warn
            self.loss_backend = resolve_backend(options.backend, self.device)
            try:
                self.forward_loss = compile_function(self._forward_loss, options.compile_mode)
                self.eval_forward = compile_function(self.eval_model, options.compile_mode)
            except Exception as err:  # torch.compile itself refused (e.g. an unsupported Python)
                self._stop_compiling(err)

    # -- between epochs -----------------------------------------------------------------------
    def start_epoch(self, order: torch.Tensor, lr: float, eps: float, start_step: int = 0) -> None:
        """New sample order (this rank's, indices into the training set), learning rate and eps,
        written in place (a captured graph sees them)."""
        if len(order) != len(self.epoch_order):
            raise ValueError(f"epoch order has {len(order)} samples, the step expects {len(self.epoch_order)}")
        self.epoch_order.copy_(self.data.start_epoch(order), non_blocking=False)
        self.step_in_epoch.fill_(start_step)
        self.host_step = start_step
        self.lr.fill_(float(lr))
        self.eps.fill_(float(eps))
        if start_step == 0:
            self.totals.reset()

    # -- the step -------------------------------------------------------------------------------
    def _forward_loss(self, view1, view2, labels, eps, soft_targets=None):
        """Forward over the views, loss, NAW weights and the per-sample statistics the running
        sums need: ``(loss, weights, correct, points)``. The compiled region when compiling."""
        options, model = self.options, self.model
        memory = torch.channels_last if options.channels_last else torch.contiguous_format
        with autocast_context(self.device, options.amp):
            if options.loss == "ce":
                logits = model(view1.contiguous(memory_format=memory)).float()
                logits_flip = None
            elif options.views == "concat":
                both = torch.cat([view1, view2]).contiguous(memory_format=memory)
                logits, logits_flip = model(both).float().chunk(2)
            else:
                logits = model(view1.contiguous(memory_format=memory)).float()
                logits_flip = model(view2.contiguous(memory_format=memory)).float()
        if options.loss == "ce":
            # soft targets (FERPlus vote distributions): cross-entropy against the distribution
            loss = F.cross_entropy(logits, labels if soft_targets is None else soft_targets)
            weights = naw_weight(logits.detach(), labels, eps, self.nla_config,
                                 backend=self.loss_backend, validate=False)
        else:
            loss, weights = nla_loss(logits, logits_flip, labels, eps=eps, config=self.nla_config,
                                     backend=self.loss_backend, validate=False, return_weights=True)
            if options.loss_scale != 1.0:
                loss = loss * options.loss_scale
        with torch.no_grad():
            scores = logits.detach()
            correct = (scores.argmax(dim=1) == labels).sum()
            p_gt, p_nn, _ = ground_truth_and_nearest_negative(scores.softmax(dim=1), labels)
            points = torch.stack([p_gt, p_nn], dim=1)
        return loss, weights, correct, points

    def _step(self) -> None:
        """The whole step; device work only (captured as a CUDA graph on CUDA)."""
        positions = self.step_in_epoch * self.options.batch_size + self.offsets
        indices = self.epoch_order[positions]
        images = self.data.batch_images(indices)
        labels = self.data.labels[indices]
        soft = self.data.soft_labels[indices] if self.soft_targets else None
        view1, view2 = self.augment(images, self.generator)
        loss, weights, correct, points = self.forward_loss(view1, view2, labels, self.eps, soft)

        self.optimizer.zero_grad(set_to_none=True)
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

        with torch.no_grad():
            totals = self.totals
            loss = loss.detach()
            totals.loss_sum += loss.double()
            totals.correct += correct
            totals.seen += labels.numel()
            totals.steps += 1
            totals.naw_sum.index_add_(0, labels, weights.double())
            totals.naw_count.index_add_(0, labels, torch.ones_like(labels))
            totals.points[positions] = points
            bad = ~torch.isfinite(loss) & (totals.first_bad_step < 0)
            totals.first_bad_step.copy_(torch.where(bad, self.step_in_epoch, totals.first_bad_step))
            self.step_in_epoch += 1

    def _first_compiled_step(self) -> None:
        """The first step through the compiled function, where compiling happens (lazily, at the
        first call: forward at the forward, backward at the backward). If it fails, the step's
        effects so far are undone (nothing but the augmentation's random draws and the gradients
        happen before the optimiser) and it runs again: compiled with the loss written in plain
        PyTorch (Inductor fuses it itself) when the fused loss kernel was in the region, else
        uncompiled. Each fallback says so in one line."""
        state = self.generator.get_state()
        while True:
            try:
                self._step()
                break
            except Exception as err:
                if not self.compiled:
                    raise  # the uncompiled step failed: not a compilation problem
                self.generator.set_state(state)
                self.optimizer.zero_grad(set_to_none=True)
                if self.loss_backend != "reference":
                    self.loss_backend = "reference"
                    self.note = (f"torch.compile failed with the {self.options.backend!r} loss kernel inside "
                                 f"({short_error(err, first_line=True)}); compiling the plain PyTorch loss instead")
                    if self.verbose:
                        print(f"nla_fast: {self.note}", flush=True)
                    self.forward_loss = compile_function(self._forward_loss, self.options.compile_mode)
                    continue
                self._stop_compiling(err)
        self.compile_unverified = False

    def _stop_compiling(self, err: BaseException) -> None:
        self.forward_loss, self.eval_forward = self._forward_loss, None
        self.loss_backend = self.options.backend  # the fused kernels run fine uncompiled
        self.compiled = self.compile_unverified = False
        self.note = f"torch.compile failed ({short_error(err, first_line=True)}); running the uncompiled step"
        if self.verbose:
            print(f"nla_fast: {self.note}", flush=True)

    def _run_step(self) -> None:
        if self.compile_unverified:
            self._first_compiled_step()
        else:
            self._step()

    def __call__(self) -> None:
        if self.host_step >= self.steps_per_epoch:
            raise RuntimeError(f"all {self.steps_per_epoch} steps of this epoch are done: call start_epoch() "
                               "with the next epoch's order first")
        self.data.before_step(self.host_step)
        self.host_step += 1
        if self.graph is not None:
            self.graph.replay()
            return
        first = self.first_step_s is None
        t0 = time.perf_counter()
        self._eager_or_capture()
        if first:  # one host synchronisation in the whole run, to time compilation honestly
            if self.device.type == "cuda":
                torch.cuda.synchronize(self.device)
            self.first_step_s = time.perf_counter() - t0

    def _eager_or_capture(self) -> None:
        if not self.use_graph:
            self._run_step()
            return
        if self.eager_steps_done < self.options.warmup_steps or self.compile_unverified:
            # warm-up: real training steps (the first compiles, never inside the capture), on a side
            # stream as CUDA-graph capture requires
            side = torch.cuda.Stream(self.device)
            side.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(side), warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=".*capturable=True.*")  # it is captured next
                self._run_step()
            torch.cuda.current_stream(self.device).wait_stream(side)
            self.eager_steps_done += 1
            return
        self._capture()
        if self.graph is not None:
            self.graph.replay()  # capture records the step without running it
        else:
            self._run_step()

    # -- evaluation -----------------------------------------------------------------------------
    def evaluate(self, images, labels, transform: Transform, num_classes: int, class_names=None,
                 batch_size: int = 256, amp: str = "off", reduce: Callable[[MetricCounts], None] | None = None) -> dict:
        """``evaluate`` with ``eval_model``, through its compiled forward when compiling: every
        batch then has one shape (the last one padded), so it compiles once per run, not per
        epoch or per remainder. A compilation failure at the first call: one line, uncompiled."""
        if self.eval_forward is not None:
            try:
                return evaluate(self.eval_forward, images, labels, transform, num_classes, class_names, batch_size,
                                amp, reduce=reduce, pad_last_batch=True)
            except Exception as err:
                self.eval_forward = None
                self.note = (f"torch.compile failed for evaluation ({short_error(err, first_line=True)}); "
                             "evaluating uncompiled")
                if self.verbose:
                    print(f"nla_fast: {self.note}", flush=True)
        return evaluate(self.eval_model, images, labels, transform, num_classes, class_names, batch_size, amp,
                        reduce=reduce)

    def _capture(self) -> None:
        torch.cuda.synchronize(self.device)
        graph = torch.cuda.CUDAGraph()
        default_generator = torch.cuda.default_generators[
            self.device.index if self.device.index is not None else torch.cuda.current_device()]
        try:
            if self.generator is not default_generator:
                if not hasattr(graph, "register_generator_state"):
                    raise RuntimeError("this torch cannot register a custom generator with a CUDA graph")
                graph.register_generator_state(self.generator)
            self.optimizer.zero_grad(set_to_none=True)
            with torch.cuda.graph(graph):
                self._step()
        except Exception as err:  # anything that cannot be captured: run eagerly instead
            failure = f"{type(err).__name__}: {err}"
        else:
            failure = None
        if self.agree is not None and not self.agree(failure is None) and failure is None:
            failure = "the capture failed on another rank"
        if failure is not None:
            self.use_graph = False
            self.mode = "eager"
            kept = " (still compiled)" if self.compiled else ""
            self.note = f"CUDA-graph capture failed ({failure}); running the step without graphs{kept}"
            if self.verbose:
                print(f"nla_fast: {self.note}", flush=True)
            torch.cuda.synchronize(self.device)
            return
        self.graph = graph
        self.mode = "cuda-graph"


def build_train_step(model: torch.nn.Module, data: Placement, options: StepOptions, *, image_size: int, lr: float,
                     weight_decay: float, seed: int, nla_config: NLAConfig, num_classes: int, steps_per_epoch: int,
                     network: torch.nn.Module | None = None, agree: Callable[[bool], bool] | None = None,
                     verbose: bool = True, adam: str = "auto") -> TrainStep:
    """The trainer's step over ``model`` (already on its device): Adam with its learning rate
    in a device tensor (capturable when the step is captured; ``adam``: see ``make_optimizer``),
    the batched augmentation at ``image_size`` drawing from a generator seeded with ``seed``.
    ``network``: what runs (a DDP wrapper of ``model``; default ``model``); with
    ``options.compile`` the step compiles its forward and loss itself, and evaluates ``model``. ``data``: a placement
    (``nla_fast.placement``). The optimiser and generator are ``step.optimizer`` / ``step.generator``."""
    device = data.labels.device
    optimizer = make_optimizer(model, lr, weight_decay, device, capturable=options.cuda_graphs, implementation=adam)
    generator = augmentation_generator(device, seed)
    return TrainStep(model if network is None else network, optimizer, data, TrainAugment(image_size), generator,
                     options, nla_config, num_classes, steps_per_epoch, agree=agree, verbose=verbose,
                     eval_model=model)
