"""What this process's control group allows, read from its files (cgroup v2, else v1): the CPU quota (Docker's
``--cpus``, Kubernetes' CPU limit; threads.py) and the memory limit (memory.py). ``os.cpu_count()`` and the RAM the
kernel reports see neither. Each answer is None where there is no limit or no cgroup to read."""

from __future__ import annotations

import os

ROOT = "/sys/fs/cgroup"
UNLIMITED_BYTES = 1 << 60  # v1 writes "no limit" as a page-rounded 2^63


def read(name: str, root: str = ROOT) -> str | None:
    """The stripped text of a cgroup file (a path under ``root``), or None when it cannot be read."""
    try:
        with open(os.path.join(root, name), encoding="ascii") as handle:
            return handle.read().strip()
    except OSError:
        return None


def cpu_quota(root: str = ROOT) -> float | None:
    """CPUs allowed by the quota (e.g. 1.5): v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    v2 = read("cpu.max", root)
    if v2:
        quota, _, period = v2.partition(" ")
        if quota != "max" and period:
            return int(quota) / int(period)
        return None
    quota, period = (read(os.path.join("cpu", name), root) for name in ("cpu.cfs_quota_us", "cpu.cfs_period_us"))
    if quota and period and int(quota) > 0:
        return int(quota) / int(period)
    return None


def memory_limit(root: str = ROOT) -> tuple[int, str] | None:
    """(bytes, the file it was read from): v2 ``memory.max``, v1 ``memory.limit_in_bytes``."""
    for name in ("memory.max", os.path.join("memory", "memory.limit_in_bytes")):
        text = read(name, root)
        if text and text.isdigit() and int(text) < UNLIMITED_BYTES:
            return int(text), f"cgroup {os.path.join(root, name)}"
    return None
