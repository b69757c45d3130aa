"""Checkpoint files: weights_only loading (atomic writes: test_atomic.py), RNG states, backbone weight files."""
import random

import numpy as np
import pytest
import torch

from nla_fast import checkpoint as ckpt
from nla_fast.model import WeightsError, build_resnet18, initialise_weights, load_backbone_weights


def test_save_roundtrip_with_weights_only(tmp_path):
    path = tmp_path / "a.pt"
    blob = {"format": ckpt.FORMAT, "x": torch.arange(3), "nested": {"names": ["a", "b"], "v": 1.5, "n": None}}
    ckpt.save(blob, path)
    loaded = ckpt.load(path)
    assert torch.equal(loaded["x"], blob["x"]) and loaded["nested"] == blob["nested"]
    assert [p.name for p in tmp_path.iterdir()] == ["a.pt"]


def test_load_rejects_foreign_files(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "w.pth")
    with pytest.raises(ValueError, match="not an nla_fast checkpoint"):
        ckpt.load(tmp_path / "w.pth")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        ckpt.load(tmp_path / "missing.pt")


def test_rng_states_roundtrip(tmp_path):
    gen = torch.Generator().manual_seed(7)
    torch.manual_seed(1)
    np.random.seed(2)
    random.seed(3)
    states = ckpt.capture_rng_states(gen)
    ckpt.save({"format": ckpt.FORMAT, "rng": states}, tmp_path / "r.pt")
    expected = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    torch.manual_seed(99)
    np.random.seed(99)
    random.seed(99)
    gen.manual_seed(99)
    ckpt.restore_rng_states(ckpt.load(tmp_path / "r.pt")["rng"], gen)
    again = (torch.rand(3), np.random.rand(3), random.random(), torch.rand(3, generator=gen))
    assert torch.equal(expected[0], again[0])
    assert np.array_equal(expected[1], again[1])
    assert expected[2] == again[2]
    assert torch.equal(expected[3], again[3])


def _fake_msceleb_file(path, prefix=""):
    """A file in the layout of resnet18_msceleb.pth: {'state_dict': torchvision names, fc [1000, 512]}."""
    source = build_resnet18(1000)
    torch.nn.init.constant_(source.conv1.weight, 0.25)
    state = {prefix + k: v for k, v in source.state_dict().items()}
    state[prefix + "feature.extra.weight"] = torch.zeros(3)  # something the model does not have
    torch.save({"state_dict": state, "epoch": 5, "arch": "resnet18"}, path)
    return source


@pytest.mark.parametrize("prefix", ["", "module."])
def test_msceleb_layout_loads_with_and_without_module_prefix(tmp_path, prefix):
    path = tmp_path / "resnet18_msceleb.pth"
    source = _fake_msceleb_file(path, prefix)
    model = build_resnet18(7)
    fc_before = model.fc.weight.clone()
    report = load_backbone_weights(model, path)
    assert torch.equal(model.conv1.weight, source.conv1.weight)
    assert torch.equal(model.layer4[1].bn2.running_var, source.layer4[1].bn2.running_var)
    assert torch.equal(model.fc.weight, fc_before)  # the 7-class head is not taken from the file
    assert model.fc.weight.shape == (7, 512)
    assert "Loaded 120 of the model's 122 tensors" in report
    assert "Dropped the file's classifier (fc.bias, fc.weight)" in report
    assert "feature.extra.weight" in report and "not used by the model" in report
    assert "Nothing the backbone needs is missing" in report
    assert ("Stripped the key prefix 'module.'" in report) == (prefix == "module.")


def test_missing_backbone_keys_are_reported_in_words(tmp_path):
    state = build_resnet18(1000).state_dict()
    del state["layer4.1.conv2.weight"]
    torch.save({"state_dict": state}, tmp_path / "partial.pth")
    report = load_backbone_weights(build_resnet18(7), tmp_path / "partial.pth")
    assert "Missing from the file, left at their initial values: layer4.1.conv2.weight" in report


def test_plain_torchvision_state_dict_and_bad_files(tmp_path):
    torch.save(build_resnet18(1000).state_dict(), tmp_path / "plain.pth")
    assert "Loaded 120" in initialise_weights(build_resnet18(7), str(tmp_path / "plain.pth"))
    with pytest.raises(WeightsError, match="does not exist"):
        initialise_weights(build_resnet18(7), str(tmp_path / "nope.pth"))
    torch.save({"state_dict": {"unrelated.weight": torch.zeros(2)}}, tmp_path / "other.pth")
    with pytest.raises(WeightsError, match="no tensor that fits"):
        load_backbone_weights(build_resnet18(7), tmp_path / "other.pth")

    torch.save({"state_dict": build_resnet18(7).state_dict(), "args": Opaque()}, tmp_path / "pickled.pth")
    with pytest.raises(WeightsError, match="weights_only=True"):
        load_backbone_weights(build_resnet18(7), tmp_path / "pickled.pth")


class Opaque:
    """An arbitrary object: files holding one cannot be read with weights_only=True."""


def test_imagenet_never_downloads_and_says_where_to_put_the_file(tmp_path, monkeypatch):
    import torchvision

    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path / "hub"))

    def download(*args, **kwargs):
        raise AssertionError("--weights imagenet must never download")

    monkeypatch.setattr(torchvision.models.ResNet18_Weights.IMAGENET1K_V1.__class__, "get_state_dict", download)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", download)
    with pytest.raises(WeightsError) as info:
        initialise_weights(build_resnet18(7), "imagenet")
    message = str(info.value)
    assert "--weights /path/to/resnet18-f37072fd.pth" in message
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
    assert str(tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth") in message
    # the file placed where the message says is used
    source = build_resnet18(1000)
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(source.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    model = build_resnet18(7)
    initialise_weights(model, "imagenet")
    torch.testing.assert_close(model.conv1.weight, source.conv1.weight)
    assert "https://download.pytorch.org/models/resnet18-f37072fd.pth" in message
