"""Small datasets in the published layouts, drawn from the embedded synthetic faces:
``python -m nla_fast.data.samples --out DIR [--layout rafdb|ferplus|affectnet|all]``.

Each layout is what its authors distribute, so the real loaders (and ``--data-root``) can be
rehearsed anywhere, without a licence or a download:

    DIR/RAF-DB/      EmoLabel/list_patition_label.txt, Image/aligned/<name>_aligned.jpg (100x100)
    DIR/FERPlus/     fer2013.csv (48x48 grey faces) + fer2013new.csv (ten annotators' votes)
    DIR/AffectNet/   training.csv, validation.csv, Manually_Annotated_Images/<dir>/<file>.jpg
                     (each face inside a larger photo; the face box in the CSV)

The faces are the synthetic set's (``nla_fast.data.synthetic``): procedurally drawn people
with the seven basic expressions, their labels the expressions drawn, written in each dataset's
own class order and label format (classes matched by meaning, ``nla_fast.class_map``). FERPlus
votes come from each face's blend of two expressions (ten annotators split as its weights).
Train and test faces are different people. The same seed writes the same files.
"""
from __future__ import annotations

import argparse
import csv
import io
import sys
from pathlib import Path

import numpy as np

from .. import atomic
from ..class_map import meaning

LAYOUTS = ("rafdb", "ferplus", "affectnet")
FOLDERS = {"rafdb": "RAF-DB", "ferplus": "FERPlus", "affectnet": "AffectNet"}
FER2013_EMOTIONS = ("anger", "disgust", "fear", "happiness", "sadness", "surprise", "neutral")  # fer2013.csv's 0..6
FERPLUS_COLUMNS = ("neutral", "happiness", "surprise", "sadness", "anger", "disgust", "fear", "contempt", "unknown",
                   "NF")
AFFECTNET_ORDER = ("neutral", "happiness", "sadness", "surprise", "fear", "disgust", "anger", "contempt")
# rough valence / arousal of each expression, for AffectNet's two continuous columns
VALENCE_AROUSAL = {"neutral": (0.0, 0.0), "happiness": (0.7, 0.4), "sadness": (-0.6, -0.3), "surprise": (0.2, 0.7),
                   "fear": (-0.5, 0.6), "disgust": (-0.6, 0.3), "anger": (-0.6, 0.6)}


def faces(split: str, count: int, seed: int, resolution: int) -> dict:
    """``count`` synthetic faces: images (uint8 N x R x R x 3), labels (synthetic class indices),
    the meaning of each label, and the soft labels (blend weights)."""
    from .synthetic import CLASSES, generate

    drawn = generate(split, num_samples=count, seed=seed, resolution=resolution)
    meanings = [meaning(CLASSES[label]) for label in drawn["labels"].tolist()]
    return {"images": drawn["images"].numpy(), "labels": drawn["labels"].numpy(), "meanings": meanings,
            "soft": drawn["soft_labels"].numpy(), "classes": [meaning(name) for name in CLASSES]}


def _jpeg(image: np.ndarray, quality: int = 95) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def _csv_text(rows) -> str:
    text = io.StringIO()
    csv.writer(text, lineterminator="\n").writerows(rows)
    return text.getvalue()


def write_rafdb(root, train: int = 60, test: int = 20, seed: int = 0) -> Path:
    """RAF-DB basic: labels 1..7 in its order (Surprise ... Neutral), 100x100 aligned faces."""
    from .rafdb import CLASSES

    root = Path(root)
    order = [meaning(name) for name in CLASSES]
    lines = []
    for split, count in (("train", train), ("test", test)):
        drawn = faces(split, count, seed, 100)
        for k, (image, what) in enumerate(zip(drawn["images"], drawn["meanings"]), 1):
            atomic.write_bytes(root / "Image" / "aligned" / f"{split}_{k:05d}_aligned.jpg", _jpeg(image))
            lines.append(f"{split}_{k:05d}.jpg {order.index(what) + 1}")
    atomic.write_text(root / "EmoLabel" / "list_patition_label.txt", "\n".join(lines) + "\n")
    return root


def _votes(soft_row: np.ndarray, classes: list, rng) -> list:
    """Ten annotators' votes in FERPlus's columns: split between the face's (at most two)
    expressions as its blend weights, one vote sometimes on a third class (an outlier)."""
    votes = [0] * len(FERPLUS_COLUMNS)
    shares = {classes[k]: float(w) for k, w in enumerate(soft_row) if w > 0}
    main = max(shares, key=shares.get)
    for name, weight in shares.items():
        votes[FERPLUS_COLUMNS.index(name)] += int(round(10 * weight))
    votes[FERPLUS_COLUMNS.index(main)] += 10 - sum(votes)
    if rng.random() < 0.3:  # an outlier vote, which the majority rule removes
        votes[FERPLUS_COLUMNS.index(main)] -= 1
        votes[int(rng.integers(0, 8))] += 1
    return votes


