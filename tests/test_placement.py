"""nla_fast.placement: where the training images live, and the step sees the same batches from each."""
import os
import subprocess
import sys
import textwrap

import pytest
import torch

from nla_fast import NLAConfig, placement
from nla_fast.augment import TrainAugment
from nla_fast.data.cache import mapped_file
from nla_fast.engine import StepOptions, TrainStep, augmentation_generator, epoch_permutation, make_optimizer, shard
from nla_fast.placement import DeviceResident, EpochShard, HostStaged

CPU = torch.device("cpu")
CUDA = torch.device("cuda")
GiB = 2**30


def tiny_set(n=40, side=12):
    g = torch.Generator().manual_seed(0)
    return torch.randint(0, 256, (n, side, side, 3), dtype=torch.uint8, generator=g), torch.arange(n) % 7


def test_choice_follows_free_device_memory():
    assert placement.choose(10 * GiB, CPU, sharded=False) == "device"  # a CPU run never stages
    assert placement.choose(10 * GiB, CPU, sharded=True) == "shard"
    assert placement.choose(4 * GiB, CUDA, sharded=False, free_bytes=10 * GiB) == "device"
    assert placement.choose(6 * GiB, CUDA, sharded=False, free_bytes=10 * GiB) == "host"
    assert placement.choose(4 * GiB, CUDA, sharded=True, free_bytes=10 * GiB) == "shard"
    assert placement.choose(6 * GiB, CUDA, sharded=True, free_bytes=10 * GiB) == "host"


def test_place_training_set_on_the_cpu():
    images, labels = tiny_set()
    assert isinstance(placement.place_training_set(images, labels, CPU, 4), DeviceResident)
    assert isinstance(placement.place_training_set(images, labels, CPU, 4, shard_length=16), EpochShard)


@pytest.mark.parametrize("kind", ["device", "shard", "host"])
def test_every_placement_gives_the_batches_of_the_epoch_order(kind):
    images, labels = tiny_set()
    batch, steps = 4, 5
    order = shard(epoch_permutation(len(labels), 3, 1), 1, 2, batch)  # rank 1 of 2: 20 samples
    placed = {"device": lambda: DeviceResident(images, labels, CPU),
              "shard": lambda: EpochShard(images, labels, len(order), CPU),
              "host": lambda: HostStaged(images, labels, CPU, batch)}[kind]()
    assert isinstance(placed, placement.Placement) and placed.soft_labels is None  # the interface TrainStep reads
    device_order = placed.start_epoch(order)
    for step in range(steps):
        placed.before_step(step)
        positions = device_order[step * batch:(step + 1) * batch]
        rows = order[step * batch:(step + 1) * batch]
        assert torch.equal(placed.batch_images(positions), images[rows])
        assert torch.equal(placed.labels[positions], labels[rows])


def test_test_split_slices_tile_the_split():
    images, labels = tiny_set(n=17)
    parts = [placement.place_test_split(images, labels, CPU, rank, 3) for rank in range(3)]
    assert torch.equal(torch.cat([p[1] for p in parts]), labels)
    assert torch.equal(torch.cat([p[0] for p in parts]), images)


def losses(placed, steps=3, batch=4):
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(),
                                torch.nn.Linear(4, 7))
    optimizer = make_optimizer(model, 1e-2, 1e-4, CPU, capturable=False)
    options = StepOptions(batch_size=batch, amp="off", backend="reference", cuda_graphs=False)
    step = TrainStep(model, optimizer, placed, TrainAugment(16), augmentation_generator(CPU, 5), options,
                     NLAConfig(), 7, steps)
    step.start_epoch(shard(epoch_permutation(40, 0, 0), 0, 1, batch)[: steps * batch], lr=1e-2, eps=0.3)
    trajectory = []
    for _ in range(steps):
        step()
        trajectory.append(float(step.totals.loss_sum))
    return trajectory


def test_the_step_trains_identically_from_device_and_host_staged_images():
    images, labels = tiny_set()
    expected = losses(DeviceResident(images, labels, CPU))
    assert losses(HostStaged(images, labels, CPU, 4)) == expected


@pytest.mark.gpu
def test_placements_on_cuda(cuda_device):
    images, labels = tiny_set()
    resident = placement.place_training_set(images, labels, cuda_device, 4)
    assert isinstance(resident, DeviceResident) and resident.images.is_cuda and resident.labels.is_cuda
    staged = HostStaged(images.pin_memory(), labels, cuda_device, 4)
    shard_ = EpochShard(images, labels, 8, cuda_device)
    order = torch.tensor([5, 1, 9, 3, 0, 2, 7, 4])
    for placed in (staged, shard_):
        positions = placed.start_epoch(order)
        placed.before_step(1)
        torch.cuda.synchronize()
        assert torch.equal(placed.batch_images(positions[4:8]).cpu(), images[order[4:8]])
        assert placed.labels.is_cuda


