"""Thread budget: a container's CPU quota (cgroup v2 and v1) and affinity bound the threads; --worker_cpu and a
user's OMP_NUM_THREADS win; processes on one host share the budget; OpenMP workers wait passively unless told."""

import os

import pytest
import torch

from easynlp_ldm import cgroups, threads


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_budget_is_the_smaller_of_affinity_and_quota(tmp_path, monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)))
    write(tmp_path / "cpu.max", "150000 100000")  # --cpus=1.5 → 2 (rounded to the nearest CPU), not 8
    assert threads.cpu_budget(str(tmp_path)) == 2
    write(tmp_path / "cpu.max", "40000 100000")  # --cpus=0.4: still one thread
    assert threads.cpu_budget(str(tmp_path)) == 1
    write(tmp_path / "cpu.max", "max 100000")
    assert threads.cpu_budget(str(tmp_path)) == 8


@pytest.fixture
def clean_env(monkeypatch):
    for name in ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "LOCAL_WORLD_SIZE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(threads, "cpu_budget", lambda root=cgroups.ROOT: 4)
    before = torch.get_num_threads()
    yield monkeypatch
    torch.set_num_threads(before)


def test_configure_order_of_precedence(clean_env):
    assert threads.configure() == 4 and os.environ["OMP_NUM_THREADS"] == "4" and torch.get_num_threads() == 4
    assert os.environ["OMP_WAIT_POLICY"] == "PASSIVE"
    clean_env.setenv("OMP_NUM_THREADS", "3")
    assert threads.configure() == 3  # the user's OpenMP setting is kept
    assert threads.configure(worker_cpu=1) == 1 and torch.get_num_threads() == 1  # --worker_cpu wins
    clean_env.setenv("OMP_WAIT_POLICY", "ACTIVE")
    threads.configure()
    assert os.environ["OMP_WAIT_POLICY"] == "ACTIVE"


def test_processes_on_one_host_share_the_budget(clean_env):
    clean_env.setenv("LOCAL_WORLD_SIZE", "2")
    assert threads.configure() == 2
    clean_env.setenv("LOCAL_WORLD_SIZE", "8")
    assert threads.configure() == 1


def test_a_second_command_in_one_process_is_not_bound_by_the_first(clean_env):
    assert threads.configure(worker_cpu=1) == 1
    assert threads.configure() == 4  # OMP_NUM_THREADS=1 was ours, not the user's
