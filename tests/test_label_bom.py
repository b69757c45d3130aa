"""Label files saved with a UTF-8 byte-order mark (Windows editors, Excel 'CSV UTF-8') lose no line."""
import numpy as np
import pytest
import torch

from nla_fast.data import load_dataset, read_noise_file
from nla_fast.data.fixtures import make_affectnet_tree, make_ferplus_csv, make_ferplus_folders, make_rafdb_tree

BOM = "\ufeff".encode("utf-8")


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))


def _add_bom(path):
    data = path.read_bytes()
    assert not data.startswith(BOM)
    path.write_bytes(BOM + data)


def _same(plain, with_bom):
    assert len(plain) == len(with_bom) > 0
    assert plain.names == with_bom.names and torch.equal(plain.labels, with_bom.labels)
    assert torch.equal(plain.images, with_bom.images)


def test_rafdb_partition_file_with_bom_keeps_its_first_line(tmp_path):
    fx = make_rafdb_tree(tmp_path / "raf", n_train=6, n_test=3, size=24)
    plain = load_dataset("rafdb", fx["root"], "train", cache=False, verbose=False)
    _add_bom(fx["root"] / "EmoLabel/list_patition_label.txt")
    with_bom = load_dataset("rafdb", fx["root"], "train", cache=False, verbose=False)
    assert with_bom.names[0] == "train_00001.jpg"
    _same(plain, with_bom)


def test_noise_file_with_bom_keeps_its_first_line(tmp_path):
    names = ["train_00001.jpg", "train_00002.jpg"]
    noise = tmp_path / "noise.txt"
    noise.write_bytes(BOM + b"train_00001.jpg 3\ntrain_00002.jpg 5\n")
    labels, found = read_noise_file(noise, names, 7)
    assert found.tolist() == [True, True] and labels.tolist() == [2, 4]


def test_ferplus_csv_pair_with_bom(tmp_path):
    votes = [[8, 1, 0, 0, 0, 0, 0, 0, 0, 1], [0, 9, 1, 0, 0, 0, 0, 0, 0, 0], [0, 0, 10, 0, 0, 0, 0, 0, 0, 0]] * 2
    fx = make_ferplus_csv(tmp_path / "fer", votes, usages=["Training"] * 6)
    plain = load_dataset("ferplus", fx["root"], "train", cache=False, verbose=False)
    _add_bom(fx["root"] / "fer2013.csv")
    _add_bom(fx["root"] / "fer2013new.csv")
    _same(plain, load_dataset("ferplus", fx["root"], "train", cache=False, verbose=False))


def test_ferplus_folder_label_csv_with_bom(tmp_path):
    votes = [[8, 1, 0, 0, 0, 0, 0, 0, 0, 1], [0, 9, 1, 0, 0, 0, 0, 0, 0, 0]]
    fx = make_ferplus_folders(tmp_path / "fer", {"train": votes})
    plain = load_dataset("ferplus", fx["root"], "train", cache=False, verbose=False)
    _add_bom(fx["root"] / "FER2013Train" / "label.csv")
    _same(plain, load_dataset("ferplus", fx["root"], "train", cache=False, verbose=False))


def test_affectnet_csv_with_bom(tmp_path):
    fx = make_affectnet_tree(tmp_path / "aff", {"train": [1, 2, 0, 6]})
    plain = load_dataset("affectnet", fx["root"], "train", image_size=16, cache=False, verbose=False)
    _add_bom(fx["root"] / "training.csv")
    with_bom = load_dataset("affectnet", fx["root"], "train", image_size=16, cache=False, verbose=False)
    _same(plain, with_bom)
    assert with_bom.info["layout"] == "manual"
