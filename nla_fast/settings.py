"""The settings of a training run: what they are, how the command line fills them, and how a
resumed run merges its saved settings with the flags typed this time. ``train`` imports this
module; it imports none of the programs.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
import typing
from dataclasses import dataclass
from pathlib import Path

import torch

from . import arg_types
from .cli import HelpFormatter
from .config import NLAConfig
from .data import DATASETS
from .device import DEVICE_CHOICES, device_type

# The paper's recipe: the defaults of a run on CUDA or on a real dataset.
PAPER_RECIPE = {"image_size": 224, "epochs": 60, "batch_size": 32, "lr": 1e-4, "weight_decay": 1e-4, "gamma": 0.9}
# A synthetic-data run that finishes in about three minutes on 2 CPU cores (used when CUDA is
# absent and the dataset is synthetic; every value can still be set on the command line). It
# averages the consistency term over the batch, which a network trained from scratch needs to
# learn every class in a few epochs (the measurements: bench/NOTES.md).
CPU_QUICK_RUN = {"image_size": 64, "epochs": 6, "num_samples": 1600, "lr": 1e-3, "batch_size": 16,
                 "consistency_reduction": "mean"}
# Settings whose default depends on the device (filled in by TrainSettings.resolve).
DEVICE_DEFAULTS = ("amp", "cuda_graphs", "log_every", "backend", "compile")
# Settings that are also options of a dataset loader (see nla_fast.data.DATASET_OPTIONS); a
# loader receives those of them that it accepts and that are set.
LOADER_SETTINGS = ("label_mode", "num_classes", "num_samples")
# Settings that change the training split's labels or samples (nla_fast.data.protocols).
PROTOCOL_SETTINGS = ("noise_rate", "noise_seed", "noise_file", "imbalance_factor", "imbalance_seed")


@dataclass
class TrainSettings:
    """Everything a run depends on. ``None`` means 'the default for this device' (see ``resolve``)."""

    dataset: str = "synthetic"
    data_root: str | None = None
    out: str | None = None
    epochs: int | None = None
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float = PAPER_RECIPE["weight_decay"]
    gamma: float = PAPER_RECIPE["gamma"]
    image_size: int | None = None
    weights: str = "none"
    device: str = "auto"
    seed: int = 0
    limit_train: int | None = None
    limit_test: int | None = None
    loss: str = "nla"
    preset: str = "paper"
    consistency: str = "official"
    consistency_reduction: str | None = None  # None: the consistency variant's own (NLAConfig)
    views: str = "concat"
    amp: str | None = None
    compile: bool | None = None
    cuda_graphs: bool | None = None
    backend: str | None = None
    noise_rate: float = 0.0
    noise_seed: int = 0
    noise_file: str | None = None
    imbalance_factor: float | None = None
    imbalance_seed: int = 0
    label_mode: str | None = None
    num_classes: int | None = None
    num_samples: int | None = None
    eval_batch_size: int = 256
    log_every: int | None = None
    plot_every: int = 1
    progress: bool = True
    sync_bn: bool = False
    tensorboard: bool = False

    def resolve(self, device: torch.device) -> "TrainSettings":
        """A copy with every device-dependent default filled in."""
        on_cuda = device.type == "cuda"
        quick = not on_cuda and self.dataset == "synthetic"
        filled = dataclasses.replace(self)
        for name, value in (PAPER_RECIPE | CPU_QUICK_RUN if quick else PAPER_RECIPE).items():
            if getattr(filled, name) is None:
                setattr(filled, name, value)
        if filled.amp is None:
            filled.amp = "bf16" if on_cuda else "off"
        if filled.cuda_graphs is None:
            filled.cuda_graphs = on_cuda
        if filled.compile is None:
            # On the CPU, Inductor's C++ compilation (minutes on 2 cores) costs more than it saves
            # in a demo-sized run.
            filled.compile = on_cuda
        if filled.backend is None:
            # On the CPU the loss is a negligible share of a step: the eager reference avoids
            # compiling the native extension on a first run.
            filled.backend = "auto" if on_cuda else "reference"
        if filled.log_every is None:
            filled.log_every = 50 if on_cuda else 1
        if filled.out is None:
            filled.out = str(Path("runs") / f"{self.dataset}-{time.strftime('%Y%m%d-%H%M%S')}")
        return filled

    @classmethod
    def from_dict(cls, values: dict) -> "TrainSettings":
        """Settings saved in a checkpoint (keys this version does not know are ignored)."""
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in names})

    def split_arguments(self, split: str) -> dict:
        """The keyword arguments of ``nla_fast.data.splits.load_split`` for ``split`` of this
        run's dataset: the loader's options, ``--limit-train`` / ``--limit-test``, and on the
        training split only the noise and imbalance protocols."""
        arguments = {name: getattr(self, name) for name in LOADER_SETTINGS}
        arguments["limit"] = self.limit_train if split == "train" else self.limit_test
        if split == "train":
            arguments.update({name: getattr(self, name) for name in PROTOCOL_SETTINGS})
        return arguments

    def nla_config(self) -> NLAConfig:
        if self.preset == "official":
            return NLAConfig.official(consistency=self.consistency, consistency_reduction=self.consistency_reduction)
        return NLAConfig(consistency=self.consistency, consistency_reduction=self.consistency_reduction)


# each setting's types, from its annotation: int | None -> (int, NoneType)
_SETTING_TYPES = {name: typing.get_args(hint) or (hint,) for name, hint in typing.get_type_hints(TrainSettings).items()}


# ----------------------------------------------------------------------------------------------
# Command line
# ----------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CommandLine:
    settings: TrainSettings
    resume: str | None  # checkpoint to continue from
    explicit: frozenset  # settings typed on the command line (they override a resumed run's)
    overwrite: bool = False  # a new run may replace an earlier run's results in --out


def parse_command_line(argv: list[str]) -> CommandLine:
    """Settings from ``argv``, and which of them were typed: the same parser built with every
    default ``SUPPRESS``ed leaves out of its result exactly the options not given."""
    parser = build_parser()
    args = vars(parser.parse_args(argv))  # reports errors and prints --help
    typed = vars(build_parser(defaults=False).parse_args(argv))
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    settings = TrainSettings(**{k: v for k, v in args.items() if k in names})
    if args["config"] is not None:
        if args["resume"] is not None:
            parser.error("--config and --resume cannot be combined: a resumed run takes its checkpoint's settings")
        try:
            settings, notes = settings_from_config_file(args["config"], settings, typed)
        except ConfigFileError as err:
            parser.error(str(err))
        if os.environ.get("RANK", "0") == "0":
            for note in notes:
                print(note, file=sys.stderr)
    return CommandLine(settings, args["resume"], frozenset(typed), bool(args["overwrite"]))


def build_parser(defaults: bool = True) -> argparse.ArgumentParser:
    """The command line of ``python -m nla_fast.train``. ``defaults=False``: every option's
    default is ``argparse.SUPPRESS`` (the result holds only the options given)."""
    p = argparse.ArgumentParser(
        prog="python -m nla_fast.train",
        description="Train ResNet-18 with the NLA loss (Navigating Label Ambiguity, AAAI 2025). "
        "With no arguments and no GPU: a few-minute demonstration on synthetic data; "
        f"on a GPU: the paper's recipe ({_recipe_in_words()}).",
        formatter_class=HelpFormatter,
        argument_default=argparse.SUPPRESS,
    )
    _data_flags(p.add_argument_group("data"))
    _run_flags(p.add_argument_group("run"))
    _recipe_flags(p.add_argument_group("recipe"))
    _speed_flags(p.add_argument_group("speed"))
    if defaults:
        p.set_defaults(**dataclasses.asdict(TrainSettings()), resume=None, overwrite=False, config=None)
    return p


def _recipe_in_words() -> str:
    r = PAPER_RECIPE
    return (f"{r['image_size']} px, {r['epochs']} epochs, batch {r['batch_size']}, Adam {r['lr']:g} with L2 "
            f"{r['weight_decay']:g}, ExponentialLR {r['gamma']:g}")


def _recipe_default(name: str) -> str:
    return f"default: {PAPER_RECIPE[name]:g}; {CPU_QUICK_RUN[name]:g} for the CPU synthetic demo"


def _data_flags(data) -> None:
    data.add_argument("--dataset", choices=DATASETS, help="dataset to train and test on")
    data.add_argument("--data-root", metavar="DIR",
                      help="folder holding the dataset in its original layout (not needed for synthetic)")
    data.add_argument("--image-size", type=arg_types.image_size, metavar="PX",
                      help=f"side of the square network input ({_recipe_default('image_size')})")
    data.add_argument("--limit-train", type=arg_types.positive_int, metavar="N",
                      help="train on a fixed, seeded subset of N training samples (smoke runs)")
    data.add_argument("--limit-test", type=arg_types.positive_int, metavar="N",
                      help="evaluate on a fixed, seeded subset of N test samples (smoke runs)")
    data.add_argument("--noise-rate", type=arg_types.probability_below_one, metavar="P",
                      help="replace each training label with probability P by a different class")
    data.add_argument("--noise-seed", type=int, metavar="SEED", help="seed of the label noise")
    data.add_argument("--noise-file", metavar="PATH",
                      help="read noisy training labels from a file of 'name label' lines (RAF-DB format)")
    data.add_argument("--imbalance-factor", type=arg_types.at_least_one, metavar="RHO",
                      help="subsample the training set to an exponential long tail with n_max/n_min = RHO")
    data.add_argument("--imbalance-seed", type=int, metavar="SEED", help="seed of the imbalance subsample")
    data.add_argument("--label-mode", choices=("majority", "argmax", "soft"),
                      help="FERPlus labels: the dataset authors' majority rule (the loader's default), "
                      "plurality (argmax) or the vote distribution (soft: cross-entropy on it, needs --loss ce; evaluation "
                      "uses the argmax labels)")
    data.add_argument("--num-classes", type=int, choices=(7, 8),
                      help="FERPlus / AffectNet: 7 basic expressions or 8 with contempt (the loader's default)")
    data.add_argument("--num-samples", type=arg_types.positive_int, metavar="N",
                      help="synthetic: number of training samples (default: the data module's; "
                      f"{CPU_QUICK_RUN['num_samples']} in the CPU demo)")


def _run_flags(run) -> None:
    run.add_argument("--out", metavar="DIR", help="output folder (default: runs/<dataset>-<time>)")
    run.add_argument("--device", choices=DEVICE_CHOICES, help="where to train; auto picks CUDA when present")
    run.add_argument("--seed", type=int, help="seed of initialisation, order and augmentation")
    run.add_argument("--resume", metavar="PATH",
                     help="continue a run exactly from its checkpoint (e.g. runs/x/last.pt); its settings "
                     "are reused, flags given here override them (e.g. --epochs)")
    run.add_argument("--overwrite", action="store_true",
                     help="start a new run in an --out folder that already holds one, removing its checkpoints, "
                     "metrics and plots first (without it such a folder is refused)")
    run.add_argument("--config", metavar="JSON",
                     help="start a run with the settings of a run's config.json (e.g. runs/x/config.json) or of a "
                     "JSON object of settings (the keys of config.json's \"train\"); flags given here override "
                     "them; its output folder is not taken (the new run gets its own --out)")
    run.add_argument("--tensorboard", action="store_true",
                     help="also log the per-epoch metrics and the figures to <out>/tensorboard "
                     "(needs pip install 'nla_fast[tensorboard]')")
    run.add_argument("--log-every", type=arg_types.positive_int, metavar="N",
                     help="read progress back from the device every N steps (default: 50 on CUDA, 1 on CPU)")
    run.add_argument("--plot-every", type=arg_types.non_negative_int, metavar="N",
                     help="draw the plots every N epochs (and always after the last); 0: only at the end")
    run.add_argument("--eval-batch-size", type=arg_types.positive_int, metavar="N", help="batch size of evaluation")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="hide the tqdm progress bar (shown when stderr is a terminal; otherwise one line per "
                     "epoch is printed)")


def _recipe_flags(recipe) -> None:
    recipe.add_argument("--epochs", type=arg_types.positive_int, metavar="N",
                        help=f"epochs ({_recipe_default('epochs')})")
    recipe.add_argument("--batch-size", type=arg_types.positive_int, metavar="N",
                        help="training batch size, images per view; batches are always full, the remainder of "
                        f"each epoch's order is dropped ({_recipe_default('batch_size')})")
    recipe.add_argument("--lr", type=arg_types.positive_float,
                        help=f"Adam learning rate of epoch 0 ({_recipe_default('lr')})")
    recipe.add_argument("--weight-decay", type=arg_types.non_negative_float, metavar="WD", help="Adam's L2 weight decay")
    recipe.add_argument("--gamma", type=arg_types.decay_factor, help="ExponentialLR factor, applied once per epoch")
    recipe.add_argument("--weights", metavar="{none,imagenet,PATH}",
                        help="backbone initialisation: none (random), imagenet (torchvision), or a checkpoint file "
                        "such as resnet18_msceleb.pth (the paper's; 'module.' is stripped, fc.* dropped)")
    recipe.add_argument("--loss", choices=("nla", "ce"),
                        help="nla: NAW + consistency; ce: plain cross-entropy on one view (baseline)")
    recipe.add_argument("--preset", choices=("paper", "official"),
                        help="loss constants: paper (as published) or official (the public code's sigma=0.91)")
    recipe.add_argument("--consistency", choices=("official", "jsd"),
                        help="consistency term: official (KL to the logit-mean softmax, summed) or jsd")
    recipe.add_argument("--consistency-reduction", choices=("sum", "mean"),
                        help="the consistency term over the batch: summed (the official variant's own, as the "
                        "reference code) or averaged (the jsd variant's own; independent of the batch size). "
                        "Default: the variant's own (the CPU synthetic demo: mean). Under torchrun the sum is over "
                        "the global batch")
    recipe.add_argument("--views", choices=("concat", "separate"),
                        help="concat: both views in one forward (BatchNorm statistics over both); "
                        "separate: two forwards, as the reference code")


def _speed_flags(speed) -> None:
    speed.add_argument("--amp", choices=("bf16", "fp16", "off"),
                       help="autocast precision (default: bf16 on CUDA, off on CPU)")
    speed.add_argument("--compile", dest="compile", action=argparse.BooleanOptionalAction,
                       help="torch.compile the forward, loss and evaluation with Inductor (default: on with CUDA, "
                       "inside the captured step; off on CPU). The first step compiles (tens of seconds, cached "
                       "in $TORCHINDUCTOR_CACHE_DIR, default <cache>/inductor); --no-compile switches it off")
    speed.add_argument("--cuda-graphs", dest="cuda_graphs", action=argparse.BooleanOptionalAction,
                       help="capture the whole training step as one CUDA graph (default: on with CUDA)")
    speed.add_argument("--sync-bn", dest="sync_bn", action="store_true",
                       help="torchrun with several GPUs: SyncBatchNorm, BatchNorm statistics over the global "
                       "batch instead of each GPU's (CUDA only; no effect in a one-process run)")
    speed.add_argument("--backend", choices=("auto", "triton", "extension", "reference"),
                       help="implementation of the NLA loss (default: auto on CUDA, i.e. the fused Triton kernel; "
                       "reference on CPU, where the loss is a negligible share of the step)")


# ----------------------------------------------------------------------------------------------
# A resumed run's settings
# ----------------------------------------------------------------------------------------------
def settings_for_resume(settings: TrainSettings, saved_config: dict, resume: str, explicit) -> tuple:
    """(settings, notes): the checkpoint's settings (``saved_config`` is its ``config``),
    overridden by the flags typed this time; the notes say which differ."""
    notes = []
    saved = TrainSettings.from_dict(saved_config["train"])
    trained_with = (saved_config.get("nla") or {}).get("consistency_reduction")
    if saved.consistency_reduction is None and trained_with is not None:
        # saved before the CPU demo averaged the term by default: continue with the one it used
        saved = dataclasses.replace(saved, consistency_reduction=trained_with)
    overrides = {name: getattr(settings, name) for name in explicit if hasattr(saved, name)}
    if "out" not in overrides:
        overrides["out"] = str(Path(resume).resolve().parent)
    for name, value in overrides.items():
        if getattr(saved, name) != value and name not in ("out", "progress"):
            notes.append(f"nla_fast: resume: {name} = {value!r} (the checkpoint had {getattr(saved, name)!r})")
    settings = dataclasses.replace(saved, **overrides)
    if device_type(settings.device) != saved_config.get("device_type"):
        # continuing on another kind of device: its own precision / graph defaults
        fresh = {name: None for name in DEVICE_DEFAULTS if name not in overrides}
        settings = dataclasses.replace(settings, **fresh)
    return settings, notes


class SettingsError(ValueError):
    """Settings that cannot work together; the message says which and what works."""


class ResumeError(SettingsError):
    """``--resume`` with settings that cannot continue the checkpoint's run; the message says why."""


