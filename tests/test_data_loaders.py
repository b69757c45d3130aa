"""Loaders on tiny fixture trees: formats, label rules, every error, the cache."""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest
import torch
from PIL import Image

from nla_fast.data import (
    AFFECTNET_CLASSES7, FERPLUS_CLASSES, RAFDB_CLASSES, CorruptImageError, DatasetNotFoundError,
    LabelFormatError, LabelRangeError, load_dataset,
)
from nla_fast.data import cache as cache_mod
from nla_fast.data import ferplus
from nla_fast.data.decode import ImageFiles
from nla_fast.data.fixtures import make_affectnet_tree, make_ferplus_csv, make_ferplus_folders, make_rafdb_tree


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture
def raf(tmp_path):
    return make_rafdb_tree(tmp_path / "raf", n_train=10, n_test=5, size=100, labels=[1, 2, 3, 4, 5, 6, 7, 5, 5, 1, 7, 7, 2, 3, 4])


# ----------------------------------------------------------------------------- RAF-DB
def test_rafdb_loads_and_maps_labels(raf):
    ds = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert ds.images.dtype == torch.uint8 and ds.images.shape == (10, 100, 100, 3)
    assert ds.labels.dtype == torch.int64
    assert ds.labels.tolist() == [lab - 1 for _, lab in raf["train"]]
    assert ds.classes == RAFDB_CLASSES and ds.classes[4] == "Sadness"
    assert ds.names[0] == "train_00001.jpg"
    jpg = np.asarray(Image.open(raf["root"] / "Image/aligned/train_00003_aligned.jpg").convert("RGB"))
    assert np.array_equal(ds.images[2].numpy(), jpg)
    test = load_dataset("raf-db", raf["root"], "test", verbose=False)
    assert len(test) == 5 and test.labels.tolist() == [lab - 1 for _, lab in raf["test"]]


def test_rafdb_parent_folder_grey_and_odd_size(raf):
    img_dir = raf["root"] / "Image/aligned"
    Image.fromarray(np.full((100, 100), 77, np.uint8)).save(img_dir / "train_00002_aligned.jpg", quality=100)
    Image.fromarray(np.zeros((30, 50, 3), np.uint8)).save(img_dir / "train_00004_aligned.jpg")
    ds = load_dataset("rafdb", raf["root"].parent / "raf", "train", verbose=False)
    g = ds.images[1]
    assert torch.equal(g[..., 0], g[..., 1]) and torch.equal(g[..., 1], g[..., 2])  # grey replicated
    assert abs(int(g[5, 5, 0]) - 77) <= 1
    assert ds.images.shape == (10, 100, 100, 3)  # the odd-sized image was resized


def test_rafdb_image_size_option(raf):
    ds = load_dataset("rafdb", raf["root"], "train", image_size=24, verbose=False)
    assert ds.images.shape == (10, 24, 24, 3) and ds.images.dtype == torch.uint8


def test_rafdb_missing_root(tmp_path):
    with pytest.raises(DatasetNotFoundError) as e:
        load_dataset("rafdb", tmp_path / "nowhere", "train")
    msg = str(e.value)
    assert str(tmp_path / "nowhere") in msg and "list_patition_label.txt" in msg and "whdeng" in msg


def test_rafdb_missing_label_file(raf):
    (raf["root"] / "EmoLabel/list_patition_label.txt").unlink()
    with pytest.raises(DatasetNotFoundError, match="list_patition_label.txt"):
        load_dataset("rafdb", raf["root"], "train")


def test_rafdb_missing_and_corrupt_image(raf):
    bad = raf["root"] / "Image/aligned/train_00004_aligned.jpg"
    bad.unlink()
    with pytest.raises(DatasetNotFoundError, match="train_00004_aligned.jpg"):
        load_dataset("rafdb", raf["root"], "train", verbose=False)
    bad.write_bytes(b"\xff\xd8\xff\xe0 this is not a jpeg")
    with pytest.raises(CorruptImageError, match="train_00004_aligned.jpg"):
        load_dataset("rafdb", raf["root"], "train", verbose=False)


