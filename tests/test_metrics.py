import math

import pytest
import torch

from nla_fast.metrics import MetricCounts, compute_metrics, format_table, summarise_confusion


def test_metrics_by_hand():
    # 3 classes; rows of scores chosen so argmax / top-2 are known
    scores = torch.tensor([
        [3.0, 2.0, 0.0],  # true 0, pred 0
        [3.0, 2.0, 0.0],  # true 1, pred 0, top-2 hit
        [0.0, 1.0, 3.0],  # true 2, pred 2
        [0.0, 1.0, 3.0],  # true 0, pred 2, top-2 miss
        [0.0, 3.0, 1.0],  # true 1, pred 1
    ])
    target = torch.tensor([0, 1, 2, 0, 1])
    m = compute_metrics(scores, target, 3, ["a", "b", "c"])
    assert m["confusion"] == [[1, 0, 1], [1, 1, 0], [0, 0, 1]]
    assert m["acc"] == pytest.approx(3 / 5)
    assert m["per_class_acc"] == pytest.approx([0.5, 0.5, 1.0])
    assert m["mean_acc"] == pytest.approx((0.5 + 0.5 + 1.0) / 3)
    assert m["top2_acc"] == pytest.approx(4 / 5)
    assert m["support"] == [2, 2, 1]
    assert m["classes"] == ["a", "b", "c"]


def test_batches_accumulate_like_one_pass():
    g = torch.Generator().manual_seed(0)
    scores = torch.randn(50, 7, generator=g)
    target = torch.randint(0, 7, (50,), generator=g)
    whole = compute_metrics(scores, target, 7)
    counts = MetricCounts(7)
    for start in range(0, 50, 16):
        counts.update(scores[start:start + 16], target[start:start + 16])
    summed = counts.summarise()
    assert summed.pop("loss") == pytest.approx(whole.pop("loss"), rel=1e-6)  # float sums in another order
    assert summed == whole


def test_absent_class_is_none_and_left_out_of_the_mean():
    confusion = torch.tensor([[2, 0, 0], [0, 0, 0], [1, 0, 1]])
    m = summarise_confusion(confusion, top2_correct=4)
    assert m["per_class_acc"] == [1.0, None, 0.5]
    assert m["mean_acc"] == pytest.approx(0.75)
    assert m["acc"] == pytest.approx(3 / 4)
    table = format_table(m, ["x", "y", "z"])
    assert "mean class accuracy" in table and "75.00" in table and "y" in table


def test_empty_split_gives_nan():
    m = summarise_confusion(torch.zeros(2, 2, dtype=torch.int64), 0)
    assert math.isnan(m["acc"]) and math.isnan(m["mean_acc"]) and math.isnan(m["top2_acc"])


def test_macro_f1_per_class_f1_and_the_cross_entropy_loss():
    from nla_fast.metrics import MetricCounts

    # true 0,0,1,1,2 ; predicted 0,1,1,1,1 ; class 3 neither present nor predicted
    scores = torch.tensor([[3.0, 0, 0, 0], [0, 2, 0, 0], [0, 1, 0, 0], [0, 4, 1, 0], [0, 1, 0.5, 0]])
    target = torch.tensor([0, 0, 1, 1, 2])
    counts = MetricCounts(4)
    counts.update(scores[:2], target[:2])  # two batches: the sums carry over
    counts.update(scores[2:], target[2:])
    m = counts.summarise(["a", "b", "c", "d"])
    # F1 = 2 tp / (support + predicted): a 2/3, b 4/6, c 0/1, d absent from both (None, left out)
    assert m["per_class_f1"][:3] == pytest.approx([2 / 3, 2 / 3, 0.0]) and m["per_class_f1"][3] is None
    assert m["macro_f1"] == pytest.approx((2 / 3 + 2 / 3 + 0) / 3)
    assert m["loss"] == pytest.approx(float(torch.nn.functional.cross_entropy(scores, target)), rel=1e-6)
    assert m["mean_acc"] == pytest.approx((0.5 + 1.0 + 0.0) / 3)  # unchanged beside it


def test_as_record_keys_every_per_class_value_by_class_name():
    from nla_fast.metrics import as_record, compute_metrics

    m = compute_metrics(torch.tensor([[1.0, 0], [0, 1.0], [1.0, 0]]), torch.tensor([0, 1, 1]), 2, ["x", "y"])
    record = as_record(m, ["x", "y"], prefix="test_")
    assert record["test_per_class_acc"] == {"x": 1.0, "y": 0.5} and record["test_support"] == {"x": 1, "y": 2}
    assert record["test_per_class_f1"] == pytest.approx({"x": 2 / 3, "y": 2 / 3})
    assert record["test_confusion"] == [[1, 0], [1, 1]] and record["test_samples"] == 3
