"""CPU smoke runs of ``python -m nla_fast.train``: outputs, exact resume, Ctrl-C, SIGTERM, non-finite stop."""
import json
import os
import signal

import pytest
import torch

from nla_fast import checkpoint as ckpt
from nla_fast import engine, train

# 32 synthetic training faces at 32 px, batches of 8: 4 steps per epoch; 16 test faces.
TINY = ["--dataset", "synthetic", "--num-samples", "32", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "16", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--seed", "3"]
STEPS_PER_EPOCH = 4
TIMING = {"samples_per_s", "seconds", "train_seconds", "eval_seconds", "first_step_s"}


pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def run(out, *extra):
    return train.main(TINY + ["--out", str(out)] + list(extra))


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def two_epochs(module_tmp):
    out = module_tmp("two_epochs")
    assert run(out, "--epochs", "2") == 0
    return out


def test_run_writes_metrics_plots_and_checkpoints(two_epochs):
    rows = metrics(two_epochs)
    assert [r["epoch"] for r in rows] == [0, 1]
    required = {"epoch", "train_loss", "train_acc", "test_acc", "test_mean_acc", "per_class_acc", "top2_acc",
                "lr", "eps", "samples_per_s", "world_size", "seconds", "naw_weight_mean"}
    for row in rows:
        assert required <= set(row)
        assert row["world_size"] == 1 and row["train_samples"] == 32 and row["test_samples"] == 16
        assert len(row["per_class_acc"]) == 7 and len(row["naw_weight_mean"]) == 7
        assert 0 <= row["test_acc"] <= 1 and 0 <= row["top2_acc"] <= 1 and row["test_acc"] <= row["top2_acc"]
        assert row["train_loss"] > 0
    assert rows[0]["eps"] == 0.0 and rows[1]["eps"] == pytest.approx(1 - torch.exp(torch.tensor(-7.5)).item())
    assert rows[0]["lr"] == pytest.approx(1e-3) and rows[1]["lr"] == pytest.approx(0.9e-3)
    for name in ("curves.png", "confusion.png", "naw_weights.png", "config.json", "last.pt", "best.pt",
                 "best_mean.pt"):
        assert (two_epochs / name).is_file(), name
    assert not [p for p in two_epochs.iterdir() if p.name.endswith(".tmp")]
    state = torch.load(two_epochs / "last.pt", weights_only=True)  # plain tensors and containers only
    assert state["epoch"] == 1 and state["epoch_done"] and state["model_info"]["classes"][0] == "Surprise"
    assert {"torch_cpu", "numpy", "python", "augment"} <= set(state["rng"])
    best = ckpt.load(two_epochs / "best.pt")
    assert best["epoch"] == max(rows, key=lambda r: (r["test_acc"], -r["epoch"]))["epoch"]


@pytest.mark.slow
def test_resume_continues_exactly(two_epochs, tmp_path):
    assert run(tmp_path, "--epochs", "1") == 0
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert without_timing(metrics(tmp_path)) == without_timing(metrics(two_epochs))
    a, b = ckpt.load(two_epochs / "last.pt"), ckpt.load(tmp_path / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_ctrl_c_writes_last_pt_and_resumes_mid_epoch(two_epochs, tmp_path, monkeypatch):
    real_call = engine.TrainStep.__call__
    calls = []

    def step_then_ctrl_c(self):
        real_call(self)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 2:  # epoch 1, after its second step
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(engine.TrainStep, "__call__", step_then_ctrl_c)
    handler_before = signal.getsignal(signal.SIGINT)
    assert run(tmp_path, "--epochs", "2") == 130
    state = ckpt.load(tmp_path / "last.pt")
    assert (state["epoch"], state["step"], state["epoch_done"]) == (1, 2, False)
    assert signal.getsignal(signal.SIGINT) is handler_before  # handler restored
    monkeypatch.setattr(engine.TrainStep, "__call__", real_call)
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--no-progress"]) == 0
    assert without_timing(metrics(tmp_path)) == without_timing(metrics(two_epochs))


def test_sigterm_saves_at_a_step_boundary_and_resumes_exactly(two_epochs, tmp_path, monkeypatch, capsys):
    """What a cluster scheduler does before it kills a job: SIGTERM is Ctrl-C's stop, exit 143."""
    real_call = engine.TrainStep.__call__
    calls = []

    def step_then_sigterm(self):
        real_call(self)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 1:  # epoch 1, after its first step
            os.kill(os.getpid(), signal.SIGTERM)

    monkeypatch.setattr(engine.TrainStep, "__call__", step_then_sigterm)
    handler_before = signal.getsignal(signal.SIGTERM)
    capsys.readouterr()
    assert run(tmp_path, "--epochs", "2") == 143
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "SIGTERM: stopped at epoch 1, step 1" in err, err
    assert f"--resume {tmp_path / 'last.pt'}" in err
    state = ckpt.load(tmp_path / "last.pt")
    assert (state["epoch"], state["step"], state["epoch_done"]) == (1, 1, False)
    assert not (tmp_path / ".nla_fast.lock").exists()  # released: the requeued job may start at once
    assert signal.getsignal(signal.SIGTERM) is handler_before
    monkeypatch.setattr(engine.TrainStep, "__call__", real_call)
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--no-progress"]) == 0
    assert without_timing(metrics(tmp_path)) == without_timing(metrics(two_epochs))  # as if never stopped
    a, b = ckpt.load(two_epochs / "last.pt"), ckpt.load(tmp_path / "last.pt")
    for key in a["model"]:
        assert torch.equal(a["model"][key], b["model"][key]), key


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    real_loss = engine.nla_loss
    calls = []

    def poisoned(*args, **kwargs):
        loss, weights = real_loss(*args, **kwargs)
        calls.append(1)
        if len(calls) == STEPS_PER_EPOCH + 2:  # epoch 1, step 1 (0-based)
            loss = loss * float("nan")
        return loss, weights

    monkeypatch.setattr(engine, "nla_loss", poisoned)
    assert run(tmp_path, "--epochs", "3") == 1
    err = capsys.readouterr().err
    assert "NaN or infinite at epoch 1, step 1" in err
    state = ckpt.load(tmp_path / "last.pt")
    assert state["epoch"] == 0 and state["epoch_done"]
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    assert [r["epoch"] for r in metrics(tmp_path)] == [0]


@pytest.mark.parametrize("extra", [["--loss", "ce"], ["--views", "separate", "--preset", "official",
                                                      "--consistency", "jsd"]])
def test_variants_run(tmp_path, extra):
    assert run(tmp_path, "--epochs", "1", "--limit-train", "16", *extra) == 0
    row = metrics(tmp_path)[0]
    assert row["train_samples"] == 16 and row["train_loss"] > 0
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["train"][extra[0].lstrip("-")] == extra[1]


def test_help_lists_every_flag(capsys):
    with pytest.raises(SystemExit) as exit_info:
        train.main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for flag in ("--dataset", "--data-root", "--out", "--epochs", "--batch-size", "--lr", "--weight-decay",
                 "--gamma", "--image-size", "--weights", "--device", "--seed", "--resume", "--limit-train",
                 "--limit-test", "--loss", "--preset", "--consistency", "--views", "--amp", "--compile",
                 "--no-compile", "--cuda-graphs", "--no-cuda-graphs", "--backend", "--noise-rate",
                 "--noise-seed", "--noise-file", "--imbalance-factor", "--imbalance-seed"):
        assert flag in text, flag


def test_epoch_order_is_a_seeded_global_permutation_sharded_into_full_batches():
    a, b = engine.epoch_permutation(103, 5, 2), engine.epoch_permutation(103, 5, 2)
    assert torch.equal(a, b) and sorted(a.tolist()) == list(range(103))
    assert not torch.equal(a, engine.epoch_permutation(103, 5, 3))
    assert not torch.equal(a, engine.epoch_permutation(103, 6, 2))
    mine = engine.shard(a, 0, 1, 10)
    assert torch.equal(mine, a[:100])  # the remainder of 3 is dropped
    shards = [engine.shard(a, r, 2, 10) for r in range(2)]
    assert all(len(s) == 50 for s in shards)
    assert not set(shards[0].tolist()) & set(shards[1].tolist())
