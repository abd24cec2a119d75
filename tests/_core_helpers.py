"""Small helpers shared by the core tests (segments, locks, ring, crashes).

Every wait here is bounded; polling a condition against a deadline is the
only use of ``time.sleep``.
"""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import psutil

SHM_DIR = "/dev/shm"


def wait_for(predicate, timeout=10.0, interval=0.002, what="condition"):
    """Poll ``predicate()`` until it is true; fail after ``timeout`` seconds.
    Returns the predicate's (true) value."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def wait_pid(pid, timeout=30.0):
    """Reap child ``pid`` (from os.fork); returns its wait status.  Kills it
    and fails if it does not exit within ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            raise AssertionError(f"child {pid} did not exit within {timeout}s")
        time.sleep(0.002)


def fork_call(fn, *args):
    """Run ``fn(*args)`` in an os.fork() child; the child's exit code is
    fn's return value (0 if None), 99 on an exception.  Returns the pid."""
    pid = os.fork()
    if pid == 0:  # child: never return into pytest
        code = 99
        try:
            code = fn(*args) or 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    return pid


def is_zombie(pid):
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def shm_exists(name):
    return os.path.exists(os.path.join(SHM_DIR, name))


def sem_exists(name):
    return os.path.exists(os.path.join(SHM_DIR, "sem." + name))


def run_python(code, *args, timeout=60):
    """Run ``code`` in a fresh interpreter (the session's SHMQ_NAME_TAG is in
    the environment); returns the CompletedProcess."""
    return subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=timeout
    )


def read_line(pipe_file, timeout=30.0):
    """One line from a subprocess pipe, within ``timeout`` seconds."""
    import selectors

    sel = selectors.DefaultSelector()
    sel.register(pipe_file, selectors.EVENT_READ)
    try:
        if not sel.select(timeout):
            raise AssertionError(f"no output from the subprocess within {timeout}s")
    finally:
        sel.close()
    return pipe_file.readline()


# -- numbered, checksummed records -------------------------------------------------
import random as _random
import struct as _struct
import zlib as _zlib

RECORD_HEADER = _struct.Struct("<HIII")  # producer, seq, body length, crc32(body)
_BLOB = _random.Random(1234).randbytes(1 << 17)


def make_record(producer, seq, size):
    """A record of ``size`` bytes (at least the header) that says who sent it
    and carries its own checksum."""
    body_len = max(0, size - RECORD_HEADER.size)
    start = (producer * 7919 + seq * 104729) % (len(_BLOB) - body_len)
    body = _BLOB[start : start + body_len]
    return RECORD_HEADER.pack(producer, seq, body_len, _zlib.crc32(body)) + body


def check_record(rec):
    """(producer, seq) of an intact record; AssertionError if it is torn."""
    rec = bytes(rec)
    if len(rec) < RECORD_HEADER.size:
        raise AssertionError(f"torn record: only {len(rec)} bytes")
    producer, seq, body_len, crc = RECORD_HEADER.unpack_from(rec)
    body = rec[RECORD_HEADER.size :]
    if len(body) != body_len or _zlib.crc32(body) != crc:
        raise AssertionError(f"torn record from producer {producer} seq {seq}: {len(rec)} bytes")
    return producer, seq


def thread_is_in(thread, func):
    """True while ``thread`` runs ``func`` (anywhere on its stack)."""
    code = getattr(func, "__func__", func).__code__
    frame = sys._current_frames().get(thread.ident)
    while frame is not None:
        if frame.f_code is code:
            return True
        frame = frame.f_back
    return False
