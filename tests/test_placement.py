"""nla_fast.placement: where the training images live, and the step sees the same batches from each."""
import pytest
import torch

from nla_fast import NLAConfig, placement
from nla_fast.augment import TrainAugment
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
