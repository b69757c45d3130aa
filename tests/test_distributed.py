"""Multi-process training through torchrun: a 2-process gloo run on the CPU, a 1-process NCCL
run on the GPU (``make gpu-check``), and the pieces they rely on."""
import json
import os
import socket
import subprocess
import sys

import pytest
import torch

from nla_fast import distributed, engine
from nla_fast.metrics import MetricCounts

# 32 training faces at 32 px, batch 8 per process: 2 steps per rank; 17 test faces (odd: the
# two ranks' evaluation slices differ in size).
TINY = ["--dataset", "synthetic", "--num-samples", "32", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "17", "--epochs", "1", "--backend", "reference", "--no-progress", "--plot-every", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, out, *extra, timeout: int = 240) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", NLA_FAST_CACHE=str(out.parent / "cache"))
    for name in distributed.ENV_VARS:  # a clean launch, whatever the test runner's environment
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "nla_fast.train",
               *TINY, "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_train_one_epoch_with_exact_evaluation(tmp_path):
    out = tmp_path / "run"
    # summed explicitly: the CPU synthetic demo's own default is the averaged term
    result = torchrun(2, out, "--device", "cpu", "--consistency-reduction", "sum")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    metrics = rows(out)
    assert len(metrics) == 1  # rank 0 alone writes
    row = metrics[0]
    assert row["world_size"] == 2 and row["train_samples"] == 32
    assert row["test_samples"] == 17 and sum(map(sum, row["confusion"])) == 17  # counts summed over ranks
    assert result.stdout.count("epoch 0 (1/1)") == 1  # only rank 0 prints
    assert "global batch 16" in result.stdout
    assert "summed over the global batch" in result.stdout  # distributed.global_batch_loss is in the step
    state = torch.load(out / "last.pt", weights_only=True)
    assert state["config"]["world_size"] == 2 and len(state["rank_states"]) == 2
    assert not any(k.startswith("module.") for k in state["model"])


def test_shards_are_disjoint_and_cover_the_epoch():
    order = engine.epoch_permutation(103, 1, 0)
    shards = [engine.shard(order, r, 4, 5) for r in range(4)]
    assert all(len(s) == 25 for s in shards)
    assert len(set(torch.cat(shards).tolist())) == 100


def test_contiguous_slices_tile_the_test_set():
    for length in (0, 3, 17, 100):
        for world in (1, 2, 3, 8):
            parts = [distributed.contiguous_slice(length, r, world) for r in range(world)]
            assert [i for p in parts for i in range(length)[p]] == list(range(length))


def test_one_process_is_not_distributed(monkeypatch):
    for name in distributed.ENV_VARS:
        monkeypatch.delenv(name, raising=False)
    ctx, device = distributed.setup("cpu")
    assert device is None and not ctx.enabled and ctx.world_size == 1 and ctx.is_main
    assert distributed.rank_seed(7, 0) == 7 and distributed.rank_seed(7, 1) != 7
    counts = MetricCounts(3)
    counts.update(torch.tensor([[2.0, 1, 0], [0, 1, 2]]), torch.tensor([0, 1]))
    counts.all_reduce()  # no process group: unchanged
    assert int(counts.confusion.sum()) == 2


@pytest.mark.gpu
def test_one_nccl_process_trains_under_ddp(tmp_path):
    out = tmp_path / "run"
    # 160 samples / 8 = 20 steps: past DDP's 11 eager warm-up steps, so the capture is tried
    result = torchrun(1, out, "--device", "cuda", "--num-samples", "160", timeout=300)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    row = rows(out)[0]
    assert row["world_size"] == 1 and sum(map(sum, row["confusion"])) == 17
    assert "backend nccl" in result.stdout
    assert row["step_mode"] in ("cuda-graph", "eager"), row["step_mode"]  # eager: the announced fallback
    assert row["step_mode"] == "cuda-graph" or "CUDA-graph capture failed" in result.stdout
