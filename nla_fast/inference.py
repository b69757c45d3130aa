"""Classify face images from Python: ``nla_fast.predict`` (with a model from ``nla_fast.load_model``,
:mod:`nla_fast.evaluation`).

    model = nla_fast.load_model("runs/x/best.pt")
    nla_fast.predict(model, ["face1.jpg", "face2.png"])   # [{'label': 'Happiness', 'probability': 0.93, ...}, ...]

Images are aligned face crops of any size (paths, uint8 HxWx3 tensors / arrays, or PIL
images); each is resized to the checkpoint's input size and normalised like the test data.
Class names come from the checkpoint. The command line is ``python -m nla_fast.classify``.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from .augment import resize_uint8
from .evaluation import predict_logits


def read_image(path) -> torch.Tensor:
    """uint8 HxWx3 RGB tensor of an image file (grey images are replicated to three channels)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"image {str(path)!r} does not exist")
    try:
        from .data.decode import open_rgb  # the loaders' decoder: 16-bit PNGs too

        return torch.from_numpy(np.asarray(open_rgb(path)).copy())
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
    if not isinstance(image, (torch.Tensor, np.ndarray)):  # PIL image: 16-bit grey scaled, not clipped
        from .data.decode import to_rgb8

        image = np.asarray(to_rgb8(image))
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
    return resize_uint8(image.permute(2, 0, 1)[None], size)[0].permute(1, 2, 0).contiguous()
