"""What a training run records: metrics.csv, TensorBoard, config.json (environment, command
line, --config) and how best.pt is chosen (validation split where the dataset has one)."""
import csv
import json
import sys

import pytest
import torch

from nla_fast import checkpoint as ckpt
from nla_fast import train
from nla_fast.run_log import flatten
from nla_fast.settings import parse_command_line

TINY = ["--num-samples", "32", "--image-size", "32", "--batch-size", "8", "--limit-test", "16",
        "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu", "--no-progress", "--seed", "3"]
TIMING = {"samples_per_s", "seconds", "train_seconds", "eval_seconds", "first_step_s"}


pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def metrics(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def without_timing(rows):
    return [{k: v for k, v in row.items() if k not in TIMING} for row in rows]


@pytest.fixture(scope="module")
def logged_run(module_tmp):
    """Two epochs with --tensorboard (plots every epoch), then resumed for a third."""
    out = module_tmp("logged")
    assert train.main(["--dataset", "synthetic", *TINY, "--epochs", "2", "--lr", "5e-4", "--gamma", "0.8",
                       "--tensorboard", "--out", str(out)]) == 0
    first_header = (out / "metrics.csv").read_text().splitlines()[0]
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "3", "--no-progress"]) == 0
    return out, first_header


@pytest.mark.slow
def test_metrics_csv_holds_the_jsonl_rows_and_a_resumed_run_appends(logged_run):
    out, first_header = logged_run
    with open(out / "metrics.csv", newline="") as handle:
        reader = csv.reader(handle)
        header = next(reader)
        rows = list(reader)
    assert ",".join(header) == first_header  # the header stays the first row's
    jsonl = metrics(out)
    assert len(rows) == len(jsonl) == 3
    assert "per_class_acc/Happiness" in header and "naw_weight_mean/Fear" in header and "confusion/3/4" in header
    for row, expected in zip(rows, jsonl):
        flat = flatten(expected)
        assert set(header) == set(flat)
        for column, text in zip(header, row):
            value = flat[column]
            if value is None:
                assert text == ""
            elif isinstance(value, float):
                assert float(text) == value, column  # exact: floats are written with repr
            else:
                assert text == str(value), column


def test_tensorboard_has_the_epoch_scalars_and_figures(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"images": 0, "scalars": 0})
    events.Reload()
    jsonl = metrics(out)
    for tag, key in (("accuracy/test", "test_acc"), ("loss/train", "train_loss"), ("schedule/lr", "lr"),
                     ("schedule/eps", "eps"), ("mean_class_accuracy/test", "test_mean_acc"),
                     ("speed/samples_per_s", "samples_per_s"), ("accuracy/train", "train_acc")):
        scalars = events.Scalars(tag)
        assert [s.step for s in scalars] == [0, 1, 2], tag
        assert [s.value for s in scalars] == pytest.approx([row[key] for row in jsonl], rel=1e-6), tag
    assert {"curves", "confusion", "naw_weights"} <= set(events.Tags()["images"])
    assert [image.step for image in events.Images("confusion")] == [0, 1, 2]


