"""Export a trained checkpoint for use outside nla_fast: ``python -m nla_fast.export`` / ``nla-export``.

    python -m nla_fast.export --checkpoint runs/x/best.pt --format safetensors [--out DIR]
    python -m nla_fast.export --checkpoint runs/x/best.pt --format onnx
    python -m nla_fast.export --checkpoint runs/x/best.pt --format torchscript

Every format writes, into ``--out`` (default: ``export/`` next to the checkpoint):

- ``model.json``: class names, image size, mean/std, the preprocessing in words, the
  checkpoint's epoch and SHA-256, and the run's training settings;
- ``safetensors``: ``model.safetensors``, the network's weights only (no optimiser, no
  pickle); :func:`load_exported` rebuilds the model from it and ``model.json``;
- ``onnx``: ``model.onnx`` (input ``images``: float32 N x 3 x S x S, normalised; output
  ``logits``: N x C; the batch axis is dynamic), checked through onnxruntime on the CPU;
- ``torchscript``: ``model.torchscript.pt`` (traced; ``model.json`` is also stored inside
  it), checked with ``torch.jit.load``.

Each export is checked against the PyTorch model on a batch of synthetic faces of another
batch size than the one traced, and the largest absolute logit difference is printed.
The ``safetensors`` and ``onnx`` formats need the extras of the same names
(``pip install 'nla_fast[onnx]'``).
"""
from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import sys
from pathlib import Path

import torch

from . import atomic
from . import checkpoint as ckpt
from .cli import HelpFormatter
from .device import pick_device
from .messages import short_error
from .model import build_resnet18

FORMAT = "nla_fast.export/1"
FORMATS = ("safetensors", "onnx", "torchscript")
FILES = {"safetensors": "model.safetensors", "onnx": "model.onnx", "torchscript": "model.torchscript.pt"}
METADATA_FILE = "model.json"
EXTRAS = {"safetensors": ("safetensors",), "onnx": ("onnx", "onnxruntime")}
TRACE_BATCH = 2  # traced with 2 images, checked with another count: proves the batch axis is dynamic
CHECK_BATCH = 8
# largest |logit difference| accepted, times max(1, largest |logit|): float32 kernels of
# onnxruntime / TorchScript sum in other orders than eager PyTorch (typically ~1e-6 here)
TOLERANCE = 1e-3
PREPROCESSING = (
    "RGB uint8 face crop -> resized to image_size x image_size (bilinear, antialiased) -> "
    "float pixels / 255 -> (x - mean) / std per channel -> N x 3 x H x W float32"
)


class ExportError(ValueError):
    """A checkpoint or an export folder cannot be used; the message names the file."""


class ExportCheckError(ExportError):
    """An export's logits differ from PyTorch's by more than the tolerance."""


class MissingExtraError(ImportError):
    """An optional package is missing; the message names the extra that installs it."""


def require_extra(fmt: str) -> None:
    """Import the packages ``fmt`` needs, or raise :class:`MissingExtraError` naming the extra."""
    missing = []
    for name in EXTRAS.get(fmt, ()):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        raise MissingExtraError(
            f"the {fmt} format needs the package{'s' if len(missing) > 1 else ''} {' and '.join(missing)}: "
            f"pip install 'nla_fast[{fmt}]'"
        )


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def read_checkpoint(path) -> tuple[dict, dict]:
    """``(state_dict, metadata)`` of an nla_fast checkpoint; :class:`ExportError` naming the file otherwise."""
    path = Path(path)
    if not path.is_file():
        raise ExportError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = ckpt.load(path)
        info = state["model_info"]
        weights = state["model"]
        metadata = {
            "format": FORMAT,
            "arch": info.get("arch", "resnet18"),
            "num_classes": int(info["num_classes"]),
            "classes": [str(name) for name in info["classes"]],
            "image_size": int(info["image_size"]),
            "mean": [float(v) for v in info["mean"]],
            "std": [float(v) for v in info["std"]],
            "dataset": info.get("dataset"),
            "preprocessing": PREPROCESSING,
            "input": {"name": "images", "dtype": "float32", "shape": ["N", 3, int(info["image_size"]), int(info["image_size"])]},
            "output": {"name": "logits", "dtype": "float32", "shape": ["N", int(info["num_classes"])]},
            "epoch": int(state["epoch"]),
            "best": state.get("best"),
            "checkpoint": {"file": path.name, "sha256": _sha256(path)},
            "training": state.get("config", {}),
        }
    except ckpt.CheckpointError as err:
        raise ExportError(str(err)) from err
    except (KeyError, TypeError, ValueError) as err:  # a readable file without a model in it
        raise ExportError(f"cannot read checkpoint {str(path)!r}: {ckpt.damage(err)}") from err
    if metadata["arch"] != "resnet18":
        raise ExportError(f"checkpoint {str(path)!r} holds a {metadata['arch']!r} network; only resnet18 is known")
    if len(metadata["classes"]) != metadata["num_classes"]:
        raise ExportError(f"checkpoint {str(path)!r}: {len(metadata['classes'])} class names for "
                          f"{metadata['num_classes']} classes")
    return weights, metadata


