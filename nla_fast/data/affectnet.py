"""AffectNet, manually annotated part.

Layouts under ``root``:

1. The official release: ``training.csv`` (-> train) and ``validation.csv`` (-> test) with
   columns ``subDirectory_filePath, face_x, face_y, face_width, face_height,
   facial_landmarks, expression, valence, arousal``; images under
   ``Manually_Annotated_Images/<subDirectory_filePath>`` (or directly under ``root``).
   The face box is cropped out of each image.
2. A plain CSV with columns ``path,expression`` (paths relative to ``root``, no crop):
   ``train.csv`` / ``test.csv``, or ``training.csv`` / ``validation.csv`` in that format.

``csv_file=`` names the file explicitly. Classes: 0 Neutral, 1 Happy, 2 Sad, 3 Surprise,
4 Fear, 5 Disgust, 6 Anger (7 Contempt kept with ``num_classes=8``); 8 None, 9 Uncertain
and 10 Non-face are always dropped; any other value is an error.

Face crops vary in size and are mostly larger than the network's input, so each is decoded
straight to the size the run trains at: ``cache_size``, else ``image_size``, else
:data:`DEFAULT_SIZE` (the paper's 224 px input); the size is part of the cache key. A
smaller cache (``--cache-size 112``) halves the side at the cost of detail the recipe's
224 px input would see.
"""
from __future__ import annotations

import csv
from pathlib import Path

import torch

from . import cache as _cache
from .decode import ImageFiles, square
from .errors import DatasetNotFoundError, LabelFormatError, LabelRangeError
from .text_files import open_label_text

