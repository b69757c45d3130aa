"""Tiny on-disk trees in every supported layout, for tests and benchmarks, with labels chosen by
the caller (``nla_fast.data.samples`` writes whole datasets whose labels are the faces' own).

Images are the synthetic faces (RAF-DB, FERPlus); the AffectNet tree draws a coloured face box
on a plain background, so that a test can see where the crop was taken.
"""
from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional, Sequence

import numpy as np


def _faces(n: int, size: int, seed: int) -> np.ndarray:
    if n == 0:
        return np.zeros((0, size, size, 3), np.uint8)
    from .synthetic import generate

    return generate("train", num_samples=n, seed=seed, resolution=size)["images"].numpy()


def _grey_faces(n: int, seed: int) -> np.ndarray:
    """``n`` synthetic faces as FER2013 has them: 48 x 48 grey, uint8."""
    rgb = _faces(n, 48, seed).astype(np.float32)
    return (rgb @ np.array([0.299, 0.587, 0.114], np.float32)).round().astype(np.uint8)


def make_rafdb_tree(root, n_train: int = 12, n_test: int = 6, size: int = 100, seed: int = 0,
                    labels: Optional[Sequence[int]] = None, quality: int = 95) -> dict:
    """RAF-DB basic layout; returns ``{"root", "train": [(name, label1..7)], "test": [...]}``."""
    from PIL import Image

    root = Path(root)
    (root / "EmoLabel").mkdir(parents=True, exist_ok=True)
    (root / "Image" / "aligned").mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    n = n_train + n_test
    labs = list(labels) if labels is not None else [int(v) for v in rng.integers(1, 8, n)]
    imgs = _faces(n, size, seed)
    entries = {"train": [], "test": []}
    lines = []
    for k in range(n):
        split = "train" if k < n_train else "test"
        idx = k + 1 if split == "train" else k - n_train + 1
        name = f"{split}_{idx:05d}.jpg"
        Image.fromarray(imgs[k]).save(root / "Image" / "aligned" / f"{split}_{idx:05d}_aligned.jpg", quality=quality)
        lines.append(f"{name} {labs[k]}")
        entries[split].append((name, labs[k]))
    (root / "EmoLabel" / "list_patition_label.txt").write_text("\n".join(lines) + "\n")
    return {"root": root, **entries}


FER_USAGE = ("Training", "PublicTest", "PrivateTest")


def make_ferplus_csv(root, votes: Sequence[Sequence[int]], usages: Optional[Sequence[str]] = None,
                     names: Optional[Sequence[str]] = None, seed: int = 0) -> dict:
    """``fer2013.csv`` + ``fer2013new.csv`` with the given vote rows (10 counts each)."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    n = len(votes)
    usages = list(usages) if usages is not None else [FER_USAGE[k % 3] for k in range(n)]
    names = list(names) if names is not None else [f"fer{k:07d}.png" for k in range(n)]
    pixels = _grey_faces(n, seed).reshape(n, 48 * 48)
    with open(root / "fer2013.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["emotion", "pixels", "Usage"])
        for k in range(n):
            w.writerow([0, " ".join(map(str, pixels[k])), usages[k]])
    with open(root / "fer2013new.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["Usage", "Image name", "neutral", "happiness", "surprise", "sadness", "anger", "disgust",
                    "fear", "contempt", "unknown", "NF"])
        for k in range(n):
            w.writerow([usages[k], names[k], *votes[k]])
    return {"root": root, "pixels": pixels.reshape(n, 48, 48).astype(np.uint8), "usages": usages, "names": names}


def make_ferplus_folders(root, votes_by_split: dict, seed: int = 0) -> dict:
    """The image-folder release: FER2013Train/Valid/Test with label.csv and grey PNGs."""
    from PIL import Image

    from .ferplus import FOLDERS

    root = Path(root)
    out = {"root": root}
    for index, (split, votes) in enumerate(votes_by_split.items()):
        folder = root / FOLDERS[split]
        folder.mkdir(parents=True, exist_ok=True)
        rows, imgs = [], []
        grey = _grey_faces(len(votes), seed * 7 + index)
        for k, v in enumerate(votes):
            name = f"fer{k:07d}.png"
            img = grey[k]
            Image.fromarray(img).save(folder / name)
            rows.append([name, "(0, 0, 48, 48)", *v])
            imgs.append(img)
        with open(folder / "label.csv", "w", newline="") as f:
            csv.writer(f).writerows(rows)
        out[split] = np.stack(imgs) if imgs else np.zeros((0, 48, 48), np.uint8)
    return out


def make_affectnet_tree(root, rows_by_split: dict, seed: int = 0) -> dict:
    """Official-release layout. ``rows_by_split[split]`` = list of expression values.

    Each image is a random size with a red face box on a blue background; returns the
    boxes so tests can check the crop.
    """
    from PIL import Image

    root = Path(root)
    img_dir = root / "Manually_Annotated_Images"
    rng = np.random.default_rng(seed)
    out = {"root": root}
    files = {"train": "training.csv", "test": "validation.csv"}
    for split, exprs in rows_by_split.items():
        rows = []
        for k, e in enumerate(exprs):
            h, w = int(rng.integers(60, 120)), int(rng.integers(60, 120))
            bw, bh = int(rng.integers(20, w - 10)), int(rng.integers(20, h - 10))
            x0, y0 = int(rng.integers(0, w - bw)), int(rng.integers(0, h - bh))
            img = np.zeros((h, w, 3), np.uint8)
            img[..., 2] = 200
            img[y0:y0 + bh, x0:x0 + bw] = (220, 30, 30)
            sub = f"{k % 3}/{split}_{k:04d}.jpg"
            (img_dir / sub).parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(img).save(img_dir / sub, quality=98)
            lm = ";".join(f"{v:.2f}" for v in rng.uniform(0, 50, 136))
            rows.append([sub, x0, y0, bw, bh, lm, e, 0.1, -0.2])
        with open(root / files[split], "w", newline="") as f:
            wr = csv.writer(f)
            wr.writerow(["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height",
                         "facial_landmarks", "expression", "valence", "arousal"])
            wr.writerows(rows)
        out[split] = rows
    return out


def write_png16(path, pixels) -> None:
    """A 16-bit PNG of ``pixels`` (uint16, H x W grey or H x W x 2/3/4: grey+alpha, RGB, RGBA).

    Pillow cannot write 16-bit colour PNGs, so the file is assembled here (one IDAT, filter 0).
    """
    import struct
    import zlib

    data = np.asarray(pixels, dtype=">u2")  # PNG stores samples big-endian
    height, width = data.shape[:2]
    channels = 1 if data.ndim == 2 else data.shape[2]
    colour_type = {1: 0, 2: 4, 3: 2, 4: 6}[channels]
    raw = b"".join(b"\0" + data[row].tobytes() for row in range(height))

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 16, colour_type, 0, 0, 0)
    Path(path).write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(raw))
                           + chunk(b"IEND", b""))
