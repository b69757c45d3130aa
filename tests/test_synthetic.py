"""The embedded synthetic FER set: determinism, prior, soft labels, visible expressions."""
from __future__ import annotations

import pytest
import torch

from nla_fast.data import RAFDB_CLASSES, RAFDB_TRAIN_COUNTS, load_dataset
from nla_fast.data import synthetic


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def small():
    return synthetic.generate("train", num_samples=350, seed=0, resolution=48)


def test_deterministic_by_seed(small):
    again = synthetic.generate("train", num_samples=350, seed=0, resolution=48)
    for k in ("images", "labels", "soft_labels", "identity"):
        assert torch.equal(small[k], again[k]), k
    other = synthetic.generate("train", num_samples=350, seed=1, resolution=48)
    assert not torch.equal(small["images"], other["images"])
    test = synthetic.generate("test", num_samples=350, seed=0, resolution=48)
    assert not torch.equal(small["images"], test["images"])


def test_prior_follows_rafdb(small):
    counts = torch.bincount(small["labels"], minlength=7).tolist()
    assert counts == synthetic.class_allocation(350)
    total = sum(RAFDB_TRAIN_COUNTS)
    for c, p in zip(counts, RAFDB_TRAIN_COUNTS):
        assert abs(c - 350 * p / total) < 1
    assert synthetic.class_allocation(12271) == list(RAFDB_TRAIN_COUNTS)


def test_soft_labels_describe_the_blends(small):
    soft, labels, blend = small["soft_labels"], small["labels"], small["blend"]
    assert torch.allclose(soft.sum(1), torch.ones(len(soft)))
    assert torch.equal(soft.argmax(1), labels)
    top = soft.max(1).values
    assert (top[~blend] == 1).all()
    assert ((top[blend] >= 0.5) & (top[blend] <= 0.9)).all()
    assert ((soft[blend] > 0).sum(1) == 2).all()
    assert 0.12 < blend.float().mean().item() < 0.28  # blend_fraction 0.2


def test_load_dataset_synthetic(tmp_path):
    ds = load_dataset("synthetic", None, "test", num_samples=40, resolution=32, verbose=False)
    assert ds.images.shape == (40, 32, 32, 3) and ds.images.dtype == torch.uint8
    assert ds.labels.dtype == torch.int64 and ds.classes == RAFDB_CLASSES
    assert ds.soft_labels.shape == (40, 7)
    again = load_dataset("synthetic", None, "test", num_samples=40, resolution=32, verbose=False)
    assert not again.info["cache_built"] and torch.equal(ds.images, again.images)
    fresh = load_dataset("synthetic", None, "test", num_samples=40, resolution=32, cache=False, verbose=False)
    assert torch.equal(ds.images, fresh.images)
    small = load_dataset("synthetic", None, "train", image_size=16, num_samples=20, resolution=32, verbose=False)
    assert small.images.shape == (20, 16, 16, 3)
    noisy = load_dataset("synthetic", None, "train", num_samples=200, resolution=16, noise_rate=0.4, verbose=False)
    assert 0.25 < noisy.noise_rate < 0.55


def _class_means(images, labels):
    x = images.float().mean(-1)  # grey
    return torch.stack([x[labels == k].mean(0) for k in range(7)])


def test_expressions_are_visible_and_pose_varies(small):
    images, labels = small["images"], small["labels"]
    # faces vary: no two images are the same, identities repeat
    assert len(torch.unique(images.flatten(1), dim=0)) == len(images)
    assert len(torch.unique(small["identity"])) > 5
    # a nearest-class-mean classifier on the mouth/eye region beats the prior
    x = images.float().mean(-1)[:, 10:44, 8:40].flatten(1)
    x = x - x.mean(1, keepdim=True)
    train, test = slice(0, 250), slice(250, 350)
    means = torch.stack([x[train][labels[train] == k].mean(0) for k in range(7)])
    pred = torch.cdist(x[test], means).argmin(1)
    per_class = [(pred[labels[test] == k] == k).float().mean().item() for k in range(7) if (labels[test] == k).sum() >= 3]
    assert sum(per_class) / len(per_class) > 1 / 7 + 0.1
