"""Test set-up shared by every test module.

Without a GPU the Triton kernels run in Triton's interpreter, which must be switched on
before any kernel module is imported. Tests marked ``gpu`` need CUDA and run in
``make gpu-check`` on the GPU machine.
"""
import contextlib
import os
import shutil
import tempfile
from pathlib import Path

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


@contextlib.contextmanager
def one_thread_with_environment(name: str, value: str):
    """``name=value`` in the environment and one intra-op thread, both restored afterwards."""
    threads = torch.get_num_threads()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv(name, value)
        torch.set_num_threads(1)
        try:
            yield
        finally:
            torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def module_tmp(tmp_path_factory, request):
    """``mktemp`` for module-scoped fixtures: what they make (training runs, ~130 MB a checkpoint)
    is removed when the module is done, unless a test failed (the files may explain it)."""
    made = []

    def mktemp(name: str) -> Path:
        made.append(tmp_path_factory.mktemp(name))
        return made[-1]

    failed_before = request.session.testsfailed
    yield mktemp
    if request.session.testsfailed == failed_before:
        for path in made:
            shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def private_data_cache_one_thread(tmp_path_factory):
    """Keep a module's synthetic renders out of the user's cache; one intra-op thread (tiny
    convolutions gain nothing from two, and OpenMP spin-waits badly on a busy machine)."""
    with one_thread_with_environment("NLA_FAST_CACHE", str(tmp_path_factory.mktemp("cache"))):
        yield


@pytest.fixture(scope="module")
def stable_inductor_cache():
    """One Inductor cache for the compile tests that survives between runs of the suite (a cold
    compile costs minutes on 2 cores) and stays out of the user's own cache; one thread."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    with one_thread_with_environment("TORCHINDUCTOR_CACHE_DIR",
                                     str(Path(tempfile.gettempdir()) / f"nla_fast_test_inductor_{uid}")):
        yield


@pytest.fixture(scope="module")
def stable_kernel_model_cache():
    """One cache for the kernel model's builds (cubins, the extension's launch and plan programs,
    all keyed by their sources and commands) that survives between runs of the suite: nvcc takes
    a minute for the extension on 2 cores. It lives under TRITON_CACHE_DIR, set here."""
    uid = os.getuid() if hasattr(os, "getuid") else "user"
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TRITON_CACHE_DIR", str(Path(tempfile.gettempdir()) / f"nla_fast_test_kernel_model_{uid}"))
        yield
