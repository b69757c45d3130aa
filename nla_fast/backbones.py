"""The network of a run, ``--model NAME``: its construction, initial weights and input normalisation.

``resnet18`` (the default) is torchvision's ResNet-18 layout, the paper's backbone, into which
the MS-Celeb-1M file loads (``nla_fast.model``). Any other name is a timm model (``pip install
'nla_fast[timm]'``): ``resnet50``, ``convnext_tiny``, ``vit_base_patch16_224`` ... built with a
fresh ``num_classes`` classifier. Nothing is ever downloaded: timm's pretrained weights are read
from the local cache timm itself fills (``cached_pretrained_file`` says where it looks).

The normalisation (``normalisation``) follows the weights: the paper's mean/std for ResNet-18
(the reference code's), ImageNet's for torchvision's ImageNet weights, and for a timm model
the mean/std of its pretrained config, i.e. of the data its weights were trained on.
"""
from __future__ import annotations

import difflib
import os
from pathlib import Path

import torch

from .augment import MEAN as PAPER_MEAN
from .augment import STD as PAPER_STD
from .messages import short_error
from .model import WeightsError, build_resnet18, initialise_weights, load_backbone_weights

DEFAULT_MODEL = "resnet18"
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
TIMM_EXTRA = "timm"
# --weights values that are not files
RANDOM, PRETRAINED, IMAGENET = "none", "pretrained", "imagenet"
# timm's files on the Hugging Face hub, in the order timm itself tries them
HUB_FILES = ("model.safetensors", "pytorch_model.bin")


class ModelError(ValueError):
    """A model name that cannot be built here; the message says why and what to do."""


def is_torchvision(name: str) -> bool:
    return name == DEFAULT_MODEL


def _timm(name: str):
    try:
        import timm
    except ImportError:
        raise ModelError(f"--model {name} is a timm model and timm is not installed: "
                         f"pip install 'nla_fast[{TIMM_EXTRA}]' (the default --model {DEFAULT_MODEL} needs only "
                         "torchvision)") from None
    return timm


def check_model_name(name: str) -> None:
    """Raise :class:`ModelError` unless ``name`` is resnet18 or a model timm knows."""
    if is_torchvision(name):
        return
    timm = _timm(name)
    if not timm.is_model(name.split(".")[0]):
        close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
        hint = f"; close names: {', '.join(close)}" if close else "; list them with timm.list_models('*pattern*')"
        raise ModelError(f"--model {name}: timm has no such model{hint}")


def build_model(name: str, num_classes: int, image_size: int | None = None,
                pretrained_file: str | os.PathLike | None = None) -> torch.nn.Module:
    """``name`` with a fresh ``num_classes`` classifier, randomly initialised or (timm models)
    from ``pretrained_file`` through timm's own loader (which adapts what the model's shape
    needs, e.g. a ViT's position embedding). Models whose input size is part of their shape
    (ViTs) are built for ``image_size``."""
    if is_torchvision(name):
        return build_resnet18(num_classes)
    check_model_name(name)
    timm = _timm(name)
    options = {"num_classes": num_classes, "pretrained": pretrained_file is not None}
    if pretrained_file is not None:
        options["pretrained_cfg_overlay"] = {"file": str(pretrained_file)}
    if image_size is not None:
        try:
            return timm.create_model(name, img_size=image_size, **options)
        except TypeError:  # a convolutional network takes any size and no img_size argument
            pass
    return timm.create_model(name, **options)


def create(name: str, num_classes: int, image_size: int | None, weights: str) -> tuple[torch.nn.Module, str]:
    """``(model, what was done in words)``: ``--model name`` initialised as ``--weights`` says:
    none (random), pretrained (torchvision's ImageNet weights for resnet18, also called
    imagenet; timm's own for a timm model, from the local cache) or a file of backbone weights
    (its classifier dropped, missing and unexpected keys reported)."""
    if is_torchvision(name):
        model = build_resnet18(num_classes)
        return model, initialise_weights(model, IMAGENET if weights == PRETRAINED else weights)
    if weights in (None, "", RANDOM):
        return build_model(name, num_classes, image_size), f"{name} starts from random initialisation (--weights none)."
    check_weights(name, weights)
    if weights == PRETRAINED:
        path = _pretrained_file_or_error(name)
        try:
            model = build_model(name, num_classes, image_size, pretrained_file=path)
        except (RuntimeError, ValueError, OSError) as err:
            raise WeightsError(f"cannot load timm's pretrained {name} from {path}: {short_error(err)}") from err
        return model, (f"Loaded timm's pretrained {name} from {path}; the classifier "
                       f"({', '.join(_classifier_prefixes(model))}) starts fresh.")
    model = build_model(name, num_classes, image_size)
    return model, load_backbone_weights(model, weights, classifier=_classifier_prefixes(model))


