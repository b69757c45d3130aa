"""Batched, per-sample random augmentation on whichever device holds the images.

:class:`TrainAugment` reproduces the reference training transform (SPEC §1.2) sample by
sample in distribution, for a whole uint8 batch at once:

1. with p=0.5 add Gaussian noise (variance 30 on the 0..255 scale) to the raw image at
   native resolution, clip to 0..255 and truncate to integers (``np.clip(...).astype(uint8)``);
2. bilinear, antialiased resize to ``image_size``, rounded to integers (the reference goes
   through a uint8 image; torchvision's tensor ``resize`` rounds the same way);
3. ``/255``, normalise with ``mean``/``std``;
4. horizontal flip with p=0.5;
5. RandomErasing with p=0.5, scale (0.02, 0.3), ratio (0.3, 3.3), value 0 — the
   torchvision rule: up to ten attempts, the first box with h < H and w < W is erased,
   none if all ten fail; here the ten attempts are drawn at once and the first valid one
   chosen with ``argmax``;
6. view 2 = horizontal flip of the finished view 1 (the erased box is mirrored too).

All randomness comes from one ``torch.Generator`` on the images' device; there is no
``.item()``, no host synchronisation, no Python loop over samples and every shape is
static, so a call can be captured in a CUDA graph (register a custom generator with
``graph.register_generator_state(gen)``, or pass ``generator=None`` to use the default
one; call once before capture so the constant tensors exist). Outputs are float NCHW,
channels_last by default.

:func:`eval_transform` is steps 2-3 with the same arithmetic; it equals torchvision's
per-image ``resize(antialias=True)`` + ``/255`` + ``normalize`` exactly.
"""
from __future__ import annotations

import math
from typing import Optional, Sequence

import torch
import torch.nn.functional as F

MEAN = (0.577, 0.4494, 0.4001)
STD = (0.2628, 0.2395, 0.2383)


def _pair(size) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    h, w = size
    return int(h), int(w)


def to_nchw(images: torch.Tensor) -> torch.Tensor:
    """N x H x W x 3 (or N x 3 x H x W) -> N x 3 x H x W view (no copy)."""
    if images.dim() != 4:
        raise ValueError(f"expected a batch N x H x W x 3, got shape {tuple(images.shape)}")
    if images.shape[-1] == 3:  # the documented layout
        return images.permute(0, 3, 1, 2)
    if images.shape[1] == 3:
        return images
    raise ValueError(f"expected N x H x W x 3 or N x 3 x H x W, got {tuple(images.shape)}")


def resize_uint8(x: torch.Tensor, size, out_dtype: torch.dtype = torch.uint8) -> torch.Tensor:
    """Bilinear antialiased resize of integer-valued N x 3 x H x W images, rounded to integers.

    Same arithmetic as ``torchvision.transforms.functional.resize(uint8_tensor, size,
    antialias=True)``: float32 interpolation (``align_corners=False``), then ``round``.
    Returns ``out_dtype`` (uint8, or a float dtype holding the integer values).
    """
    size = _pair(size)
    if tuple(x.shape[-2:]) == size:
        return x.to(out_dtype, copy=True)  # a new tensor: callers normalise it in place
    y = F.interpolate(x.float().contiguous(), size=size, mode="bilinear", align_corners=False, antialias=True)
    y = y.round_()
    if out_dtype == torch.uint8:
        return y.clamp_(0, 255).to(torch.uint8)
    return y.to(out_dtype)


