"""FERPlus: FER2013's 48x48 grey faces with the ten-annotator FERPlus votes.

Two source layouts under ``root``:

1. ``fer2013.csv`` (``emotion,pixels,Usage``) + ``fer2013new.csv`` (``Usage,Image name,
   neutral,happiness,surprise,sadness,anger,disgust,fear,contempt,unknown,NF``), rows aligned
   one to one. Usage Training -> train, PublicTest -> valid, PrivateTest -> test.
2. The image-folder release written by the FERPlus scripts: ``FER2013Train/``,
   ``FER2013Valid/``, ``FER2013Test/``, each with ``label.csv`` rows
   ``fer0000000.png,"(0, 0, 48, 48)",<10 vote counts>`` and the PNG files.

The ten vote counts of every row are cached; the label rule is applied afterwards
(:func:`labels_from_votes`):

- ``majority`` (the dataset authors' rule): set each count <= 1 to 0; keep the row only if
  the largest count is strictly more than half of the remaining total; its class is the
  label; rows won by unknown or NF are dropped, so are rows with an empty ``Image name``
  and, for 7 classes, contempt rows.
- ``argmax``: after the same outlier removal, the most voted class (first in column order
  on ties); rows with no vote left, or won by unknown/NF (or contempt for 7 classes), drop.
- ``soft``: the rows and labels of ``argmax`` plus ``soft_labels``: the raw vote counts of
  the C emotion classes normalised to sum to 1 (the annotators' distribution).
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import torch

from . import cache as _cache
from .decode import ArrayImages, ImageFiles, square
from .errors import CorruptImageError, DatasetNotFoundError, LabelFormatError, LabelRangeError
from .text_files import open_label_text

CLASSES8 = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt")
CLASSES7 = CLASSES8[:7]
VOTE_COLUMNS = CLASSES8 + ("unknown", "NF")
USAGE = {"Training": "train", "PublicTest": "valid", "PrivateTest": "test"}
FOLDERS = {"train": "FER2013Train", "valid": "FER2013Valid", "test": "FER2013Test"}
LABEL_MODES = ("majority", "argmax", "soft")
SOURCE_SIZE = 48  # FER2013's faces are 48 x 48 (the cache keeps them so unless cache_size says otherwise)
# FERPlus has ten annotators per image; a larger count is a damaged file, not a vote
MAX_VOTES = 1000
WHERE = (
    "fer2013.csv comes from the Kaggle 'Challenges in Representation Learning: Facial Expression "
    "Recognition Challenge' (https://www.kaggle.com/c/challenges-in-representation-learning-facial-"
    "expression-recognition-challenge); fer2013new.csv from https://github.com/microsoft/FERPlus ; "
    "nothing is downloaded automatically"
)


def _expected(root: Path) -> str:
    return (
        f"expected {root / 'fer2013.csv'} and {root / 'fer2013new.csv'}, or the image-folder release "
        f"{root}/FER2013Train|FER2013Valid|FER2013Test/label.csv with the PNG files. {WHERE}"
    )


def _layout(root) -> tuple[Path, str]:
    if root is None:
        raise DatasetNotFoundError(f"FERPlus needs --data-root DIR (root= from Python). {WHERE}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"FERPlus root {root} does not exist; {_expected(root)}")
    has_old, has_new = (root / "fer2013.csv").is_file(), (root / "fer2013new.csv").is_file()
    if has_old and has_new:
        return root, "csv"
    if any((root / d / "label.csv").is_file() for d in FOLDERS.values()):
        return root, "folders"
    missing = [str(root / n) for n, ok in (("fer2013.csv", has_old), ("fer2013new.csv", has_new)) if not ok]
    raise DatasetNotFoundError(f"FERPlus label file(s) missing: {', '.join(missing)}; {_expected(root)}")


def _parse_votes(fields, path: Path, lineno: int) -> list[int]:
    if len(fields) != 10:
        raise LabelFormatError(f"{path}, line {lineno}: expected 10 vote counts, got {len(fields)}")
    try:
        numbers = [float(v) for v in fields]
    except ValueError:
        raise LabelFormatError(f"{path}, line {lineno}: vote counts {fields} are not integers") from None
    for raw, number in zip(fields, numbers):
        if number < 0:
            raise LabelRangeError(f"{path}, line {lineno}: vote count {int(number) if number.is_integer() else raw.strip()} "
                                  "out of range (must be >= 0)")
        if not number <= MAX_VOTES:  # also inf and nan
            raise LabelRangeError(f"{path}, line {lineno}: vote count {raw.strip()!r} out of range 0..{MAX_VOTES}")
    return [int(number) for number in numbers]


def _read_csv_pair(root: Path, split: str):
    old_path, new_path = root / "fer2013.csv", root / "fer2013new.csv"
    with open_label_text(new_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or len(header) < 12 or header[0].strip() != "Usage":
            raise LabelFormatError(
                f"{new_path}, line 1: expected header 'Usage,Image name,{','.join(VOTE_COLUMNS)}', got {header}"
            )
        new_rows = []
        for row in reader:
            if not row:
                continue
            if len(row) != 12:
                raise LabelFormatError(f"{new_path}, line {reader.line_num}: expected 12 fields, got {len(row)}")
            usage = row[0].strip()
            if usage not in USAGE:
                raise LabelFormatError(f"{new_path}, line {reader.line_num}: unknown Usage {usage!r} (expected {list(USAGE)})")
            new_rows.append((usage, row[1].strip(), _parse_votes(row[2:], new_path, reader.line_num), reader.line_num))

    pixels, names, votes, rows = [], [], [], []
    with open_label_text(old_path, newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None or [h.strip() for h in header[:3]] != ["emotion", "pixels", "Usage"]:
            raise LabelFormatError(f"{old_path}, line 1: expected header 'emotion,pixels,Usage', got {header}")
        i = -1
        for i, row in enumerate(reader):
            if len(row) != 3:
                raise LabelFormatError(f"{old_path}, line {reader.line_num}: expected 3 fields, got {len(row)}")
            if i >= len(new_rows):
                continue  # counted below
            usage, name, v, new_line = new_rows[i]
            if row[2].strip() != usage:
                raise LabelFormatError(
                    f"{old_path}, line {reader.line_num}: Usage {row[2]!r} differs from {usage!r} in "
                    f"{new_path}, line {new_line}: the two files must align row by row"
                )
            if USAGE[usage] != split:
                continue
            try:
                px = np.fromstring(row[1], dtype=np.int32, sep=" ")
            except ValueError:
                px = None
            if px is None or px.size != 48 * 48:
                raise CorruptImageError(f"{old_path}, line {reader.line_num}: pixels are not 2304 space-separated integers")
            if px.min() < 0 or px.max() > 255:
                raise CorruptImageError(f"{old_path}, line {reader.line_num}: pixel value out of 0..255")
            pixels.append(px.astype(np.uint8))
            names.append(name)
            votes.append(v)
            rows.append(i)
        n_old = i + 1
    if n_old != len(new_rows):
        raise LabelFormatError(
            f"{old_path} has {n_old} data rows but {new_path} has {len(new_rows)}; they must align one to one"
        )
    grey = np.stack(pixels).reshape(-1, 48, 48) if pixels else np.zeros((0, 48, 48), np.uint8)
    images = np.repeat(grey[..., None], 3, axis=-1)
    return images, names, votes, rows, [old_path, new_path]


def _read_folder(root: Path, split: str, workers, verbose):
    folder = root / FOLDERS[split]
    label_file = folder / "label.csv"
    if not label_file.is_file():
        raise DatasetNotFoundError(
            f"FERPlus label file {label_file} is missing (split {split!r}); {_expected(root)}"
        )
    names, votes = [], []
    with open_label_text(label_file, newline="") as f:
        reader = csv.reader(f)
        for row in reader:
            if not row:
                continue
            if len(row) != 12:
                raise LabelFormatError(f"{label_file}, line {reader.line_num}: expected 12 fields (name, box, 10 votes), got {len(row)}")
            names.append(row[0].strip())
            votes.append(_parse_votes(row[2:], label_file, reader.line_num))
    paths = [folder / n for n in names]
    return paths, names, votes, [label_file]


def labels_from_votes(votes: np.ndarray, mode: str = "majority", num_classes: int = 7, names=None):
    """``(keep, labels, soft)`` for an ``N x 10`` vote array (see the module docstring)."""
    if mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {mode!r}")
    if num_classes not in (7, 8):
        raise ValueError(f"FERPlus num_classes must be 7 or 8, got {num_classes}")
    votes = np.asarray(votes, dtype=np.int64).reshape(-1, 10)
    v = np.where(votes <= 1, 0, votes)
    total = v.sum(1)
    arg = v.argmax(1)  # first maximum on ties
    top = v.max(1)
    valid_class = arg < num_classes  # drops unknown (8), NF (9) and, for 7 classes, contempt (7)
    if mode == "majority":
        keep = (2 * top > total) & valid_class
    else:
        keep = (total > 0) & valid_class
    if names is not None:
        keep &= np.array([bool(n) for n in names], dtype=bool)
    soft = None
    if mode == "soft":
        raw = votes[:, :num_classes].astype(np.float64)
        s = raw.sum(1, keepdims=True)
        soft = np.divide(raw, s, out=np.zeros_like(raw), where=s > 0).astype(np.float32)
    return keep, arg.astype(np.int64), soft


def load(root, split: str, label_mode: str = "majority", num_classes: int = 7, cache_size=None,
         use_cache=True, cache_dir=None, workers=None, verbose=True, **_):
    if split not in FOLDERS:
        raise ValueError(f"FERPlus splits are 'train', 'valid' and 'test', got {split!r}")
    if label_mode not in LABEL_MODES:
        raise ValueError(f"label_mode must be one of {LABEL_MODES}, got {label_mode!r}")
    if num_classes not in (7, 8):
        raise ValueError(f"FERPlus num_classes must be 7 or 8, got {num_classes}")
    root, layout = _layout(root)
    size = square(cache_size or SOURCE_SIZE)
    if layout == "csv":
        label_files = [root / "fer2013.csv", root / "fer2013new.csv"]
        key = {"layout": layout, "root": str(root.resolve()), "labels_sha256": [_cache.file_digest(p) for p in label_files],
               "size": size}

        def build():
            images, names, votes, rows, _files = _read_csv_pair(root, split)
            return {"images": ArrayImages(images, size, f"ferplus/{split}"), "votes": torch.tensor(votes, dtype=torch.int64).reshape(-1, 10),
                    "names": names, "rows": torch.tensor(rows, dtype=torch.int64)}
    else:
        paths, names_, votes_, label_files = _read_folder(root, split, workers, verbose)
        key = {"layout": layout, "root": str(root.resolve()), "labels_sha256": [_cache.file_digest(p) for p in label_files],
               "images": _cache.stat_digest(paths), "size": size}

        def build():
            return {"images": ImageFiles(paths, size, workers=workers, desc=f"ferplus/{split}"), "votes": torch.tensor(votes_, dtype=torch.int64).reshape(-1, 10),
                    "names": names_, "rows": torch.arange(len(names_))}

    payload, path, built = _cache.load_or_build("ferplus", split, key, build, use_cache, cache_dir, verbose)
    names = list(payload["names"])
    keep, arg, soft = labels_from_votes(payload["votes"].numpy(), label_mode, num_classes, names)
    idx = torch.from_numpy(np.flatnonzero(keep))
    images = payload["images"]
    out = dict(
        images=images[idx] if len(idx) != len(images) else images,
        labels=torch.from_numpy(arg)[idx],
        names=[names[i] for i in idx.tolist()],
        classes=CLASSES8 if num_classes == 8 else CLASSES7,
        soft_labels=None if soft is None else torch.from_numpy(soft)[idx],
        info={"root": str(root), "layout": layout, "label_files": [str(p) for p in label_files],
              "label_mode": label_mode, "rows_total": len(names), "rows_dropped": len(names) - len(idx),
              "votes": payload["votes"][idx],
              "cache_file": str(path) if path else None, "cache_built": built, "cache_size": size},
    )
    return out
