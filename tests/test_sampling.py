"""--sampler balanced: per-class weights, seeded draws, exact resume, the device-resident data and
the epoch shards of a distributed run (a 2-process gloo run on the CPU)."""
import json

import pytest
import torch

from nla_fast import train
from nla_fast.data.splits import load_split
from nla_fast.sampling import EpochOrder, balanced_order, class_balanced_weights

TINY = ["--dataset", "synthetic", "--num-samples", "48", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "8", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--seed", "5", "--sampler", "balanced", "--imbalance-factor", "6"]
TIMING = {"samples_per_s", "seconds", "train_seconds", "eval_seconds", "first_step_s"}

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_every_class_is_drawn_about_equally_often_and_the_draw_is_seeded():
    labels = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    weights = class_balanced_weights(labels, 3)
    assert weights[0] == pytest.approx(1 / 900) and weights[-1] == pytest.approx(1 / 10)
    drawn = torch.bincount(labels[balanced_order(weights, seed=1, epoch=0)], minlength=3)
    assert drawn.sum() == 1000 and (drawn - 333).abs().max() < 60  # binomial sd ~15
    assert torch.equal(balanced_order(weights, 1, 0), balanced_order(weights, 1, 0))
    assert not torch.equal(balanced_order(weights, 1, 0), balanced_order(weights, 1, 1))
    assert not torch.equal(balanced_order(weights, 1, 0), balanced_order(weights, 2, 0))
    uniform = EpochOrder("uniform", labels, 3, seed=1)(0)
    assert sorted(uniform.tolist()) == list(range(1000))  # the uniform order stays a permutation


def test_the_run_trains_on_the_balanced_order_and_records_its_class_counts(tmp_path):
    out = tmp_path / "run"
    assert train.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    (row,) = rows(out)
    labels = load_split("synthetic", None, "train", num_samples=48, imbalance_factor=6).labels
    order = EpochOrder("balanced", labels, 7, seed=5)
    expected = order.class_counts(order(0), world_size=1, batch_size=8)
    assert list(row["train_class_counts"].values()) == expected and sum(expected) == row["train_samples"]
    natural = torch.bincount(labels, minlength=7)
    rare = int(natural.argmin())
    assert expected[rare] > natural[rare] * row["train_samples"] / len(labels)  # the rare class is drawn more


@pytest.mark.slow
def test_a_balanced_run_resumes_exactly(tmp_path):
    whole, resumed = tmp_path / "whole", tmp_path / "resumed"
    assert train.main(TINY + ["--epochs", "2", "--out", str(whole)]) == 0
    assert train.main(TINY + ["--epochs", "1", "--out", str(resumed)]) == 0
    assert train.main(["--resume", str(resumed / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert rows(resumed) == rows(whole)


@pytest.mark.slow
def test_two_gloo_processes_train_their_shards_of_the_balanced_order(tmp_path):
    from test_distributed import torchrun

    out = tmp_path / "run"
    result = torchrun(2, out, "--device", "cpu", "--num-samples", "48", "--imbalance-factor", "6",
                      "--sampler", "balanced", "--seed", "5")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    (row,) = rows(out)
    labels = load_split("synthetic", None, "train", num_samples=48, imbalance_factor=6).labels
    order = EpochOrder("balanced", labels, 7, seed=5)
    assert list(row["train_class_counts"].values()) == order.class_counts(order(0), world_size=2, batch_size=8)
    assert row["world_size"] == 2 and row["train_samples"] == sum(row["train_class_counts"].values())