def check_label_mode(s: TrainSettings) -> None:
    """``--label-mode soft`` trains on FERPlus's vote distributions, which only cross-entropy
    can use: refuse what would silently train on the argmax labels instead."""
    if s.label_mode != "soft":
        return
    if s.dataset != "ferplus":
        raise SettingsError(f"--label-mode soft is a FERPlus option (its vote distributions); {s.dataset} has one "
                            "label per image")
    if s.loss != "ce":
        raise SettingsError(
            f"--label-mode soft needs --loss ce (cross-entropy on the vote distribution); the NLA loss (--loss "
            f"{s.loss}) is defined for one label per image: use --label-mode majority or argmax with it")
    if s.noise_rate or s.noise_file:
        raise SettingsError("--label-mode soft trains on the vote distributions, which label noise "
                            "(--noise-rate / --noise-file) does not change: use --label-mode majority or argmax")


# Settings that decide how many samples an epoch has and how they are cut into steps: a
# checkpoint written mid-epoch can only continue with the values it was written with.
EPOCH_SHAPE_SETTINGS = ("batch_size", "limit_train", "num_samples", "imbalance_factor", "label_mode")


def check_resume(settings: TrainSettings, state: dict, resume: str) -> None:
    """Refuse a resume that would not continue the checkpoint's run (``settings``: merged by
    ``settings_for_resume``; ``state``: the checkpoint). Raises :class:`ResumeError`."""
    saved = TrainSettings.from_dict(state["config"]["train"])
    if settings.dataset != saved.dataset:
        raise ResumeError(
            f"{resume} was trained on {saved.dataset}, not {settings.dataset}: --resume continues the same run "
            f"(its classes would change meaning). To fine-tune from its weights, start a new run with "
            f"--weights {resume}")
    if not state["epoch_done"] and state["step"] > 0:
        changed = [name for name in EPOCH_SHAPE_SETTINGS if getattr(settings, name) != getattr(saved, name)]
        if changed:
            what = ", ".join(f"--{name.replace('_', '-')} {getattr(settings, name)} (it had {getattr(saved, name)})"
                             for name in changed)
            raise ResumeError(
                f"{resume} was written mid-epoch (epoch {state['epoch']}, step {state['step']}); {what} would change "
                f"that epoch's samples or steps, so the rest of it cannot be trained exactly: resume without "
                f"changing {', '.join('--' + n.replace('_', '-') for n in changed)}, or from a checkpoint written at "
                f"the end of an epoch")


