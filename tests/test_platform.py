"""shmq._platform: which machines shmq runs on, and the semaphores it hands out.

The import refusal runs in a fresh interpreter whose ``platform.machine``
reports another CPU: that patches the environment shmq looks at, not shmq."""
from __future__ import annotations

import _multiprocessing
import os
import subprocess
import sys
import textwrap

import pytest

from shmq import _platform as P
from conftest import unique_name

TSO = ["x86_64", "AMD64", "amd64"]
OTHERS = ["aarch64", "arm64", "armv7l", "ppc64le", "s390x", "riscv64", "i686", "i386", ""]


@pytest.mark.parametrize("machine", TSO)
def test_x86_64_runs_without_a_compiled_core(machine):
    assert P.memory_order_problem(machine, compiled_core=False) is None


@pytest.mark.parametrize("machine", OTHERS)
def test_other_cpus_are_refused_without_a_compiled_core(machine):
    problem = P.memory_order_problem(machine, compiled_core=False)
    assert problem is not None
    assert f"({machine or 'unknown CPU'})" in problem
    assert "x86-64" in problem and "shmq._core" in problem


@pytest.mark.parametrize("machine", TSO + OTHERS)
def test_a_compiled_core_runs_anywhere(machine):
    assert P.memory_order_problem(machine, compiled_core=True) is None


def _import_shmq_as(machine: str, prelude: str = "") -> subprocess.CompletedProcess:
    code = textwrap.dedent(
        f"""
        import platform
        platform.machine = lambda: {machine!r}
        {prelude}
        import shmq
        print("imported")
        """
    )
    return subprocess.run(
        [sys.executable, "-c", code], env=dict(os.environ), capture_output=True, text=True, timeout=60
    )


def test_import_refuses_an_aarch64_machine_with_a_clear_message():
    res = _import_shmq_as("aarch64")
    assert res.returncode == 1 and "imported" not in res.stdout
    last = res.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: shmq does not run on this machine (aarch64)"), res.stderr
    assert "x86-64" in last and "shmq._core" in last


def test_import_succeeds_on_x86_64():
    res = _import_shmq_as("x86_64")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "imported"


# A finder that makes "shmq._core" importable in the child, as a module that
# says it fences every shared access: stands in for the complete compiled
# core a later version may install (today's does not say so, and is refused
# on other CPUs: test_import_refuses_an_aarch64_machine_with_a_clear_message).
_FAKE_CORE = """
import importlib.abc, importlib.machinery, sys
class _CoreFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(self, name, path=None, target=None):
        return importlib.machinery.ModuleSpec(name, self) if name == "shmq._core" else None
    def create_module(self, spec):
        return None
    def exec_module(self, module):
        module.ORDERS_EVERY_ACCESS = True
sys.meta_path.insert(0, _CoreFinder())
"""


def test_import_accepts_any_machine_when_a_compiled_core_imports():
    res = _import_shmq_as("aarch64", prelude=_FAKE_CORE.replace("\n", "\n        "))
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "imported"


def test_semaphores_are_plain_semlocks_and_report_their_value():
    # A subclass of SemLock segfaults in its dealloc on Python 3.9 (issue 16).
    name = unique_name("sem")
    made = P.semaphore(name, True, lock=True)
    try:
        opened = P.sem_open(name, 1)
        assert type(made) is _multiprocessing.SemLock and type(opened) is _multiprocessing.SemLock
        assert P.sem_value(made) == 1
        assert made.acquire(False) and not opened.acquire(False)
        assert P.sem_value(opened) == 0
        opened.release()
        assert P.sem_value(made) == 1
        del made, opened  # dealloc of both (what crashed on 3.9)
    finally:
        P.sem_unlink(name)


# -- CPUs a process may use: affinity and cgroup quota --------------------------
# The cgroup files are written under tmp_path: a hierarchy as the kernel shows
# it, read by the real parser.


def _cgroup_tree(tmp_path, membership: str, files: dict) -> tuple:
    (tmp_path / "cgroup").write_text(membership)
    for rel, text in files.items():
        f = tmp_path / "fs" / rel
        f.parent.mkdir(parents=True, exist_ok=True)
        f.write_text(text)
    (tmp_path / "fs").mkdir(exist_ok=True)
    return str(tmp_path / "cgroup"), str(tmp_path / "fs")


@pytest.mark.parametrize(
    "membership, files, quota",
    [
        ("0::/\n", {}, None),  # no cpu.max at all
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("0::/app\n", {"cpu.max": "max 100000\n", "app/cpu.max": "150000 100000\n"}, 1.5),
        # the tightest level wins, wherever it sits
        ("0::/a/b\n", {"a/cpu.max": "50000 100000\n", "a/b/cpu.max": "300000 100000\n"}, 0.5),
        # a container: /proc names the host's path, the mount shows only the container's root
        ("0::/kubepods/pod1/c1\n", {"cpu.max": "200000 100000\n"}, 2.0),
        ("0::/\n", {"cpu.max": "garbage\n"}, None),
        # cgroup v1 (hybrid hosts): -1 is no limit
        ("4:memory:/x\n1:cpu,cpuacct:/\n0::/\n", {"cpu,cpuacct/cpu.cfs_quota_us": "-1\n",
                                                "cpu,cpuacct/cpu.cfs_period_us": "100000\n"}, None),
        ("1:cpu:/job\n0::/\n", {"cpu/job/cpu.cfs_quota_us": "250000\n", "cpu/job/cpu.cfs_period_us": "100000\n"}, 2.5),
    ],
)
def test_cgroup_cpu_quota(tmp_path, membership, files, quota):
    proc, root = _cgroup_tree(tmp_path, membership, files)
    assert P.cgroup_cpu_quota(proc, root) == quota


def test_cgroup_cpu_quota_without_proc_is_none(tmp_path):
    assert P.cgroup_cpu_quota(str(tmp_path / "absent"), str(tmp_path)) is None


def test_this_machines_cgroup_quota_reads():
    quota = P.cgroup_cpu_quota()
    assert quota is None or quota > 0


def test_usable_cpus_is_the_affinity_within_the_quota():
    cpus = len(os.sched_getaffinity(0))
    assert P.usable_cpus() == cpus
    assert P.usable_cpus(None) == cpus
    assert P.usable_cpus(0.5) == 1  # half a CPU still runs the caller
    assert P.usable_cpus(1.9) == 1  # whole CPUs only
    assert P.usable_cpus(cpus + 8.0) == cpus
