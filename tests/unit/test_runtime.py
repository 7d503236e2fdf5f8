"""CPU allotment: the torch thread default follows affinity, cgroup quota and Ray's reservation, not the host's
core count (no Ray started here: every input is passed in)."""

from __future__ import annotations

import pytest

from ncf_ray.runtime import cgroup_cpu_limit, usable_cpus
from ncf_ray.train import default_threads


def test_cgroup_v2_quota_and_unlimited(tmp_path):
    (tmp_path / "cpu.max").write_text("250000 100000\n")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(2.5)
    (tmp_path / "cpu.max").write_text("max 100000\n")
    assert cgroup_cpu_limit(tmp_path) is None


def test_cgroup_v1_quota_and_none(tmp_path):
    assert cgroup_cpu_limit(tmp_path) is None  # no cgroup files at all
    (tmp_path / "cpu").mkdir()
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("300000")
    (tmp_path / "cpu" / "cpu.cfs_period_us").write_text("100000")
    assert cgroup_cpu_limit(tmp_path) == pytest.approx(3.0)
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("-1")
    assert cgroup_cpu_limit(tmp_path) is None
    (tmp_path / "cpu" / "cpu.cfs_quota_us").write_text("garbage")
    assert cgroup_cpu_limit(tmp_path) is None


def test_usable_cpus_is_the_smallest_limit():
    assert usable_cpus(affinity=64, quota=2.5, ray_node_cpus=0) == 2  # a --cpus 2.5 container on a big host
    assert usable_cpus(affinity=4, quota=None, ray_node_cpus=0) == 4
    assert usable_cpus(affinity=16, quota=None, ray_node_cpus=6.0) == 6  # `ray start --num-cpus 6`
    assert usable_cpus(affinity=16, quota=0.5, ray_node_cpus=0) == 1  # a fractional quota still gets a thread


@pytest.mark.parametrize(
    ("local_workers", "cpus", "assigned", "expected"),
    [
        (1, 2, 1.0, 1),    # 2 cores: one left to Ray's processes
        (1, 16, 1.0, 15),  # a free node: the worker takes all but one core
        (2, 16, 1.0, 7),   # split between the node's workers
        (4, 4, 1.0, 1),    # never 0
        (2, 16, 12.0, 12), # resources_per_worker={"CPU": 12}: the reservation is the floor
        (1, 4, 8.0, 4),    # ... but never above the cores the node offers
        (1, 8, None, 7),   # outside a Ray worker (bench's plain-torch baseline)
    ],
)
def test_default_threads(local_workers, cpus, assigned, expected):
    assert default_threads(local_workers, cpus=cpus, assigned=assigned) == expected


def test_default_threads_reads_the_system_when_not_told(monkeypatch):
    import ncf_ray.runtime as runtime

    monkeypatch.setattr(runtime, "usable_cpus", lambda: 3)
    monkeypatch.setattr(runtime, "assigned_cpus", lambda: None)
    assert default_threads(1) == 2