@pytest.mark.parametrize(
    "line, exc, pattern",
    [
        ("train_00003.jpg", LabelFormatError, r"line 3"),
        ("train_00003.jpg five", LabelFormatError, r"line 3: label 'five'"),
        ("train_00003.jpg 8", LabelRangeError, r"line 3: label 8 out of range"),
        ("train_00003.jpg 0", LabelRangeError, r"label 0"),
    ],
)
def test_rafdb_malformed_lines(raf, line, exc, pattern):
    path = raf["root"] / "EmoLabel/list_patition_label.txt"
    lines = path.read_text().splitlines()
    lines[2] = line
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(exc, match=pattern) as e:
        load_dataset("rafdb", raf["root"], "train")
    assert str(path) in str(e.value)


# ----------------------------------------------------------------------------- FERPlus rule
#        neu hap sur sad ang dis fea con unk NF
RULE_CASES = [
    ([10, 0, 0, 0, 0, 0, 0, 0, 0, 0], 0, 0, 0),          # unanimous
    ([6, 1, 1, 1, 1, 0, 0, 0, 0, 0], 0, 0, 0),           # single votes are outliers: 6 of 6
    ([1, 1, 1, 1, 1, 1, 1, 1, 1, 1], None, None, None),  # nothing left after outlier removal
    ([5, 5, 0, 0, 0, 0, 0, 0, 0, 0], None, 0, 0),        # exact half: dropped; argmax: first
    ([4, 4, 2, 0, 0, 0, 0, 0, 0, 0], None, 0, 0),        # tie below half
    ([0, 4, 2, 2, 2, 0, 0, 0, 0, 0], None, 1, 1),        # plurality only
    ([0, 6, 4, 0, 0, 0, 0, 0, 0, 0], 1, 1, 1),           # strict majority
    ([3, 0, 0, 0, 0, 0, 0, 7, 0, 0], "contempt", "contempt", "contempt"),
    ([2, 0, 0, 0, 0, 0, 0, 0, 8, 0], None, None, None),  # unknown
    ([0, 0, 0, 0, 0, 0, 0, 0, 3, 7], None, None, None),  # not a face
    ([0, 0, 0, 0, 0, 3, 6, 0, 1, 0], 6, 6, 6),           # single unknown vote removed: 6 of 9
]


@pytest.mark.parametrize("num_classes", [7, 8])
@pytest.mark.parametrize("votes, maj, arg, soft", RULE_CASES)
def test_ferplus_label_rule(votes, maj, arg, soft, num_classes):
    for mode, want in (("majority", maj), ("argmax", arg), ("soft", soft)):
        if want == "contempt":
            want = 7 if num_classes == 8 else None
        keep, label, dist = ferplus.labels_from_votes(np.array([votes]), mode, num_classes)
        assert bool(keep[0]) == (want is not None), (mode, votes)
        if want is not None:
            assert int(label[0]) == want
        if mode == "soft" and want is not None:
            raw = np.array(votes[:num_classes], float)
            assert np.allclose(dist[0], raw / raw.sum())


def test_ferplus_empty_name_dropped():
    keep, _, _ = ferplus.labels_from_votes(np.array([[10] + [0] * 9] * 2), "majority", 7, names=["a.png", ""])
    assert keep.tolist() == [True, False]


def _fer_rows():
    votes = [c[0] for c in RULE_CASES] * 2
    usages = ["Training"] * len(RULE_CASES) + ["PublicTest"] * 6 + ["PrivateTest"] * (len(RULE_CASES) - 6)
    names = [f"fer{k:07d}.png" for k in range(len(votes))]
    names[1] = ""  # the second training row (a valid majority) has no image name
    return votes, usages, names


