"""Which torch device a command or a loaded model runs on: ``--device auto|cuda|cpu``, resolved
here for training, evaluation, prediction and export alike."""
from __future__ import annotations

import torch

DEVICE_CHOICES = ("auto", "cuda", "cpu")


class DeviceError(ValueError):
    """A device that this machine does not have; the message names it."""


def pick_device(name: str | torch.device = "auto") -> torch.device:
    """``"auto"``: the current CUDA device when torch sees one, else the CPU. ``"cuda"``: the
    current CUDA device (:class:`DeviceError` when there is none). Anything else
    (``"cpu"``, ``"cuda:1"``, a ``torch.device``) is taken as it is."""
    if isinstance(name, torch.device):
        return name
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("device 'cuda' was asked for, but torch sees no CUDA device (use --device cpu or auto)")
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device(name)


def device_type(name: str | torch.device) -> str:
    """The type of device ``pick_device(name)`` gives (``"cuda"``, ``"cpu"``), without initialising CUDA."""
    if isinstance(name, torch.device):
        return name.type
    if name == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return torch.device(name).type
