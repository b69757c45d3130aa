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


@pytest.fixture(scope="module")
def private_data_cache_one_thread(tmp_path_factory):
    """Keep a module's synthetic renders out of the user's cache; one intra-op thread (tiny
    convolutions gain nothing from two, and OpenMP spin-waits badly on a busy machine)."""
    old, threads = os.environ.get("NLA_FAST_CACHE"), torch.get_num_threads()
    os.environ["NLA_FAST_CACHE"] = str(tmp_path_factory.mktemp("cache"))
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
    if old is None:
        os.environ.pop("NLA_FAST_CACHE", None)
    else:
        os.environ["NLA_FAST_CACHE"] = old