def test_ferplus_csv_pair(tmp_path):
    votes, usages, names = _fer_rows()
    fx = make_ferplus_csv(tmp_path / "fer", votes, usages, names)
    ds = load_dataset("ferplus", fx["root"], "train", verbose=False)
    # majority, 7 classes: rows 0, 6, 10 of the rule table (row 1 has no name; contempt dropped)
    assert ds.labels.tolist() == [0, 1, 6]
    assert ds.names == ["fer0000000.png", "fer0000006.png", "fer0000010.png"]
    assert ds.images.shape == (3, 48, 48, 3) and ds.classes == FERPLUS_CLASSES[:7]
    assert np.array_equal(ds.images[1, ..., 0].numpy(), fx["pixels"][6])
    assert torch.equal(ds.images[..., 0], ds.images[..., 2])
    ds8 = load_dataset("ferplus", fx["root"], "train", num_classes=8, label_mode="argmax", verbose=False)
    assert ds8.classes == FERPLUS_CLASSES and 7 in ds8.labels.tolist()
    soft = load_dataset("ferplus", fx["root"], "train", label_mode="soft", verbose=False)
    assert soft.soft_labels.shape == (len(soft), 7)
    assert torch.allclose(soft.soft_labels.sum(1), torch.ones(len(soft)))
    assert torch.equal(soft.soft_labels.argmax(1), soft.labels)
    valid = load_dataset("ferplus", fx["root"], "valid", label_mode="argmax", verbose=False)
    assert len(valid) == sum(1 for v in votes[len(RULE_CASES):len(RULE_CASES) + 6] if ferplus.labels_from_votes(np.array([v]), "argmax", 7)[0][0])
    test = load_dataset("ferplus", fx["root"], "test", verbose=False)
    assert all(n.startswith("fer") for n in test.names)


def test_ferplus_csv_errors(tmp_path):
    votes, usages, names = _fer_rows()
    root = tmp_path / "fer"
    make_ferplus_csv(root, votes, usages, names)
    new = root / "fer2013new.csv"
    text = new.read_text().splitlines()

    def with_line(k, line):
        lines = list(text)
        lines[k] = line
        new.write_text("\n".join(lines) + "\n")

    with_line(3, "Training,fer0000002.png,1,1,1,1,x,1,1,1,1,1")
    with pytest.raises(LabelFormatError, match=r"fer2013new.csv, line 4: vote counts"):
        load_dataset("ferplus", root, "train")
    with_line(3, "Training,fer0000002.png,1,1,1,1,-1,1,1,1,1,1")
    with pytest.raises(LabelRangeError, match=r"line 4: vote count -1"):
        load_dataset("ferplus", root, "train")
    with_line(3, "Training,fer0000002.png,1,1,1,1")
    with pytest.raises(LabelFormatError, match=r"line 4: expected 12 fields"):
        load_dataset("ferplus", root, "train")
    with_line(3, "Train,fer0000002.png,1,1,1,1,1,1,1,1,1,1")
    with pytest.raises(LabelFormatError, match=r"line 4: unknown Usage 'Train'"):
        load_dataset("ferplus", root, "train")
    new.write_text("\n".join(text[:-1]) + "\n")
    with pytest.raises(LabelFormatError, match=r"must align one to one"):
        load_dataset("ferplus", root, "train")
    new.write_text("\n".join(text) + "\n")
    old = root / "fer2013.csv"
    old_lines = old.read_text().splitlines()
    old_lines[2] = "0,1 2 3,Training"
    old.write_text("\n".join(old_lines) + "\n")
    with pytest.raises(CorruptImageError, match=r"fer2013.csv, line 3: pixels"):
        load_dataset("ferplus", root, "train")
    old.unlink()
    with pytest.raises(DatasetNotFoundError, match=r"fer2013.csv.*kaggle"):
        load_dataset("ferplus", root, "train")


