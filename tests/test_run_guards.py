"""What the programs refuse, each in one line: bad numbers on the command line, damaged
checkpoints, an output folder that holds or runs another run, and resumes that would not
continue their run."""
import os
import subprocess

import numpy as np
import pytest
import torch
from PIL import Image

from nla_fast import atomic
from nla_fast import checkpoint as ckpt
from nla_fast import run_folder, settings, train
from nla_fast.evaluate import main as evaluate_main
from nla_fast.classify import main as classify_main

# 16 synthetic faces at 32 px, batches of 8: 2 steps per epoch; 8 test faces.
TINY = ["--dataset", "synthetic", "--num-samples", "16", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "8", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--seed", "1"]


@pytest.fixture(scope="module")
def done_run(module_tmp, private_data_cache_one_thread):
    """One finished epoch, and a copy of its checkpoint marked as written mid-epoch (after step 1)."""
    out = module_tmp("run")
    assert train.main(TINY + ["--epochs", "1", "--out", str(out)]) == 0
    state = ckpt.load(out / "last.pt")
    state.update(epoch=0, step=1, epoch_done=False, history=[])
    ckpt.save(state, out / "mid.pt")
    yield out


def one_error_line(capsys, *words):
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)
    return err


# ----------------------------------------------------------------------------------------------
# Numbers on the command line
# ----------------------------------------------------------------------------------------------
BAD_TRAIN_FLAGS = [
    ("--batch-size", "0"), ("--batch-size", "-3"), ("--batch-size", "2.5"), ("--epochs", "0"),
    ("--eval-batch-size", "0"), ("--log-every", "0"), ("--image-size", "31"), ("--image-size", "0"),
    ("--limit-train", "0"), ("--limit-test", "-1"), ("--num-samples", "0"), ("--lr", "0"), ("--lr", "-1e-3"),
    ("--lr", "nan"), ("--lr", "inf"), ("--gamma", "0"), ("--gamma", "1.5"), ("--gamma", "nan"),
    ("--weight-decay", "-1e-4"), ("--weight-decay", "inf"), ("--noise-rate", "1"), ("--noise-rate", "-0.1"),
    ("--imbalance-factor", "0.5"), ("--imbalance-factor", "nan"), ("--plot-every", "-1"),
]


@pytest.mark.parametrize("flag,value", BAD_TRAIN_FLAGS)
def test_train_refuses_a_bad_number_naming_the_flag(flag, value, capsys):
    with pytest.raises(SystemExit) as exit_info:
        settings.parse_command_line([f"{flag}={value}"])  # "=": argparse would take "-1e-3" for an option
    assert exit_info.value.code == 2
    assert f"argument {flag}: " in capsys.readouterr().err


def test_train_accepts_the_edges_of_each_range():
    s = settings.parse_command_line(["--gamma", "1", "--noise-rate", "0", "--imbalance-factor", "1",
                                     "--weight-decay", "0", "--image-size", "32", "--batch-size", "1",
                                     "--lr", "1e-6", "--plot-every", "0", "--epochs", "1"]).settings
    assert (s.gamma, s.noise_rate, s.imbalance_factor, s.weight_decay, s.image_size, s.batch_size) == (
        1.0, 0.0, 1.0, 0.0, 32, 1)