def _network(weights: dict, metadata: dict, source: str) -> torch.nn.Module:
    model = build_resnet18(metadata["num_classes"])
    try:
        model.load_state_dict(weights)
    except RuntimeError as err:
        raise ExportError(f"the weights in {source} do not fit a {metadata['num_classes']}-class ResNet-18: "
                          f"{short_error(err)}") from err
    return model.eval()


def _eval_transform(metadata: dict, channels_last: bool = True):
    from . import augment

    return augment.EvalTransform(int(metadata["image_size"]), mean=tuple(metadata["mean"]),
                                 std=tuple(metadata["std"]), channels_last=channels_last)


def _attach(model: torch.nn.Module, metadata: dict) -> torch.nn.Module:
    """Attach what :func:`nla_fast.evaluation.load_model` attaches to a checkpoint's model."""
    model.classes = list(metadata["classes"])
    model.image_size = int(metadata["image_size"])
    model.eval_transform = _eval_transform(metadata)
    model.checkpoint_epoch = metadata["epoch"]
    return model


def _write_json(metadata: dict, path: Path) -> None:
    atomic.write_text(path, json.dumps(metadata, indent=2, default=str) + "\n")


def check_batch(metadata: dict, count: int = CHECK_BATCH) -> torch.Tensor:
    """``count`` synthetic faces as the network sees them (float32 N x 3 x S x S, normalised), seeded."""
    from .data.synthetic import generate

    faces = generate("test", num_samples=count, seed=1234, resolution=metadata["image_size"])["images"]
    return _eval_transform(metadata, channels_last=False)(faces).contiguous()


def _compare(name: str, expected: torch.Tensor, got, verbose: bool) -> float:
    got = torch.as_tensor(got, dtype=torch.float32)
    if got.shape != expected.shape:
        raise ExportError(f"{name} returned logits of shape {tuple(got.shape)}, expected {tuple(expected.shape)}")
    diff = float((got - expected).abs().max())
    limit = TOLERANCE * max(1.0, float(expected.abs().max()))
    if verbose:
        print(f"nla_fast.export: {name} vs PyTorch on {len(expected)} images: max |logit difference| = {diff:.3g} "
              f"(tolerance {limit:.3g})")
    if not diff <= limit:
        raise ExportCheckError(f"{name} differs from PyTorch by {diff:.3g} (more than {limit:.3g})")
    return diff


def export_safetensors(weights: dict, metadata: dict, out: Path) -> Path:
    require_extra("safetensors")
    from safetensors.torch import save_file

    target = out / FILES["safetensors"]
    tensors = {name: value.detach().cpu().contiguous() for name, value in weights.items()}
    # the checkpoint's digest is stored in both files so load_exported can tell they belong together
    header = {"format": "pt", "nla_fast": FORMAT, "checkpoint_sha256": metadata["checkpoint"]["sha256"]}
    with atomic.target(target) as tmp:
        save_file(tensors, str(tmp), metadata=header)
    return target


def export_onnx(model: torch.nn.Module, metadata: dict, out: Path) -> Path:
    require_extra("onnx")
    import onnx

    target = out / FILES["onnx"]
    size = metadata["image_size"]
    example = torch.zeros(TRACE_BATCH, 3, size, size)
    options = dict(input_names=["images"], output_names=["logits"], opset_version=17,
                   dynamic_axes={"images": {0: "batch"}, "logits": {0: "batch"}})
    with atomic.target(target) as tmp, torch.no_grad():
        try:
            # the TorchScript-based exporter: the torch.export-based one needs onnxscript, which the
            # onnx extra does not install (deprecated since torch 2.9, still present)
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", DeprecationWarning)
                torch.onnx.export(model, (example,), str(tmp), dynamo=False, **options)
        except TypeError:  # torch 2.4 has no `dynamo` argument and only that exporter
            torch.onnx.export(model, (example,), str(tmp), **options)
        graph = onnx.load(str(tmp))
        onnx.checker.check_model(graph)
        onnx.helper.set_model_props(graph, {"nla_fast": json.dumps({k: v for k, v in metadata.items() if k != "training"})})
        onnx.save(graph, str(tmp))
    return target


def export_torchscript(model: torch.nn.Module, metadata: dict, out: Path) -> Path:
    target = out / FILES["torchscript"]
    size = metadata["image_size"]
    with torch.no_grad(), _quiet_jit():
        traced = torch.jit.trace(model, torch.zeros(TRACE_BATCH, 3, size, size))
    with atomic.target(target) as tmp, _quiet_jit():
        torch.jit.save(traced, str(tmp), _extra_files={METADATA_FILE: json.dumps(metadata, default=str)})
    return target


