"""The reference-style training loop of SPEC 3, rebuilt for the benchmark (rung 0).

JPEG files in the RAF-DB layout (written by ``nla_fast.data.fixtures``) read by a DataLoader with PIL per-sample transforms, two
separate float32 forwards (one per view), the reference-style loss that rebuilds its
constants every call, and per-step ``.item()`` / ``.cpu()`` reads. It is what nla_fast is
measured against; nothing in the package uses it.
"""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torchvision import transforms

from reference_style import reference_style_nla_loss

from nla_fast.augment import MEAN, STD
from nla_fast.model import build_resnet18

class AddGaussianNoise:
    """p=0.5: noise of variance 30 on the raw uint8 image, clipped (the reference's first transform)."""

    def __call__(self, img: np.ndarray) -> np.ndarray:
        if np.random.rand() < 0.5:
            noisy = img.astype(np.float32) + np.random.normal(0.0, 30**0.5, img.shape)
            img = np.clip(noisy, 0, 255).astype(np.uint8)
        return img


class RafJpegDataset(torch.utils.data.Dataset):
    def __init__(self, root: Path, split: str, image_size: int, train: bool):
        rows = [line.split() for line in (root / "EmoLabel" / "list_patition_label.txt").read_text().splitlines()]
        rows = [r for r in rows if r[0].startswith(split)]
        self.paths = [root / "Image" / "aligned" / r[0].replace(".jpg", "_aligned.jpg") for r in rows]
        self.labels = [int(r[1]) - 1 for r in rows]
        self.noise = AddGaussianNoise() if train else None
        steps = [transforms.Resize((image_size, image_size)), transforms.ToTensor(), transforms.Normalize(MEAN, STD)]
        if train:
            steps += [transforms.RandomHorizontalFlip(), transforms.RandomErasing(scale=(0.02, 0.3), value=0)]
        self.transform = transforms.Compose(steps)

    def __len__(self):
        return len(self.paths)

    def __getitem__(self, i):
        img = np.asarray(Image.open(self.paths[i]).convert("RGB"))
        if self.noise is not None:
            img = self.noise(img)
        return self.transform(Image.fromarray(img)), self.labels[i]


def make_loader(root: Path, split: str, image_size: int, batch_size: int, workers: int, train: bool):
    dataset = RafJpegDataset(root, split, image_size, train)
    return torch.utils.data.DataLoader(
        dataset, batch_size=batch_size, shuffle=train, num_workers=workers, pin_memory=torch.cuda.is_available(),
        drop_last=train, persistent_workers=workers > 0,
    )


def make_model(num_classes: int, device) -> torch.nn.Module:
    """The same ResNet-18 as the trainer's, in float32 and the default memory format."""
    return build_resnet18(num_classes).to(device)


def reference_step(model, optimizer, images, labels, eps: float, device):
    """One step as the reference code does it: two forwards, .item() and .cpu() every step."""
    images = images.to(device)
    labels = labels.to(device)
    flipped = torch.flip(images, dims=[3])
    out1 = model(images)
    out2 = model(flipped)
    loss = reference_style_nla_loss(out1, out2, labels, eps)
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    correct = (out1.argmax(1) == labels).sum().cpu()
    return loss.item(), int(correct)


def run_reference_epoch(model, optimizer, loader, eps: float, device, max_steps: int | None = None):
    """(seconds, steps, loss sum) over one pass of the loader (or max_steps)."""
    model.train()
    t0 = time.perf_counter()
    steps, loss_sum = 0, 0.0
    for images, labels in loader:
        loss, _ = reference_step(model, optimizer, images, labels, eps, device)
        loss_sum += loss
        steps += 1
        if max_steps is not None and steps >= max_steps:
            break
    return time.perf_counter() - t0, steps, loss_sum


@torch.no_grad()
def run_reference_eval(model, loader, device) -> tuple[float, float]:
    model.eval()
    t0 = time.perf_counter()
    correct = total = 0
    for images, labels in loader:
        pred = model(images.to(device)).argmax(1).cpu()
        correct += int((pred == labels).sum())
        total += len(labels)
    return time.perf_counter() - t0, correct / max(total, 1)
