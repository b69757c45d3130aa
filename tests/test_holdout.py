"""--val-fraction: a stratified, seeded validation split held out of the training split; best.pt
chosen on it (recorded); label noise and imbalance on the training part only."""
import json

import pytest
import torch

from nla_fast import checkpoint as ckpt
from nla_fast import train
from nla_fast.data.holdout import stratified_holdout
from nla_fast.data.splits import load_split

TINY = ["--dataset", "synthetic", "--num-samples", "48", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "8", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--seed", "1"]

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def test_the_hold_out_is_stratified_seeded_and_disjoint():
    labels = torch.tensor([0] * 50 + [1] * 20 + [2] * 9 + [3])
    kept, held = stratified_holdout(labels, 0.2, seed=4)
    assert sorted(kept.tolist() + held.tolist()) == list(range(80))
    assert torch.bincount(labels[held], minlength=4).tolist() == [10, 4, 2, 0]  # a class of one stays in training
    again, _ = stratified_holdout(labels, 0.2, seed=4)
    other, _ = stratified_holdout(labels, 0.2, seed=5)
    assert torch.equal(kept, again) and not torch.equal(kept, other)


def test_noise_and_imbalance_apply_to_the_training_part_only():
    common = dict(num_samples=200, val_fraction=0.25, val_seed=0)
    train_part = load_split("synthetic", None, "train", noise_rate=0.5, noise_seed=1, imbalance_factor=20, **common)
    valid_part = load_split("synthetic", None, "valid", **common)
    clean = load_split("synthetic", None, "train", num_samples=200)
    assert not set(train_part.names) & set(valid_part.names)
    assert len(valid_part) == 50 and set(valid_part.names) <= set(clean.names)
    by_name = dict(zip(clean.names, clean.labels.tolist()))
    assert valid_part.labels.tolist() == [by_name[n] for n in valid_part.names]  # clean labels
    assert torch.equal(valid_part.clean_labels, valid_part.labels)
    assert train_part.noise_rate > 0.3  # the noise went to the training part
    assert train_part.info["imbalance_factor"] == 20 and len(train_part) < 150
    # stratified: the held-out part has the training split's class shares (each within one sample)
    shares = torch.bincount(clean.labels, minlength=7).float() / 4
    assert (torch.bincount(valid_part.labels, minlength=7).float() - shares).abs().max() <= 1


def test_best_pt_is_chosen_on_the_held_out_split_and_the_run_says_so(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY + ["--epochs", "2", "--val-fraction", "0.25", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "35 train / 13 valid / 8 test images" in printed
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(row["valid_samples"] == 13 and row["train_samples"] == 32 for row in rows)  # 35 -> 4 full batches
    config = json.loads((out / "config.json").read_text())
    assert config["model_selection"].startswith("valid split held out of the training split (--val-fraction 0.25")
    best = ckpt.load(out / "best.pt")
    assert best["best"]["split"] == "valid"
    assert best["epoch"] == max(rows, key=lambda r: (r["valid_acc"], -r["epoch"]))["epoch"]


def test_val_fraction_is_refused_where_the_dataset_has_a_validation_split(capsys):
    assert train.main(["--dataset", "ferplus", "--data-root", "/nowhere", "--val-fraction", "0.1",
                       "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert "--val-fraction: ferplus has its own validation split" in err and len(err.strip().splitlines()) == 1
