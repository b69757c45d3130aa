"""A trained network on images: load it from a checkpoint (``load_model``), its class scores
(``predict_logits``) and its metrics on a labelled split (``evaluate``).

What the commands that use a trained model need (``nla_fast.evaluate``, ``nla_fast.classify``,
``nla_fast.load_model``), and what the trainer's step evaluates with; it imports nothing of
the training step (``engine``), which imports it.
"""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Callable

import torch

from . import checkpoint as ckpt
from .augment import EvalTransform
from .device import pick_device
from .metrics import MetricCounts
from .model import build_resnet18

AMP_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "off": None}

Transform = Callable[[torch.Tensor], torch.Tensor]


def load_model(path, device: str | torch.device = "auto") -> torch.nn.Module:
    """The network of an nla_fast checkpoint in eval mode, with ``classes``, ``image_size`` and
    ``eval_transform`` (uint8 NHWC batch -> normalised float NCHW) attached.

    ``path`` may also be a folder written by ``python -m nla_fast.export --format safetensors``
    (or its ``model.safetensors`` / ``model.json``)."""
    if Path(path).is_dir() or Path(path).name in ("model.safetensors", "model.json"):
        from .export import load_exported

        return load_exported(path, device)
    state = ckpt.load(path)
    info = state["model_info"]
    device = pick_device(device)
    model = build_resnet18(info["num_classes"])
    model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last).eval()
    model.classes = list(info["classes"])
    model.image_size = int(info["image_size"])
    model.eval_transform = EvalTransform(model.image_size)
    model.checkpoint_epoch = state["epoch"]
    return model


def autocast_context(device: torch.device, amp: str):
    dtype = AMP_DTYPES[amp]
    if dtype is None:
        return contextlib.nullcontext()
    # the autocast weight cache must be off for CUDA-graph capture (and is useless in training)
    return torch.autocast(device.type, dtype=dtype, cache_enabled=False)


@torch.no_grad()
def predict_logits(model, images: torch.Tensor, transform: Transform, batch_size: int = 256,
                   amp: str = "off", tta: str | None = None, channels_last: bool = True,
                   pad_last_batch: bool = False) -> torch.Tensor:
    """float32 class scores for uint8 NHWC ``images``: logits, or with ``tta="flip"`` the mean
    log-probability of each image and its horizontal flip.

    ``pad_last_batch``: every batch the network sees has ``min(batch_size, len(images))``
    images, the last one padded with copies of its last image (scores of the padding are
    dropped; in eval mode each image's scores depend on it alone). A compiled network then
    sees one shape."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    memory = torch.channels_last if channels_last else torch.contiguous_format
    outputs = []
    size = min(batch_size, len(images)) if pad_last_batch else batch_size
    try:
        for start in range(0, len(images), size):
            batch = images[start:start + size].to(device, non_blocking=True)
            real = len(batch)
            if pad_last_batch and real < size:
                batch = torch.cat([batch, batch[-1:].expand(size - real, *batch.shape[1:])])
            inputs = transform(batch).contiguous(memory_format=memory)
            with autocast_context(device, amp):
                if tta == "flip":
                    both = torch.cat([inputs, inputs.flip(3)]).contiguous(memory_format=memory)
                    scores = model(both).float().log_softmax(dim=1)
                    scores = (scores[: len(inputs)] + scores[len(inputs):]) / 2
                elif tta in (None, "none"):
                    scores = model(inputs).float()
                else:
                    raise ValueError(f"tta must be None or 'flip', got {tta!r}")
            outputs.append(scores[:real])
    finally:
        model.train(was_training)
    if not outputs:
        return torch.zeros(0, 0, device=device)
    return torch.cat(outputs)


def evaluate(model, images, labels, transform: Transform, num_classes: int, class_names=None,
             batch_size: int = 256, amp: str = "off", tta: str | None = None,
             channels_last: bool = True, reduce: Callable[[MetricCounts], None] | None = None,
             pad_last_batch: bool = False) -> dict:
    """Overall, mean-class, per-class and top-2 accuracy and the confusion matrix on a split.

    ``reduce``: sums the counts over the ranks of a distributed run (each rank passing its own
    slice of the split), so the metrics are exact for the whole split. ``pad_last_batch``: see
    ``predict_logits``.
    """
    scores = predict_logits(model, images, transform, batch_size, amp, tta, channels_last, pad_last_batch)
    device = next(model.parameters()).device
    counts = MetricCounts(num_classes, device)
    if len(images):
        counts.update(scores, labels.to(device))
    if reduce is not None:
        reduce(counts)
    return counts.summarise(class_names)
