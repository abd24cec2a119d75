"""The pytest-benchmark regression suite of shmq's hot paths: opt-in.

Not collected unless SHMQ_PERF=1, so the normal test run stays fast and its
timings are not mistaken for results.  Run it with::

    SHMQ_PERF=1 python -m pytest tests/perf --benchmark-enable --benchmark-autosave
    SHMQ_PERF=1 python -m pytest tests/perf --benchmark-enable --benchmark-compare \\
        --benchmark-compare-fail=median:25%

(``--benchmark-enable`` overrides the ``--benchmark-disable`` in pyproject's
addopts.)  Each test measures one operation; compare runs on the same
machine only.
"""
import os

if os.environ.get("SHMQ_PERF", "") not in ("1", "true", "yes"):
    collect_ignore_glob = ["test_*.py"]
