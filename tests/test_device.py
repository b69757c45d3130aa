"""nla_fast.device: one resolver of --device / device="auto" for every command and loaded model."""
import pytest
import torch

from nla_fast.device import DeviceError, device_type, pick_device


def test_auto_is_the_cpu_without_cuda_and_cuda_is_refused_in_one_named_line(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == torch.device("cpu") and device_type("auto") == "cpu"
    assert pick_device("cpu") == torch.device("cpu") and device_type("cpu") == "cpu"
    with pytest.raises(DeviceError, match="'cuda'.*no CUDA device"):
        pick_device("cuda")


def test_an_explicit_device_is_taken_as_it_is():
    assert pick_device(torch.device("cpu")) == torch.device("cpu")
    assert pick_device("cuda:1") == torch.device("cuda", 1) and device_type("cuda:1") == "cuda"


def test_auto_is_the_current_cuda_device_where_there_is_one(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 3)
    assert pick_device("auto") == torch.device("cuda", 3) == pick_device("cuda")
    assert device_type("auto") == "cuda"
