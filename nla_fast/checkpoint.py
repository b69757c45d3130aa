"""Checkpoints: written atomically (``nla_fast.atomic``), read back with ``torch.load(weights_only=True)``.

A training checkpoint is a plain dict of tensors, numbers, strings, lists and dicts (nothing
that needs unpickling of arbitrary classes):

    format        "nla_fast.checkpoint/1"
    model         the network's state dict (no wrapper prefixes)
    model_info    {"arch", "num_classes", "classes", "image_size", "mean", "std"}
    optimizer     Adam's state dict
    schedule      {"base_lr", "gamma", "lr", "eps", "slope", "epochs"}
    epoch         the epoch the state belongs to (0-based)
    step          steps of ``epoch`` already done; == steps_per_epoch after a finished epoch
    epoch_done    True once ``epoch`` is fully trained and evaluated
    rng           every random state: torch CPU, CUDA, numpy, python, the augmentation generator
    config        the run's settings (``TrainSettings`` as a dict) and the NLA loss config
    totals        the running sums of a partly trained epoch (for an exact mid-epoch resume)
    best          {"acc", "mean_acc"} so far
"""
from __future__ import annotations

import os
import random
from pathlib import Path

import numpy as np
import torch

from . import atomic

FORMAT = "nla_fast.checkpoint/1"


class CheckpointError(ValueError):
    """A file is not an nla_fast checkpoint (or not one this version can read)."""


def save(blob: dict, path: str | os.PathLike) -> None:
    """Write a checkpoint atomically (see ``nla_fast.atomic``): an interrupted save keeps the
    previous file."""
    atomic.torch_save(blob, path)


def load(path: str | os.PathLike, map_location="cpu") -> dict:
    """Read a checkpoint with ``weights_only=True``; a clear error if it is missing or foreign."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    kind = _foreign_kind(path)
    if kind is not None:
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {kind}, not a checkpoint written by "
                              "nla_fast.train")
    try:
        blob = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as err:  # truncated or overwritten files fail inside torch.load in many ways
        raise CheckpointError(f"cannot read checkpoint {str(path)!r}: {damage(err)}") from err
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:
        raise CheckpointError(
            f"{str(path)!r} is not an nla_fast checkpoint (no format tag {FORMAT!r}); "
            "backbone weights files go to `--weights PATH` instead"
        )
    return blob


# What a file that is not a PyTorch zip archive (torch.save's format since PyTorch 1.6) looks like.
_SIGNATURES = ((b"\x89PNG", "a PNG image"), (b"\xff\xd8\xff", "a JPEG image"), (b"GIF8", "a GIF image"),
               (b"BM", "a BMP image"), (b"%PDF", "a PDF document"), (b"\x1f\x8b", "a gzip file"))


def _foreign_kind(path: Path) -> str | None:
    """A few words on what ``path`` is when it clearly is not a checkpoint; None when it may be one."""
    with open(path, "rb") as handle:
        head = handle.read(512)
    if not head:
        return "the file is empty (0 bytes)"
    if head.startswith(b"PK") or head.startswith(b"\x80"):  # zip archive, or a legacy pickle
        return None
    for signature, kind in _SIGNATURES:
        if head.startswith(signature):
            return kind
    try:
        head.decode("utf-8")
    except UnicodeDecodeError as err:
        if err.start < len(head) - 3:  # not just a character cut at the end of the sample
            return f"an unknown binary file (it starts with {head[:8]!r})"
    return f"a text file (it starts with {head[:24].decode('utf-8', 'replace')!r})"


def damage(err: BaseException) -> str:
    """What ``torch.load``'s error says about a damaged file, in one line: its first sentence
    (the rest is torch's advice to set weights_only=False, which is wrong for a damaged file)."""
    text = " ".join(str(err).split()).split(". ")[0][:160]
    detail = f"{type(err).__name__}: {text}" if text else type(err).__name__
    return f"damaged, truncated or not written by nla_fast.train ({detail})"


def capture_rng_states(augment_generator: torch.Generator | None) -> dict:
    """Every random state a run draws from, as tensors and plain values."""
    np_state = np.random.get_state()
    states = {
        "torch_cpu": torch.get_rng_state(),
        "numpy": {
            "name": str(np_state[0]),
            "keys": torch.from_numpy(np_state[1].astype(np.int64)),
            "pos": int(np_state[2]),
            "has_gauss": int(np_state[3]),
            "cached_gaussian": float(np_state[4]),
        },
        "python": _python_state_to_plain(random.getstate()),
        "augment": augment_generator.get_state() if augment_generator is not None else None,
        "augment_device": str(augment_generator.device) if augment_generator is not None else None,
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        states["torch_cuda"] = torch.cuda.get_rng_state_all()
    return states


def restore_rng_states(states: dict, augment_generator: torch.Generator | None) -> None:
    torch.set_rng_state(states["torch_cpu"])
    numpy_state = states["numpy"]
    np.random.set_state((
        numpy_state["name"],
        numpy_state["keys"].numpy().astype(np.uint32),
        numpy_state["pos"],
        numpy_state["has_gauss"],
        numpy_state["cached_gaussian"],
    ))
    random.setstate(_python_state_from_plain(states["python"]))
    cuda_states = states.get("torch_cuda")
    if cuda_states and torch.cuda.is_available():
        for index, state in enumerate(cuda_states[: torch.cuda.device_count()]):
            torch.cuda.set_rng_state(state, index)
    if augment_generator is not None and states.get("augment") is not None:
        augment_generator.set_state(states["augment"])


def _python_state_to_plain(state):
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def _python_state_from_plain(plain):
    return (plain["version"], tuple(plain["internal"]), plain["gauss"])


# what other readers of PyTorch files (weights files, nla_fast.model) say about a foreign file
foreign_kind = _foreign_kind