def test_ferplus_folder_release(tmp_path):
    votes = {"train": [c[0] for c in RULE_CASES], "valid": [[0, 9, 1, 0, 0, 0, 0, 0, 0, 0]], "test": [[0, 0, 8, 2, 0, 0, 0, 0, 0, 0]]}
    fx = make_ferplus_folders(tmp_path / "ferf", votes)
    ds = load_dataset("ferplus", fx["root"], "train", num_classes=8, verbose=False)
    assert ds.labels.tolist() == [0, 0, 1, 7, 6] and ds.info["layout"] == "folders"
    assert np.array_equal(ds.images[2, ..., 1].numpy(), fx["train"][6])
    assert load_dataset("ferplus", fx["root"], "test", verbose=False).labels.tolist() == [2]
    (fx["root"] / "FER2013Train/fer0000006.png").write_bytes(b"garbage")
    with pytest.raises(CorruptImageError, match="fer0000006.png"):
        load_dataset("ferplus", fx["root"], "train", cache=False, verbose=False)


# ----------------------------------------------------------------------------- AffectNet
def test_affectnet_manual_release(tmp_path):
    fx = make_affectnet_tree(tmp_path / "aff", {"train": [0, 1, 7, 8, 9, 10, 6, 3], "test": [2, 5]})
    ds = load_dataset("affectnet", fx["root"], "train", image_size=32, verbose=False)
    assert ds.labels.tolist() == [0, 1, 6, 3] and ds.classes == AFFECTNET_CLASSES7
    assert ds.images.shape == (4, 32, 32, 3)
    # the face box (red) was cropped: the centre and most of the crop are red
    red = ds.images[..., 0].float().mean().item()
    blue = ds.images[..., 2].float().mean().item()
    assert red > 150 and blue < 80
    ds8 = load_dataset("affectnet", fx["root"], "train", image_size=32, num_classes=8, verbose=False)
    assert ds8.labels.tolist() == [0, 1, 7, 6, 3]
    test = load_dataset("affectnet", fx["root"], "test", verbose=False)
    assert test.images.shape[1:] == (224, 224, 3) and test.labels.tolist() == [2, 5]  # the paper's input size


def test_affectnet_plain_csv_and_errors(tmp_path):
    root = tmp_path / "plain"
    (root / "imgs").mkdir(parents=True)
    for k in range(3):
        Image.fromarray(np.full((20, 20, 3), 40 * k, np.uint8)).save(root / "imgs" / f"{k}.png")
    (root / "train.csv").write_text("path,expression\nimgs/0.png,4\nimgs/1.png,9\nimgs/2.png,6\n")
    ds = load_dataset("affectnet", root, "train", cache_size=20, verbose=False)
    assert ds.labels.tolist() == [4, 6] and ds.images.shape == (2, 20, 20, 3) and int(ds.images[1, 0, 0, 0]) == 80
    trained_at = load_dataset("affectnet", root, "train", image_size=48, verbose=False)
    assert trained_at.images.shape == (2, 48, 48, 3)  # cached at the size the run trains at
    (root / "train.csv").write_text("path,expression\nimgs/0.png,4\nimgs/1.png,11\n")
    with pytest.raises(LabelRangeError, match=r"train.csv, line 3: expression 11"):
        load_dataset("affectnet", root, "train")
    (root / "train.csv").write_text("path,expression\nimgs/0.png,happy\n")
    with pytest.raises(LabelFormatError, match=r"line 2: expression 'happy'"):
        load_dataset("affectnet", root, "train")
    (root / "train.csv").write_text("file,label\nimgs/0.png,4\n")
    with pytest.raises(LabelFormatError, match=r"line 1: header"):
        load_dataset("affectnet", root, "train")
    (root / "train.csv").write_text("path,expression\nimgs/missing.png,4\n")
    with pytest.raises(DatasetNotFoundError, match="missing.png"):
        load_dataset("affectnet", root, "train", verbose=False)
    with pytest.raises(DatasetNotFoundError, match=r"validation.csv.*mahoor"):
        load_dataset("affectnet", root, "test")


# ----------------------------------------------------------------------------- API checks
def test_bad_name_split_option(raf):
    with pytest.raises(ValueError, match="unknown dataset"):
        load_dataset("cifar", raf["root"], "train")
    with pytest.raises(ValueError, match="splits"):
        load_dataset("rafdb", raf["root"], "valid")
    with pytest.raises(TypeError, match="label_mode"):
        load_dataset("rafdb", raf["root"], "train", label_mode="soft")


