"""--seeds 0,1: one run per seed in <out>/seed-<n>, summary.json / summary.md with mean and sd;
the same command again continues the sweep."""
import json
import statistics

import pytest

from nla_fast import train
from nla_fast.settings import parse_command_line

TINY = ["--dataset", "synthetic", "--num-samples", "16", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "8", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--epochs", "1"]
TIMING = {"samples_per_s", "seconds", "train_seconds", "eval_seconds", "first_step_s"}

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def rows(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_one_run_per_seed_and_a_summary_with_mean_and_sd(tmp_path, capsys):
    sweep = tmp_path / "sweep"
    assert train.main(TINY + ["--seeds", "0,1", "--out", str(sweep)]) == 0
    single = tmp_path / "single"
    assert train.main(TINY + ["--seed", "1", "--out", str(single)]) == 0
    assert rows(sweep / "seed-1") == rows(single)  # a seed's run is the plain run with --seed
    assert json.loads((sweep / "seed-0" / "config.json").read_text())["train"]["seed"] == 0

    summary = json.loads((sweep / "summary.json").read_text())
    assert summary["seeds"] == [0, 1] and summary["best_split"] == "test"
    finals = [rows(sweep / f"seed-{seed}")[-1]["test_acc"] for seed in (0, 1)]
    assert [run["final_test_acc"] for run in summary["runs"]] == finals
    assert summary["mean_sd"]["final_test_acc"]["mean"] == pytest.approx(statistics.fmean(finals))
    assert summary["mean_sd"]["final_test_acc"]["sd"] == pytest.approx(statistics.stdev(finals))
    table = (sweep / "summary.md").read_text()
    assert "| final test accuracy |" in table and "±" in table and "seed 1" in table

    # the same command again: both seeds are finished, nothing is trained, the summary is the same
    capsys.readouterr()
    (sweep / "summary.json").unlink()
    assert train.main(TINY + ["--seeds", "0,1", "--out", str(sweep)]) == 0
    assert capsys.readouterr().out.count("nothing left to train") == 2
    assert json.loads((sweep / "summary.json").read_text()) == summary


def test_seeds_are_checked_when_parsed(capsys):
    assert parse_command_line(["--seeds", "0, 1,2"]).seeds == (0, 1, 2)
    for bad, words in (("0,0", "twice"), ("a,b", "integer"), ("", "expected seeds")):
        with pytest.raises(SystemExit):
            parse_command_line([f"--seeds={bad}"])
        assert words in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_command_line(["--seeds", "0,1", "--seed", "3"])
    assert "cannot be combined with --seed" in capsys.readouterr().err
