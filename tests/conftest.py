"""Shared test fixtures.

Every segment and semaphore a test session creates carries the session's
``SHMQ_NAME_TAG``; at the end the session fails if any of them is still in
/dev/shm (and removes them, so one leak does not poison the next run).
"""
from __future__ import annotations

import multiprocessing as mp
import os
import secrets
import sys

import pytest

SESSION_TAG = os.environ.setdefault("SHMQ_NAME_TAG", "t" + secrets.token_hex(2))
SHM_DIR = "/dev/shm"

START_METHODS = [m for m in ("fork", "spawn", "forkserver") if m in mp.get_all_start_methods()]


def session_entries() -> list:
    """/dev/shm entries (segments and sem.* semaphores) made by this session."""
    try:
        names = os.listdir(SHM_DIR)
    except OSError:
        return []
    marker = f"shmq_{SESSION_TAG}_"
    return sorted(n for n in names if marker in n)


def unique_name(label: str = "") -> str:
    """An explicit segment name inside this session's namespace."""
    return f"shmq_{SESSION_TAG}_{label}{secrets.token_hex(3)}"[:24]


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput"):
        return
    left = session_entries()
    if left:
        for entry in left:
            try:
                os.unlink(os.path.join(SHM_DIR, entry))
            except OSError:
                pass
        sys.stderr.write(
            "\nLEAK: the test session left these entries in /dev/shm (now removed):\n  "
            + "\n  ".join(left)
            + "\n"
        )
        session.exitstatus = 1


@pytest.fixture(params=START_METHODS)
def ctx(request):
    """A multiprocessing context for each start method."""
    return mp.get_context(request.param)


@pytest.fixture
def name():
    return unique_name()


def join_all(procs, timeout=60.0):
    """Join with a deadline; kill and fail on a hang."""
    import time

    deadline = time.monotonic() + timeout
    hung = []
    for p in procs:
        p.join(max(0.0, deadline - time.monotonic()))
        if p.is_alive():
            hung.append(p)
    for p in hung:
        p.kill()
        p.join(5)
    assert not hung, f"processes did not finish in {timeout}s: {hung}"