# ----------------------------------------------------------------------------- cache
def test_cache_reuse_and_invalidation(raf, tmp_path, monkeypatch):
    cdir = tmp_path / "cache"
    a = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert a.info["cache_built"] and os.path.dirname(a.info["cache_file"]) == str(cdir)
    assert not [p for p in cdir.iterdir() if p.name.endswith(".tmp")]

    calls = []
    real = cache_mod.atomic.torch_save
    monkeypatch.setattr(cache_mod.atomic, "torch_save", lambda *x: (calls.append(1), real(*x)))
    b = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert not b.info["cache_built"] and calls == [] and torch.equal(a.images, b.images)

    # a changed label file -> new key, rebuild with the new labels
    path = raf["root"] / "EmoLabel/list_patition_label.txt"
    lines = path.read_text().splitlines()
    lines[0] = "train_00001.jpg 7"
    path.write_text("\n".join(lines) + "\n")
    c = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert c.info["cache_built"] and c.labels[0] == 6

    # a replaced image -> rebuild with the new pixels
    img = raf["root"] / "Image/aligned/train_00002_aligned.jpg"
    Image.fromarray(np.full((100, 100, 3), 200, np.uint8)).save(img, quality=100)
    st = img.stat()
    os.utime(img, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
    d = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert d.info["cache_built"] and abs(int(d.images[1, 0, 0, 0]) - 200) <= 1

    # cache=False never writes
    n_files = len(list(cdir.iterdir()))
    load_dataset("rafdb", raf["root"], "train", cache=False, verbose=False)
    assert len(list(cdir.iterdir())) == n_files


def test_interrupted_cache_write_is_never_read(raf, tmp_path, monkeypatch):
    real = ImageFiles.decode

    def interrupted(self, i, out):  # Ctrl-C half-way through decoding into the file
        if i == 5:
            raise KeyboardInterrupt
        real(self, i, out)

    monkeypatch.setattr(ImageFiles, "decode", interrupted)
    monkeypatch.setattr(ImageFiles, "ROWS_PER_TASK", 1)
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 3 * 100 * 100 * 3)  # chunks of 3 images: some are written
    with pytest.raises(KeyboardInterrupt):
        load_dataset("rafdb", raf["root"], "train", workers=1, verbose=False)
    cdir = tmp_path / "cache"
    assert not cdir.exists() or list(cdir.iterdir()) == []
    monkeypatch.undo()
    monkeypatch.setenv("NLA_FAST_CACHE", str(cdir))
    ds = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert ds.info["cache_built"] and len(ds) == 10


def test_corrupt_cache_file_is_rebuilt(raf, capsys):
    a = load_dataset("rafdb", raf["root"], "train", verbose=False)
    expected = a.images.clone()  # a.images maps the file that is damaged next
    with open(a.info["cache_file"], "wb") as f:
        f.write(b"not a cache file")
    b = load_dataset("rafdb", raf["root"], "train", verbose=True)
    assert b.info["cache_built"] and torch.equal(expected, b.images)
    assert "rebuilding" in capsys.readouterr().err


def test_cache_damaged_in_place_with_the_same_size_is_rebuilt(raf, capsys):
    a = load_dataset("rafdb", raf["root"], "train", verbose=False)
    expected = a.images.clone()  # a.images maps the file that is damaged next
    path = a.info["cache_file"]
    blob = bytearray(open(path, "rb").read())
    row = a.images[3].numpy().tobytes()  # 30,000 pixel bytes, stored uncompressed in the file
    at = blob.find(row)
    assert at > 0
    blob[at:at + 64] = bytes(255 - b for b in blob[at:at + 64])  # a bad sector in the pixels
    with open(path, "r+b") as f:  # in place: same size, same name
        f.write(blob)
    assert os.path.getsize(path) == len(blob)
    b = load_dataset("rafdb", raf["root"], "train", verbose=True)
    err = capsys.readouterr().err
    assert b.info["cache_built"] and torch.equal(expected, b.images)
    assert "checksum" in err and path in err and len([l for l in err.splitlines() if "checksum" in l]) == 1
    c = load_dataset("rafdb", raf["root"], "train", verbose=False)  # the rebuilt file verifies
    assert not c.info["cache_built"] and torch.equal(expected, c.images)


