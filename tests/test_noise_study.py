"""bench/noise_study.py: the trainer's noisy labels, the per-cell summary, and a small --quick study on the CPU."""
import json
import math
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))

import noise_study  # noqa: E402

from nla_fast.config import eps_schedule  # noqa: E402
from nla_fast.settings import TrainSettings  # noqa: E402
from nla_fast.train import load_run_split  # noqa: E402


pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def test_noisy_labels_are_those_the_trainer_gets_from_noise_rate_and_seed():
    settings = TrainSettings(dataset="synthetic", num_samples=96)
    clean = load_run_split(settings, "train")
    for rate, seed in ((0.2, 0), (0.3, 1)):
        trainer = load_run_split(TrainSettings(dataset="synthetic", num_samples=96, noise_rate=rate, noise_seed=seed),
                                 "train")
        study = noise_study.noisy_labels(clean.clean_labels, len(clean.classes), rate, seed)
        assert torch.equal(study, trainer.labels)
        assert torch.equal(trainer.clean_labels, clean.labels)
        assert 0 < float((study != clean.labels).float().mean()) < 0.6
    assert torch.equal(noise_study.noisy_labels(clean.clean_labels, 7, 0.0, 0), clean.labels)


def _run(loss, rate, seed, acc, flipped_series):
    return {"loss": loss, "noise_rate": rate, "seed": seed, "realised_noise_rate": rate + 0.01 * seed,
            "test_acc": acc, "test_mean_acc": acc / 2,
            "epochs": [{"naw_flipped": f, "naw_kept": 0.5, "naw_kept_ambiguous": None} for f in flipped_series]}


def test_summary_is_mean_and_sample_sd_over_seeds_per_cell():
    runs = [_run("ce", 0.3, 0, 0.50, [0.2, 0.1]), _run("ce", 0.3, 1, 0.60, [0.4, 0.3]),
            _run("nla-paper", 0.3, 0, 0.70, [0.2, 0.2])]
    cells = {(c["noise_rate"], c["loss"]): c for c in noise_study.summarise(runs)}
    assert set(cells) == {(0.3, "ce"), (0.3, "nla-paper")}
    ce = cells[(0.3, "ce")]
    assert ce["seeds"] == [0, 1]
    assert ce["test_acc"] == pytest.approx(0.55) and ce["test_acc_sd"] == pytest.approx(0.1 / math.sqrt(2))
    assert ce["test_mean_acc"] == pytest.approx(0.275)
    assert ce["realised_noise_rate"] == pytest.approx(0.305)
    assert ce["naw_flipped_per_epoch"] == pytest.approx([0.3, 0.2])
    assert ce["naw_kept_ambiguous_per_epoch"] == [None, None]
    assert cells[(0.3, "nla-paper")]["test_acc_sd"] == 0.0  # one seed: no spread


def test_study_runs_use_the_published_summed_consistency_on_every_device():
    # the CPU demo's default averages the term; the study compares the losses as published
    for device in ("cpu", "cuda"):
        for loss in noise_study.LOSSES:
            settings = noise_study.run_settings(noise_study.QUICK, device, loss, 0, "unused")
            if settings.loss == "nla":
                assert settings.resolve(torch.device(device)).nla_config().consistency_reduction == "sum"


def test_bad_arguments_are_refused_with_the_flag_named(capsys):
    for argv, flag in ((["--losses", "ce,focal"], "--losses"), (["--rates", "0,1.5"], "--rates"),
                       (["--seeds", "0"], "--seeds")):
        with pytest.raises(SystemExit):
            noise_study.main(argv)
        assert flag in capsys.readouterr().err


@pytest.mark.slow
def test_quick_study_writes_every_cell_weights_per_epoch_table_and_plots(tmp_path, capsys):
    epochs, num_train, rates, losses = 2, 128, [0.0, 0.3], ["ce", "nla-official"]
    result = noise_study.main(["--quick", "--device", "cpu", "--seeds", "2", "--rates", "0,0.3",
                               "--losses", ",".join(losses), "--num-samples", str(num_train),
                               "--epochs", str(epochs), "--out-dir", str(tmp_path)])
    stem = f"noise_study-{result['device']}-quick"
    saved = json.loads((tmp_path / f"{stem}.json").read_text())
    assert saved["runs"] == json.loads(json.dumps(result["runs"]))
    assert saved["quick"] and saved["plan"]["epochs"] == epochs and saved["num_train"] == num_train
    cells = sorted((r["noise_rate"], r["loss"], r["seed"]) for r in saved["runs"])
    assert cells == sorted((rate, loss, seed) for rate in rates for loss in losses for seed in (0, 1))

    batch = saved["plan"]["batch_size"]
    for run in saved["runs"]:
        realised = run["realised_noise_rate"]
        assert realised == pytest.approx(run["flipped"] / num_train)
        assert realised == 0.0 if run["noise_rate"] == 0 else abs(realised - run["noise_rate"]) < 0.1
        assert len(run["epochs"]) == epochs
        for e in run["epochs"]:
            assert e["eps"] == pytest.approx(eps_schedule(e["epoch"], epochs))
            trained = num_train // batch * batch
            assert e["n_flipped"] + e["n_kept"] == trained
            if run["noise_rate"] == 0:
                assert e["naw_flipped"] is None and e["n_flipped"] == 0
            else:
                assert e["n_flipped"] > 0 and e["naw_flipped"] > 0 and e["naw_kept"] > 0
                # the groups' weights average to the mean of the weights the step itself used
                both = (e["n_flipped"] * e["naw_flipped"] + e["n_kept"] * e["naw_kept"]) / trained
                assert both == pytest.approx(e["naw_all_step"], rel=1e-5)
            # positions map to the right samples: per noisy label, the weights match the step's own
            assert [w is None for w in e["naw_per_label"]] == [w is None for w in e["naw_per_label_step"]]
            assert [w for w in e["naw_per_label"] if w is not None] == pytest.approx(
                [w for w in e["naw_per_label_step"] if w is not None], rel=1e-5)
            assert 0 <= e["test_acc"] <= 1 and 0 <= e["test_mean_acc"] <= 1
    # the same seed gives every loss the same flipped labels
    for seed in (0, 1):
        assert len({r["flipped"] for r in saved["runs"] if r["seed"] == seed and r["noise_rate"] == 0.3}) == 1

    assert len(saved["cells"]) == len(rates) * len(losses)
    for cell in saved["cells"]:
        assert cell["seeds"] == [0, 1]
        assert len(cell["naw_flipped_per_epoch"]) == len(cell["naw_kept_per_epoch"]) == epochs
        assert all(v is not None for v in cell["naw_kept_per_epoch"])
    table = (tmp_path / f"{stem}.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| 0%") or line.startswith("| 30%")]
    assert len(rows) == len(rates) * len(losses)
    assert "--quick" in table and "± " in table
    for suffix in (".png", "-naw.png"):
        assert (tmp_path / f"{stem}{suffix}").stat().st_size > 5000
    assert "noise (asked)" in capsys.readouterr().out