def write_ferplus(root, train: int = 60, valid: int = 20, test: int = 20, seed: int = 0) -> Path:
    """FER2013's fer2013.csv (48x48 grey, space-separated pixels) and FERPlus's fer2013new.csv."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    old, new = [["emotion", "pixels", "Usage"]], [["Usage", "Image name", *FERPLUS_COLUMNS]]
    row = 0
    for split, usage, count in (("train", "Training", train), ("valid", "PublicTest", valid),
                                ("test", "PrivateTest", test)):
        drawn = faces(split, count, seed, 48)
        grey = (drawn["images"].astype(np.float32) @ np.array([0.299, 0.587, 0.114], np.float32)).round()
        for image, what, soft in zip(grey.astype(np.uint8), drawn["meanings"], drawn["soft"]):
            old.append([FER2013_EMOTIONS.index(what), " ".join(map(str, image.reshape(-1).tolist())), usage])
            new.append([usage, f"fer{row:07d}.png", *_votes(soft, drawn["classes"], rng)])
            row += 1
    atomic.write_text(root / "fer2013.csv", _csv_text(old))
    atomic.write_text(root / "fer2013new.csv", _csv_text(new))
    return root


def _photo(face: np.ndarray, rng) -> tuple[np.ndarray, tuple]:
    """``face`` inside a larger photo (a smooth background of random colours) at a random place;
    returns the photo and the face box (x, y, width, height)."""
    size = face.shape[0]
    height, width = int(size * rng.uniform(1.3, 1.9)), int(size * rng.uniform(1.3, 1.9))
    x0, y0 = int(rng.integers(0, width - size + 1)), int(rng.integers(0, height - size + 1))
    top, bottom = rng.uniform(40, 220, 3), rng.uniform(40, 220, 3)
    ramp = np.linspace(0, 1, height)[:, None, None]
    photo = np.broadcast_to(top + (bottom - top) * ramp, (height, width, 3)).round().astype(np.uint8).copy()
    photo[y0:y0 + size, x0:x0 + size] = face
    return photo, (x0, y0, size, size)


def write_affectnet(root, train: int = 60, test: int = 20, seed: int = 0) -> Path:
    """AffectNet's manually annotated release: training.csv / validation.csv with the face box,
    68 landmarks, expression (its order: Neutral, Happy, Sad, ...), valence and arousal."""
    root = Path(root)
    rng = np.random.default_rng(seed)
    header = ["subDirectory_filePath", "face_x", "face_y", "face_width", "face_height", "facial_landmarks",
              "expression", "valence", "arousal"]
    for split, file, count in (("train", "training.csv", train), ("test", "validation.csv", test)):
        drawn = faces(split, count, seed, int(rng.integers(96, 129)))
        rows = [header]
        for k, (image, what) in enumerate(zip(drawn["images"], drawn["meanings"])):
            photo, (x, y, w, h) = _photo(image, rng)
            relative = f"{k % 7 + 1}/{split}_{k:05d}.jpg"
            atomic.write_bytes(root / "Manually_Annotated_Images" / relative, _jpeg(photo))
            ring = np.linspace(0, 2 * np.pi, 68, endpoint=False)  # points on the face oval, as x;y pairs
            points = np.stack([x + w * (0.5 + 0.4 * np.cos(ring)), y + h * (0.55 + 0.4 * np.sin(ring))], 1)
            valence, arousal = VALENCE_AROUSAL[what]
            rows.append([relative, x, y, w, h, ";".join(f"{v:.2f}" for v in points.reshape(-1)),
                         AFFECTNET_ORDER.index(what), valence, arousal])
        atomic.write_text(root / file, _csv_text(rows))
    return root


WRITERS = {"rafdb": write_rafdb, "ferplus": write_ferplus, "affectnet": write_affectnet}


def build_parser() -> argparse.ArgumentParser:
    from ..cli import HelpFormatter

    p = argparse.ArgumentParser(
        prog="python -m nla_fast.data.samples", formatter_class=HelpFormatter,
        description="Write small datasets of synthetic faces in RAF-DB's, FERPlus's and AffectNet's published layouts "
        "(DIR/RAF-DB, DIR/FERPlus, DIR/AffectNet), to rehearse the real loaders: train with --dataset rafdb "
        "--data-root DIR/RAF-DB, and so on.")
    p.add_argument("--out", required=True, metavar="DIR", help="folder to write the datasets into")
    p.add_argument("--layout", choices=(*LAYOUTS, "all"), default="all", help="which dataset layout(s) to write")
    p.add_argument("--train", type=_count, default=200, metavar="N", help="training images of each dataset")
    p.add_argument("--test", type=_count, default=60, metavar="N",
                   help="test images of each dataset (FERPlus also writes as many validation images)")
    p.add_argument("--seed", type=int, default=0, help="seed of the faces (the same seed writes the same files)")
    return p


def _count(text: str) -> int:
    from ..arg_types import positive_int

    return positive_int(text)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    out = Path(args.out)
    for layout in LAYOUTS if args.layout == "all" else (args.layout,):
        folder = out / FOLDERS[layout]
        sizes = {"train": args.train, "test": args.test} | ({"valid": args.test} if layout == "ferplus" else {})
        try:
            WRITERS[layout](folder, seed=args.seed, **sizes)
        except OSError as err:
            print(f"nla_fast.data.samples: error: cannot write {folder}: {err.strerror or err}", file=sys.stderr)
            return 2
        print(f"nla_fast.data.samples: wrote {layout} ({', '.join(f'{n} {s}' for s, n in sizes.items())}) to {folder}: "
              f"python -m nla_fast.train --dataset {layout} --data-root {folder}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
