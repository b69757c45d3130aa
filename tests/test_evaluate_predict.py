"""The evaluate and predict CLIs and the Python side (load_model / predict) on a tiny trained run."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch

from nla_fast import train
from nla_fast.evaluate import build_parser as build_evaluate_parser
from nla_fast.evaluate import main as evaluate_main
from nla_fast.evaluate import split_arguments
from nla_fast.evaluation import load_model, predict_logits
from nla_fast.inference import predict
from nla_fast.classify import main as classify_main

TINY = ["--dataset", "synthetic", "--num-samples", "16", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "24", "--backend", "reference", "--device", "cpu", "--no-progress", "--plot-every", "0",
        "--epochs", "1"]


@pytest.fixture(scope="module")
def run_dir(module_tmp, private_data_cache_one_thread):
    out = module_tmp("run")
    assert train.main(TINY + ["--out", str(out)]) == 0
    yield out


def test_evaluate_prints_a_table_and_writes_the_confusion_matrix(run_dir, capsys, tmp_path):
    assert evaluate_main(["--checkpoint", str(run_dir / "last.pt"), "--limit", "24", "--out", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    for words in ("overall accuracy", "mean class accuracy", "top-2 accuracy", "Happiness", "support"):
        assert words in text
    (json_file,) = tmp_path.glob("*-confusion.json")
    (png_file,) = tmp_path.glob("*-confusion.png")
    result = json.loads(json_file.read_text())
    assert np.array(result["confusion"]).sum() == 24 and png_file.stat().st_size > 0
    # the same numbers as the training run's last evaluation (same 24 test faces, float32 on CPU)
    row = json.loads((run_dir / "metrics.jsonl").read_text().splitlines()[-1])
    assert result["acc"] == pytest.approx(row["test_acc"])
    assert result["mean_acc"] == pytest.approx(row["test_mean_acc"])
    assert result["confusion"] == row["confusion"]


def test_evaluate_flip_tta_and_json(run_dir, capsys, tmp_path):
    code = evaluate_main(["--checkpoint", str(run_dir / "best.pt"), "--dataset", "synthetic", "--limit", "24",
                              "--tta", "flip", "--json", "--out", str(tmp_path)])
    assert code == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tta"] == "flip" and result["samples"] == 24 and len(result["per_class_acc"]) == 7
    assert list(tmp_path.glob("*-flip-confusion.png"))


def test_evaluate_reports_a_missing_checkpoint(tmp_path, capsys):
    assert evaluate_main(["--checkpoint", str(tmp_path / "nope.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


def _write_images(folder):
    from PIL import Image

    rng = np.random.default_rng(0)
    paths = [folder / "face.png", folder / "grey.jpg"]
    Image.fromarray(rng.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(paths[0])
    Image.fromarray(rng.integers(0, 256, (57, 80), dtype=np.uint8), mode="L").save(paths[1])
    return paths


def test_predict_cli_text_and_json(run_dir, tmp_path, capsys):
    paths = _write_images(tmp_path)
    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), *map(str, paths), "--top", "2"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith(str(paths[0])) and "%" in lines[0]
    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), *map(str, paths), "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    classes = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]
    for entry, path in zip(results, paths):
        assert entry["image"] == str(path)
        assert set(entry["probabilities"]) == set(classes)
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert entry["label"] == entry["top"][0]["label"] == max(entry["probabilities"], key=entry["probabilities"].get)
        assert len(entry["top"]) == 3
    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), str(tmp_path / "missing.png")]) == 1
    assert "missing.png" in capsys.readouterr().err


CLASSES = ["Surprise", "Fear", "Disgust", "Happiness", "Sadness", "Anger", "Neutral"]


def _image_tree(root):
    """Nested folders of readable images, one corrupt JPEG, a text file; returns (folder, glob
    folder, the images the folder and the glob '*.png' name)."""
    from PIL import Image

    rng = np.random.default_rng(1)
    faces, other = root / "faces", root / "other"
    expected = []
    for relative, size in (("a.png", 60), ("sub/b.JPG", 40), ("sub/deeper/c.bmp", 80), ("sub/deeper/d.tiff", 50)):
        path = faces / relative
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
        expected.append(path)
    (faces / "sub" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    (faces / "notes.txt").write_text("not an image, not looked at")
    other.mkdir()
    for name in ("e.png", "f.png", "g.jpg"):
        Image.fromarray(rng.integers(0, 256, (30, 30, 3), dtype=np.uint8)).save(other / name)
    expected += [other / "e.png", other / "f.png"]
    return faces, other, expected


def test_predict_folders_globs_and_a_corrupt_file(run_dir, tmp_path, capsys):
    import csv
    import io

    faces, other, expected = _image_tree(tmp_path)
    inputs = [str(faces), str(other / "*.png")]
    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), *inputs, "--csv", "--batch-size", "2"]) == 1
    captured = capsys.readouterr()
    problems = captured.err.strip().splitlines()
    assert [line for line in problems if "broken.jpg" in line] == [problems[0]] and "skipped" in problems[0]
    rows = list(csv.DictReader(io.StringIO(captured.out)))
    assert sorted(row["image"] for row in rows) == sorted(map(str, expected))
    header = list(rows[0])
    assert header == ["image", "label", "probability", *CLASSES]
    for row in rows:
        probabilities = {name: float(row[name]) for name in CLASSES}
        assert sum(probabilities.values()) == pytest.approx(1.0, abs=1e-5)
        assert row["label"] == max(probabilities, key=probabilities.get)
        assert float(row["probability"]) == probabilities[row["label"]]

    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), *inputs, "--json", "--batch-size", "3"]) == 1
    entries = json.loads(capsys.readouterr().out)
    assert sorted(entry["image"] for entry in entries) == sorted(map(str, expected))
    by_csv = {row["image"]: float(row["Happiness"]) for row in rows}
    for entry in entries:  # the same numbers whatever the batch size
        assert list(entry["probabilities"]) == CLASSES
        assert sum(entry["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert entry["probabilities"]["Happiness"] == pytest.approx(by_csv[entry["image"]], abs=1e-5)

    # only readable images: exit 0; a pattern matching nothing: reported, exit 1
    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), str(other / "*.png"), "--csv"]) == 0
    assert classify_main(["--checkpoint", str(run_dir / "last.pt"), str(tmp_path / "none*.png")]) == 1
    assert "none*.png" in capsys.readouterr().err


def test_predict_refuses_a_damaged_checkpoint_and_bad_usage(run_dir, tmp_path, capsys):
    damaged = tmp_path / "damaged.pt"
    damaged.write_bytes((run_dir / "last.pt").read_bytes()[:5000])
    image = _write_images(tmp_path)[0]
    assert classify_main(["--checkpoint", str(damaged), str(image)]) == 2
    assert "damaged.pt" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_info:
        classify_main(["--checkpoint", str(run_dir / "last.pt"), str(image), "--json", "--csv"])
    assert exit_info.value.code == 2
    with pytest.raises(SystemExit) as exit_info:
        classify_main(["--checkpoint", str(run_dir / "last.pt"), str(image), "--batch-size", "0"])
    assert exit_info.value.code == 2


def test_python_api_matches_evaluation(run_dir):
    from nla_fast.data import load_dataset

    model = load_model(run_dir / "last.pt", device="cpu")
    assert model.classes[3] == "Happiness" and model.image_size == 32 and not model.training
    images = load_dataset("synthetic", None, "test", num_samples=64, verbose=False).images[:6]
    results = predict(model, images)  # a uint8 N x H x W x 3 batch at native size (100 px)
    expected = predict_logits(model, images, model.eval_transform).argmax(1).tolist()
    assert [model.classes.index(r["label"]) for r in results] == expected
    single = predict(model, images[0].numpy(), top_k=1)  # one H x W x 3 array
    assert single[0]["label"] == results[0]["label"] and len(single[0]["top"]) == 1
    assert single[0]["probability"] == pytest.approx(results[0]["probability"], abs=1e-5)


def test_the_classify_command_leaves_nla_fast_predict_the_function(run_dir):
    """``python -m nla_fast.classify`` runs without runpy's 'found in sys.modules' warning;
    importing any program leaves ``nla_fast.predict`` the function: no module shadows it."""
    code = ("import importlib.util, nla_fast, nla_fast.classify, nla_fast.evaluate, nla_fast.export, nla_fast.train; "
            "assert nla_fast.predict is nla_fast.inference.predict, nla_fast.predict; "
            "assert importlib.util.find_spec('nla_fast.predict') is None; "
            "assert callable(nla_fast.classify.main); print('function ok')")
    checked = subprocess.run([sys.executable, "-W", "error", "-c", code], capture_output=True, text=True)
    assert checked.returncode == 0 and "function ok" in checked.stdout, checked.stderr
    helped = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-m", "nla_fast.classify", "--help"],
                            capture_output=True, text=True)
    assert helped.returncode == 0 and "--checkpoint" in helped.stdout and not helped.stderr, helped.stderr
    import nla_fast
    import nla_fast.classify  # noqa: F401

    model = nla_fast.load_model(run_dir / "last.pt", device="cpu")
    image = torch.zeros(40, 40, 3, dtype=torch.uint8)
    assert nla_fast.predict(model, image) == predict(model, image)


TRAINER = {"nla_fast.engine", "nla_fast.train", "nla_fast.settings", "nla_fast.placement"}


def test_the_package_and_the_model_using_commands_do_not_load_the_trainer():
    """``import nla_fast`` loads the loss but not the training step; evaluate, classify and
    export load neither (nor the training settings)."""
    code = ("import sys, json; import {}; "
            "print(json.dumps(sorted(m for m in sys.modules if m.startswith('nla_fast'))))")
    loaded = {}
    for modules in ("nla_fast", "nla_fast.evaluate, nla_fast.classify, nla_fast.export"):
        done = subprocess.run([sys.executable, "-c", code.format(modules)], capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        loaded[modules] = set(json.loads(done.stdout.splitlines()[-1]))
    assert "nla_fast.loss" in loaded["nla_fast"] and "nla_fast.evaluation" in loaded["nla_fast"]
    assert not loaded["nla_fast"] & TRAINER, loaded["nla_fast"]
    commands = loaded["nla_fast.evaluate, nla_fast.classify, nla_fast.export"]
    assert "nla_fast.evaluation" in commands and not commands & TRAINER, commands


def test_evaluation_takes_the_runs_data_options_but_never_its_label_noise():
    trained = {"dataset": "ferplus", "data_root": "/data/FERPlus", "label_mode": "argmax", "num_classes": 7,
               "num_samples": None, "noise_rate": 0.3, "noise_file": "noisy.txt", "imbalance_factor": 10.0,
               "limit_test": 100, "a_training_setting_of_a_newer_version": 1}
    args = build_evaluate_parser().parse_args(["--checkpoint", "x.pt", "--limit", "5", "--num-classes", "8"])
    assert split_arguments(args, trained) == {"dataset": "ferplus", "data_root": "/data/FERPlus",
                                              "label_mode": "argmax", "num_classes": 8, "num_samples": None,
                                              "cache_size": None, "limit": 5}
    other = build_evaluate_parser().parse_args(["--checkpoint", "x.pt", "--dataset", "synthetic"])
    assert split_arguments(other, trained | {"dataset": "rafdb"}) == {
        "dataset": "synthetic", "data_root": None, "label_mode": None, "num_classes": None, "num_samples": None,
        "cache_size": None, "limit": None}
    # AffectNet: the run's own cache size (its files are found again), else the size the model takes
    plain = build_evaluate_parser().parse_args(["--checkpoint", "x.pt"])
    run_at_112 = {"dataset": "affectnet", "image_size": 112, "cache_size": 96}
    assert split_arguments(plain, run_at_112)["cache_size"] == 96
    assert split_arguments(plain, run_at_112 | {"cache_size": None})["cache_size"] == 112  # an older checkpoint
    on_affectnet = build_evaluate_parser().parse_args(["--checkpoint", "x.pt", "--dataset", "affectnet"])
    assert split_arguments(on_affectnet, {"dataset": "rafdb", "image_size": 224, "cache_size": None})["cache_size"] == 224