# ----------------------------------------------------------------------------- the cache file under a run
def cached_split(tmp_path):
    """A RAF-DB-layout training split loaded through its cache: images mapped from the file."""
    from nla_fast.data import load_dataset
    from nla_fast.data.fixtures import make_rafdb_tree

    tree = make_rafdb_tree(tmp_path / "raf", n_train=12, n_test=4, size=100)
    load_dataset("rafdb", tree["root"], "train", cache_dir=tmp_path / "cache", verbose=False)  # builds the file
    data = load_dataset("rafdb", tree["root"], "train", cache_dir=tmp_path / "cache", verbose=False)  # reads it
    assert not data.info["cache_built"]
    return data, data.info["cache_file"]


@pytest.mark.parametrize("sharded", [False, True])
def test_a_cpu_run_reads_its_own_copy_not_a_cache_file_overwritten_in_place(tmp_path, sharded):
    data, cache_file = cached_split(tmp_path)
    expected = data.images.clone()
    placed = placement.place_training_set(data.images, data.labels, CPU, 4, shard_length=8 if sharded else None)
    test_images, _ = placement.place_test_split(data.images, data.labels, CPU)
    size = os.path.getsize(cache_file)
    with open(cache_file, "r+b") as f:  # in place: same file, same size, every byte zero
        f.write(bytes(size))
    assert os.path.getsize(cache_file) == size and mapped_file(data.images) == cache_file
    assert int(data.images.sum()) == 0  # what a run reading the map would now train on
    order = torch.arange(8)
    positions = placed.start_epoch(order)
    placed.before_step(0)
    assert torch.equal(placed.batch_images(positions[:4]), expected[:4])
    assert torch.equal(test_images, expected)


def test_a_cache_file_truncated_under_a_placed_cpu_set_does_not_crash_the_run(tmp_path):
    # in a child process: reading a truncated map ends the process with SIGBUS ("Bus error")
    script = textwrap.dedent(f"""
        import os, torch
        from pathlib import Path
        from nla_fast import placement
        from nla_fast.data import load_dataset
        from nla_fast.data.fixtures import make_rafdb_tree
        tree = make_rafdb_tree(Path({str(tmp_path)!r}) / "raf", n_train=12, n_test=4, size=100)
        for _ in range(2):  # the second load reads the file the first one built
            data = load_dataset("rafdb", tree["root"], "train", cache_dir={str(tmp_path / "cache")!r}, verbose=False)
        expected = data.images.numpy().copy()
        placed = placement.place_training_set(data.images, data.labels, torch.device("cpu"), 4)
        test_images, _ = placement.place_test_split(data.images, data.labels, torch.device("cpu"))
        os.truncate(data.info["cache_file"], 0)
        assert (placed.batch_images(torch.arange(12)).numpy() == expected).all()
        assert (test_images.numpy() == expected).all()
        print("read after truncation")
    """)
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "read after truncation" in done.stdout, (done.returncode, done.stderr[-2000:])


def test_a_set_too_large_for_memory_is_read_from_its_file_and_the_run_says_which(tmp_path):
    data, cache_file = cached_split(tmp_path)
    said = []
    nbytes = data.images.numel()
    kept = placement.in_own_memory(data.images, copies=2, say=said.append, free_bytes=3 * nbytes)
    assert mapped_file(kept) == cache_file and len(said) == 1  # 2 copies > half of 3x the set
    assert cache_file in said[0] and "do not rebuild, overwrite, truncate or delete it" in said[0]
    copied = placement.in_own_memory(data.images, copies=1, say=said.append, free_bytes=3 * nbytes)
    assert mapped_file(copied) is None and torch.equal(copied, data.images) and len(said) == 1
    in_memory = torch.zeros(4, 8, 8, 3, dtype=torch.uint8)
    assert placement.in_own_memory(in_memory, say=said.append, free_bytes=0) is in_memory  # not a map: as it is


@pytest.mark.gpu
def test_host_staged_streams_its_batches_from_the_cache_file_on_cuda(cuda_device, tmp_path, monkeypatch):
    data, cache_file = cached_split(tmp_path)
    monkeypatch.setattr(placement, "DEVICE_DATA_SHARE", 0.0)  # the set does not fit on the device
    monkeypatch.setattr(placement, "HOST_MEMORY_SHARE", 0.0)  # nor in host memory: read from the file
    said = []
    staged = placement.place_training_set(data.images, data.labels, cuda_device, 4, say=said.append)
    assert isinstance(staged, HostStaged) and mapped_file(staged.host_images) == cache_file
    assert not staged.host_images.is_pinned() and all(buffer.is_pinned() for buffer in staged.staging)
    assert any(cache_file in line for line in said)
    order = torch.tensor([5, 1, 9, 3, 0, 2, 7, 4])
    positions = staged.start_epoch(order)
    for step in range(2):
        staged.before_step(step)
        torch.cuda.synchronize()
        batch = slice(4 * step, 4 * step + 4)
        assert torch.equal(staged.batch_images(positions[batch]).cpu(), data.images[order[batch]])
