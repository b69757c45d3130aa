"""Label-noise and imbalance protocols."""
from __future__ import annotations

import math

import pytest
import torch

from nla_fast.data import (
    LabelFormatError, LabelRangeError, imbalance_counts, imbalance_indices, load_dataset, read_noise_file,
    symmetric_noise,
)
from nla_fast.data.fixtures import make_rafdb_tree


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))


def test_symmetric_noise_rate_and_uniformity():
    n, c = 60000, 7
    clean = torch.randint(0, c, (n,), generator=torch.Generator().manual_seed(3))
    noisy = symmetric_noise(clean, c, 0.3, seed=11)
    changed = noisy != clean
    rate = changed.float().mean().item()
    assert abs(rate - 0.3) < 4 * math.sqrt(0.3 * 0.7 / n)
    # the new class is uniform over the *other* classes: offset (noisy - clean) mod C in 1..C-1
    off = ((noisy - clean) % c)[changed]
    counts = torch.bincount(off, minlength=c).float()
    assert counts[0] == 0
    expected = changed.sum() / (c - 1)
    chi2 = (((counts[1:] - expected) ** 2) / expected).sum().item()
    assert chi2 < 25  # 5 dof; p ~ 1e-4
    assert torch.equal(noisy, symmetric_noise(clean, c, 0.3, seed=11))
    assert not torch.equal(noisy, symmetric_noise(clean, c, 0.3, seed=12))
    assert torch.equal(symmetric_noise(clean, c, 0.0), clean)


def test_imbalance_counts_formula():
    counts = [1290, 281, 717, 4772, 1982, 705, 2524]  # RAF-DB train
    t = imbalance_counts(counts, 100)
    # ranks by frequency: Happiness 0, Neutral 1, Sadness 2, Surprise 3, Disgust 4, Anger 5, Fear 6
    order = [3, 6, 4, 0, 2, 5, 1]
    for rank, k in enumerate(order):
        want = min(counts[k], math.floor(4772 * 100 ** (-rank / 6)))
        assert t[k] == want, (k, t[k], want)
    assert t[3] == 4772 and t[1] == 47
    assert imbalance_counts(counts, 1) == counts
    with pytest.raises(ValueError):
        imbalance_counts(counts, 0.5)


def test_imbalance_indices_seeded():
    labels = torch.tensor([0] * 100 + [1] * 60 + [2] * 30)
    idx, targets = imbalance_indices(labels, 3, 10, seed=1)
    kept = torch.bincount(labels[idx], minlength=3).tolist()
    assert kept == targets == [100, 31, 10]  # 100 * 10 ** -0.5 = 31.6
    idx2, _ = imbalance_indices(labels, 3, 10, seed=1)
    idx3, _ = imbalance_indices(labels, 3, 10, seed=2)
    assert torch.equal(idx, idx2) and not torch.equal(idx, idx3)
    assert torch.equal(idx, idx.sort().values)


def test_protocols_through_load_dataset(tmp_path, capsys):
    labels = [4] * 12 + [7] * 6 + [1] * 4 + [6] * 2 + [3] * 2
    fx = make_rafdb_tree(tmp_path / "raf", n_train=26, n_test=4, size=16, labels=labels + [1, 2, 3, 4])
    ds = load_dataset("rafdb", fx["root"], "train", noise_rate=0.5, noise_seed=5)
    out = capsys.readouterr().out
    assert "realised rate" in out and f"{ds.noise_rate:.4f}" in out
    assert ds.noise_rate == pytest.approx(ds.is_noisy.float().mean().item()) and 0 < ds.noise_rate < 1
    assert torch.equal(ds.clean_labels, torch.tensor(labels) - 1)
    assert ds.info["noise_rate"] == ds.noise_rate
    again = load_dataset("rafdb", fx["root"], "train", noise_rate=0.5, noise_seed=5, verbose=False)
    assert torch.equal(ds.labels, again.labels)

    imb = load_dataset("rafdb", fx["root"], "train", imbalance_factor=6, imbalance_seed=0)
    out = capsys.readouterr().out
    assert "class counts" in out
    want = imbalance_counts(torch.bincount(torch.tensor(labels) - 1, minlength=7).tolist(), 6)
    assert imb.class_counts == want and imb.info["imbalance_targets"] == want
    assert len(imb.images) == sum(want) and len(imb.names) == sum(want)
    # the kept images are the right rows
    full = load_dataset("rafdb", fx["root"], "train", verbose=False)
    assert torch.equal(imb.images, full.images[imb.indices])

    # protocols are for the training split only
    test = load_dataset("rafdb", fx["root"], "test", noise_rate=0.5)
    assert "training split only" in capsys.readouterr().out and test.noise_rate == 0.0

    with pytest.raises(ValueError, match="either"):
        load_dataset("rafdb", fx["root"], "train", noise_rate=0.2, noise_file=tmp_path / "x.txt")


def test_noise_file(tmp_path):
    fx = make_rafdb_tree(tmp_path / "raf", n_train=6, n_test=2, size=16, labels=[1, 2, 3, 4, 5, 6, 7, 1])
    nf = tmp_path / "noise.txt"
    # RAF-DB format with both splits; train_00002 relabelled 7, train_00006 missing
    nf.write_text("train_00001.jpg 1\ntrain_00002.jpg 7\ntrain_00003_aligned.jpg 3\ntrain_00004.jpg 4\n"
                  "train_00005.jpg 5\ntest_00001.jpg 2\n")
    ds = load_dataset("rafdb", fx["root"], "train", noise_file=nf, verbose=False)
    assert ds.labels.tolist() == [0, 6, 2, 3, 4, 5]
    assert ds.noise_rate == pytest.approx(1 / 6) and ds.info["noise_file_unlisted"] == 1
    nf.write_text("train_00001.jpg 1\ntrain_00002.jpg 9\n")
    with pytest.raises(LabelRangeError, match=r"noise.txt, line 2: label 9"):
        load_dataset("rafdb", fx["root"], "train", noise_file=nf, verbose=False)
    nf.write_text("train_00001.jpg\n")
    with pytest.raises(LabelFormatError, match=r"line 1"):
        load_dataset("rafdb", fx["root"], "train", noise_file=nf, verbose=False)
    nf.write_text("other_1.jpg 2\n")
    with pytest.raises(LabelFormatError, match="names none"):
        read_noise_file(nf, ["train_00001.jpg"], 7)