def _pretrained_cfg(name: str):
    timm = _timm(name)
    from timm.models import get_pretrained_cfg

    check_model_name(name)
    cfg = get_pretrained_cfg(name, allow_unregistered=True)
    if cfg is None:  # a name without a tag: the model's default one
        cfg = timm.create_model(name.split(".")[0], pretrained=False).pretrained_cfg
        return cfg if isinstance(cfg, dict) else cfg.to_dict()
    return cfg.to_dict()


def normalisation(name: str, weights: str) -> tuple[tuple, tuple, str]:
    """``(mean, std, why)``: the input normalisation that goes with ``--model name --weights weights``."""
    if is_torchvision(name):
        if weights in (IMAGENET, PRETRAINED):
            return IMAGENET_MEAN, IMAGENET_STD, "ImageNet's, as torchvision's ImageNet weights were trained"
        return PAPER_MEAN, PAPER_STD, "the paper's (the NLA reference code's, used with the MS-Celeb-1M backbone)"
    cfg = _pretrained_cfg(name)
    return (tuple(float(v) for v in cfg["mean"]), tuple(float(v) for v in cfg["std"]),
            f"timm's pretrained config of {name}")


def hub_cache_dir() -> Path:
    """Where huggingface_hub keeps downloaded files (timm's weights): ``$HF_HUB_CACHE``, else
    ``$HF_HOME/hub``, else ``~/.cache/huggingface/hub``; read at every call."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME", "~/.cache"), "huggingface")
    return Path(home).expanduser() / "hub"


def _hub_snapshot_file(repo_id: str, filename: str) -> Path | None:
    """``filename`` of the cached snapshot of ``repo_id`` that ``refs/main`` names (the layout
    huggingface_hub writes: models--<org>--<name>/refs/main, snapshots/<commit>/<file>)."""
    folder = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    try:
        commit = (folder / "refs" / "main").read_text().strip()
    except OSError:
        commit = None
    candidates = [folder / "snapshots" / commit / filename] if commit else []
    candidates += sorted((folder / "snapshots").glob(f"*/{filename}")) if (folder / "snapshots").is_dir() else []
    return next((path for path in candidates if path.is_file()), None)


def cached_pretrained_file(name: str) -> tuple[Path | None, list[str]]:
    """(the local file of timm's pretrained weights of ``name``, or None; the places looked at)."""
    cfg = _pretrained_cfg(name)
    looked = []
    hub_id = cfg.get("hf_hub_id")
    if hub_id:
        names = (cfg["hf_hub_filename"],) if cfg.get("hf_hub_filename") else HUB_FILES
        for filename in names:
            found = _hub_snapshot_file(hub_id, filename)
            if found is not None:
                return found, looked
        looked.append(f"{hub_cache_dir() / ('models--' + hub_id.replace('/', '--'))}/snapshots/<commit>/"
                      f"{' or '.join(names)}")
    if cfg.get("url"):
        path = Path(torch.hub.get_dir()) / "checkpoints" / os.path.basename(cfg["url"])
        if path.is_file():
            return path, looked
        looked.append(str(path))
    return None, looked


def check_weights(name: str, weights: str) -> None:
    """Fail early (before any data is loaded) on ``--weights`` that cannot work with ``--model``:
    a file that cannot be read or holds no backbone tensor, timm weights missing from the cache."""
    if weights in (None, "", RANDOM):
        return
    if is_torchvision(name):
        if weights in (IMAGENET, PRETRAINED):
            return  # checked where it is loaded, with its own message
        load_backbone_weights(build_resnet18(2), weights, dry_run=True)
        return
    if weights == IMAGENET:
        raise WeightsError(f"--weights imagenet is torchvision's ResNet-18; a timm model's own weights are "
                           f"--weights {PRETRAINED} (timm's pretrained weights of {name}, from the local cache)")
    if weights == PRETRAINED:
        _pretrained_file_or_error(name)
        return
    model = build_model(name, 2)
    load_backbone_weights(model, weights, classifier=_classifier_prefixes(model), dry_run=True)


def _pretrained_file_or_error(name: str) -> Path:
    path, looked = cached_pretrained_file(name)
    if path is None:
        where = "; ".join(looked) if looked else "timm names no file for it"
        raise WeightsError(
            f"--weights {PRETRAINED}: timm's pretrained weights of {name} are not in the local cache (nla_fast "
            f"never downloads). Looked for: {where}. Fill the cache once on a machine with internet "
            f"(python -c \"import timm; timm.create_model('{name}', pretrained=True)\") and copy its "
            f"{hub_cache_dir()} here (or set HF_HUB_CACHE to a copy), or pass the file with --weights PATH")
    return path


def _classifier_prefixes(model: torch.nn.Module) -> tuple[str, ...]:
    """The parameter-name prefixes of a timm model's classifier (``head.fc``, ``classifier``...)."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    names = cfg.get("classifier") or "fc"
    return tuple(names) if isinstance(names, (list, tuple)) else (names,)
