"""The network: torchvision's ResNet-18 with its classifier replaced by 512 -> C, and its weights.

``build_resnet18`` makes the model; ``load_backbone_weights`` fills it from a file in the
MS-Celeb-1M checkpoint layout of SPEC 1.3 (a dict whose ``'state_dict'`` holds torchvision
names, possibly prefixed ``module.``) or from a plain torchvision state dict, and says in
words what it loaded; ``load_imagenet_weights`` uses torchvision's weights API.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

PREFIXES = ("module.", "_orig_mod.", "model.", "backbone.")
IMAGENET_FILE = "resnet18-f37072fd.pth"
IMAGENET_URL = f"https://download.pytorch.org/models/{IMAGENET_FILE}"


def build_resnet18(num_classes: int) -> torch.nn.Module:
    """torchvision ResNet-18 (random init) with ``fc`` replaced by a fresh 512 -> ``num_classes`` layer."""
    import torchvision  # imported here: it is slow to import and `--help` does not need it

    model = torchvision.models.resnet18(weights=None)
    model.fc = torch.nn.Linear(model.fc.in_features, num_classes)
    return model


class WeightsError(RuntimeError):
    """A weights file or name cannot be used; the message says why and what to do."""


def _strip_prefixes(state: dict) -> tuple[dict, list[str]]:
    """Remove wrapper prefixes (``module.`` from DataParallel, ``_orig_mod.`` from torch.compile)."""
    stripped = []
    for prefix in PREFIXES:
        if state and all(key.startswith(prefix) for key in state):
            state = {key[len(prefix):]: value for key, value in state.items()}
            stripped.append(prefix)
    # DataParallel checkpoints sometimes mix prefixed and bare keys: strip 'module.' wherever it is.
    if any(key.startswith("module.") for key in state):
        state = {key[len("module."):] if key.startswith("module.") else key: v for key, v in state.items()}
        stripped.append("module.")
    return state, stripped


def read_state_dict(path: str | os.PathLike) -> dict:
    """The tensor dict inside a weights file: a PyTorch file loaded with ``weights_only=True``
    (a state dict, or a dict holding one under 'state_dict' / 'model_state_dict' / 'model'),
    or a ``.safetensors`` file. :class:`WeightsError` names the file and what is wrong."""
    from .checkpoint import foreign_kind

    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        return _read_safetensors(path)
    kind = foreign_kind(path)
    if kind is not None:
        raise WeightsError(f"weights file {str(path)!r} is {kind}, not a PyTorch weights file")
    try:
        blob = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # unpickling errors come in many types
        first = " ".join(str(err).split()).split(". ")[0][:160]
        if "Weights only load failed" in first:  # a readable file holding Python objects besides tensors
            raise WeightsError(
                f"cannot read weights file {str(path)!r} with torch.load(weights_only=True): it holds Python objects "
                "besides tensors and plain containers. Save the state dict alone (torch.save(model.state_dict(), "
                "path)), or a dict with 'state_dict' or 'model' holding one") from err
        raise WeightsError(f"cannot read weights file {str(path)!r}: damaged or truncated "
                           f"({type(err).__name__}: {first})") from err
    for key in ("state_dict", "model_state_dict", "model"):
        if isinstance(blob, dict) and isinstance(blob.get(key), dict):
            blob = blob[key]
            break
    if not isinstance(blob, dict) or not any(isinstance(v, torch.Tensor) for v in blob.values()):
        raise WeightsError(
            f"{str(path)!r} holds no state dict: expected a dict of tensors, or a dict whose "
            "'state_dict' is one (the MS-Celeb-1M ResNet-18 layout)"
        )
    return {k: v for k, v in blob.items() if isinstance(v, torch.Tensor)}


def _read_safetensors(path: Path) -> dict:
    try:
        from safetensors.torch import load_file
    except ImportError:
        raise WeightsError(f"{str(path)!r} is a safetensors file: pip install 'nla_fast[safetensors]'") from None
    try:
        return load_file(str(path))
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise WeightsError(f"cannot read weights file {str(path)!r}: {type(err).__name__}: {err}") from err


def _names(keys, limit: int = 8) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def load_backbone_weights(model: torch.nn.Module, path: str | os.PathLike, classifier=("fc",),
                          dry_run: bool = False) -> str:
    """Load every matching backbone tensor from ``path`` into ``model``; the classifier
    (parameters under the prefixes ``classifier``: ``fc`` for ResNet-18) is never taken.

    Returns a report in plain words: how many tensors were loaded, which prefix was stripped,
    what the model still lacks (left at its initial values) and what the file had that the
    model does not use. Tensors whose shape differs from the model's are skipped and named.
    ``dry_run``: only check that the file can be read and has a tensor that fits.
    """
    heads = tuple(f"{prefix}." for prefix in classifier)
    state, stripped = _strip_prefixes(read_state_dict(path))
    dropped_fc = sorted(k for k in state if k.startswith(heads))
    state = {k: v for k, v in state.items() if not k.startswith(heads)}
    own = model.state_dict()
    mismatched = sorted(k for k, v in state.items() if k in own and tuple(v.shape) != tuple(own[k].shape))
    usable = {k: v for k, v in state.items() if k in own and k not in mismatched}
    if not usable:
        raise WeightsError(
            f"{str(path)!r} has no tensor that fits a {type(model).__name__} like this one "
            f"(its keys look like: {_names(state, 5)}; the model's: {_names(own, 5)})"
        )
    if dry_run:
        return ""
    result = model.load_state_dict(usable, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith(heads)]
    unexpected = sorted(k for k in state if k not in own)
    head = "/".join(classifier)

    lines = [f"Loaded {len(usable)} of the model's {len(own)} tensors from {path}."]
    if stripped:
        lines.append("Stripped the key prefix " + " and ".join(repr(p) for p in dict.fromkeys(stripped)) + ".")
    if dropped_fc:
        lines.append(f"Dropped the file's classifier ({_names(dropped_fc)}); the new classifier starts fresh.")
    else:
        lines.append(f"The file has no classifier ({head}.*); the new classifier starts fresh.")
    if missing:
        lines.append(f"Missing from the file, left at their initial values: {_names(missing)}.")
    else:
        lines.append("Nothing the backbone needs is missing.")
    if unexpected:
        lines.append(f"In the file but not used by the model: {_names(unexpected)}.")
    if mismatched:
        lines.append(
            "Skipped because their shapes differ from the model's: "
            + ", ".join(f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched[:8])
            + "."
        )
    return " ".join(lines)


def load_imagenet_weights(model: torch.nn.Module) -> str:
    """torchvision's ImageNet ResNet-18 weights from the local torch hub cache; never downloads."""
    cached = Path(torch.hub.get_dir()) / "checkpoints" / IMAGENET_FILE
    if not cached.is_file():
        raise WeightsError(
            f"--weights imagenet reads torchvision's ImageNet ResNet-18 from the local torch hub cache, "
            f"and {cached} does not exist (nla_fast never downloads). Download {IMAGENET_URL} once and put "
            f"it there (or pass the file with --weights /path/to/{IMAGENET_FILE}). The paper's backbone is "
            "the MS-Celeb-1M ResNet-18 (resnet18_msceleb.pth), passed the same way."
        )
    try:
        state = torch.load(cached, map_location="cpu", weights_only=True)
    except Exception as err:
        raise WeightsError(f"cannot read the ImageNet weights {cached}: {type(err).__name__}: {err}") from err
    state = {k: v for k, v in state.items() if not k.startswith("fc.")}
    result = model.load_state_dict(state, strict=False)
    missing = [k for k in result.missing_keys if not k.startswith("fc.")]
    return (
        f"Loaded torchvision's ImageNet ResNet-18 weights ({len(state)} tensors; "
        f"the classifier starts fresh{'; missing: ' + _names(missing) if missing else ''})."
    )


def initialise_weights(model: torch.nn.Module, weights: str) -> str:
    """Apply ``--weights``: ``none``, ``imagenet`` or a file path. Returns what was done, in words."""
    if weights in (None, "", "none"):
        return "Backbone starts from random initialisation (--weights none; the paper uses MS-Celeb-1M weights)."
    if weights == "imagenet":
        return load_imagenet_weights(model)
    return load_backbone_weights(model, weights)