def test_missing_tensorboard_is_named_in_one_line(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # `import tensorboard` raises ImportError
    assert train.main(["--dataset", "synthetic", *TINY, "--epochs", "1", "--tensorboard", "--out",
                       str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "pip install 'nla_fast[tensorboard]'" in err[0] and "--tensorboard" in err[0]
    assert not (tmp_path / "run").exists()  # refused before the run started


@pytest.mark.slow
def test_config_json_records_the_run_and_starts_an_identical_one(logged_run, tmp_path, capsys):
    out, _ = logged_run
    config = json.loads((out / "config.json").read_text())
    environment = config["environment"]
    assert environment["torch"] == str(torch.__version__) and "torchvision" in environment and "triton" in environment
    assert "cuda" in environment and "gpu" in environment
    assert environment["git"] is None or (len(environment["git"]["commit"]) == 40
                                         and isinstance(environment["git"]["dirty"], bool))
    assert config["command_line"][:3] == ["python", "-m", "nla_fast.train"] and "--resume" in config["command_line"]
    assert config["model_selection"] == "test split (no validation split; as the reference code)"
    assert ckpt.load(out / "last.pt")["config"]["environment"] == environment  # every checkpoint too

    # a first run's config.json starts a second with the same settings and the same numbers
    first = tmp_path / "first"
    assert train.main(["--dataset", "synthetic", *TINY, "--epochs", "1", "--lr", "5e-4", "--gamma", "0.8",
                       "--views", "separate", "--out", str(first)]) == 0
    second = tmp_path / "second"
    assert train.main(["--config", str(first / "config.json"), "--out", str(second)]) == 0
    saved = [json.loads((run / "config.json").read_text())["train"] for run in (first, second)]
    assert saved[1] == saved[0] | {"out": str(second)}
    assert without_timing(metrics(second)) == without_timing(metrics(first))

    # a flag given explicitly overrides the file, even when it is the default value
    command = parse_command_line(["--config", str(first / "config.json"), "--lr", "1e-4", "--views", "concat"])
    assert (command.settings.lr, command.settings.views, command.settings.gamma) == (1e-4, "concat", 0.8)
    assert command.settings.out is None  # a new run writes into its own folder
    # a plain object of settings works too
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps({"epochs": 7, "dataset": "synthetic", "limit_test": None}))
    assert parse_command_line(["--config", str(plain)]).settings.epochs == 7


@pytest.mark.parametrize("content, named", [
    ({"train": {"epochz": 3}}, "'epochz'"),
    ({"train": {"epochs": 3}, "extra_section": 1}, "'extra_section'"),
    ({"batchsize": 8}, "'batchsize'"),
    ({"epochs": "three"}, "'epochs'"),
])
def test_config_refuses_unknown_keys_and_wrong_types(tmp_path, capsys, content, named):
    path = tmp_path / "settings.json"
    path.write_text(json.dumps(content))
    with pytest.raises(SystemExit) as exit_info:
        parse_command_line(["--config", str(path)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert named in err and str(path) in err


def test_config_and_resume_are_refused_together(tmp_path, capsys):
    path = tmp_path / "c.json"
    path.write_text("{}")
    with pytest.raises(SystemExit):
        parse_command_line(["--config", str(path), "--resume", "runs/x/last.pt"])
    assert "--config and --resume" in capsys.readouterr().err


def test_ferplus_chooses_best_on_the_validation_split_and_reports_test_there(tmp_path, monkeypatch, capsys):
    from nla_fast.data.fixtures import make_ferplus_csv

    votes = [[10 if c == k % 7 else 0 for c in range(10)] for k in range(72)]  # 24 rows per split
    root = make_ferplus_csv(tmp_path / "FERPlus", votes)["root"]
    # scripted accuracies: on the test split the best epoch would be 0, on the valid split it is 1
    scripted = {"valid": [(0.2, 0.5), (0.6, 0.1), (0.4, 0.3)], "test": [(0.9, 0.1), (0.3, 0.7), (0.5, 0.2)]}
    from nla_fast.engine import TrainStep

    real_evaluate, calls = TrainStep.evaluate, []

    def evaluate(step, images, labels, *args, **kwargs):
        result = real_evaluate(step, images, labels, *args, **kwargs)
        split = "test" if len(calls) % 2 == 0 else "valid"  # evaluate_epoch: test, then valid
        result["acc"], result["mean_acc"] = scripted[split][len(calls) // 2]
        calls.append(split)
        return result

    monkeypatch.setattr(TrainStep, "evaluate", evaluate)
    out = tmp_path / "run"
    assert train.main(["--dataset", "ferplus", "--data-root", str(root), "--image-size", "32", "--batch-size", "8",
                       "--epochs", "3", "--backend", "reference", "--device", "cpu",
                       "--plot-every", "0", "--out", str(out)]) == 0
    rows = metrics(out)
    assert [row["valid_acc"] for row in rows] == [0.2, 0.6, 0.4]
    assert [row["test_acc"] for row in rows] == [0.9, 0.3, 0.5] and rows[0]["valid_samples"] == 24
    assert ckpt.load(out / "best.pt")["epoch"] == 1
    assert ckpt.load(out / "best_mean.pt")["epoch"] == 0
    best = ckpt.load(out / "last.pt")["best"]
    assert (best["split"], best["acc"], best["test_acc_at_acc_epoch"]) == ("valid", 0.6, 0.3)
    captured = capsys.readouterr()
    text = captured.out
    assert "epoch 0 (1/3)" not in captured.err  # stderr is no terminal: no progress bar, one line per epoch
    assert text.count("epoch 2 (3/3): train loss") == 1
    assert "best valid accuracy 60.00% (epoch 1, best.pt): test accuracy there 30.00%" in text
    assert "valid acc 20.00%" in text
    config = json.loads((out / "config.json").read_text())
    assert config["model_selection"].startswith("valid split")


def test_tensorboard_has_each_steps_loss_the_naw_weight_per_class_f1_and_the_test_loss(logged_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    out, _ = logged_run
    events = EventAccumulator(str(out / "tensorboard"), size_guidance={"scalars": 0})
    events.Reload()
    jsonl = metrics(out)
    steps = events.Scalars("loss/train_step")  # 4 steps per epoch, 3 epochs (the third after a resume)
    assert [s.step for s in steps] == list(range(12))
    for epoch, row in enumerate(jsonl):  # the epoch's train_loss is the mean of its steps' losses
        assert sum(s.value for s in steps[4 * epoch:4 * epoch + 4]) / 4 == pytest.approx(row["train_loss"], rel=1e-5)
    for tag, key in (("macro_f1/test", "test_macro_f1"), ("loss/test", "test_loss")):
        assert [s.value for s in events.Scalars(tag)] == pytest.approx([row[key] for row in jsonl], rel=1e-6), tag
    for name, value in jsonl[-1]["naw_weight_mean"].items():
        if value is not None:
            assert events.Scalars(f"naw_weight_mean/{name}")[-1].value == pytest.approx(value, rel=1e-6), name


def test_evaluate_json_has_the_shapes_of_metrics_jsonl(logged_run, capsys, tmp_path):
    from nla_fast.evaluate import main as evaluate_main

    out, _ = logged_run
    row = metrics(out)[-1]
    assert 0 <= row["test_macro_f1"] <= 1 and row["test_loss"] > 0
    capsys.readouterr()
    assert evaluate_main(["--checkpoint", str(out / "last.pt"), "--limit", "16", "--json", "--out", str(tmp_path)]) == 0
    result = json.loads(capsys.readouterr().out)
    assert isinstance(result["per_class_acc"], dict) and result["per_class_acc"] == row["per_class_acc"]
    assert result["per_class_f1"] == row["test_per_class_f1"] and result["confusion"] == row["confusion"]
    assert result["macro_f1"] == row["test_macro_f1"] and result["mean_acc"] == row["test_mean_acc"]
    assert result["loss"] == pytest.approx(row["test_loss"], rel=1e-6) and result["samples"] == row["test_samples"]
