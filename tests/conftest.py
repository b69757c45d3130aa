"""Test set-up shared by every test module.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported. Tests marked ``gpu`` need CUDA and run in
``make gpu-check`` on the GPU machine.
"""
import os

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
if not HAS_CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if HAS_CUDA:
        return
    skip_gpu = pytest.mark.skip(reason="needs a CUDA device; runs in `make gpu-check`")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip_gpu)


@pytest.fixture
def cuda_device():
    return torch.device("cuda")
