"""The training step on CUDA: the captured graph follows the eager step, and no step syncs the host.

Run by ``make gpu-check`` on the GPU machine (skipped without CUDA). Small shapes keep the
whole file to a few seconds after CUDA start-up.
"""
import json

import pytest
import torch

from nla_fast import NLAConfig, train
from nla_fast.augment import TrainAugment
from nla_fast.engine import (WARMUP_STEPS, StepOptions, TrainStep, augmentation_generator, epoch_permutation,
                             make_optimizer, shard)
from nla_fast.model import build_resnet18
from nla_fast.placement import DeviceResident, HostStaged

pytestmark = pytest.mark.gpu

BATCH, SAMPLES, NATIVE, SIZE = 16, 160, 40, 32


def make_step(cuda_graphs: bool, host_images: bool = False, amp: str = "bf16", views: str = "concat",
              backend: str = "auto", compile: bool = False, samples: int = SAMPLES):
    device = torch.device("cuda", torch.cuda.current_device())
    torch.manual_seed(0)
    model = build_resnet18(7).to(device, memory_format=torch.channels_last)
    optimizer = make_optimizer(model, 1e-4, 1e-4, device, capturable=cuda_graphs)
    data = torch.Generator().manual_seed(1)
    images = torch.randint(0, 256, (samples, NATIVE, NATIVE, 3), dtype=torch.uint8, generator=data)
    labels = torch.randint(0, 7, (samples,), generator=data)
    placed = (HostStaged(images.pin_memory(), labels, device, BATCH) if host_images
              else DeviceResident(images, labels, device))
    generator = augmentation_generator(device, 2)
    options = StepOptions(batch_size=BATCH, views=views, amp=amp, backend=backend, cuda_graphs=cuda_graphs,
                          compile=compile)
    steps = samples // BATCH
    step = TrainStep(model, optimizer, placed, TrainAugment(SIZE), generator, options, NLAConfig(), 7, steps)
    order = shard(epoch_permutation(samples, 0, 0), 0, 1, BATCH)
    step.start_epoch(order, lr=1e-4, eps=0.4)
    return step


def loss_trajectory(step, n):
    losses, previous = [], 0.0
    for _ in range(n):
        step()
        total = float(step.totals.loss_sum)  # a host read per step: fine in a test
        losses.append(total - previous)
        previous = total
    return torch.tensor(losses)


@pytest.mark.parametrize("views", ["concat", "separate"])
def test_captured_step_follows_the_eager_step(views):
    n = WARMUP_STEPS + 6
    eager = loss_trajectory(make_step(cuda_graphs=False, views=views), n)
    graphed_step = make_step(cuda_graphs=True, views=views)
    graphed = loss_trajectory(graphed_step, n)
    assert graphed_step.mode == "cuda-graph" and graphed_step.graph is not None, graphed_step.note
    assert torch.isfinite(eager).all()
    torch.testing.assert_close(graphed, eager, rtol=3e-2, atol=3e-2)  # bf16 autocast tolerance
    assert int(graphed_step.step_in_epoch) == n  # the step counter advanced inside the graph


def test_host_resident_images_give_the_same_steps():
    n = WARMUP_STEPS + 4
    on_device = loss_trajectory(make_step(cuda_graphs=True), n)
    pinned_step = make_step(cuda_graphs=True, host_images=True)
    pinned = loss_trajectory(pinned_step, n)
    assert isinstance(pinned_step.data, HostStaged) and pinned_step.graph is not None
    torch.testing.assert_close(pinned, on_device, rtol=3e-2, atol=3e-2)


@pytest.mark.parametrize("cuda_graphs,compile", [(True, False), (False, False), (True, True)])
def test_no_host_synchronisation_per_step(cuda_graphs, compile):
    # one epoch long enough for every step below (warm-up and capture, 4 checked, 2 + 6 profiled):
    # a step past the epoch's end raises by design
    total_steps = WARMUP_STEPS + 1 + 4 + 2 + 6
    step = make_step(cuda_graphs=cuda_graphs, compile=compile, samples=BATCH * total_steps)
    assert step.steps_per_epoch >= total_steps
    for _ in range(WARMUP_STEPS + 1):  # warm-up and capture
        step()
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")  # any synchronising call in a step raises
    try:
        for _ in range(4):
            step()
    finally:
        torch.cuda.set_sync_debug_mode(0)
    # and counted by the profiler: the synchronisations it sees (its own included) must not grow
    # with the number of steps
    from torch.profiler import ProfilerActivity, profile

    def synchronisations(steps):
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            for _ in range(steps):
                step()
        return [e.name for e in prof.events() if "Synchronize" in e.name]

    few, many = synchronisations(2), synchronisations(6)
    assert len(many) <= len(few), (few, many)
    assert int(step.totals.steps) == total_steps


@pytest.mark.parametrize("cuda_graphs", [False, True])
def test_compiled_step_follows_the_eager_step(cuda_graphs):
    """The trainer's default on CUDA: forward + fused loss compiled by Inductor (the loss's
    Triton kernels inside the compiled region), captured with the rest of the step."""
    n = WARMUP_STEPS + 3
    eager = loss_trajectory(make_step(cuda_graphs=False), n)
    compiled_step = make_step(cuda_graphs=cuda_graphs, compile=True)
    compiled = loss_trajectory(compiled_step, n)
    assert compiled_step.compiled, compiled_step.note  # no fallback to the uncompiled step
    assert (compiled_step.graph is not None) == cuda_graphs, compiled_step.note
    torch.testing.assert_close(compiled, eager, rtol=3e-2, atol=3e-2)


def test_cli_run_on_cuda(tmp_path, monkeypatch):
    monkeypatch.setenv("NLA_FAST_CACHE", str(tmp_path / "cache"))
    out = tmp_path / "run"
    code = train.main(["--dataset", "synthetic", "--num-samples", "128", "--image-size", "32", "--batch-size", "16",
                       "--epochs", "2", "--limit-test", "64", "--device", "cuda", "--no-progress", "--plot-every",
                       "0", "--out", str(out)])
    assert code == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1]
    assert rows[-1]["step_mode"] == "cuda-graph" and rows[-1]["samples_per_s"] > 0
    assert rows[0]["compiled"] and rows[0]["first_step_s"] > 0  # compiled by default on CUDA
    assert (out / "last.pt").is_file() and (out / "naw_weights.png").is_file()
    # resume on the GPU runs (bitwise equality is promised on the CPU only)
    assert train.main(["--resume", str(out / "last.pt"), "--epochs", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in rows] == [0, 1, 2]
