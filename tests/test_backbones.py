"""--model: resnet18 (torchvision) or any timm model; --weights for each; the input normalisation
that goes with them; a timm model through training, exact resume, export and prediction."""
import contextlib
import json

import pytest
import torch

from nla_fast import backbones, engine, train
from nla_fast import checkpoint as ckpt
from nla_fast.augment import MEAN as PAPER_MEAN
from nla_fast.augment import STD as PAPER_STD
from nla_fast.model import WeightsError

timm = pytest.importorskip("timm")  # the dev extra installs it; CI tests it

TIMM_MODEL = "test_efficientnet"  # timm's own test network: 0.1 M parameters, BatchNorm, ImageNet mean/std
TINY = ["--dataset", "synthetic", "--num-samples", "16", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "8", "--eval-batch-size", "64", "--backend", "reference", "--device", "cpu",
        "--no-progress", "--plot-every", "0", "--seed", "2", "--model", TIMM_MODEL]
TIMING = {"samples_per_s", "seconds", "train_seconds", "eval_seconds", "first_step_s"}

pytestmark = pytest.mark.usefixtures("private_data_cache_one_thread")


def metrics(out):
    return [{k: v for k, v in json.loads(line).items() if k not in TIMING}
            for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def timm_run(module_tmp):
    out = module_tmp("timm_run")
    assert train.main(TINY + ["--epochs", "2", "--out", str(out)]) == 0
    return out


@pytest.mark.slow
def test_a_timm_model_trains_resumes_exactly_exports_and_predicts(timm_run, tmp_path, capsys):
    from nla_fast.classify import main as classify_main
    from nla_fast.evaluation import load_model
    from nla_fast.export import load_exported
    from nla_fast.export import main as export_main

    state = ckpt.load(timm_run / "last.pt")
    info = state["model_info"]
    assert info["arch"] == TIMM_MODEL and info["mean"] == [0.485, 0.456, 0.406] and info["std"] == [0.229, 0.224, 0.225]
    assert any(key.startswith("conv_stem") for key in state["model"])  # timm's layout, not torchvision's

    resumed = tmp_path / "resumed"
    assert train.main(TINY + ["--epochs", "1", "--out", str(resumed)]) == 0
    assert train.main(["--resume", str(resumed / "last.pt"), "--epochs", "2", "--no-progress"]) == 0
    assert metrics(resumed) == metrics(timm_run)
    final = ckpt.load(resumed / "last.pt")["model"]
    assert all(torch.equal(final[k], state["model"][k]) for k in state["model"])

    model = load_model(timm_run / "last.pt", device="cpu")
    assert tuple(model.eval_transform._c.mean) == (0.485, 0.456, 0.406)  # the run's normalisation, not the paper's
    assert export_main(["--checkpoint", str(timm_run / "last.pt"), "--format", "safetensors",
                        "--out", str(tmp_path / "export")]) == 0
    exported = load_exported(tmp_path / "export", device="cpu")
    faces = torch.randint(0, 256, (3, 40, 40, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(exported(model.eval_transform(faces)), model(model.eval_transform(faces)))
    from PIL import Image

    Image.fromarray(faces[0].numpy()).save(tmp_path / "face.png")
    capsys.readouterr()
    assert classify_main(["--checkpoint", str(tmp_path / "export"), str(tmp_path / "face.png"), "--json"]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert set(entry["probabilities"]) == set(info["classes"])


def test_the_normalisation_follows_the_model_and_its_weights():
    assert backbones.normalisation("resnet18", "none")[:2] == (PAPER_MEAN, PAPER_STD)
    assert backbones.normalisation("resnet18", "resnet18_msceleb.pth")[:2] == (PAPER_MEAN, PAPER_STD)
    assert backbones.normalisation("resnet18", "imagenet")[:2] == (backbones.IMAGENET_MEAN, backbones.IMAGENET_STD)
    assert backbones.normalisation("test_vit", "none")[:2] == ((0.5,) * 3, (0.5,) * 3)
    assert backbones.normalisation(TIMM_MODEL, "pretrained")[:2] == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_mean_and_std_flags_override_and_are_recorded(tmp_path, capsys):
    out = tmp_path / "run"
    assert train.main(TINY[:-2] + ["--epochs", "1", "--limit-train", "8", "--mean", "0.4,0.4,0.4", "--std",
                                   "0.3, 0.3, 0.3", "--out", str(out)]) == 0
    config = json.loads((out / "config.json").read_text())["train"]
    assert config["model"] == "resnet18" and config["mean"] == [0.4] * 3 and config["std"] == [0.3] * 3
    info = ckpt.load(out / "last.pt")["model_info"]
    assert info["mean"] == [0.4] * 3 and info["arch"] == "resnet18"
    capsys.readouterr()
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "2", "--model", TIMM_MODEL]) == 2
    err = capsys.readouterr().err
    assert f"holds a resnet18 network, not {TIMM_MODEL}" in err and len(err.strip().splitlines()) == 1


def test_a_vit_is_built_for_the_run_image_size():
    model = backbones.build_model("test_vit", 7, image_size=32)
    assert model(torch.zeros(2, 3, 32, 32)).shape == (2, 7)


def _fake_hub_cache(root, name, state):
    """The layout huggingface_hub writes: models--timm--<name>/refs/main + snapshots/<commit>/model.safetensors."""
    from safetensors.torch import save_file

    cfg = timm.models.get_pretrained_cfg(name) or timm.create_model(name).pretrained_cfg
    repo = root / ("models--" + (cfg.hf_hub_id if hasattr(cfg, "hf_hub_id") else cfg["hf_hub_id"]).replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("abc123")
    (repo / "snapshots" / "abc123").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in state.items()}, str(repo / "snapshots" / "abc123" / "model.safetensors"))


def test_timm_pretrained_weights_come_from_the_local_cache_only(tmp_path, monkeypatch):
    import huggingface_hub

    def no_network(*args, **kwargs):
        raise AssertionError("nla_fast must never download")

    monkeypatch.setattr(huggingface_hub, "hf_hub_download", no_network)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(WeightsError) as missing:
        backbones.check_weights(TIMM_MODEL, "pretrained")
    message = str(missing.value)
    assert "not in the local cache" in message and str(tmp_path / "hub") in message and "never downloads" in message

    torch.manual_seed(11)
    source = timm.create_model(TIMM_MODEL, num_classes=1000).state_dict()
    _fake_hub_cache(tmp_path / "hub", TIMM_MODEL, source)
    model, report = backbones.create(TIMM_MODEL, 7, 32, "pretrained")
    assert "Loaded timm's pretrained" in report and "model.safetensors" in report
    loaded = model.state_dict()
    assert loaded["classifier.weight"].shape == (7, loaded["classifier.weight"].shape[1])  # a fresh 7-class head
    assert all(torch.equal(loaded[k], v) for k, v in source.items() if not k.startswith("classifier"))


def test_a_timm_backbone_file_loads_without_its_classifier(tmp_path):
    torch.manual_seed(3)
    source = timm.create_model(TIMM_MODEL, num_classes=1000).state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.items()}}, tmp_path / "backbone.pth")
    model, report = backbones.create(TIMM_MODEL, 7, 32, str(tmp_path / "backbone.pth"))
    assert "Dropped the file's classifier" in report and "'module.'" in report
    assert torch.equal(model.state_dict()["conv_stem.weight"], source["conv_stem.weight"])


