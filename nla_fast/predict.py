"""Use a trained model: ``nla_fast.load_model`` / ``nla_fast.predict`` and ``python -m nla_fast.predict``.

    model = nla_fast.load_model("runs/x/best.pt")
    nla_fast.predict(model, ["face1.jpg", "face2.png"])   # [{'label': 'Happiness', 'probability': 0.93, ...}, ...]

    python -m nla_fast.predict --checkpoint runs/x/best.pt face1.jpg face2.png [--top 3] [--json]

Images are aligned face crops of any size (paths, uint8 HxWx3 tensors / arrays, or PIL
images); each is resized to the checkpoint's input size and normalised like the test data.
Class names come from the checkpoint.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from .cli import HelpFormatter
from .model import build_resnet18


def load_model(path, device: str | torch.device = "auto") -> torch.nn.Module:
    """The network of an nla_fast checkpoint in eval mode, with ``classes``, ``image_size`` and
    ``eval_transform`` (uint8 NHWC batch -> normalised float NCHW) attached."""
    from . import augment

    state = ckpt.load(path)
    info = state["model_info"]
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(device)
    model = build_resnet18(info["num_classes"])
    model.load_state_dict(state["model"])
    model = model.to(device, memory_format=torch.channels_last).eval()
    model.classes = list(info["classes"])
    model.image_size = int(info["image_size"])
    model.eval_transform = augment.EvalTransform(model.image_size)
    model.checkpoint_epoch = state["epoch"]
    return model


def read_image(path) -> torch.Tensor:
    """uint8 HxWx3 RGB tensor of an image file (grey images are replicated to three channels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        from .data.decode import open_rgb  # the loaders' decoder: 16-bit PNGs too

        array = np.asarray(open_rgb(path))
        return torch.from_numpy(array.copy())
    except ImportError:
        import torchvision

        image = torchvision.io.decode_image(torchvision.io.read_file(str(path)),
                                            mode=torchvision.io.ImageReadMode.RGB)
        return image.permute(1, 2, 0).contiguous()
    except Exception as err:
        raise ValueError(f"cannot read image {str(path)!r}: {err}") from err


def _as_hwc_uint8(image) -> torch.Tensor:
    if isinstance(image, (str, Path)):
        return read_image(image)
    if not isinstance(image, (torch.Tensor, np.ndarray)):  # PIL image
        image = np.asarray(image.convert("RGB"))
    tensor = torch.as_tensor(np.asarray(image) if isinstance(image, np.ndarray) else image)
    if tensor.dim() == 2:
        tensor = tensor[..., None].expand(-1, -1, 3)
    if tensor.dim() != 3 or tensor.shape[-1] not in (1, 3):
        raise ValueError(f"an image must be H x W x 3 (or H x W), got shape {tuple(tensor.shape)}")
    if tensor.shape[-1] == 1:
        tensor = tensor.expand(-1, -1, 3)
    if tensor.dtype != torch.uint8:
        raise ValueError(f"image tensors must be uint8 (0..255), got {tensor.dtype}")
    return tensor.contiguous()


@torch.no_grad()
def predict(model: torch.nn.Module, images, top_k: int = 3, tta: str | None = None) -> list[dict]:
    """Class probabilities of each image: a list of dicts, one per image, best class first:
    ``{"label", "probability", "top": [{"label", "probability"}, ...], "probabilities": {class: p}}``.

    ``images``: a path, an image, a list of them, or a uint8 N x H x W x 3 tensor.
    ``tta="flip"``: average with the horizontally flipped image.
    """
    from .engine import predict_logits

    if isinstance(images, torch.Tensor) and images.dim() == 4:
        batch = [images[i] for i in range(len(images))]
    elif isinstance(images, (list, tuple)):
        batch = list(images)
    else:
        batch = [images]
    size = model.image_size
    resized = []
    for image in batch:
        hwc = _as_hwc_uint8(image)
        resized.append(_resize_uint8(hwc, size))
    if not resized:
        return []
    stacked = torch.stack(resized)
    scores = predict_logits(model, stacked, model.eval_transform, batch_size=64, tta=tta)
    probs = scores.float().softmax(dim=1).cpu()
    classes = model.classes
    results = []
    k = min(top_k, len(classes))
    for row in probs:
        values, order = row.sort(descending=True)
        top = [{"label": classes[i], "probability": float(v)} for v, i in zip(values[:k], order[:k])]
        results.append({
            "label": top[0]["label"],
            "probability": top[0]["probability"],
            "top": top,
            "probabilities": {name: float(p) for name, p in zip(classes, row.tolist())},
        })
    return results


def _resize_uint8(image: torch.Tensor, size: int) -> torch.Tensor:
    """One uint8 HxWx3 image resized to size x size with the evaluation's arithmetic (bilinear,
    antialiased, rounded), so that images of any size can share a batch."""
    from .augment import resize_uint8

    return resize_uint8(image.permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).contiguous()


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nla_fast.predict",
        description="Classify the facial expression of aligned face crops with an nla_fast checkpoint.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by nla_fast.train (e.g. best.pt)")
    p.add_argument("images", nargs="+", metavar="IMAGE", help="image files (aligned face crops, any size)")
    p.add_argument("--top", type=int, default=3, metavar="K", help="how many classes to show per image")
    p.add_argument("--tta", choices=("none", "flip"), default="none", help="flip: average with the mirrored image")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto", help="where to run")
    p.add_argument("--json", action="store_true", help="print one JSON list instead of text")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        model = load_model(args.checkpoint, device=args.device)
        results = predict(model, list(args.images), top_k=args.top, tta=None if args.tta == "none" else args.tta)
    except (FileNotFoundError, ValueError) as err:  # missing or unreadable image or checkpoint
        print(f"nla_fast.predict: error: {err}", file=sys.stderr)
        return 2
    if args.json:
        print(json.dumps([{"image": str(path), **result} for path, result in zip(args.images, results)], indent=2))
        return 0
    for path, result in zip(args.images, results):
        shown = ", ".join(f"{entry['label']} {100 * entry['probability']:.1f}%" for entry in result["top"])
        print(f"{path}: {shown}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
