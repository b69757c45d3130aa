"""Faults of the real world lose nothing (issue 21): --overwrite and export targets that would
destroy, resumes that would rewrite a run, SIGTERM, full disks (simulated: a writer that
raises ENOSPC; and, where a private tmpfs can be mounted, real ones), --config values, hostile
dataset files, unusable --out folders and closed pipes. Each fault: one line, nothing lost."""
import errno
import fcntl
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from nla_fast import atomic, settings, train
from nla_fast import checkpoint as ckpt
from nla_fast import export as ex
from nla_fast import run_folder
from nla_fast.data import CorruptImageError, LabelFormatError, load_dataset
from nla_fast.data.fixtures import make_affectnet_tree, make_ferplus_csv, make_rafdb_tree
from nla_fast.disk import WriteFailed
from nla_fast.evaluate import main as evaluate_main

# The issue's tiny CPU settings (64 synthetic faces rendered, not 1,600): 8 steps of 8, 32 test faces.
TINY = ["--dataset", "synthetic", "--num-samples", "64", "--limit-train", "64", "--limit-test", "32",
        "--image-size", "32", "--batch-size", "8", "--epochs", "1", "--device", "cpu", "--backend", "reference",
        "--no-progress", "--plot-every", "0", "--eval-batch-size", "64"]
RUN_FILES = ("config.json", "metrics.jsonl", "metrics.csv", "last.pt", "best.pt", "best_mean.pt")

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


@pytest.fixture(scope="module")
def done_run(module_tmp, private_data_cache_one_thread):
    out = module_tmp("done")
    assert train.main(TINY + ["--out", str(out)]) == 0
    return out


def copy_of(run: Path, folder: Path) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name in RUN_FILES:
        shutil.copy(run / name, folder / name)
    return folder


def contents(folder: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()}


def one_line(text: str, *words) -> str:
    """The one line a fault is reported in (the data loaders' [nla_fast.data] notes aside)."""
    text = "\n".join(line for line in text.strip().splitlines() if not line.startswith("[nla_fast.data]"))
    assert len(text.splitlines()) == 1 and "Traceback" not in text, text
    for word in words:
        assert word in text, (word, text)
    return text


# ----------------------------------------------------------------------------------------------
# --overwrite, --resume and export targets that would destroy
# ----------------------------------------------------------------------------------------------
def test_overwrite_removes_nothing_when_the_new_run_cannot_start(done_run, tmp_path, capsys):
    folder = copy_of(done_run, tmp_path / "run")
    before = contents(folder)
    code = train.main(TINY + ["--out", str(folder), "--overwrite", "--dataset", "rafdb", "--data-root",
                              str(tmp_path / "nonexistent")])
    assert code == 2
    one_line(capsys.readouterr().err, "nonexistent")
    assert contents(folder) == before
    (tmp_path / "weights.pt").write_text("not weights\n")  # fails after the data is loaded, in build
    assert train.main(TINY + ["--out", str(folder), "--overwrite", "--weights", str(tmp_path / "weights.pt")]) == 2
    assert contents(folder) == before
    assert not (folder / run_folder.LOCK_FILE).exists()


def test_resume_from_best_into_its_own_folder_is_refused(done_run, tmp_path, capsys):
    folder = copy_of(done_run, tmp_path / "run")
    before = contents(folder)
    assert train.main(["--resume", str(folder / "best.pt"), "--epochs", "2", "--no-progress"]) == 2
    one_line(capsys.readouterr().err, "best.pt is not", f"--resume {folder / 'last.pt'}",
             f"--weights {folder / 'best.pt'}")
    assert contents(folder) == before


@pytest.mark.slow
def test_resume_from_best_into_a_new_folder_still_works(done_run, tmp_path):
    folder = copy_of(done_run, tmp_path / "run")
    assert train.main(["--resume", str(folder / "best.pt"), "--out", str(tmp_path / "new"), "--epochs", "2",
                       "--no-progress"]) == 0
    assert ckpt.load(tmp_path / "new" / "last.pt")["epoch"] == 1
    assert contents(folder)["last.pt"] == (done_run / "last.pt").read_bytes()