def check_resume_classes(classes: list, state: dict, resume: str, dataset: str) -> None:
    """Refuse a resume whose data has other classes than the checkpoint's model (e.g. another
    ``--num-classes``). Raises :class:`ResumeError`."""
    saved = list(state["model_info"]["classes"])
    if list(classes) != saved:
        raise ResumeError(
            f"{resume} classifies {len(saved)} classes {saved}; this run's {dataset} data has {len(classes)} "
            f"{list(classes)}: --resume continues the same run. To fine-tune from its weights, start a new run "
            f"with --weights {resume}")


# ----------------------------------------------------------------------------------------------
# --config: a run's settings from a JSON file
# ----------------------------------------------------------------------------------------------
class ConfigFileError(ValueError):
    """A --config file that cannot be used (unreadable, not JSON, unknown key, wrong type)."""


# top-level keys of a run's config.json (see train._run_config); only "train" holds settings
RUN_CONFIG_KEYS = ("train", "nla", "device_type", "world_size", "environment", "command_line", "model_selection")
# settings a --config file does not carry over to a new run: it writes into its own folder
NOT_FROM_CONFIG = ("out",)
def _check_setting_type(name: str, value, path) -> None:
    """Refuse a value of the wrong JSON type for setting ``name`` (its annotation: ``int | None``...)."""
    allowed = _SETTING_TYPES[name]
    if float in allowed:
        allowed += (int,)  # JSON writes 1.0 as 1
    # a true/false is a Python int: only a bool setting takes it
    if not isinstance(value, allowed) or (isinstance(value, bool) and bool not in allowed):
        names = " or ".join("null" if kind is type(None) else kind.__name__ for kind in _SETTING_TYPES[name])
        raise ConfigFileError(f"{path}: setting {name!r} = {json.dumps(value)} should be {names}")


