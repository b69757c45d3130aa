"""``--label-mode soft``: cross-entropy against FERPlus's vote distributions; refused with the
NLA loss (one label per image); evaluation keeps the argmax labels. Also: a FERPlus resume
with another ``--num-classes`` is refused."""
import os

import pytest
import torch

from nla_fast import checkpoint as ckpt
from nla_fast import engine, train
from nla_fast.data.fixtures import make_ferplus_csv

# 16 training rows whose votes are split between two classes (the argmax is the first).
PAIRS = [(0, 1), (1, 2), (2, 3), (3, 4), (4, 5), (5, 6), (6, 0), (1, 0)]
TRAIN_VOTES = [[0] * 10 for _ in range(16)]
for row, (first, second) in zip(TRAIN_VOTES, PAIRS * 2):
    row[first], row[second] = 6, 4
TEST_VOTES = [[10 if c == k % 7 else 0 for c in range(10)] for k in range(8)]


@pytest.fixture(scope="module")
def fer_root(tmp_path_factory):
    old, threads = os.environ.get("NLA_FAST_CACHE"), torch.get_num_threads()
    os.environ["NLA_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(1)
    # the validation rows (PublicTest) choose best.pt; an empty validation split is refused
    fx = make_ferplus_csv(tmp_path_factory.mktemp("fer"), TRAIN_VOTES + TEST_VOTES + TEST_VOTES,
                          usages=["Training"] * 16 + ["PrivateTest"] * 8 + ["PublicTest"] * 8)
    yield fx["root"]
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("NLA_FAST_CACHE", None)
    else:
        os.environ["NLA_FAST_CACHE"] = old


def fer_args(root, out, *extra):
    return ["--dataset", "ferplus", "--data-root", str(root), "--image-size", "32", "--batch-size", "8",
            "--epochs", "1", "--backend", "reference", "--device", "cpu", "--no-progress", "--plot-every", "0",
            "--out", str(out), *extra]


def test_soft_mode_trains_on_the_vote_distribution(fer_root, tmp_path, monkeypatch):
    targets = []
    real = engine.F.cross_entropy

    def recording(logits, target, *args, **kwargs):
        targets.append(target.detach().clone())
        return real(logits, target, *args, **kwargs)

    monkeypatch.setattr(engine.F, "cross_entropy", recording)
    assert train.main(fer_args(fer_root, tmp_path / "soft", "--loss", "ce", "--label-mode", "soft")) == 0
    assert len(targets) == 2 and all(t.dtype == torch.float32 and t.shape == (8, 7) for t in targets)
    seen = {tuple(round(v, 3) for v in row.tolist()) for t in targets for row in t}
    expected = {tuple(0.6 if c == a else 0.4 if c == b else 0.0 for c in range(7)) for a, b in PAIRS}
    assert seen == expected  # every training row's votes, normalised
    targets.clear()
    assert train.main(fer_args(fer_root, tmp_path / "argmax", "--loss", "ce", "--label-mode", "argmax")) == 0
    assert all(t.dtype == torch.int64 for t in targets)
    soft, hard = ckpt.load(tmp_path / "soft" / "last.pt"), ckpt.load(tmp_path / "argmax" / "last.pt")
    assert not torch.equal(soft["model"]["fc.weight"], hard["model"]["fc.weight"])
    # evaluation is against the argmax labels: all 8 test rows count, one class each
    row = [line for line in (tmp_path / "soft" / "metrics.jsonl").read_text().splitlines()]
    assert len(row) == 1 and '"test_samples": 8' in row[0]


@pytest.mark.parametrize("extra,words", [
    (["--label-mode", "soft"], "needs --loss ce"),
    (["--label-mode", "soft", "--loss", "ce", "--noise-rate", "0.2"], "label noise"),
])
def test_soft_mode_refuses_what_would_ignore_the_distribution(fer_root, tmp_path, capsys, extra, words):
    assert train.main(fer_args(fer_root, tmp_path, *extra)) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and words in err and "--label-mode majority or argmax" in err, err


def test_soft_mode_is_a_ferplus_option(tmp_path, capsys):
    args = ["--dataset", "synthetic", "--label-mode", "soft", "--loss", "ce", "--device", "cpu", "--out", str(tmp_path)]
    assert train.main(args) == 2
    assert "a FERPlus option" in capsys.readouterr().err


def test_resume_with_another_number_of_classes_is_refused(fer_root, tmp_path, capsys):
    assert train.main(fer_args(fer_root, tmp_path, "--loss", "ce", "--label-mode", "argmax")) == 0
    capsys.readouterr()
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--num-classes", "8", "--epochs", "2",
                       "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "classifies 7 classes" in err and "--weights" in err, err
