"""The control group's limits (cgroup v2, else v1): the CPU quota the thread budget reads and the memory limit the
memory plan reads; None where there is no limit or no cgroup."""

from easynlp_ldm import cgroups


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_cgroup_v2_quota(tmp_path):
    write(tmp_path / "cpu.max", "150000 100000\n")
    assert cgroups.cpu_quota(str(tmp_path)) == 1.5
    write(tmp_path / "cpu.max", "max 100000\n")
    assert cgroups.cpu_quota(str(tmp_path)) is None


def test_cgroup_v1_quota(tmp_path):
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "50000")
    write(tmp_path / "cpu" / "cpu.cfs_period_us", "100000")
    assert cgroups.cpu_quota(str(tmp_path)) == 0.5
    write(tmp_path / "cpu" / "cpu.cfs_quota_us", "-1")  # v1's "no limit"
    assert cgroups.cpu_quota(str(tmp_path)) is None
    assert cgroups.cpu_quota(str(tmp_path / "absent")) is None


def test_memory_limit_v2_and_v1(tmp_path):
    write(tmp_path / "v2" / "memory.max", "2147483648\n")
    assert cgroups.memory_limit(str(tmp_path / "v2")) == (2 << 30, f"cgroup {tmp_path / 'v2' / 'memory.max'}")
    write(tmp_path / "v2" / "memory.max", "max\n")
    assert cgroups.memory_limit(str(tmp_path / "v2")) is None
    write(tmp_path / "v1" / "memory" / "memory.limit_in_bytes", "1073741824")
    assert cgroups.memory_limit(str(tmp_path / "v1"))[0] == 1 << 30
    write(tmp_path / "v1" / "memory" / "memory.limit_in_bytes", "9223372036854771712")  # v1's "no limit"
    assert cgroups.memory_limit(str(tmp_path / "v1")) is None
    assert cgroups.memory_limit(str(tmp_path / "absent")) is None