@pytest.mark.parametrize("main,args", [
    (evaluate_main, ["--checkpoint", "x.pt", "--batch-size", "0"]),
    (evaluate_main, ["--checkpoint", "x.pt", "--limit", "0"]),
    (classify_main, ["--checkpoint", "x.pt", "a.png", "--top", "0"]),
])
def test_evaluate_and_predict_refuse_bad_numbers(main, args, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    assert exit_info.value.code == 2
    flag = next(a for a in args if a in ("--batch-size", "--limit", "--top"))
    assert f"argument {flag}: must be at least 1" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Damaged checkpoints: one line, exit 2, in every program that reads one
# ----------------------------------------------------------------------------------------------
def damaged_checkpoints(good, folder):
    blob = good.read_bytes()
    files = {name: folder / f"{name}.pt" for name in ("truncated", "text", "image", "empty")}
    files["truncated"].write_bytes(blob[: len(blob) // 2])
    files["text"].write_text("epoch 3: accuracy 0.81\n")
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(files["image"], format="PNG")
    files["empty"].write_bytes(b"")
    return files


EXPECTED_DAMAGE = {"truncated": "damaged, truncated", "text": "a text file", "image": "a PNG image",
                   "empty": "empty (0 bytes)"}


@pytest.mark.parametrize("kind", sorted(EXPECTED_DAMAGE))
def test_a_damaged_checkpoint_is_one_line_and_exit_2_everywhere(done_run, tmp_path, capsys, kind):
    path = damaged_checkpoints(done_run / "last.pt", tmp_path)[kind]
    image = tmp_path / "face.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    commands = {
        "train": lambda: train.main(["--resume", str(path), "--no-progress"]),
        "evaluate": lambda: evaluate_main(["--checkpoint", str(path), "--device", "cpu"]),
        "predict": lambda: classify_main(["--checkpoint", str(path), str(image), "--device", "cpu"]),
    }
    for name, command in commands.items():
        assert command() == 2, name
        one_error_line(capsys, str(path), EXPECTED_DAMAGE[kind])
    assert not (tmp_path / "metrics.jsonl").exists()  # the resume wrote nothing


def test_a_missing_cuda_device_is_one_line_and_exit_2_everywhere(done_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    image = tmp_path / "face.png"
    Image.fromarray(np.full((40, 40, 3), 128, np.uint8)).save(image)
    commands = {
        "train": lambda: train.main(TINY + ["--epochs", "1", "--out", str(tmp_path / "run"), "--device", "cuda"]),
        "evaluate": lambda: evaluate_main(["--checkpoint", str(done_run / "last.pt"), "--device", "cuda"]),
        "predict": lambda: classify_main(["--checkpoint", str(done_run / "last.pt"), str(image), "--device", "cuda"]),
    }
    for name, command in commands.items():
        assert command() == 2, name
        one_error_line(capsys, "'cuda'", "no CUDA device")
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------------------------
# The output folder
# ----------------------------------------------------------------------------------------------
def test_a_folder_holding_a_run_is_refused_and_left_as_it_was(done_run, capsys):
    before = {name: (done_run / name).read_bytes() for name in ("metrics.jsonl", "last.pt", "best.pt")}
    assert train.main(TINY + ["--epochs", "1", "--out", str(done_run)]) == 2
    one_error_line(capsys, "already holds a run", f"--resume {done_run / 'last.pt'}", "--overwrite")
    assert {name: (done_run / name).read_bytes() for name in before} == before
    assert not (done_run / run_folder.LOCK_FILE).exists()  # released after the refusal


def test_overwrite_replaces_an_earlier_run(done_run, tmp_path):
    out = tmp_path / "again"
    out.mkdir()
    for name in ("metrics.jsonl", "last.pt", "best.pt", "best_mean.pt", "config.json"):
        (out / name).write_bytes((done_run / name).read_bytes())
    (out / "notes.txt").write_text("mine")
    assert train.main(TINY + ["--epochs", "1", "--seed", "5", "--out", str(out), "--overwrite"]) == 0
    state = ckpt.load(out / "last.pt")
    assert state["config"]["train"]["seed"] == 5 and len((out / "metrics.jsonl").read_text().splitlines()) == 1
    assert (out / "notes.txt").read_text() == "mine"  # only the run's own files are replaced


def test_a_folder_in_use_by_a_live_run_is_refused(tmp_path, capsys):
    other = run_folder.FolderLock(tmp_path)  # this process's pid: alive, as a concurrent run's would be
    other.acquire()
    try:
        assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 2
        one_error_line(capsys, "is in use by process", str(os.getpid()))
        assert (tmp_path / run_folder.LOCK_FILE).read_text() == other.mine  # not taken over
    finally:
        other.release()
    assert not (tmp_path / run_folder.LOCK_FILE).exists()


def test_a_killed_runs_lock_is_stale_and_taken_over(tmp_path):
    finished = subprocess.Popen(["true"])
    finished.wait()  # its pid no longer exists
    (tmp_path / run_folder.LOCK_FILE).write_text(f"{atomic.this_host()} {finished.pid}\n")
    assert train.main(TINY + ["--epochs", "1", "--out", str(tmp_path)]) == 0
    assert not (tmp_path / run_folder.LOCK_FILE).exists()


def test_another_hosts_lock_is_never_declared_stale(tmp_path):
    (tmp_path / run_folder.LOCK_FILE).write_text("some-other-host 1\n")
    with pytest.raises(run_folder.RunFolderError, match="process 1 on some-other-host"):
        run_folder.RunFolder(tmp_path).start()


# ----------------------------------------------------------------------------------------------
# Resumes that would not continue their run
# ----------------------------------------------------------------------------------------------
def test_resume_on_another_dataset_is_refused_pointing_to_weights(done_run, tmp_path, capsys):
    code = train.main(["--resume", str(done_run / "last.pt"), "--dataset", "rafdb", "--data-root", str(tmp_path),
                       "--epochs", "2", "--no-progress"])
    assert code == 2
    one_error_line(capsys, "trained on synthetic, not rafdb", f"--weights {done_run / 'last.pt'}")


def test_resume_with_other_classes_is_refused(done_run, tmp_path, capsys):
    state = ckpt.load(done_run / "last.pt")
    state["model_info"]["classes"] = state["model_info"]["classes"] + ["Contempt"]
    ckpt.save(state, tmp_path / "eight.pt")
    assert train.main(["--resume", str(tmp_path / "eight.pt"), "--epochs", "2", "--no-progress"]) == 2
    one_error_line(capsys, "classifies 8 classes", "--weights")


@pytest.mark.parametrize("flag,value", [("--batch-size", "4"), ("--limit-train", "8")])
def test_mid_epoch_resume_with_another_epoch_shape_is_refused(done_run, capsys, flag, value):
    mid = done_run / "mid.pt"
    assert train.main(["--resume", str(mid), flag, value, "--no-progress"]) == 2
    one_error_line(capsys, "written mid-epoch (epoch 0, step 1)", f"{flag} {value}")


def test_mid_epoch_resume_with_the_same_epoch_shape_still_runs(done_run, tmp_path):
    folder = tmp_path / "mid"
    folder.mkdir()
    (folder / "last.pt").write_bytes((done_run / "mid.pt").read_bytes())
    assert train.main(["--resume", str(folder / "last.pt"), "--no-progress"]) == 0
    state = ckpt.load(folder / "last.pt")
    assert (state["epoch"], state["epoch_done"]) == (0, True)
    assert state["history"][0]["samples_per_s"] > 0 and state["history"][0]["train_samples"] == 16
