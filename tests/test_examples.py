"""Every program in examples/ runs briefly, ends on its own, says OK, and
leaves nothing in /dev/shm.

Each run gets a name tag of its own (SHMQ_NAME_TAG), so "nothing left" is
judged on exactly the names that run made, whatever else runs on the machine.
"""
from __future__ import annotations

import os
import pathlib
import re
import secrets
import signal
import subprocess
import sys

import pytest

from conftest import SHM_DIR

ROOT = pathlib.Path(__file__).resolve().parents[1]
EXAMPLES = ROOT / "examples"
TIMEOUT = 90.0

# example -> (arguments that make it brief, lines its output must contain)
RUNS = {
    "worker_pool.py": (["--tasks", "300", "--workers", "3"], [r"^300 tasks done by \d of 3 workers"]),
    "camera.py": (
        ["--frames", "20", "--fps", "60", "--analyse-ms", "30"],
        [
            r"^camera: 20 frames in",
            r"^display: shown (\d+), dropped (\d+)$",
            r"^analyser: analysed 20 of 20, in order: True, mean brightness 9\.5$",
        ],
    ),
    "rpc.py": (
        ["--calls", "200", "--servers", "2", "--clients", "2"],
        [r"^client \d+: 200 calls answered and matched, \+1 error"],
    ),
}


def test_every_example_is_run_here():
    assert sorted(p.name for p in EXAMPLES.glob("*.py")) == sorted(RUNS)


def left_behind(tag: str) -> list:
    marker = f"shmq_{tag}_"
    return sorted(n for n in os.listdir(SHM_DIR) if marker in n)


@pytest.mark.parametrize("start_method", ["fork", "spawn"])
@pytest.mark.parametrize("example", sorted(RUNS))
def test_example_runs_and_cleans_up(example, start_method, tmp_path):
    args, expected = RUNS[example]
    tag = "x" + secrets.token_hex(2)
    env = dict(os.environ, SHMQ_NAME_TAG=tag)
    env["PYTHONPATH"] = str(ROOT) + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
    argv = [sys.executable, str(EXAMPLES / example), *args, "--start-method", start_method]
    proc = subprocess.Popen(
        argv, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True
    )
    try:
        out, err = proc.communicate(timeout=TIMEOUT)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        out, err = None, None
    left = left_behind(tag)
    for n in left:  # do not poison later runs
        try:
            os.unlink(os.path.join(SHM_DIR, n))
        except OSError:
            pass
    assert out is not None, f"{example} did not end within {TIMEOUT:.0f} s"
    assert proc.returncode == 0, f"{example} exited {proc.returncode}\n{out}\n{err}"
    lines = out.splitlines()
    assert lines[-1] == "OK", out
    for pattern in expected:
        assert any(re.search(pattern, line) for line in lines), f"no line matches {pattern!r}:\n{out}"
    assert not left, f"{example} left {left} in /dev/shm"
    if example == "camera.py":
        shown, dropped = map(int, re.search(r"display: shown (\d+), dropped (\d+)", out).groups())
        assert shown + dropped == 20


def test_readme_links_every_example():
    readme = (ROOT / "README.md").read_text()
    for name in RUNS:
        assert f"examples/{name}" in readme, f"README.md does not mention examples/{name}"
