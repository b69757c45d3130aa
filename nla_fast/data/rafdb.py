"""RAF-DB (basic emotions), aligned 100x100 images.

Layout (``root`` is the ``basic`` folder, or a folder holding ``basic/``)::

    EmoLabel/list_patition_label.txt     lines 'train_00001.jpg 5' (labels 1..7)
    Image/aligned/train_00001_aligned.jpg

Labels 1..7 in the file become 0..6: Surprise, Fear, Disgust, Happiness, Sadness, Anger,
Neutral. Names starting with ``train`` form the training split, ``test`` the test split.
Images are cached at :data:`SOURCE_SIZE` (the aligned faces' size; ``cache_size`` to
change): an image of another size is resized to it and counted, it never sets the size.
"""
from __future__ import annotations

from pathlib import Path

import torch

from . import cache as _cache
from .decode import ImageFiles, square
from .errors import DatasetNotFoundError, LabelFormatError, LabelRangeError
from .text_files import open_label_text

CLASSES = ("Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral")
TRAIN_COUNTS = (1290, 281, 717, 4772, 1982, 705, 2524)
TEST_COUNTS = (329, 74, 160, 1185, 478, 162, 680)
SOURCE_SIZE = 100  # RAF-DB's aligned faces are 100 x 100
LABEL_FILE = Path("EmoLabel") / "list_patition_label.txt"
IMAGE_DIR = Path("Image") / "aligned"
WHERE = (
    "RAF-DB is distributed by its authors on request (academic use): "
    "http://www.whdeng.cn/RAF/model1.html ; nothing is downloaded automatically"
)


def _expected(root: Path) -> str:
    return (
        f"expected {root / LABEL_FILE} (lines 'train_00001.jpg 5', labels 1..7) and "
        f"{root / IMAGE_DIR}/<name>_aligned.jpg. {WHERE}"
    )


def resolve_root(root) -> Path:
    if root is None:
        raise DatasetNotFoundError(f"RAF-DB needs --data-root DIR, its 'basic' folder (root= from Python). {WHERE}")
    root = Path(root).expanduser()
    if not root.exists():
        raise DatasetNotFoundError(f"RAF-DB root {root} does not exist; {_expected(root)}")
    if not (root / LABEL_FILE).is_file() and (root / "basic" / LABEL_FILE).is_file():
        root = root / "basic"
    if not (root / LABEL_FILE).is_file():
        raise DatasetNotFoundError(f"RAF-DB label file {root / LABEL_FILE} is missing; {_expected(root)}")
    return root


def read_name_label_lines(path, low: int, high: int):
    """Yield (line number, name, label) of RAF-DB-format ``name label`` lines, label in low..high."""
    with open_label_text(path) as f:
        for lineno, line in enumerate(f, 1):
            parts = line.split()
            if not parts:
                continue
            if len(parts) != 2:
                raise LabelFormatError(f"{path}, line {lineno}: expected '<name> <label>', got {line.rstrip()!r}")
            name, raw = parts
            try:
                value = int(raw)
            except ValueError:
                raise LabelFormatError(f"{path}, line {lineno}: label {raw!r} is not an integer") from None
            if not low <= value <= high:
                raise LabelRangeError(f"{path}, line {lineno}: label {value} out of range {low}..{high}")
            yield lineno, name, value


def read_label_file(path: Path, split: str) -> tuple[list[str], list[int]]:
    """Names and 0-based labels of ``split`` from list_patition_label.txt. A name listed twice
    is refused when its labels differ (which one is right cannot be told) and kept once when
    they agree."""
    names, labels, seen = [], [], {}
    for lineno, name, value in read_name_label_lines(path, 1, 7):
        if not name.startswith(split):
            continue
        if name in seen:
            first_line, first_value = seen[name]
            if first_value != value:
                raise LabelFormatError(f"{path}, line {lineno}: {name} is labelled {value}, but {first_value} on "
                                       f"line {first_line}: keep one line per image")
            continue
        seen[name] = (lineno, value)
        names.append(name)
        labels.append(value - 1)
    return names, labels


def image_path(root: Path, name: str) -> Path:
    stem = name.rsplit(".", 1)[0]
    return root / IMAGE_DIR / f"{stem}_aligned.jpg"


def load(root, split: str, cache_size=None, use_cache=True, cache_dir=None, workers=None, verbose=True, **_):
    if split not in ("train", "test"):
        raise ValueError(f"RAF-DB splits are 'train' and 'test', got {split!r}")
    root = resolve_root(root)
    label_file = root / LABEL_FILE
    names, labels = read_label_file(label_file, split)
    if not names:
        raise LabelFormatError(f"{label_file} lists no '{split}*' images")
    paths = [image_path(root, n) for n in names]
    size = square(cache_size or SOURCE_SIZE)
    key = {
        "root": str(root.resolve()),
        "labels_sha256": _cache.file_digest(label_file),
        "images": _cache.stat_digest(paths),
        "size": size,
    }

    def build():
        return {
            "images": ImageFiles(paths, size, workers=workers, desc=f"rafdb/{split}"),
            "labels": torch.tensor(labels, dtype=torch.int64),
            "names": names,
        }

    payload, path, built = _cache.load_or_build("rafdb", split, key, build, use_cache, cache_dir, verbose)
    return dict(
        images=payload["images"],
        labels=payload["labels"],
        names=list(payload["names"]),
        classes=CLASSES,
        info={"root": str(root), "label_file": str(label_file), "cache_file": str(path) if path else None,
              "cache_built": built, "cache_size": size},
    )