@pytest.mark.parametrize("where", ["first image", "last image", "labels", "names", "header length"])
def test_cache_checksum_covers_every_byte_the_payload_reads(tmp_path, monkeypatch, where):
    monkeypatch.setattr(cache_mod, "BLOCK_BYTES", 4096)  # several blocks in a small file
    images = torch.randint(0, 256, (9, 20, 20, 3), dtype=torch.uint8)
    payload = {"images": images, "labels": torch.arange(9), "names": [f"n{i}" for i in range(9)]}
    path = tmp_path / "x.cache"
    cache_mod.write_cache(path, "key", payload)
    opened = cache_mod.open_cache(path, "key")
    assert torch.equal(opened["images"], images) and torch.equal(opened["labels"], torch.arange(9))
    assert opened["names"] == payload["names"]
    blob = bytearray(path.read_bytes())
    at = {"first image": cache_mod.DATA_OFFSET, "last image": cache_mod.DATA_OFFSET + images.numel() - 1,
          "labels": blob.find(torch.arange(9).numpy().tobytes()) + 8, "names": blob.find(b'"n4"') + 2,
          "header length": len(blob) - 16}[where]
    blob[at] ^= 1  # one bit
    path.write_bytes(blob)
    with pytest.raises(cache_mod.CacheFileError):
        cache_mod.open_cache(path, "key")


def test_cache_file_maps_its_images_and_a_view_knows_its_file(tmp_path):
    path = tmp_path / "x.cache"
    cache_mod.write_cache(path, "key", {"images": torch.ones(4, 8, 8, 3, dtype=torch.uint8), "labels": torch.zeros(4)})
    opened = cache_mod.open_cache(path, "key")
    assert cache_mod.mapped_file(opened["images"]) == str(path)
    assert cache_mod.mapped_file(opened["images"][1:3]) == str(path)  # a slice reads the same map
    assert cache_mod.mapped_file(opened["labels"]) is None  # read into memory
    assert cache_mod.mapped_file(opened["images"].clone()) is None
    with pytest.raises(cache_mod.CacheFileError, match="key mismatch"):
        cache_mod.open_cache(path, "another key")


def test_label_hash_is_content_based(tmp_path):
    p = tmp_path / "f.txt"
    p.write_text("abc")
    h1 = cache_mod.file_digest(p)
    time.sleep(0.01)
    p.write_text("abc")
    assert cache_mod.file_digest(p) == h1
    p.write_text("abd")
    assert cache_mod.file_digest(p) != h1