@pytest.mark.parametrize("flags,words", [
    (["--model", "resnet5O"], ["--model resnet5O", "close names", "resnet50"]),
    (["--model", TIMM_MODEL, "--weights", "imagenet"], ["--weights pretrained"]),
    (["--weights", "WEIGHTS"], ["WEIGHTS", "a text file"]),
])
def test_a_bad_model_or_weights_is_one_line_before_any_data_is_loaded(flags, words, tmp_path, monkeypatch, capsys):
    weights = tmp_path / "weights.pth"
    weights.write_text("not weights at all\n")
    flags = [str(weights) if flag == "WEIGHTS" else flag for flag in flags]
    words = [str(weights) if word == "WEIGHTS" else word for word in words]

    def no_data(run):
        raise AssertionError("the data was loaded before the model and weights were checked")

    monkeypatch.setattr(train, "load_data", no_data)
    assert train.main(TINY[:-2] + flags + ["--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    for word in words:
        assert word in err, (word, err)


def test_without_timm_a_timm_model_says_which_extra_to_install(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "timm", None)  # import timm raises ImportError
    with pytest.raises(backbones.ModelError, match=r"pip install 'nla_fast\[timm\]'"):
        backbones.build_model("convnext_tiny", 7)
    assert isinstance(backbones.build_model("resnet18", 7), torch.nn.Module)  # torchvision needs no timm


def test_a_failed_capture_is_told_in_one_line(monkeypatch, capsys):
    """What a backbone that cannot be captured prints: the first line of the error, then the
    eager step. (The capture itself needs CUDA: its API is stood in for here.)"""
    step = engine.build_train_step(backbones.build_model(TIMM_MODEL, 7), _placement(), engine.StepOptions(
        batch_size=4, amp="off", backend="reference"), image_size=32, lr=1e-3, weight_decay=0.0, seed=0,
        nla_config=__import__("nla_fast").NLAConfig(), num_classes=7, steps_per_epoch=2)

    @contextlib.contextmanager
    def failing_graph(graph):
        raise RuntimeError("operation not permitted when stream is capturing\nCUDA kernel errors might be "
                           "asynchronously reported")
        yield

    monkeypatch.setattr(torch.cuda, "synchronize", lambda *args: None)
    monkeypatch.setattr(torch.cuda, "CUDAGraph", lambda: object())
    monkeypatch.setattr(torch.cuda, "graph", failing_graph)
    monkeypatch.setattr(torch.cuda, "default_generators", [step.generator])
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    step._capture()
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "capture failed" in line]
    assert line == ("nla_fast: CUDA-graph capture failed (RuntimeError: operation not permitted when stream is "
                    "capturing); running the step without graphs")
    assert step.graph is None and step.mode == "eager"


def _placement():
    from nla_fast.placement import DeviceResident

    images = torch.randint(0, 256, (8, 36, 36, 3), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return DeviceResident(images, torch.arange(8) % 7, torch.device("cpu"))


@pytest.mark.gpu
def test_a_timm_model_runs_the_compiled_captured_step_on_cuda(tmp_path, capsys):
    """The default CUDA step (bf16, channels-last, compiled, one CUDA graph) with a timm backbone;
    where it cannot be compiled or captured, the run says why in one line."""
    out = tmp_path / "run"
    flags = [flag for flag in TINY if flag not in ("--device", "cpu", "--backend", "reference")]
    assert train.main(flags + ["--device", "cuda", "--num-samples", "64", "--epochs", "2", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    row = metrics(out)[-1]
    if row["step_mode"] != "cuda-graph":
        (line,) = [line for line in printed.splitlines() if "capture failed" in line]
        assert "\n" not in line
    assert row["compiled"] or len([line for line in printed.splitlines() if "torch.compile failed" in line]) == 1
