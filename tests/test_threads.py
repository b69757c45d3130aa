"""nla_fast.threads: the CPU thread count that does not oversubscribe a shared host."""
import pytest
import torch

from nla_fast import threads, train


@pytest.fixture
def host(monkeypatch):
    """A fake host: 8 CPUs in the affinity mask, no quota, idle; no thread variables set."""
    for name in ("NLA_FAST_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    state = {"affinity": 8, "quota": None, "load": 0.0}
    monkeypatch.setattr(threads, "_affinity_cpus", lambda: state["affinity"])
    monkeypatch.setattr(threads, "_cgroup_cpu_quota", lambda: state["quota"])
    monkeypatch.setattr(threads, "_busy_cpus", lambda: state["load"])
    return state


def test_idle_host_uses_every_allowed_cpu(host):
    assert threads.cpu_threads() == 8
    host["affinity"] = 3
    assert threads.cpu_threads() == 3


def test_cgroup_quota_caps_the_affinity_mask(host):
    host["quota"] = 2.5  # 2.5 CPUs of quota: 2 threads, never 3
    assert threads.usable_cpus() == 2 and threads.cpu_threads() == 2
    host["quota"] = 0.5
    assert threads.cpu_threads() == 1


def test_busy_cpus_and_local_ranks_are_left_alone(host):
    host["load"] = 2.6  # other processes keep 2.6 CPUs busy: 5 of 8 are free
    assert threads.cpu_threads() == 5
    host["load"] = 40.0  # overloaded: still one thread
    assert threads.cpu_threads() == 1
    host["load"] = 0.0


def test_ranks_on_one_host_share_the_cpus(host, monkeypatch):
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "4")
    assert threads.cpu_threads() == 2
    host["load"] = 4.0
    assert threads.cpu_threads() == 1


def test_environment_variables_win_in_order(host, monkeypatch):
    host["load"] = 7.9
    monkeypatch.setenv("OMP_NUM_THREADS", "3")
    assert threads.cpu_threads() == 3
    monkeypatch.setenv("NLA_FAST_THREADS", "6")
    assert threads.cpu_threads() == 6


@pytest.mark.parametrize("value", ["zero", "0", "-2", "1.5"])
def test_a_bad_thread_count_is_named(host, monkeypatch, value):
    monkeypatch.setenv("NLA_FAST_THREADS", value)
    with pytest.raises(threads.ThreadsError, match=f"NLA_FAST_THREADS must be a positive integer, got '{value}'"):
        threads.cpu_threads()


def test_use_cpu_threads_sets_torch(host, monkeypatch):
    before = torch.get_num_threads()
    monkeypatch.setenv("NLA_FAST_THREADS", "1")
    try:
        assert threads.use_cpu_threads() == 1 and torch.get_num_threads() == 1
        monkeypatch.setenv("NLA_FAST_THREADS", "2")
        assert threads.use_cpu_threads() == 2 and torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(before)


def test_the_trainer_reports_a_bad_thread_count(host, monkeypatch, capsys):
    monkeypatch.setenv("NLA_FAST_THREADS", "many")
    assert train.main(["--dataset", "synthetic", "--device", "cpu"]) == 2
    assert "nla_fast: error: NLA_FAST_THREADS must be a positive integer, got 'many'" in capsys.readouterr().err


def test_the_real_host_gives_a_usable_count(monkeypatch):
    for name in ("NLA_FAST_THREADS", "OMP_NUM_THREADS", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    n = threads.cpu_threads()
    assert 1 <= n <= threads.usable_cpus() <= (torch.multiprocessing.cpu_count() or n)