@pytest.fixture(scope="module")
def second_checkpoint(done_run, module_tmp):
    """done_run's checkpoint with other weights: another checkpoint to export."""
    state = ckpt.load(done_run / "best.pt")
    state["model"] = {k: v * 0.5 if k.startswith("fc.") else v for k, v in state["model"].items()}
    path = module_tmp("other") / "best.pt"
    ckpt.save(state, path)
    return path


@pytest.mark.slow
def test_export_onto_an_export_of_another_checkpoint_is_refused(done_run, second_checkpoint, tmp_path, capsys):
    out = tmp_path / "export"
    assert ex.main(["--checkpoint", str(done_run / "best.pt"), "--format", "safetensors", "--out", str(out)]) == 0
    before = contents(out)
    capsys.readouterr()
    for fmt in ("safetensors", "torchscript"):
        assert ex.main(["--checkpoint", str(second_checkpoint), "--format", fmt, "--out", str(out)]) == 2
        one_line(capsys.readouterr().err, f"{out} already holds an export of best.pt", "--overwrite")
        assert contents(out) == before
    # the same checkpoint in another format goes beside it: the folder still describes one checkpoint
    assert ex.main(["--checkpoint", str(done_run / "best.pt"), "--format", "torchscript", "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors", "model.torchscript.pt"]
    # --overwrite replaces the export: the earlier checkpoint's other files go
    assert ex.main(["--checkpoint", str(second_checkpoint), "--format", "safetensors", "--out", str(out),
                    "--overwrite"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]
    assert ex.load_exported(out, device="cpu").checkpoint_epoch == 0  # weights and model.json agree


def test_export_refuses_weights_without_a_model_json(done_run, tmp_path, capsys):
    (tmp_path / "model.safetensors").write_bytes(b"weights of something")
    assert ex.main(["--checkpoint", str(done_run / "best.pt"), "--format", "torchscript", "--out", str(tmp_path)]) == 2
    one_line(capsys.readouterr().err, "model.safetensors", "without a readable model.json")


# ----------------------------------------------------------------------------------------------
# SIGTERM outside the steps (the mid-epoch case and its exact resume: tests/test_train.py)
# ----------------------------------------------------------------------------------------------
def test_sigterm_while_loading_data_releases_the_lock_in_one_line(tmp_path, monkeypatch, capsys):
    def terminated(run):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the signal arrives before this ends
        raise AssertionError("SIGTERM was not handled")

    monkeypatch.setattr(train, "load_data", terminated)
    handler = signal.getsignal(signal.SIGTERM)
    assert train.main(TINY + ["--out", str(tmp_path)]) == 143
    one_line(capsys.readouterr().err, "SIGTERM")
    assert not (tmp_path / run_folder.LOCK_FILE).exists()
    assert signal.getsignal(signal.SIGTERM) is handler


# ----------------------------------------------------------------------------------------------
# A full disk, simulated: the temporary file of a chosen target stops taking bytes
# ----------------------------------------------------------------------------------------------
class FullDisk:
    """A binary file that takes ``room`` more bytes, then fails as a full disk does."""

    def __init__(self, handle, room: int):
        self.handle, self.room = handle, room

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        self.room -= len(data)
        return self.handle.write(data)

    def __getattr__(self, name):
        return getattr(self.handle, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.handle.close()


def fill_disk(monkeypatch, name: str, room: int = 100, after: int = 0) -> list:
    """Writes of ``name`` fail once ``after`` of them have succeeded; returns the failed targets."""
    real, seen, failed = atomic._open_new, [], []

    def open_new(tmp):
        handle = real(tmp)
        if tmp.name.startswith(f".{name}."):
            seen.append(tmp)
            if len(seen) > after:
                failed.append(tmp)
                return FullDisk(handle, room)
        return handle

    monkeypatch.setattr(atomic, "_open_new", open_new)
    return failed


def no_temporary_files(folder: Path) -> bool:
    return not [p for p in folder.rglob("*.tmp")]


@pytest.mark.slow
@pytest.mark.parametrize("name,after", [("last.pt", 0), ("metrics.jsonl", 1)])
def test_a_full_disk_ends_a_run_in_one_line_keeping_the_last_good_state(done_run, tmp_path, monkeypatch, capsys,
                                                                          name, after):
    folder = copy_of(done_run, tmp_path / "run")
    before = contents(folder)
    failed = fill_disk(monkeypatch, name, after=after)
    assert train.main(["--resume", str(folder / "last.pt"), "--epochs", "2", "--no-progress"]) == 1
    assert failed
    one_line(capsys.readouterr().err, f"cannot write {folder / name}: no space left", "free",
             "the previous file is kept")
    for kept in ("last.pt", "best.pt", name):
        assert (folder / kept).read_bytes() == before[kept], kept  # epoch 0's state, untouched
    assert no_temporary_files(folder) and not (folder / run_folder.LOCK_FILE).exists()
    monkeypatch.undo()
    assert train.main(["--resume", str(folder / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert ckpt.load(folder / "last.pt")["epoch"] == 1


def test_a_full_disk_while_writing_the_lock_leaves_no_lock(tmp_path, monkeypatch):
    def no_room(fd, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "write", no_room)
    with pytest.raises(WriteFailed, match=r"cannot write .*\.nla_fast\.lock: no space left on the device \(.* free\)"):
        run_folder.RunFolder(tmp_path).start()
    monkeypatch.undo()
    assert not (tmp_path / run_folder.LOCK_FILE).exists()  # the next run is not refused
    folder = run_folder.RunFolder(tmp_path)
    folder.start()
    folder.close()


def test_an_empty_lock_whose_writer_is_gone_is_stale(tmp_path):
    lock = tmp_path / run_folder.LOCK_FILE
    lock.write_bytes(b"")  # left by a full disk, or a kill between creating and writing it
    old = time.time() - 60
    os.utime(lock, (old, old))
    folder = run_folder.RunFolder(tmp_path)
    folder.start()
    assert lock.read_text() == folder.lock.mine
    folder.close()
    assert not lock.exists()


def test_an_empty_lock_being_written_still_refuses(tmp_path):
    lock = tmp_path / run_folder.LOCK_FILE
    lock.write_bytes(b"")
    with pytest.raises(run_folder.RunFolderError, match="lock being written"):  # just created
        run_folder.RunFolder(tmp_path).start()
    old = time.time() - 60
    os.utime(lock, (old, old))
    with open(lock, "rb") as writer:  # an old empty lock its live writer still holds
        fcntl.flock(writer.fileno(), fcntl.LOCK_EX)
        with pytest.raises(run_folder.RunFolderError, match="lock being written"):
            run_folder.RunFolder(tmp_path).start()
    assert lock.exists()


def test_a_full_disk_while_evaluating_is_one_line(done_run, tmp_path, monkeypatch, capsys):
    failed = fill_disk(monkeypatch, "eval-best-synthetic-test-confusion.json")
    code = evaluate_main(["--checkpoint", str(done_run / "best.pt"), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 1 and failed
    one_line(capsys.readouterr().err, "cannot write", "confusion.json: no space left", "free")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("fmt", ["torchscript", "safetensors"])
def test_a_full_disk_while_exporting_is_one_line(done_run, tmp_path, monkeypatch, capsys, fmt):
    failed = fill_disk(monkeypatch, ex.FILES[fmt], room=1000)
    assert ex.main(["--checkpoint", str(done_run / "best.pt"), "--format", fmt, "--out", str(tmp_path)]) == 1
    assert failed
    one_line(capsys.readouterr().err, f"cannot write {tmp_path / ex.FILES[fmt]}: no space left", "free")
    assert no_temporary_files(tmp_path) and not (tmp_path / ex.FILES[fmt]).exists()


# ----------------------------------------------------------------------------------------------
# Real file systems: a full and a read-only tmpfs in a private mount namespace
# ----------------------------------------------------------------------------------------------
def _can_mount_privately() -> bool:
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c",
                            "mount -t tmpfs -o size=64k none /mnt"], capture_output=True)
    return probe.returncode == 0


REAL_FILE_SYSTEMS = textwrap.dedent("""
    import json, sys
    from nla_fast import train, export, evaluate
    tiny, checkpoint, full, readonly, filled = json.loads(sys.argv[1])
    results = {
        "train_full": train.main(tiny + ["--out", full + "/run"]),
        "export_full": export.main(["--checkpoint", checkpoint, "--format", "torchscript", "--out", full + "/export"]),
        "lock_full": train.main(tiny + ["--out", filled]),
        "train_readonly": train.main(tiny + ["--out", readonly + "/run"]),
        "evaluate_readonly": evaluate.main(["--checkpoint", checkpoint, "--out", readonly, "--device", "cpu"]),
    }
    print(json.dumps(results))
""")


@pytest.mark.slow
@pytest.mark.skipif(not _can_mount_privately(), reason="needs `unshare --user --mount` (a private tmpfs); the "
                    "same faults are simulated by the tests above")
def test_real_full_and_read_only_file_systems(done_run, tmp_path):
    """A 2 MiB tmpfs takes config.json and the metrics but no checkpoint (~45 MB) and no
    TorchScript file; a filled one not even the lock; a read-only one nothing."""
    full, readonly, filled = tmp_path / "full", tmp_path / "readonly", tmp_path / "filled"
    for folder in (full, readonly, filled):
        folder.mkdir()
    mounts = (f"mount -t tmpfs -o size=2m none {full} && mount -t tmpfs -o ro,size=64k none {readonly} && "
              f"mount -t tmpfs -o size=64k none {filled} && (cat /dev/zero > {filled}/ballast 2>/dev/null; true) && ")
    arguments = json.dumps([TINY, str(done_run / "best.pt"), str(full), str(readonly), str(filled)])
    script = tmp_path / "script.py"
    script.write_text(REAL_FILE_SYSTEMS)
    # ls: what was left, seen from inside (the mounts vanish with the namespace)
    command = (f"{mounts} {sys.executable} {script} '{arguments}'; status=$?; "
               f"ls -A {full}/run {full}/export {filled}; exit $status")
    done = subprocess.run(["unshare", "--user", "--map-root-user", "--mount", "sh", "-c", command],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})
    assert done.returncode == 0, done.stderr
    lines = done.stdout.splitlines()
    results = json.loads(next(line for line in lines if line.startswith("{")))
    assert results == {"train_full": 1, "export_full": 1, "lock_full": 1, "train_readonly": 2,
                       "evaluate_readonly": 2}, done.stderr
    errors = [line for line in done.stderr.splitlines() if "error:" in line]
    assert "Traceback" not in done.stderr and "terminate called" not in done.stderr, done.stderr
    assert f"cannot write {full}/run/last.pt: no space left on the device" in errors[0]
    assert f"cannot write {full}/export/model.torchscript.pt: no space left" in errors[1]
    assert f"cannot write {filled}/.nla_fast.lock: no space left" in errors[2]
    assert "the file system is read-only" in errors[3] and "the file system is read-only" in errors[4]
    left = done.stdout[done.stdout.index("}") + 1:]
    assert ".tmp" not in left and ".nla_fast.lock" not in left and "last.pt" not in left
    assert "config.json" in left and "metrics.jsonl" in left  # the run's first files, before the disk filled


# ----------------------------------------------------------------------------------------------
# --out folders that cannot be used
# ----------------------------------------------------------------------------------------------
def unusable_outs(tmp_path: Path) -> dict:
    (tmp_path / "a_file").write_text("x")
    return {"a file": (tmp_path / "a_file", "it is a file, not a folder"),
            "under a file": (tmp_path / "a_file" / "run", "a folder on its path is a file"),
            "name too long": (tmp_path / ("n" * 300), "the name is too long")}


@pytest.mark.parametrize("kind", ["a file", "under a file", "name too long"])
def test_an_unusable_out_is_one_line_in_train_and_evaluate(done_run, tmp_path, capsys, kind):
    out, reason = unusable_outs(tmp_path)[kind]
    assert train.main(TINY + ["--out", str(out)]) == 2
    one_line(capsys.readouterr().err, f"--out {out} cannot be used as an output folder: {reason}")
    assert evaluate_main(["--checkpoint", str(done_run / "best.pt"), "--out", str(out), "--device", "cpu"]) == 2
    one_line(capsys.readouterr().err, f"--out {out} cannot be used as an output folder: {reason}")


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders; the real read-only file "
                    "system test covers it")
def test_a_read_only_out_is_one_line(done_run, tmp_path, capsys):
    tmp_path.chmod(0o500)
    try:
        assert train.main(TINY + ["--out", str(tmp_path / "run")]) == 2
        one_line(capsys.readouterr().err, "permission denied")
    finally:
        tmp_path.chmod(0o700)


# ----------------------------------------------------------------------------------------------
# Closed pipes: `nla-train ... | head` must not kill the run before its checkpoint
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def closed_pipe():
    """A text stream into a pipe whose reader has gone, as `head` does after its lines (set as
    sys.stdout in the test itself: capsys puts its own back when the test starts)."""
    read_end, write_end = os.pipe()
    os.close(read_end)
    stream = os.fdopen(write_end, "w")
    yield stream
    try:
        stream.close()
    except BrokenPipeError:  # the old code's unflushed lines
        pass


def closed_pipe_noted_once(err: str) -> None:
    assert "Traceback" not in err and err.count("standard output was closed") == 1, err


@pytest.mark.slow
def test_training_into_a_closed_pipe_finishes_and_saves(closed_pipe, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", closed_pipe)
    assert train.main(TINY + ["--out", str(tmp_path)]) == 0
    assert ckpt.load(tmp_path / "last.pt")["epoch_done"]
    closed_pipe_noted_once(capsys.readouterr().err)


def test_evaluate_into_a_closed_pipe_is_no_traceback(closed_pipe, done_run, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(sys, "stdout", closed_pipe)
    code = evaluate_main(["--checkpoint", str(done_run / "best.pt"), "--out", str(tmp_path), "--device", "cpu"])
    assert code == 0
    assert sorted(p.suffix for p in tmp_path.iterdir()) == [".json", ".png"]
    closed_pipe_noted_once(capsys.readouterr().err)


# ----------------------------------------------------------------------------------------------
# --config values go through the flags' checks
# ----------------------------------------------------------------------------------------------
BAD_CONFIG_VALUES = [
    ("epochs", 0), ("image_size", 8), ("gamma", 5.0), ("device", "tpu"), ("batch_size", -4), ("lr", float("nan")),
    ("lr", float("inf")), ("loss", "mse"), ("log_every", 0), ("eval_batch_size", 0), ("weight_decay", -1.0),
    ("noise_rate", 1.0), ("imbalance_factor", 0.5), ("num_classes", 9), ("amp", "fp8"), ("plot_every", -1),
    ("limit_train", 0), ("limit_test", -5), ("num_samples", 0), ("views", "both"), ("backend", "cuda"),
    ("consistency", "l2"), ("preset", "mine"), ("label_mode", "vote"), ("dataset", "mnist"),
    ("consistency_reduction", "max"),
]


def flag_error(name: str, value, capsys) -> str:
    """What the command line says of the same value: argparse's reason after 'argument --flag: '."""
    with pytest.raises(SystemExit):
        settings.parse_command_line([f"--{name.replace('_', '-')}={value}"])
    err = capsys.readouterr().err.strip().splitlines()[-1]
    return err.split("argument ", 1)[1].split(": ", 1)[1]


@pytest.mark.parametrize("name,value", BAD_CONFIG_VALUES)
def test_config_values_go_through_the_flags_checks(tmp_path, capsys, name, value):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({name: value}))
    with pytest.raises(SystemExit) as exit_info:
        settings.parse_command_line(["--config", str(config)])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert f"--config {config}: setting {name!r} = {json.dumps(value)}: " in err, err
    reason = flag_error(name, value, capsys)
    if reason.startswith("invalid choice"):  # argparse's words for choices; the config names them too
        assert "should be one of" in err
    else:
        assert reason in err, (reason, err)


def test_a_flag_typed_over_a_bad_config_value_wins(tmp_path):
    config = tmp_path / "config.json"
    config.write_text(json.dumps({"epochs": 0, "seed": 4}))
    command = settings.parse_command_line(["--config", str(config), "--epochs", "2"])
    assert (command.settings.epochs, command.settings.seed) == (2, 4)


# ----------------------------------------------------------------------------------------------
# Hostile dataset files
# ----------------------------------------------------------------------------------------------
@pytest.fixture
def raf(tmp_path):
    return make_rafdb_tree(tmp_path / "raf", n_train=6, n_test=3, size=40, labels=[1, 2, 3, 4, 5, 6, 7, 1, 2])


def test_rafdb_duplicate_names_with_conflicting_labels_are_refused(raf):
    label_file = raf["root"] / "EmoLabel" / "list_patition_label.txt"
    lines = label_file.read_text().splitlines()
    label_file.write_text("\n".join(lines + [lines[1]]) + "\n")  # the same line again: kept once
    assert len(load_dataset("rafdb", raf["root"], "train", verbose=False)) == 6
    label_file.write_text("\n".join(lines + ["train_00002.jpg 7"]) + "\n")
    with pytest.raises(LabelFormatError, match=r"line 10: train_00002.jpg is labelled 7, but 2 on line 2"):
        load_dataset("rafdb", raf["root"], "train", verbose=False)


def _ferplus_all_test_rows_dropped(root):
    votes = [[8, 1, 1, 0, 0, 0, 0, 0, 0, 0]] * 6 + [[0, 0, 0, 0, 0, 0, 0, 0, 10, 0]] * 3  # test: all "unknown"
    usages = ["Training"] * 4 + ["PublicTest"] * 2 + ["PrivateTest"] * 3
    return make_ferplus_csv(root, votes, usages)["root"]


def test_an_empty_test_split_is_refused_before_training(done_run, tmp_path, capsys):
    root = _ferplus_all_test_rows_dropped(tmp_path / "ferplus")
    code = train.main(["--dataset", "ferplus", "--data-root", str(root), "--out", str(tmp_path / "run"),
                       "--batch-size", "2", "--image-size", "32", "--epochs", "1", "--device", "cpu", "--no-progress"])
    assert code == 2
    one_line(capsys.readouterr().err, "ferplus test split is empty", "all 3 of its rows were dropped")
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
    assert evaluate_main(["--checkpoint", str(done_run / "best.pt"), "--dataset", "ferplus", "--data-root", str(root),
                          "--device", "cpu", "--out", str(tmp_path / "eval")]) == 2
    one_line(capsys.readouterr().err, "ferplus test split is empty")


def test_the_done_line_names_only_the_checkpoints_written(tmp_path):
    (tmp_path / "last.pt").write_bytes(b"x")
    summary = run_folder.RunFolder(tmp_path).summary()
    assert f"checkpoints: {tmp_path / 'last.pt'}" in summary and "best.pt" not in summary


def _not_utf8(path: Path, line: int) -> None:
    lines = path.read_bytes().split(b"\n")
    lines[line - 1] = lines[line - 1] + b"\xff"
    path.write_bytes(b"\n".join(lines))


@pytest.mark.parametrize("dataset", ["rafdb", "ferplus", "affectnet", "noise-file"])
def test_a_label_file_that_is_not_utf8_is_one_line_naming_the_line(tmp_path, raf, dataset):
    if dataset in ("rafdb", "noise-file"):
        root, label_file = raf["root"], raf["root"] / "EmoLabel" / "list_patition_label.txt"
        if dataset == "noise-file":
            label_file = tmp_path / "noisy.txt"
            shutil.copy(raf["root"] / "EmoLabel" / "list_patition_label.txt", label_file)
        line = 3
    elif dataset == "ferplus":
        root = make_ferplus_csv(tmp_path / "fer", [[8, 1, 1, 0, 0, 0, 0, 0, 0, 0]] * 3)["root"]
        label_file, line = root / "fer2013new.csv", 3
    else:
        root = make_affectnet_tree(tmp_path / "aff", {"train": [0, 1, 2]})["root"]
        label_file, line = root / "training.csv", 2
    _not_utf8(label_file, line)
    options = {"noise_file": str(label_file)} if dataset == "noise-file" else {}
    with pytest.raises(LabelFormatError, match=rf"{label_file.name}, line {line}: byte 0xff at column \d+ is not UTF-8"):
        load_dataset("rafdb" if dataset == "noise-file" else dataset, root, "train", verbose=False, **options)


@pytest.mark.parametrize("value", ["inf", "1e20", "nan", "-inf"])
def test_ferplus_votes_of_inf_or_1e20_are_one_line(tmp_path, value):
    root = make_ferplus_csv(tmp_path / "fer", [[8, 1, 1, 0, 0, 0, 0, 0, 0, 0]] * 3)["root"]
    new = root / "fer2013new.csv"
    lines = new.read_text().splitlines()
    fields = lines[2].split(",")
    fields[3] = value
    lines[2] = ",".join(fields)
    new.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelFormatError, match=r"fer2013new.csv, line 3: vote count .*out of range"):
        load_dataset("ferplus", root, "train", verbose=False)


@pytest.mark.parametrize("column,value", [("expression", "inf"), ("expression", "1e20"), ("face_x", "inf"),
                                          ("face_width", "1e20")])
def test_affectnet_fields_of_inf_or_1e20_are_one_line(tmp_path, column, value):
    root = make_affectnet_tree(tmp_path / "aff", {"train": [0, 1, 2]})["root"]
    path = root / "training.csv"
    lines = path.read_text().splitlines()
    header = lines[0].split(",")
    fields = lines[2].split(",")
    fields[header.index(column)] = value
    lines[2] = ",".join(fields)
    path.write_text("\n".join(lines) + "\n")
    with pytest.raises(LabelFormatError, match=r"training.csv, line 3: "):
        load_dataset("affectnet", root, "train", verbose=False)


def _decompression_bomb(path: Path, side: int = 40000) -> None:
    """A PNG of a few bytes that declares side x side pixels (1.6 G here: beyond Pillow's limit)."""
    Image.new("L", (1, 1)).save(path, format="PNG")
    data = bytearray(path.read_bytes())
    ihdr = data.index(b"IHDR")
    data[ihdr + 4:ihdr + 12] = side.to_bytes(4, "big") * 2
    data[ihdr + 17:ihdr + 21] = zlib.crc32(bytes(data[ihdr:ihdr + 17])).to_bytes(4, "big")
    path.write_bytes(bytes(data))


def test_a_decompression_bomb_in_a_dataset_is_one_line(raf):
    bomb = raf["root"] / "Image" / "aligned" / "train_00003_aligned.jpg"
    _decompression_bomb(bomb)
    with pytest.raises(CorruptImageError, match=r"cannot decode image .*train_00003_aligned.jpg: .*decompression bomb"):
        load_dataset("rafdb", raf["root"], "train", verbose=False)