@contextlib.contextmanager
def _quiet_jit():
    """TorchScript is what this format asks for: torch >= 2.9's deprecation notes would only be noise."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=FutureWarning, message=r"`torch\.jit\.")
        yield


def export(checkpoint, fmt: str, out=None, check_count: int = CHECK_BATCH, verbose: bool = True) -> dict:
    """Export ``checkpoint`` as ``fmt``; returns ``{"files": [...], "max_abs_diff": float}``.

    Raises :class:`ExportError` (unreadable checkpoint), :class:`ExportCheckError` (the check failed) or
    :class:`MissingExtraError` (the format's packages are not installed).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {FORMATS}, got {fmt!r}")
    require_extra(fmt)  # before any work: a missing package is the cheapest thing to report
    checkpoint = Path(checkpoint)
    weights, metadata = read_checkpoint(checkpoint)
    out = Path(out) if out is not None else checkpoint.parent / "export"
    model = _network(weights, metadata, repr(str(checkpoint)))
    images = check_batch(metadata, check_count)
    with torch.no_grad():
        expected = model(images)
    if fmt == "safetensors":
        target = export_safetensors(weights, metadata, out)
        _write_json(metadata, out / METADATA_FILE)
        with torch.no_grad():  # both in channels_last, as load_model and load_exported place them
            expected = model.to(memory_format=torch.channels_last)(images)
            got = load_exported(out, device="cpu")(images)
        diff = _compare("safetensors via load_exported", expected, got, verbose)
    elif fmt == "onnx":
        import onnxruntime

        target = export_onnx(model, metadata, out)
        _write_json(metadata, out / METADATA_FILE)
        session = onnxruntime.InferenceSession(str(target), providers=["CPUExecutionProvider"])
        diff = _compare("onnxruntime", expected, session.run(["logits"], {"images": images.numpy()})[0], verbose)
    else:
        target = export_torchscript(model, metadata, out)
        _write_json(metadata, out / METADATA_FILE)
        with torch.no_grad(), _quiet_jit():
            got = torch.jit.load(str(target), map_location="cpu")(images)
        diff = _compare("TorchScript", expected, got, verbose)
    files = [target, out / METADATA_FILE]
    if verbose:
        print(f"nla_fast.export: wrote {', '.join(str(f) for f in files)}")
    return {"files": files, "max_abs_diff": diff}


def load_exported(folder, device: str | torch.device = "auto") -> torch.nn.Module:
    """The network of an export folder (``model.safetensors`` + ``model.json``) in eval mode, with
    ``classes``, ``image_size``, ``eval_transform`` and ``checkpoint_epoch`` attached as
    :func:`nla_fast.evaluation.load_model` attaches them. ``folder`` may also name a file in it."""
    folder = Path(folder)
    if folder.is_file():
        folder = folder.parent
    meta_path, weights_path = folder / METADATA_FILE, folder / FILES["safetensors"]
    for path in (meta_path, weights_path):
        if not path.is_file():
            raise FileNotFoundError(f"export file {str(path)!r} does not exist "
                                    f"(python -m nla_fast.export --format safetensors writes it)")
    try:
        metadata = json.loads(meta_path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as err:
        raise ExportError(f"{str(meta_path)!r} is not valid JSON: {short_error(err)}") from err
    if not isinstance(metadata, dict) or metadata.get("format") != FORMAT:
        raise ExportError(f"{str(meta_path)!r} is not an nla_fast export description (no format {FORMAT!r})")
    require_extra("safetensors")
    from safetensors import safe_open

    try:
        with safe_open(str(weights_path), framework="pt", device="cpu") as handle:
            header = handle.metadata() or {}
            weights = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:  # safetensors raises its own error types for damaged headers
        raise ExportError(f"cannot read {str(weights_path)!r}: {short_error(err)}") from err
    expected_sha = metadata.get("checkpoint", {}).get("sha256")
    if header.get("checkpoint_sha256") != expected_sha:
        raise ExportError(f"{str(weights_path)!r} and {str(meta_path)!r} come from different checkpoints "
                          "(their checkpoint_sha256 differ): export again into an empty folder")
    model = _network(weights, metadata, repr(str(weights_path)))
    model = model.to(pick_device(device), memory_format=torch.channels_last).eval()
    return _attach(model, metadata)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m nla_fast.export",
        description="Export an nla_fast checkpoint as safetensors weights, ONNX or TorchScript, "
                    "with a model.json of class names, input size and normalisation.",
        formatter_class=HelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, metavar="PATH", help="checkpoint written by nla_fast.train (e.g. best.pt)")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder (default: export/ next to the checkpoint)")
    p.add_argument("--check-images", type=int, default=CHECK_BATCH, metavar="N",
                   help="how many synthetic faces to compare the export with PyTorch on")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.check_images < 1:
        print("nla_fast.export: error: --check-images must be at least 1", file=sys.stderr)
        return 2
    try:
        export(args.checkpoint, args.format, args.out, args.check_images)
    except (MissingExtraError, FileNotFoundError) as err:
        print(f"nla_fast.export: error: {err}", file=sys.stderr)
        return 2
    except ExportCheckError as err:
        print(f"nla_fast.export: error: {err}", file=sys.stderr)
        return 1
    except ExportError as err:
        print(f"nla_fast.export: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # an output folder that cannot be written
        print(f"nla_fast.export: error: {short_error(err)}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
