"""``--seeds 0,1,2``: the same run once per seed, in sequence, and what the seeds agree on.

Each seed trains in ``<out>/seed-<n>`` exactly as ``--seed n --out <out>/seed-<n>`` would; then
``<out>/summary.json`` and ``<out>/summary.md`` give, per seed and as mean ± sample standard
deviation over the seeds, the final epoch's test figures and the best epochs' (``best.pt``:
overall accuracy, ``best_mean.pt``: mean class accuracy, on the split that chose them, with the
test figures there). Running the same command again continues the sweep: a finished seed is
read back, an interrupted one resumed from its ``last.pt``, the others started.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

from . import atomic
from .metrics import json_safe
from .settings import CommandLine

# (key in the summary, words, where it comes from): the last epoch's row, or the run's best
FINAL = (("final_test_acc", "final test accuracy", "test_acc"),
         ("final_test_mean_acc", "final test mean class accuracy", "test_mean_acc"),
         ("final_test_macro_f1", "final test macro F1", "test_macro_f1"))
BEST = (("best_acc", "best accuracy (best.pt)", "acc"),
        ("best_mean_acc", "best mean class accuracy (best_mean.pt)", "mean_acc"),
        ("test_acc_at_best", "test accuracy at best.pt", "test_acc_at_acc_epoch"),
        ("test_mean_acc_at_best_mean", "test mean class accuracy at best_mean.pt", "test_mean_acc_at_mean_acc_epoch"))


def run_seeds(command: CommandLine, args: list) -> int:
    """Train once per seed of ``command.seeds``; write the summary. The exit status of the first
    seed that fails or is interrupted (the sweep stops there), else 0."""
    from .train import _report, train

    if os.environ.get("WORLD_SIZE", "1") != "1":
        print("nla_fast: error: --seeds runs its seeds one after the other in one process; under torchrun start "
              "one run per seed (--seed N --out DIR/seed-N)", file=sys.stderr)
        return 2
    settings = command.settings
    root = Path(settings.out or Path("runs") / f"{settings.dataset}-seeds-{time.strftime('%Y%m%d-%H%M%S')}")
    explicit = command.explicit | {"seed", "out"}
    runs = []
    for seed in command.seeds:
        folder = root / f"seed-{seed}"
        last = folder / "last.pt"
        one = dataclasses.replace(settings, seed=seed, out=str(folder))
        resume = str(last) if last.is_file() else None
        print(f"nla_fast: --seeds: seed {seed} ({len(runs) + 1}/{len(command.seeds)}) in {folder}"
              + (f", continuing {last}" if resume else ""), flush=True)
        results = []
        status = _report(lambda: results.append(train(one, resume=resume, explicit=explicit,
                                                      overwrite=command.overwrite, command_line=args))
                         or results[-1])
        if status != 0:
            return status
        runs.append({"seed": seed, "out": str(folder), **figures(results[-1])})
    summary = summarise(runs)
    write_summary(root, summary)
    print(f"nla_fast: --seeds: {len(runs)} runs; summary: {root / 'summary.json'}, {root / 'summary.md'}")
    print(markdown_table(summary))
    return 0


def figures(result: dict) -> dict:
    """The final and best figures of one run's summary (``train.train``'s result)."""
    history, best = result["history"], result["best"]
    last = history[-1] if history else {}
    out = {key: last.get(source) for key, _, source in FINAL}
    out.update({key: best.get(source) for key, _, source in BEST})
    out["best_split"] = best.get("split", "test")
    out["epochs"] = len(history)
    return json_safe(out)


def _mean_sd(values: list) -> tuple:
    numbers = [v for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not numbers:
        return None, None
    return statistics.fmean(numbers), statistics.stdev(numbers) if len(numbers) > 1 else None


def summarise(runs: list) -> dict:
    """Per-seed figures and their mean and sample standard deviation (n - 1; None for one seed)."""
    keys = [key for key, _, _ in FINAL + BEST]
    stats = {key: dict(zip(("mean", "sd"), _mean_sd([run[key] for run in runs]))) for key in keys}
    return {"seeds": [run["seed"] for run in runs], "runs": runs, "mean_sd": stats,
            "best_split": runs[0]["best_split"] if runs else None,
            "sd": "sample standard deviation over the seeds (n - 1)"}


def _pct(value) -> str:
    return "-" if value is None else f"{100 * value:.2f}"


def markdown_table(summary: dict) -> str:
    seeds = summary["seeds"]
    lines = ["| figure (%) | " + " | ".join(f"seed {seed}" for seed in seeds) + " | mean ± sd |",
             "|---|" + "---:|" * (len(seeds) + 1)]
    for key, words, _ in FINAL + BEST:
        stats = summary["mean_sd"][key]
        spread = f"{_pct(stats['mean'])} ± {_pct(stats['sd'])}" if stats["sd"] is not None else _pct(stats["mean"])
        cells = " | ".join(_pct(run[key]) for run in summary["runs"])
        lines.append(f"| {words} | {cells} | {spread} |")
    return "\n".join(lines)


def write_summary(root: Path, summary: dict) -> None:
    atomic.write_text(root / "summary.json", json.dumps(summary, indent=2) + "\n")
    note = (f"best.pt / best_mean.pt chosen on the {summary['best_split']} split; sd: "
            f"{summary['sd']}.\n")
    atomic.write_text(root / "summary.md", f"# {len(summary['seeds'])} seeds\n\n{markdown_table(summary)}\n\n{note}")