def test_csv_reader_handles_quoted_landmarks(tmp_path):
    fx = make_affectnet_tree(tmp_path / "aff", {"train": [1]})
    with open(fx["root"] / "training.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert len(rows) == 2 and ";" in rows[1][5]


def test_dataset_container_helpers(raf):
    ds = load_dataset("rafdb", raf["root"], "train", verbose=False)
    assert ds.to("cpu") is ds and ds.images.device.type == "cpu"
    idx = torch.tensor([3, 0, 7])
    sub = ds.subset(idx)
    assert torch.equal(sub.images, ds.images[idx]) and sub.names == [ds.names[i] for i in (3, 0, 7)]
    assert torch.equal(sub.indices, idx)
    img, lab = ds[2]
    assert img.shape == (100, 100, 3) and int(lab) == int(ds.labels[2])
    assert ds.nbytes == 10 * 100 * 100 * 3 and "rafdb/train: 10 images 100x100" in ds.summary()
    assert sum(ds.class_counts) == 10 and ds.noise_rate == 0.0


# ----------------------------------------------------------------------------- cache: streamed, sized, never fatal
def test_a_split_is_cached_at_its_source_size_whatever_its_first_image(tmp_path):
    tree = make_rafdb_tree(tmp_path / "raf", n_train=6, n_test=2, size=100)
    Image.fromarray(np.full((1, 1, 3), 90, np.uint8)).save(tree["root"] / "Image/aligned/train_00001_aligned.jpg")
    ds = load_dataset("rafdb", tree["root"], "train", verbose=False)
    assert ds.images.shape == (6, 100, 100, 3)  # RAF-DB's aligned size, not the first image's 1x1
    jpg = np.asarray(Image.open(tree["root"] / "Image/aligned/train_00002_aligned.jpg").convert("RGB"))
    assert np.array_equal(ds.images[1].numpy(), jpg)  # the others untouched
    assert load_dataset("rafdb", tree["root"], "train", cache_size=40, verbose=False).images.shape == (6, 40, 40, 3)


def test_a_full_disk_costs_the_cache_not_the_load(tmp_path):
    # a file-size limit makes every write past 64 KiB fail (EFBIG) like a full disk; torch.save raised
    # RuntimeError ("unexpected pos") there, which the old cache did not catch
    tree = make_rafdb_tree(tmp_path / "raf", n_train=12, n_test=2, size=100)
    script = textwrap.dedent(f"""
        import resource, signal
        from nla_fast.data import load_dataset
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (64 << 10, 64 << 10))
        ds = load_dataset("rafdb", {str(tree["root"])!r}, "train", cache_dir={str(tmp_path / "cache")!r})
        print("loaded", tuple(ds.images.shape), ds.info["cache_file"], int(ds.images.long().sum()))
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    expected = load_dataset("rafdb", tree["root"], "train", cache=False, verbose=False).images
    assert done.stdout.split() == ["loaded", "(12,", "100,", "100,", "3)", "None", str(int(expected.long().sum()))]
    said = [line for line in done.stderr.splitlines() if "could not write cache" in line]
    assert len(said) == 1 and "going on without a cache" in said[0] and "Traceback" not in done.stderr
    assert list((tmp_path / "cache").iterdir()) == []  # no partial file left


def test_a_folder_without_room_for_the_file_is_not_written(raf, tmp_path, monkeypatch, capsys):
    usage = shutil.disk_usage(tmp_path)._replace(free=1000)
    monkeypatch.setattr(cache_mod.shutil, "disk_usage", lambda path: usage)
    ds = load_dataset("rafdb", raf["root"], "train")
    err = capsys.readouterr().err
    assert ds.info["cache_file"] is None and len(ds) == 10 and "GB are free in" in err
    assert not (tmp_path / "cache").exists() or list((tmp_path / "cache").iterdir()) == []


class RecordingImages:
    """An image source that records, at each chunk it decodes, how much of the file is written."""

    def __init__(self, folder, count=10, side=16):
        self.folder, self.shape, self.count = folder, (side, side), count
        self.calls = []

    def fill(self, lo, hi, out):
        written = sum(p.stat().st_size for p in self.folder.iterdir() if p.name.endswith(".tmp"))
        self.calls.append((lo, hi, written))
        out[...] = np.arange(lo, hi, dtype=np.uint8)[:, None, None, None]


def test_a_build_writes_each_chunk_while_decoding_the_next(tmp_path, monkeypatch):
    row = 16 * 16 * 3
    monkeypatch.setattr(cache_mod, "CHUNK_BYTES", 2 * row)  # two images per chunk
    source = RecordingImages(tmp_path / "cache")
    payload, path, built = cache_mod.load_or_build("synthetic", "train", {"n": 10}, lambda: {"images": source},
                                                   directory=tmp_path / "cache", verbose=False)
    assert [(lo, hi) for lo, hi, _ in source.calls] == [(0, 2), (2, 4), (4, 6), (6, 8), (8, 10)]
    for k, (lo, _, written) in enumerate(source.calls[2:], 2):  # chunk k-2 is in the file before chunk k decodes
        assert written >= cache_mod.DATA_OFFSET + (k - 1) * 2 * row, (k, written)
    assert built and payload["images"][:, 0, 0, 0].tolist() == list(range(10))
    assert cache_mod.mapped_file(payload["images"]) == str(path)  # training reads the finished file
