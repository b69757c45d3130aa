"""Batched augmentation: exactness where deterministic, statistics where random."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from nla_fast.augment import MEAN, STD, EvalTransform, TrainAugment, erasing_boxes, eval_transform

M = torch.tensor(MEAN).view(1, 3, 1, 1)
S = torch.tensor(STD).view(1, 3, 1, 1)


def _imgs(n=6, h=100, w=100, seed=0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 256, (n, h // 4 + 1, w // 4 + 1, 3), generator=g, dtype=torch.uint8)
    smooth = TF.resize(base.permute(0, 3, 1, 2), [h, w], antialias=True).permute(0, 2, 3, 1)
    noise = torch.randint(-20, 21, (n, h, w, 3), generator=g)
    return (smooth.int() + noise).clamp(0, 255).to(torch.uint8).contiguous()


def _unnorm(v):
    return (v * S + M) * 255


def _tv_eval(img_hwc, size):
    return TF.normalize(TF.resize(img_hwc.permute(2, 0, 1), [size, size], antialias=True).float() / 255, MEAN, STD)


@pytest.mark.parametrize("size", [224, 64, 100, 37])
def test_eval_equals_torchvision_exactly(size):
    imgs = _imgs()
    out = eval_transform(imgs, size)
    ref = torch.stack([_tv_eval(im, size) for im in imgs])
    assert out.shape == (6, 3, size, size) and out.is_contiguous(memory_format=torch.channels_last)
    assert torch.equal(out, ref)
    assert torch.equal(EvalTransform(size, channels_last=False)(imgs), ref)


def test_eval_close_to_pil_pipeline():
    """The reference goes through PIL (uint8 with fixed-point rounding): within one grey level."""
    imgs = _imgs(3)
    pil = T.Compose([T.ToPILImage(), T.Resize((224, 224)), T.ToTensor(), T.Normalize(MEAN, STD)])
    ref = torch.stack([pil(im.numpy()) for im in imgs])
    diff = (_unnorm(eval_transform(imgs, 224)) - _unnorm(ref)).abs()
    assert diff.max() < 1.001


def test_deterministic_parts_match_torchvision():
    imgs = _imgs()
    g = torch.Generator().manual_seed(0)
    ref = torch.stack([_tv_eval(im, 64) for im in imgs])
    v1, v2 = TrainAugment(64, noise_p=0, flip_p=0, erase_p=0)(imgs, g)
    assert torch.equal(v1, ref) and torch.equal(v2, ref.flip(-1))
    v1, v2 = TrainAugment(64, noise_p=0, flip_p=1, erase_p=0)(imgs, g)
    assert torch.equal(v1, ref.flip(-1)) and torch.equal(v2, ref)


def test_view2_is_mirror_of_view1_and_seeded():
    imgs = _imgs(16)
    aug = TrainAugment(48)
    v1, v2 = aug(imgs, torch.Generator().manual_seed(7))
    assert torch.equal(v2, v1.flip(-1))
    assert v1.dtype == torch.float32 and v1.is_contiguous(memory_format=torch.channels_last)
    w1, _ = aug(imgs, torch.Generator().manual_seed(7))
    u1, _ = aug(imgs, torch.Generator().manual_seed(8))
    assert torch.equal(v1, w1) and not torch.equal(v1, u1)
    assert TrainAugment(48, out_dtype=torch.bfloat16)(imgs, torch.Generator().manual_seed(7))[0].dtype == torch.bfloat16


def test_flip_rate_and_per_sample_independence():
    n = 4000
    imgs = torch.zeros(n, 8, 8, 3, dtype=torch.uint8)
    imgs[:, :, :4] = 255  # left half white: a flip is visible
    v1, _, p = TrainAugment(8, noise_p=0, erase_p=0)(imgs, torch.Generator().manual_seed(1), return_params=True)
    flipped = v1[:, 0, 0, 0] < v1[:, 0, 0, 7]
    assert torch.equal(flipped, p["flip"])
    rate = flipped.float().mean().item()
    assert abs(rate - 0.5) < 4 * math.sqrt(0.25 / n)
    # independent of the noise decision
    _, _, p2 = TrainAugment(8)(imgs, torch.Generator().manual_seed(2), return_params=True)
    both = (p2["flip"] & p2["noise"]).float().mean().item()
    assert abs(both - 0.25) < 4 * math.sqrt(0.25 * 0.75 / n)


def test_gaussian_noise_variance_and_clipping():
    n = 64
    grey = torch.full((n, 32, 32, 3), 128, dtype=torch.uint8)
    v1, _, p = TrainAugment(32, noise_p=1.0, flip_p=0, erase_p=0)(grey, torch.Generator().manual_seed(3), return_params=True)
    x = _unnorm(v1)
    assert torch.allclose(x, x.round(), atol=1e-3)  # integer levels: noise was truncated to uint8
    d = x.round() - 128
    # truncation (astype uint8) shifts the mean by -0.5 and adds 1/12 to the variance
    assert abs(d.mean().item() + 0.5) < 0.05
    assert abs(d.var().item() - (30 + 1 / 12)) < 1.0
    # at the ends of the range the values are clipped, never wrapped
    ends = torch.zeros((n, 16, 16, 3), dtype=torch.uint8)
    ends[n // 2:] = 255
    x = _unnorm(TrainAugment(16, noise_p=1.0, flip_p=0, erase_p=0)(ends, torch.Generator().manual_seed(4))[0]).round()
    assert x.min() >= 0 and x.max() <= 255
    assert (x[: n // 2] <= 33).all() and (x[n // 2:] >= 222).all()  # 6 sigma
    # p = 0.5, per sample
    _, _, p = TrainAugment(16)(torch.zeros(4000, 16, 16, 3, dtype=torch.uint8), torch.Generator().manual_seed(5), return_params=True)
    assert abs(p["noise"].float().mean().item() - 0.5) < 0.035


def test_noise_is_applied_before_resize():
    """Noise at native resolution is smoothed by the downsizing: smaller variance after 4x reduction."""
    grey = torch.full((32, 64, 64, 3), 128, dtype=torch.uint8)
    x = _unnorm(TrainAugment(16, noise_p=1.0, flip_p=0, erase_p=0)(grey, torch.Generator().manual_seed(6))[0]).round()
    assert x.var().item() < 30 / 4


def test_erased_pixels_exactly_zero_and_box_matches():
    imgs = _imgs(64, 40, 40)
    aug = TrainAugment(56, noise_p=0, erase_p=1.0)
    v1, v2, p = aug(imgs, torch.Generator().manual_seed(9), return_params=True)
    assert p["erase"].float().mean() > 0.9
    for k in range(64):
        i, j, h, w = p["box"][k].tolist()
        if not p["erase"][k]:
            continue
        patch = v1[k, :, i:i + h, j:j + w]
        assert patch.numel() > 0 and torch.equal(patch, torch.zeros_like(patch))
        outside = v1[k].clone()
        outside[:, i:i + h, j:j + w] = 1.0
        assert (outside != 0).all()
        # view 2 holds the mirrored box
        assert torch.equal(v2[k, :, i:i + h, 56 - j - w:56 - j], torch.zeros_like(patch))


def _tv_boxes(n, size, scale=(0.02, 0.3), ratio=(0.3, 3.3)):
    torch.manual_seed(0)
    img = torch.zeros(3, size, size)
    re = T.RandomErasing(p=1.0, scale=scale, ratio=ratio, value=0)
    out = []
    for _ in range(n):
        i, j, h, w, v = re.get_params(img, scale=scale, ratio=ratio, value=[0.0])
        found = not (h == size and w == size and v is img)
        out.append((found, i, j, h, w))
    return np.array(out, dtype=np.float64)


def _ours(n, size, scale=(0.02, 0.3), ratio=(0.3, 3.3), seed=0):
    g = torch.Generator().manual_seed(seed)
    u = torch.rand(n, 22, generator=g)
    f, i, j, h, w = erasing_boxes(u[:, 2:12], u[:, 12:22], u[:, 0], u[:, 1], size, size, scale, ratio)
    return np.stack([f.numpy(), i.numpy(), j.numpy(), h.numpy(), w.numpy()], 1).astype(np.float64)


def _ks(a, b):
    a, b = np.sort(a), np.sort(b)
    grid = np.concatenate([a, b])
    return np.abs(np.searchsorted(a, grid, "right") / len(a) - np.searchsorted(b, grid, "right") / len(b)).max()


@pytest.mark.parametrize("size, scale", [(224, (0.02, 0.3)), (12, (0.3, 0.9))])
def test_erasing_box_distribution_matches_torchvision(size, scale):
    n_tv, n_ours = 4000, 40000
    tv, ours = _tv_boxes(n_tv, size, scale), _ours(n_ours, size, scale)
    # probability that some attempt fits
    assert abs(tv[:, 0].mean() - ours[:, 0].mean()) < 4 * math.sqrt(0.25 / n_tv) + 1e-9
    tvf, of = tv[tv[:, 0] == 1], ours[ours[:, 0] == 1]
    crit = 1.95 * math.sqrt((len(tvf) + len(of)) / (len(tvf) * len(of)))  # KS, alpha ~ 0.001
    area_tv, area_o = tvf[:, 3] * tvf[:, 4] / size**2, of[:, 3] * of[:, 4] / size**2
    assert _ks(area_tv, area_o) < crit
    assert _ks(tvf[:, 3] / np.maximum(tvf[:, 4], 1), of[:, 3] / np.maximum(of[:, 4], 1)) < crit
    assert _ks(tvf[:, 1] / size, of[:, 1] / size) < crit
    assert _ks(tvf[:, 2] / size, of[:, 2] / size) < crit
    # boxes lie inside the image, h < H and w < W
    assert (of[:, 1] + of[:, 3] <= size).all() and (of[:, 2] + of[:, 4] <= size).all()
    assert (of[:, 3] < size).all() and (of[:, 4] < size).all()


def test_erased_area_distribution_end_to_end():
    n = 1200
    imgs = torch.full((n, 8, 8, 3), 200, dtype=torch.uint8)
    v1, _, p = TrainAugment(32, noise_p=0, flip_p=0)(imgs, torch.Generator().manual_seed(10), return_params=True)
    zero = (v1 == 0).all(1).flatten(1).float().mean(1)  # erased fraction per image
    assert abs(p["erase"].float().mean().item() - 0.5) < 0.06
    frac = zero[p["erase"]].numpy()
    expect = p["box"][p["erase"]][:, 2:].prod(1).float().numpy() / 32**2
    assert np.allclose(frac, expect)
    assert (zero[~p["erase"]] == 0).all()
    assert 0.02 - 0.01 < frac.min() and frac.max() < 0.3 + 0.02
    assert abs(frac.mean() - 0.16) < 0.025  # mean of U(0.02, 0.3), rounding aside


def test_static_shapes_no_python_per_sample_work():
    """The same call works for any batch and the outputs' shapes depend on nothing random."""
    aug = TrainAugment((30, 40))
    for n in (1, 3, 17):
        v1, v2 = aug(_imgs(n, 20, 24), torch.Generator().manual_seed(n))
        assert v1.shape == v2.shape == (n, 3, 30, 40)


@pytest.mark.gpu
def test_cuda_matches_cpu_semantics_and_graph_capture(cuda_device):
    imgs = _imgs(32).to(cuda_device)
    ref = torch.stack([_tv_eval(im, 224) for im in imgs])
    assert torch.equal(eval_transform(imgs, 224), ref)
    aug = TrainAugment(224)
    g = torch.Generator(device=cuda_device).manual_seed(0)
    aug(imgs, g)  # builds the per-device constants
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any host synchronisation raises
    try:
        v1, v2 = aug(imgs, g)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert torch.equal(v2, v1.flip(-1)) and v1.device.type == "cuda"
    # capture in a CUDA graph: same statistics, fresh randomness on each replay
    static = imgs.clone()
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        for _ in range(2):
            aug(static, g)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    if hasattr(graph, "register_generator_state"):
        graph.register_generator_state(g)
    else:
        g = None
    with torch.cuda.graph(graph):
        out1, out2 = aug(static, g)
    graph.replay()
    a = out1.clone()
    graph.replay()
    assert not torch.equal(a, out1) and torch.equal(out2, out1.flip(-1))
