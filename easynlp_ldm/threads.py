"""How many threads a process should use, and how they wait — so that a job on a shared CPU does not collapse.

* ``cpu_budget()``: the CPUs this process may really use: the smaller of its CPU affinity (``taskset``, Docker's
  ``--cpuset-cpus``) and its cgroup CPU quota (Docker's ``--cpus``, Kubernetes' CPU limit; cgroup v2 ``cpu.max`` or
  v1 ``cpu.cfs_quota_us``: cgroups.py), rounded to the nearest whole CPU, at least 1. ``os.cpu_count()`` sees
  neither, and threads beyond the quota are throttled in every period.
* ``configure(worker_cpu)``: called once at start-up, before torch is imported: the OpenMP thread count (and
  torch's) to ``--worker_cpu`` when given, else the budget; the OpenMP wait policy to PASSIVE unless the user set
  ``OMP_WAIT_POLICY`` (spinning workers burn the shared cores a neighbour or the OpenVINO runtime needs). An
  ``OMP_NUM_THREADS`` the user set is kept when ``--worker_cpu`` is not given.
"""

from __future__ import annotations

import math
import os

from easynlp_ldm import cgroups

_set_by_us: str | None = None  # the OMP_NUM_THREADS value configure() wrote last


def cpu_budget(root: str = cgroups.ROOT) -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        cpus = os.cpu_count() or 1
    quota = cgroups.cpu_quota(root)
    if quota is not None:
        cpus = min(cpus, max(1, math.floor(quota + 0.5)))
    return max(1, cpus)


def configure(worker_cpu: int = 0) -> int:
    """Set the thread count and wait policy for this process (see the module doc); returns the thread count."""
    global _set_by_us
    explicit = os.environ.get("OMP_NUM_THREADS", "")
    if explicit == _set_by_us:  # our own setting from an earlier call in this process, not the user's
        explicit = ""
    if worker_cpu and worker_cpu > 0:
        threads = worker_cpu
    elif explicit.isdigit() and int(explicit) > 0:
        threads = int(explicit)
    else:  # processes on this host (torchrun's LOCAL_WORLD_SIZE) share the budget
        threads = max(1, cpu_budget() // max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1") or 1)))
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    os.environ["OMP_NUM_THREADS"] = _set_by_us = str(threads)
    import sys

    if "torch" in sys.modules:  # imported already (a test, an embedding program): set it directly
        sys.modules["torch"].set_num_threads(threads)
    return threads