def settings_from_config_file(path, settings: TrainSettings, explicit) -> tuple:
    """(settings, notes): those of the JSON file ``path`` (a run's config.json, or an object of
    settings), with the flags in ``explicit`` taken from ``settings`` instead. Unknown keys are
    refused (ConfigFileError naming the key and the file)."""
    try:
        loaded = json.loads(Path(path).read_text())
    except OSError as err:
        raise ConfigFileError(f"--config {path}: cannot read it ({err.strerror or err})") from None
    except ValueError as err:
        raise ConfigFileError(f"--config {path}: not valid JSON ({err})") from None
    if not isinstance(loaded, dict):
        raise ConfigFileError(f"--config {path}: expected a JSON object, got {type(loaded).__name__}")
    names = {f.name for f in dataclasses.fields(TrainSettings)}
    if "train" in loaded:  # a run's config.json
        unknown = [key for key in loaded if key not in RUN_CONFIG_KEYS]
        values, where = loaded["train"], f"{path} (in \"train\")"
        if not isinstance(values, dict):
            raise ConfigFileError(f"--config {path}: \"train\" should be an object of settings")
    else:
        unknown, values, where = [], loaded, str(path)
    unknown += [key for key in values if key not in names]
    if unknown:
        raise ConfigFileError(f"--config {where}: unknown key {unknown[0]!r}"
                              + (f" (and {len(unknown) - 1} more)" if len(unknown) > 1 else "")
                              + f"; settings are: {', '.join(sorted(names))}")
    for name, value in values.items():
        _check_setting_type(name, value, where)
    taken = {name: value for name, value in values.items() if name not in NOT_FROM_CONFIG and name not in explicit}
    merged = dataclasses.replace(TrainSettings(), **taken)
    merged = dataclasses.replace(merged, **{name: getattr(settings, name) for name in explicit if name in names})
    notes = []
    saved_device = loaded.get("device_type")
    if saved_device is not None and saved_device != device_type(merged.device):
        # made on another kind of device: this device's own precision / graph defaults
        reset = [name for name in DEVICE_DEFAULTS if name not in explicit]
        merged = dataclasses.replace(merged, **{name: None for name in reset})
        notes.append(f"nla_fast: --config {path} was written on {saved_device}; this run uses "
                     f"{device_type(merged.device)}'s defaults for {', '.join(reset)}")
    return merged, notes


# ----------------------------------------------------------------------------------------------
# Model selection
# ----------------------------------------------------------------------------------------------
# The split best.pt is chosen on, per dataset: a validation split where the dataset's authors
# define one (FERPlus: Usage PublicTest); the others have none and select on the test split,
# as the reference code does.
VALIDATION_SPLITS = {"ferplus": "valid"}


def selection_split(dataset: str) -> str:
    from .data import canonical_name

    return VALIDATION_SPLITS.get(canonical_name(dataset), "test")


def model_selection_note(dataset: str) -> str:
    """What config.json says about how best.pt / best_mean.pt were chosen."""
    split = selection_split(dataset)
    if split == "test":
        return "test split (no validation split; as the reference code)"
    return f"{split} split; the test split is reported at the chosen epoch"