class _Constants:
    """Per-device mean/std tensors, built once (outside any graph capture)."""

    def __init__(self, mean, std):
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self._cache: dict = {}

    def get(self, device: torch.device):
        key = str(device)
        if key not in self._cache:
            m = torch.tensor(self.mean, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            s = torch.tensor(self.std, dtype=torch.float32, device=device).view(1, 3, 1, 1)
            self._cache[key] = (m, s)
        return self._cache[key]


def _normalise_(x: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    # exactly torchvision: to_tensor (/255) then Normalize (sub_ mean, div_ std)
    return x.div_(255.0).sub_(mean).div_(std)


_EVAL_CONSTANTS: dict = {}


def eval_transform(images: torch.Tensor, image_size=224, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                   channels_last: bool = True, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Resize + normalise a uint8 batch (N x H x W x 3) into float N x 3 x S x S."""
    x = to_nchw(images)
    key = (tuple(mean), tuple(std))
    consts = _EVAL_CONSTANTS.setdefault(key, _Constants(mean, std))
    m, s = consts.get(x.device)
    y = _normalise_(resize_uint8(x, image_size, torch.float32), m, s)
    if channels_last:
        y = y.contiguous(memory_format=torch.channels_last)
    return y.to(out_dtype)


class EvalTransform:
    """Callable form of :func:`eval_transform`."""

    def __init__(self, image_size=224, mean=MEAN, std=STD, channels_last=True, out_dtype=torch.float32):
        self.image_size, self.channels_last, self.out_dtype = image_size, channels_last, out_dtype
        self._c = _Constants(mean, std)

    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        x = to_nchw(images)
        m, s = self._c.get(x.device)
        y = _normalise_(resize_uint8(x, self.image_size, torch.float32), m, s)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        return y.to(self.out_dtype)


def erasing_boxes(u_scale: torch.Tensor, u_ratio: torch.Tensor, u_i: torch.Tensor, u_j: torch.Tensor,
                  height: int, width: int, scale=(0.02, 0.3), ratio=(0.3, 3.3)):
    """torchvision RandomErasing boxes from uniforms, vectorised over samples.

    ``u_scale``/``u_ratio``: B x A uniforms (A attempts); ``u_i``/``u_j``: B uniforms for
    the position. Returns ``(found, i, j, h, w)`` (bool and int64 tensors of length B);
    the box is the first attempt with ``h < height and w < width``.
    """
    area = float(height * width)
    erase_area = area * (scale[0] + (scale[1] - scale[0]) * u_scale)
    lr0, lr1 = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(lr0 + (lr1 - lr0) * u_ratio)
    h = torch.sqrt(erase_area * aspect).round_()  # round half to even, as Python's round()
    w = torch.sqrt(erase_area / aspect).round_()
    valid = (h < height) & (w < width)
    first = valid.to(torch.uint8).argmax(dim=1, keepdim=True)  # first valid attempt (0 if none)
    found = valid.any(dim=1)
    h = h.gather(1, first).squeeze(1)
    w = w.gather(1, first).squeeze(1)
    h = torch.where(found, h, torch.zeros_like(h))
    w = torch.where(found, w, torch.zeros_like(w))
    # torch.randint(0, H - h + 1): floor(u * n), clamped against float rounding at u -> 1
    i = torch.minimum(torch.floor(u_i * (height - h + 1)), height - h)
    j = torch.minimum(torch.floor(u_j * (width - w + 1)), width - w)
    return found, i.long(), j.long(), h.long(), w.long()


class TrainAugment:
    """The reference training transform for a uint8 batch; returns ``(view1, view2)``.

    Args:
        image_size: output size (int or (H, W)).
        mean, std: normalisation (SPEC §1.2 defaults).
        noise_p, noise_var: Gaussian noise probability and variance (0..255 scale).
        flip_p: horizontal flip probability of view 1.
        erase_p, erase_scale, erase_ratio, erase_value, erase_attempts: RandomErasing.
        channels_last: return channels_last tensors.
        out_dtype: dtype of the views (float32 default; bf16 halves the traffic).
    """

    def __init__(self, image_size=224, mean: Sequence[float] = MEAN, std: Sequence[float] = STD,
                 noise_p: float = 0.5, noise_var: float = 30.0, flip_p: float = 0.5, erase_p: float = 0.5,
                 erase_scale=(0.02, 0.3), erase_ratio=(0.3, 3.3), erase_value: float = 0.0,
                 erase_attempts: int = 10, channels_last: bool = True, out_dtype: torch.dtype = torch.float32):
        self.image_size = _pair(image_size)
        self.noise_p, self.noise_std = float(noise_p), math.sqrt(float(noise_var))
        self.flip_p, self.erase_p = float(flip_p), float(erase_p)
        self.erase_scale, self.erase_ratio = tuple(erase_scale), tuple(erase_ratio)
        self.erase_value, self.erase_attempts = float(erase_value), int(erase_attempts)
        self.channels_last, self.out_dtype = channels_last, out_dtype
        self._c = _Constants(mean, std)

    def __repr__(self) -> str:
        return (
            f"TrainAugment(image_size={self.image_size}, noise_p={self.noise_p}, noise_var={self.noise_std ** 2:g}, "
            f"flip_p={self.flip_p}, erase_p={self.erase_p}, erase_scale={self.erase_scale}, "
            f"erase_ratio={self.erase_ratio}, erase_value={self.erase_value})"
        )

    def __call__(self, images: torch.Tensor, generator: Optional[torch.Generator] = None,
                 return_params: bool = False):
        x = to_nchw(images)
        if x.dtype != torch.uint8:
            raise TypeError(f"TrainAugment expects uint8 images, got {x.dtype}")
        B, _, H, W = x.shape
        dev = x.device
        mean, std = self._c.get(dev)
        A = self.erase_attempts
        # every per-sample uniform in one draw: noise?, flip?, erase?, i, j, A scales, A ratios
        u = torch.rand((B, 5 + 2 * A), generator=generator, device=dev)
        do_noise = u[:, 0] < self.noise_p
        do_flip = u[:, 1] < self.flip_p

        # 1. Gaussian noise on the raw image, clip, truncate (as np.clip(...).astype(np.uint8))
        xf = x.float()
        if self.noise_p > 0:
            noise = torch.randn((B, H, W, 3), generator=generator, device=dev).permute(0, 3, 1, 2)
            noisy = (xf + noise * self.noise_std).clamp_(0.0, 255.0).floor_()
            xf = torch.where(do_noise.view(B, 1, 1, 1), noisy, xf)
        # 2-3. resize (rounded to integers), /255, normalise
        y = _normalise_(resize_uint8(xf, self.image_size, torch.float32), mean, std)
        Ho, Wo = self.image_size
        # 4. horizontal flip
        y = torch.where(do_flip.view(B, 1, 1, 1), y.flip(-1), y)
        # 5. RandomErasing
        found, i, j, h, w = erasing_boxes(u[:, 5:5 + A], u[:, 5 + A:], u[:, 3], u[:, 4], Ho, Wo,
                                          self.erase_scale, self.erase_ratio)
        do_erase = (u[:, 2] < self.erase_p) & found
        rows = torch.arange(Ho, device=dev).view(1, Ho)
        cols = torch.arange(Wo, device=dev).view(1, Wo)
        in_r = (rows >= i.view(B, 1)) & (rows < (i + h).view(B, 1)) & do_erase.view(B, 1)
        in_c = (cols >= j.view(B, 1)) & (cols < (j + w).view(B, 1))
        mask = in_r.view(B, 1, Ho, 1) & in_c.view(B, 1, 1, Wo)
        y = y.masked_fill(mask, self.erase_value)
        if self.channels_last:
            y = y.contiguous(memory_format=torch.channels_last)
        y = y.to(self.out_dtype)
        # 6. view 2: mirror of the finished view 1
        y2 = y.flip(-1)
        if self.channels_last:
            y2 = y2.contiguous(memory_format=torch.channels_last)
        if return_params:
            params = {"noise": do_noise, "flip": do_flip, "erase": do_erase,
                      "box": torch.stack([i, j, h, w], 1) * do_erase.view(B, 1)}
            return y, y2, params
        return y, y2


__all__ = ["MEAN", "STD", "TrainAugment", "EvalTransform", "eval_transform", "resize_uint8", "erasing_boxes", "to_nchw"]
