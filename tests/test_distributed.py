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
# two ranks' evaluation slices differ in size). TINY[4:]: the flags that do not name the data.
TINY = ["--dataset", "synthetic", "--num-samples", "32", "--image-size", "32", "--batch-size", "8",
        "--limit-test", "17", "--epochs", "1", "--backend", "reference", "--no-progress", "--plot-every", "0"]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun(nproc: int, out, *extra, timeout: int = 240, flags=TINY) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1", NLA_FAST_CACHE=str(out.parent / "cache"))
    for name in distributed.ENV_VARS:  # a clean launch, whatever the test runner's environment
        env.pop(name, None)
    command = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}",
               "--master_addr=127.0.0.1", f"--master_port={free_port()}", "-m", "nla_fast.train",
               *flags, "--out", str(out), *extra]
    return subprocess.run(command, env=env, capture_output=True, text=True, timeout=timeout)


def rows(out):
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_two_gloo_processes_train_one_epoch_with_exact_evaluation(tmp_path):
    """RAF-DB's layout, cached by the run: 32 training faces, 17 test faces."""
    from nla_fast.data.fixtures import make_rafdb_tree

    make_rafdb_tree(tmp_path / "raf", n_train=32, n_test=17, size=100)
    out = tmp_path / "run"
    result = torchrun(2, out, "--device", "cpu", "--consistency-reduction", "sum",
                      flags=["--dataset", "rafdb", "--data-root", str(tmp_path / "raf"), *TINY[4:]])
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    # the first rank decodes each split into its cache once; the run's first line gives both sizes
    assert result.stderr.count("cached rafdb/train") == 1 and result.stderr.count("cached rafdb/test") == 1
    first = result.stdout.splitlines()[0]
    assert first.startswith("nla_fast: rafdb/train images at 100x100 px, cached in ") and "trained at 32 px" in first
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


# ----------------------------------------------------------------------------- data preparation under torchrun
FIRST_ON_EACH_MACHINE = """
import json, os, sys, time
from datetime import timedelta
from pathlib import Path
import torch.distributed as dist
from nla_fast import distributed
from nla_fast.data import cache, load_dataset
from nla_fast.data.prepare import first_on_each_machine

root, out = Path(sys.argv[1]), Path(sys.argv[2])
dist.init_process_group("gloo", timeout=timedelta(seconds=1))  # the run's own group: a short timeout
ctx = distributed.Context(dist.get_rank(), dist.get_world_size(), int(os.environ["LOCAL_RANK"]), True, "gloo")
checks = []
real_check = cache._check
cache._check = lambda *args: (checks.append(1), real_check(*args))

def load():
    if ctx.local_rank == 0:
        time.sleep(3)  # a build three times longer than the group's timeout
    return load_dataset("rafdb", root / "raf", "train", cache_dir=root / "cache", verbose=False)

data = first_on_each_machine(ctx, load, timeout=timedelta(seconds=120))
dist.barrier()  # the run's group still works afterwards
(out / f"rank{ctx.rank}.json").write_text(json.dumps({"checks": len(checks), "n": len(data),
                                                      "pixels": int(data.images.long().sum())}))
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_the_first_rank_of_a_machine_checks_the_cache_while_the_others_wait_past_the_group_timeout(tmp_path):
    from nla_fast.data import load_dataset
    from nla_fast.data.fixtures import make_rafdb_tree

    make_rafdb_tree(tmp_path / "raf", n_train=12, n_test=2, size=100)
    load_dataset("rafdb", tmp_path / "raf", "train", cache_dir=tmp_path / "cache", verbose=False)  # the file exists
    script = tmp_path / "first_on_each_machine.py"
    script.write_text(FIRST_ON_EACH_MACHINE)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for name in distributed.ENV_VARS:
        env.pop(name, None)
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2",
                           "--master_addr=127.0.0.1", f"--master_port={free_port()}", str(script), str(tmp_path),
                           str(tmp_path)], env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["checks"] for r in ranks] == [1, 0]  # checked once on the machine, not once per rank
    assert ranks[0]["n"] == ranks[1]["n"] == 12 and ranks[0]["pixels"] == ranks[1]["pixels"]
