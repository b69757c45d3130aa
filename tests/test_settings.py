"""nla_fast.settings: device defaults, the command line, and a resumed run's settings."""
import pytest
import torch

from nla_fast.data.splits import load_split
from nla_fast.train import load_run_split
from nla_fast.settings import CPU_QUICK_RUN, TrainSettings, parse_command_line, settings_for_resume


def test_cpu_defaults_are_the_quick_synthetic_run():
    s = TrainSettings().resolve(torch.device("cpu"))
    quick = CPU_QUICK_RUN
    assert (s.dataset, s.image_size, s.epochs, s.num_samples, s.lr, s.batch_size) == (
        "synthetic", quick["image_size"], quick["epochs"], quick["num_samples"], quick["lr"], quick["batch_size"])
    assert s.amp == "off" and s.cuda_graphs is False and s.backend == "reference"
    # the demo averages the consistency term; everywhere else it is the variant's own (summed)
    assert s.consistency_reduction == quick["consistency_reduction"] == "mean"
    assert s.nla_config().consistency_reduction == "mean"
    summed = TrainSettings(consistency_reduction="sum").resolve(torch.device("cpu"))
    assert summed.nla_config().consistency_reduction == "sum"
    rafdb_on_cpu = TrainSettings(dataset="rafdb").resolve(torch.device("cpu"))
    assert rafdb_on_cpu.consistency_reduction is None and rafdb_on_cpu.nla_config().consistency_reduction == "sum"
    g = TrainSettings().resolve(torch.device("cuda"))
    assert (g.image_size, g.epochs, g.batch_size, g.lr, g.weight_decay, g.gamma) == (224, 60, 32, 1e-4, 1e-4, 0.9)
    assert g.amp == "bf16" and g.cuda_graphs is True and g.num_samples is None and g.backend == "auto"
    assert g.consistency_reduction is None and g.nla_config().consistency_reduction == "sum"


def test_the_paper_recipe_is_one_constant_read_by_the_defaults_and_the_help(monkeypatch):
    from nla_fast import settings

    for name, value in (("epochs", 77), ("image_size", 288), ("batch_size", 48), ("lr", 3e-4)):
        monkeypatch.setitem(settings.PAPER_RECIPE, name, value)
    g = TrainSettings().resolve(torch.device("cuda"))
    assert (g.epochs, g.image_size, g.batch_size, g.lr) == (77, 288, 48, 3e-4)
    text = " ".join(settings.build_parser().format_help().split())
    assert "(288 px, 77 epochs, batch 48, Adam 0.0003" in text
    for words in ("(default: 288;", "epochs (default: 77;", "(default: 48;", "(default: 0.0003;"):
        assert words in text, words


def test_command_line_defaults_are_the_settings_defaults():
    command = parse_command_line([])
    assert command.settings == TrainSettings() and command.resume is None and command.explicit == frozenset()


def test_explicit_flags_are_those_typed_even_when_equal_to_the_default():
    command = parse_command_line(["--epochs", "5", "--no-progress", "--seed", "0", "--no-cuda-graphs",
                                  "--sync-bn", "--resume", "runs/x/last.pt", "--dataset=synthetic"])
    assert command.explicit == {"epochs", "progress", "seed", "cuda_graphs", "sync_bn", "resume", "dataset"}
    s = command.settings
    assert (s.epochs, s.progress, s.seed, s.cuda_graphs, s.sync_bn) == (5, False, 0, False, True)
    assert command.resume == "runs/x/last.pt"
    with pytest.raises(SystemExit):
        parse_command_line(["--epochs", "many"])


def test_resume_takes_the_saved_settings_and_the_typed_flags(tmp_path):
    saved = TrainSettings(dataset="synthetic", epochs=2, lr=0.5, seed=9, out="elsewhere", device="cpu")
    config = {"train": vars(saved) | {"a_setting_of_a_newer_version": 1}, "device_type": "cpu"}
    command = parse_command_line(["--epochs", "4", "--device", "cpu"])
    merged, notes = settings_for_resume(command.settings, config, str(tmp_path / "last.pt"), command.explicit)
    assert (merged.epochs, merged.lr, merged.seed) == (4, 0.5, 9)  # typed, saved, saved
    assert merged.out == str(tmp_path.resolve())  # the checkpoint's folder
    assert notes == ["nla_fast: resume: epochs = 4 (the checkpoint had 2)"]


def test_load_split_passes_only_the_options_the_loader_takes(monkeypatch):
    calls = []

    class Loaded:
        images, labels = torch.zeros(10, 2, 2, 3, dtype=torch.uint8), torch.arange(10)

    monkeypatch.setattr("nla_fast.data.splits.load_dataset", lambda *args, **kw: calls.append((args, kw)) or Loaded())
    s = TrainSettings(dataset="ferplus", label_mode="soft", num_classes=8, num_samples=99, noise_rate=0.2,
                      limit_test=4)
    load_run_split(s, "train")
    load_run_split(s, "test")
    assert calls[0][1] == {"image_size": None, "label_mode": "soft", "num_classes": 8, "noise_rate": 0.2,
                           "noise_seed": 0}
    assert calls[1][1] == {"image_size": None, "label_mode": "soft", "num_classes": 8}
    synthetic = load_run_split(TrainSettings(num_samples=400, num_classes=8, limit_test=4), "test")
    assert calls[2][1] == {"image_size": None, "num_samples": 100} and len(synthetic.labels) == 4


def test_label_noise_and_imbalance_are_refused_on_a_split_other_than_train(monkeypatch):
    monkeypatch.setattr("nla_fast.data.splits.load_dataset", lambda *args, **kw: pytest.fail("loaded"))
    for protocol in ({"noise_rate": 0.2}, {"noise_file": "noisy.txt"}, {"imbalance_factor": 10.0}):
        with pytest.raises(ValueError, match="training split only.*'test'"):
            load_split("rafdb", "/data", "test", **protocol)
    assert "noise_rate" not in TrainSettings(noise_rate=0.2).split_arguments("test")


def test_resuming_a_run_saved_before_the_demo_default_keeps_its_consistency_reduction(tmp_path):
    # older checkpoints saved consistency_reduction None; the loss config they also saved says what ran
    config = {"train": vars(TrainSettings(device="cpu")), "nla": {"consistency_reduction": "sum"}, "device_type": "cpu"}
    command = parse_command_line([])
    merged, _ = settings_for_resume(command.settings, config, str(tmp_path / "last.pt"), command.explicit)
    assert merged.resolve(torch.device("cpu")).nla_config().consistency_reduction == "sum"
    typed = parse_command_line(["--consistency-reduction", "mean"])
    merged, _ = settings_for_resume(typed.settings, config, str(tmp_path / "last.pt"), typed.explicit)
    assert merged.resolve(torch.device("cpu")).nla_config().consistency_reduction == "mean"
