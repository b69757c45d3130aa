"""The small defects of issue 22, item 8, each as it was found."""
import os
import warnings

import numpy as np
import pytest
import torch

from nla_fast import atomic, settings, train

TINY = ["--dataset", "synthetic", "--num-samples", "16", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "8", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0"]

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def one_line(capsys, *words):
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_a_file_written_by_a_library_gets_the_umask_mode(tmp_path):
    from safetensors.torch import save_file

    mask = os.umask(0o027)
    try:
        with atomic.target(tmp_path / "model.safetensors") as tmp:
            save_file({"w": torch.zeros(2)}, str(tmp))  # safetensors creates its file 0600
    finally:
        os.umask(mask)
    assert (tmp_path / "model.safetensors").stat().st_mode & 0o777 == 0o640


def test_resuming_a_finished_run_says_nothing_is_left_and_loads_no_data(tmp_path, monkeypatch, capsys):
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()

    def no_data(run):
        raise AssertionError("a finished run loaded its data again")

    monkeypatch.setattr(train, "load_data", no_data)
    assert train.main(["--resume", str(tmp_path / "last.pt"), "--no-progress"]) == 0
    assert "has trained all 1 of its epochs: nothing left to train (pass --epochs N with N > 1" in capsys.readouterr().out


def test_a_missing_data_root_names_the_flag(capsys):
    assert train.main(["--dataset", "rafdb", "--device", "cpu", "--out", "/nonexistent/never-written"]) == 2
    one_line(capsys, "RAF-DB needs --data-root DIR")


def test_a_batch_larger_than_the_set_says_what_fits(tmp_path, capsys):
    assert train.main(TINY + ["--batch-size", "32", "--epochs", "1", "--out", str(tmp_path)]) == 2
    one_line(capsys, "16 training samples make no full batch of 32", "--batch-size 16 or less")


def test_switches_show_no_default_in_the_help(capsys):
    with pytest.raises(SystemExit):
        settings.parse_command_line(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "(default: True)" not in text and "(default: False)" not in text
    assert "--no-progress hide the tqdm progress bar" in text


def test_predict_takes_a_pil_image_without_a_warning():
    from PIL import Image

    from nla_fast.augment import EvalTransform
    from nla_fast.inference import predict
    from nla_fast.model import build_resnet18

    model = build_resnet18(3).eval()
    model.classes, model.image_size, model.eval_transform = ["a", "b", "c"], 32, EvalTransform(32)
    image = Image.fromarray(np.full((40, 30, 3), 90, np.uint8))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        (result,) = predict(model, image)
        predict(model, np.asarray(image))  # the read-only array np.asarray gives
    assert set(result["probabilities"]) == {"a", "b", "c"}


def test_config_takes_an_inline_json_object(capsys):
    command = settings.parse_command_line(["--config", '{"epochs": 3, "lr": 0.002}', "--seed", "4"])
    assert (command.settings.epochs, command.settings.lr, command.settings.seed) == (3, 0.002, 4)
    with pytest.raises(SystemExit) as exit_info:
        settings.parse_command_line(["--config", '{"epochs": 3,'])
    assert exit_info.value.code == 2 and "the inline JSON object is not valid JSON" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        settings.parse_command_line(["--config", '{"epoch": 3}'])
    assert "--config (inline JSON): unknown key 'epoch'" in capsys.readouterr().err
