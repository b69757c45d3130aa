"""nla_fast.export: safetensors / ONNX / TorchScript from a tiny trained run, load_exported, errors."""
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from nla_fast import export as ex
from nla_fast import train
from nla_fast.evaluation import load_model
from nla_fast.inference import predict

TINY = ["--dataset", "synthetic", "--num-samples", "16", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "16", "--backend", "reference", "--device", "cpu", "--no-progress", "--plot-every", "0",
        "--epochs", "1"]
# ONNX vs eager PyTorch, float32 on the CPU: other summation orders in the convolutions; measured ~1e-6
ONNX_TOLERANCE = 1e-4


@pytest.fixture(scope="module")
def checkpoint(module_tmp, private_data_cache_one_thread):
    out = module_tmp("run")
    assert train.main(TINY + ["--out", str(out)]) == 0
    yield out / "best.pt"


def _inputs(model, count, seed=7):
    """Random images (not the ones the export checked on) as the network takes them: float N x 3 x S x S."""
    images = np.random.default_rng(seed).integers(0, 256, (count, 40, 40, 3), dtype=np.uint8)
    return model.eval_transform(torch.from_numpy(images)).contiguous()


def test_safetensors_round_trip_gives_identical_logits(checkpoint, tmp_path, capsys):
    out = tmp_path / "st"
    assert ex.main(["--checkpoint", str(checkpoint), "--format", "safetensors", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "max |logit difference| = 0 " in printed and str(out / "model.safetensors") in printed
    assert sorted(p.name for p in out.iterdir()) == ["model.json", "model.safetensors"]  # no temporary left

    meta = json.loads((out / "model.json").read_text())
    state = torch.load(checkpoint, weights_only=True)
    assert meta["classes"] == state["model_info"]["classes"] and meta["classes"][3] == "Happiness"
    assert meta["image_size"] == 32 and meta["mean"] == state["model_info"]["mean"]
    assert meta["std"] == state["model_info"]["std"] and meta["epoch"] == state["epoch"]
    assert meta["training"]["train"]["epochs"] == 1 and meta["training"]["nla"]["lam"] == 0.5

    from safetensors.torch import load_file

    weights = load_file(out / "model.safetensors")  # weights only: no optimiser, no random states
    assert set(weights) == set(state["model"])
    assert all(torch.equal(weights[k], state["model"][k]) for k in weights)

    reference = load_model(checkpoint, device="cpu")
    exported = ex.load_exported(out, device="cpu")
    assert exported.classes == reference.classes and exported.image_size == reference.image_size
    assert exported.checkpoint_epoch == reference.checkpoint_epoch and not exported.training
    batch = torch.from_numpy(np.random.default_rng(1).integers(0, 256, (6, 40, 40, 3), dtype=np.uint8))
    assert torch.equal(exported.eval_transform(batch), reference.eval_transform(batch))
    with torch.no_grad():
        x = reference.eval_transform(batch)
        assert torch.equal(exported(x), reference(x))
    assert predict(exported, batch) == predict(reference, batch)
    assert ex.load_exported(out / "model.json", device="cpu").classes == reference.classes  # a file in it
    via_load_model = load_model(out, device="cpu")  # load_model takes the export folder too
    with torch.no_grad():
        assert torch.equal(via_load_model(x), reference(x))
    assert via_load_model.classes == reference.classes


def test_onnx_matches_pytorch_through_onnxruntime(checkpoint, tmp_path, capsys):
    import onnx
    import onnxruntime

    out = tmp_path / "onnx"
    assert ex.main(["--checkpoint", str(checkpoint), "--format", "onnx", "--out", str(out), "--check-images", "3"]) == 0
    printed = capsys.readouterr().out
    assert "onnxruntime vs PyTorch on 3 images: max |logit difference| = " in printed
    graph = onnx.load(str(out / "model.onnx"))
    batch_dim = graph.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param == "batch" and not batch_dim.HasField("dim_value")
    props = {p.key: p.value for p in graph.metadata_props}
    assert json.loads(props["nla_fast"])["classes"][3] == "Happiness"

    reference = load_model(checkpoint, device="cpu")
    session = onnxruntime.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    for count in (1, 5):  # neither is the traced batch of 2
        x = _inputs(reference, count, seed=count)
        with torch.no_grad():
            expected = reference(x)
        got = torch.from_numpy(session.run(["logits"], {"images": x.numpy()})[0])
        assert got.shape == (count, 7)
        assert (got - expected).abs().max() <= ONNX_TOLERANCE
        assert torch.equal(got.argmax(1), expected.argmax(1))


@pytest.mark.filterwarnings("ignore:`torch.jit.load` is deprecated:FutureWarning")
def test_torchscript_loads_and_matches(checkpoint, tmp_path, capsys):
    out = tmp_path / "ts"
    assert ex.main(["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(out)]) == 0
    assert "TorchScript vs PyTorch on 8 images" in capsys.readouterr().out
    files = {"model.json": ""}
    scripted = torch.jit.load(str(out / "model.torchscript.pt"), map_location="cpu", _extra_files=files)
    assert json.loads(files["model.json"])["image_size"] == 32
    reference = load_model(checkpoint, device="cpu")
    x = _inputs(reference, 3)
    with torch.no_grad():
        assert torch.allclose(scripted(x), reference(x), rtol=0, atol=1e-5)


def test_default_out_is_export_next_to_the_checkpoint(checkpoint, tmp_path):
    copy = tmp_path / "run" / "best.pt"
    copy.parent.mkdir()
    shutil.copy(checkpoint, copy)
    result = ex.export(copy, "torchscript", verbose=False)
    assert result["files"][0] == tmp_path / "run" / "export" / "model.torchscript.pt" and result["max_abs_diff"] <= 1e-5


@pytest.mark.parametrize("fmt, package", [("onnx", "onnxruntime"), ("onnx", "onnx"), ("safetensors", "safetensors")])
def test_a_missing_extra_names_it(checkpoint, tmp_path, monkeypatch, capsys, fmt, package):
    monkeypatch.setitem(sys.modules, package, None)  # `import package` now raises ImportError
    assert ex.main(["--checkpoint", str(checkpoint), "--format", fmt, "--out", str(tmp_path / "x")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and package in err and f"pip install 'nla_fast[{fmt}]'" in err
    assert not (tmp_path / "x").exists()


def test_load_exported_without_safetensors_names_the_extra(checkpoint, tmp_path, monkeypatch):
    ex.export(checkpoint, "safetensors", tmp_path, verbose=False)
    monkeypatch.setitem(sys.modules, "safetensors", None)
    with pytest.raises(ex.MissingExtraError, match=r"pip install 'nla_fast\[safetensors\]'"):
        ex.load_exported(tmp_path)


def _damaged_copies(checkpoint, folder):
    blob = checkpoint.read_bytes()
    truncated, overwritten, foreign, text = (folder / n for n in ("truncated.pt", "overwritten.pt", "foreign.pt", "notes.pt"))
    truncated.write_bytes(blob[: len(blob) // 3])
    overwritten.write_bytes(blob[:200] + bytes(len(blob) - 200))  # zeros over all but the zip's first header
    torch.save({"state_dict": {"w": torch.zeros(2)}}, foreign)
    text.write_text("not a checkpoint\n")
    return [truncated, overwritten, foreign, text, folder / "missing.pt"]


def test_a_damaged_checkpoint_gives_one_line_and_exit_2(checkpoint, tmp_path, capsys):
    for path in _damaged_copies(checkpoint, tmp_path):
        assert ex.main(["--checkpoint", str(path), "--format", "torchscript", "--out", str(tmp_path / "o")]) == 2, path
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and str(path) in err and err.startswith("nla_fast.export: error: "), err
    assert not (tmp_path / "o").exists()


def test_a_failed_check_exits_1(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(ex, "TOLERANCE", -1.0)  # no difference, not even 0, is accepted
    assert ex.main(["--checkpoint", str(checkpoint), "--format", "torchscript", "--out", str(tmp_path)]) == 1
    assert "differs from PyTorch" in capsys.readouterr().err


def test_load_exported_refuses_files_of_two_checkpoints(checkpoint, tmp_path):
    ex.export(checkpoint, "safetensors", tmp_path, verbose=False)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["checkpoint"]["sha256"] = "0" * 64  # as if model.json came from another export
    (tmp_path / "model.json").write_text(json.dumps(meta))
    with pytest.raises(ex.ExportError, match="different checkpoints"):
        ex.load_exported(tmp_path)
    (tmp_path / "model.json").unlink()
    with pytest.raises(FileNotFoundError, match="model.json"):
        ex.load_exported(tmp_path)


def test_extras_and_console_script_are_declared():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    project = tomllib.loads((Path(__file__).parents[1] / "pyproject.toml").read_text())["project"]
    extras = project["optional-dependencies"]
    assert extras["safetensors"] == ["safetensors"] and sorted(extras["onnx"]) == ["onnx", "onnxruntime"]
    assert extras["tensorboard"] == ["tensorboard"]
    assert {"pytest", "safetensors", "onnx", "onnxruntime", "tensorboard"} <= set(extras["dev"])
    assert project["scripts"]["nla-export"] == "nla_fast.export:main"