CLASSES8 = ("Neutral", "Happy", "Sad", "Surprise", "Fear", "Disgust", "Anger", "Contempt")
CLASSES7 = CLASSES8[:7]
DEFAULT_SIZE = 224  # the paper's input size
MANUAL_FILES = {"train": "training.csv", "test": "validation.csv"}
PLAIN_FILES = {"train": "train.csv", "test": "test.csv"}
IMAGE_DIR = "Manually_Annotated_Images"
MANUAL_COLUMNS = ("subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "expression")
MAX_BOX = 1 << 20  # px: no face box lies this far out (10^20 is a damaged field, not a position)
WHERE = (
    "AffectNet is distributed by its authors on request (academic licence): "
    "http://mohammadmahoor.com/affectnet/ ; nothing is downloaded automatically"
)


def _expected(root: Path, split: str) -> str:
    return (
        f"expected {root / MANUAL_FILES[split]} (columns {', '.join(MANUAL_COLUMNS)}, ...) with images under "
        f"{root / IMAGE_DIR}, or a plain CSV {root / PLAIN_FILES[split]} with columns path,expression. {WHERE}"
    )


def _find_csv(root: Path, split: str, csv_file) -> Path:
    if csv_file is not None:
        p = Path(csv_file).expanduser()
        p = p if p.is_absolute() else root / p
        if not p.is_file():
            raise DatasetNotFoundError(f"AffectNet label file {p} is missing; {_expected(root, split)}")
        return p
    for name in (MANUAL_FILES[split], PLAIN_FILES[split]):
        if (root / name).is_file():
            return root / name
    raise DatasetNotFoundError(
        f"AffectNet label file {root / MANUAL_FILES[split]} is missing (nor {root / PLAIN_FILES[split]}); "
        f"{_expected(root, split)}"
    )


def read_csv(path: Path, root: Path, num_classes: int):
    """``(paths, boxes or None, labels, names, manual?)`` of the rows kept for ``num_classes``."""
    paths, boxes, labels, names = [], [], [], []
    with open_label_text(path, newline="") as f:
        reader = csv.reader(f)
        header = [h.strip() for h in (next(reader, None) or [])]
        if "subDirectory_filePath" in header:
            manual = True
            missing = [c for c in MANUAL_COLUMNS if c not in header]
            if missing:
                raise LabelFormatError(f"{path}, line 1: header lacks column(s) {missing}")
            col = {c: header.index(c) for c in MANUAL_COLUMNS}
            image_root = root / IMAGE_DIR if (root / IMAGE_DIR).is_dir() else root
        elif "path" in header and "expression" in header:
            manual = False
            col = {"path": header.index("path"), "expression": header.index("expression")}
            image_root = root
        else:
            raise LabelFormatError(
                f"{path}, line 1: header {header} is neither the AffectNet release "
                f"({', '.join(MANUAL_COLUMNS)}, ...) nor 'path,expression'"
            )
        need = max(col.values()) + 1
        for row in reader:
            if not row or (len(row) == 1 and not row[0].strip()):
                continue
            line = reader.line_num
            if len(row) < need:
                raise LabelFormatError(f"{path}, line {line}: expected at least {need} fields, got {len(row)}")
            raw = row[col["expression"]].strip()
            try:
                value = int(float(raw))
                if float(raw) != value:
                    raise ValueError
            except (ValueError, OverflowError):  # OverflowError: inf
                raise LabelFormatError(f"{path}, line {line}: expression {raw!r} is not an integer") from None
            if not 0 <= value <= 10:
                raise LabelRangeError(f"{path}, line {line}: expression {value} out of range 0..10")
            if value >= num_classes:
                continue
            rel = row[col["subDirectory_filePath" if manual else "path"]].strip()
            if not rel:
                raise LabelFormatError(f"{path}, line {line}: empty image path")
            if manual:
                try:
                    box = tuple(int(float(row[col[c]])) for c in ("face_x", "face_y", "face_width", "face_height"))
                except (ValueError, OverflowError):  # OverflowError: inf
                    raise LabelFormatError(f"{path}, line {line}: face box fields are not numbers") from None
                if max(abs(v) for v in box) > MAX_BOX:
                    raise LabelRangeError(f"{path}, line {line}: face box (x={box[0]}, y={box[1]}, w={box[2]}, "
                                          f"h={box[3]}) is beyond any image ({MAX_BOX} px)")
                if box[2] <= 0 or box[3] <= 0:
                    raise LabelRangeError(f"{path}, line {line}: face box size {box[2]}x{box[3]} is not positive")
                boxes.append(box)
            paths.append(image_root / rel)
            labels.append(value)
            names.append(rel)
    return paths, (boxes if manual else None), labels, names, manual


def load(root, split: str, image_size=None, num_classes: int = 7, csv_file=None, cache_size=None,
         use_cache=True, cache_dir=None, workers=None, verbose=True, **_):
    if split not in MANUAL_FILES:
        raise ValueError(f"AffectNet splits are 'train' and 'test', got {split!r}")
    if num_classes not in (7, 8):
        raise ValueError(f"AffectNet num_classes must be 7 or 8, got {num_classes}")
    if root is None:
        raise DatasetNotFoundError(f"AffectNet needs --data-root DIR (root= from Python). {WHERE}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"AffectNet root {root} does not exist; {_expected(root, split)}")
    label_file = _find_csv(root, split, csv_file)
    paths, boxes, labels, names, manual = read_csv(label_file, root, num_classes)
    size = square(cache_size or image_size or DEFAULT_SIZE)
    key = {
        "root": str(root.resolve()), "label_file": str(label_file), "labels_sha256": _cache.file_digest(label_file),
        "num_classes": num_classes, "size": size, "images": _cache.stat_digest(paths),
    }

    def build():
        images = ImageFiles(paths, size, boxes=boxes, workers=workers, desc=f"affectnet/{split}")
        return {"images": images, "labels": torch.tensor(labels, dtype=torch.int64), "names": names}

    payload, path, built = _cache.load_or_build("affectnet", split, key, build, use_cache, cache_dir, verbose)
    return dict(
        images=payload["images"],
        labels=payload["labels"],
        names=list(payload["names"]),
        classes=CLASSES8 if num_classes == 8 else CLASSES7,
        info={"root": str(root), "label_file": str(label_file), "layout": "manual" if manual else "plain",
              "cache_size": size, "cache_file": str(path) if path else None, "cache_built": built},
    )
