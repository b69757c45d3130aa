"""nla_fast.data.prepare: building the caches once, the size they are cached at, and what a run says."""
import pytest
import torch

from nla_fast.data import cache as cache_mod
from nla_fast.data import prepare
from nla_fast.data.fixtures import make_affectnet_tree, make_rafdb_tree
from nla_fast.data.splits import load_split
from nla_fast.settings import TrainSettings, parse_command_line

CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _cache_env(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))


def test_the_cache_size_follows_the_training_size_for_affectnet_and_the_source_for_the_others():
    def resolved(*flags):
        return parse_command_line(list(flags)).settings.resolve(CPU).cache_size

    assert resolved("--dataset", "affectnet") == 224  # the paper's input, not a smaller cache
    assert resolved("--dataset", "affectnet", "--image-size", "112") == 112
    assert resolved("--dataset", "affectnet", "--cache-size", "96") == 96
    assert resolved("--dataset", "rafdb") is None and resolved("--dataset", "ferplus") is None  # their source size
    assert resolved("--dataset", "rafdb", "--cache-size", "200") == 200


def test_prepare_builds_what_the_trainer_then_reads_and_checks_it_on_a_second_run(tmp_path, capsys):
    make_affectnet_tree(tmp_path / "aff", {"train": [0, 1, 2, 3, 6, 8], "test": [1, 2]})
    assert prepare.main(["--dataset", "affectnet", "--data-root", str(tmp_path / "aff"), "--image-size", "64"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 2 and lines[0].startswith("affectnet/train: 5 images at 64x64 px, built and checked")
    settings = TrainSettings(dataset="affectnet", data_root=str(tmp_path / "aff"), image_size=64).resolve(CPU)
    train = load_split(settings.dataset, settings.data_root, "train", **settings.split_arguments("train"))
    assert not train.info["cache_built"]  # the trainer found prepare's file: the same key
    line = prepare.cache_note(train, 64)
    assert line.startswith("nla_fast: affectnet/train images at 64x64 px, cached in ")
    assert line.endswith("trained at 64 px")
    assert prepare.main(["--dataset", "affectnet", "--data-root", str(tmp_path / "aff"), "--image-size", "64",
                         "--split", "train"]) == 0
    assert "checked in" in capsys.readouterr().out


def test_prepare_refuses_a_damaged_file_it_just_built_and_a_missing_root_in_one_line(tmp_path, capsys, monkeypatch):
    make_rafdb_tree(tmp_path / "raf", n_train=4, n_test=2)
    real = cache_mod._write_cache

    def flip_a_bit_after_writing(path, key, payload, progress):  # a disk that corrupts what it stores
        real(path, key, payload, progress)
        blob = bytearray(path.read_bytes())
        blob[cache_mod.DATA_OFFSET] ^= 1
        path.write_bytes(blob)

    monkeypatch.setattr(cache_mod, "_write_cache", flip_a_bit_after_writing)
    assert prepare.main(["--dataset", "rafdb", "--data-root", str(tmp_path / "raf"), "--split", "train"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if not line.startswith("[nla_fast.data] cached")]
    assert len(err) == 1 and "checksum mismatch" in err[0] and "rafdb-train-" in err[0]
    assert prepare.main(["--dataset", "rafdb", "--data-root", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "nowhere" in err[0]


def test_a_run_says_when_its_images_are_not_cached():
    from nla_fast.data import load_dataset

    data = load_dataset("synthetic", split="test", num_samples=8, cache=False, verbose=False)
    assert prepare.cache_note(data, 100) == ("nla_fast: synthetic/test images at 100x100 px, not cached (decoded into "
                                             "memory); trained at 100 px")
