"""Operating-system access: POSIX shared memory and semaphores by name, space
reservation, and process identity.  The only module that talks to posix_ipc,
psutil, ``_multiprocessing`` or the shared-memory file system directly.

Segments are opened through posix_ipc, never through
``multiprocessing.shared_memory``: on Python < 3.13 the latter registers every
attach with the resource tracker, which then unlinks segments other processes
still use.  shmq's creator owns unlink, so no tracker is involved at all.

Semaphores are CPython's own ``_multiprocessing.SemLock`` objects (what
``multiprocessing.Lock`` is built on), opened by name and handed out as they
are.  Its non-blocking ``acquire(False)`` tries the semaphore without releasing
the GIL, and it returns False instead of raising: an uncontended acquire +
release costs 25 ns on Python 3.11 against posix_ipc's 115 ns.  A timed wait
runs signal handlers and lets their exceptions out (posix_ipc replaced them
with its SignalError).  They are not subclassed: a subclass segfaults in its
dealloc on Python 3.9, and costs 41 ns against 25 ns on 3.11-3.13 (its
methods miss the interpreter's fast path for builtin methods); a wrapper
object cost 32-49 ns.

Memory ordering: the rings publish an index with a plain store after writing
the payload, and read the index before the payload, with no fence (Python has
none).  That is correct only where the CPU keeps stores in order and an
aligned 8-byte store is atomic: x86-64 (TSO).  Elsewhere (aarch64, ppc64le,
32-bit x86 ...) a reader could see an index before the bytes it covers, so
importing shmq raises ImportError there unless a compiled core
(``shmq._core``, with real fences) is present; see :func:`memory_order_problem`.
"""
from __future__ import annotations

import errno
import importlib
import os
import platform
import re
import secrets
import stat
import sys
from typing import Optional

import _multiprocessing
import posix_ipc
import psutil

from ._errors import SharedMemoryFull

SHM_DIR = "/dev/shm"
NAME_PREFIX = "shmq_"
# macOS limits shm and semaphore names to 31 bytes including the slash; the
# semaphore suffixes below add 3.
MAX_NAME_LENGTH = 24
_NAME_RE = re.compile(r"^[A-Za-z0-9_.-]+\Z")  # \Z: "$" would accept a trailing newline
# -rl, -rb: slot pool lock and return bell; -jd: JoinableQueue's "all tasks done" bell
SEM_SUFFIXES = ("-pl", "-cl", "-ne", "-nf", "-rl", "-rb", "-jd")

_SEMAPHORE = 1  # SemLock kind: a counting semaphore (0 would be a recursive mutex)
SEM_VALUE_MAX = _multiprocessing.SemLock.SEM_VALUE_MAX


# x86-64 under the names Linux, the BSDs and Windows give it.
TSO_MACHINES = frozenset({"x86_64", "amd64"})


def memory_order_problem(machine: str, compiled_core: bool) -> Optional[str]:
    """Why shmq cannot run on a CPU reported as ``machine``
    (``platform.machine()``), or None if it can: the pure-Python rings need
    x86-64's store ordering; a compiled core that orders every shared-memory
    access (``compiled_core``: see :func:`_compiled_core_orders_everything`)
    brings its own fences and runs anywhere."""
    if compiled_core or machine.lower() in TSO_MACHINES:
        return None
    cpu = machine or "unknown CPU"
    return (
        f"shmq does not run on this machine ({cpu}): its pure-Python rings rely on x86-64 (TSO) "
        f"store ordering to publish data before the index that covers it, and this CPU ({cpu}) may "
        f"reorder those stores, so readers could see torn or stale messages; no compiled core "
        f"(shmq._core) that fences every shared-memory access is installed (today's core fences the "
        f"hot record moves only)"
    )


def _compiled_core_orders_everything() -> bool:
    """True if ``shmq._core`` imports and says (``ORDERS_EVERY_ACCESS``) that
    every load and store of a shared index goes through its acquire/release
    atomics.  Today's core covers try_write/try_read, the batches and the
    Queue's put/get, but reserve/commit, peek/release, pads and lock
    recovery still store from Python (docs/core.md), so it does not."""
    try:
        core = importlib.import_module(__package__ + "._core")
    except ImportError:
        return False
    return bool(getattr(core, "ORDERS_EVERY_ACCESS", False))


def _refuse_unsafe_machine() -> None:
    machine = platform.machine()
    if machine.lower() not in TSO_MACHINES:  # only then look for a compiled core
        problem = memory_order_problem(machine, _compiled_core_orders_everything())
        if problem is not None:
            raise ImportError(problem)


_refuse_unsafe_machine()

#: The type of the semaphores handed out here: ``_multiprocessing.SemLock``
#: itself.  ``acquire(block=True, timeout=None) -> bool`` (False: not taken;
#: ``acquire(False)`` never waits), ``release()`` (raises ValueError above
#: ``maxvalue``); read the count with :func:`sem_value`.  Closed when
#: garbage-collected.
Semaphore = _multiprocessing.SemLock


def sem_value(sem: Semaphore) -> int:
    """The current count of semaphore ``sem``."""
    return sem._get_value()


def new_name() -> str:
    """A fresh name ``shmq_[<tag>_]<pid>_<random>``, attributable to its
    creator.  ``SHMQ_NAME_TAG`` (letters and digits, at most 6) namespaces the
    names of one application or test session."""
    base = f"{name_stem()}{os.getpid()}_"
    return base + secrets.token_hex(8)[: max(4, MAX_NAME_LENGTH - len(base))]


def name_stem() -> str:
    """``shmq_`` or ``shmq_<tag>_``: how every generated name starts."""
    tag = os.environ.get("SHMQ_NAME_TAG", "")[:6]
    return f"{NAME_PREFIX}{tag + '_' if tag.isascii() and tag.isalnum() else ''}"


def check_name(name: object) -> str:
    """``name`` without a leading "/", or TypeError/ValueError saying why not:
    1-MAX_NAME_LENGTH characters of letters, digits, '_', '.', '-' (a queue's
    part may add a PART suffix, see :func:`part_name`), not "sem.*" (that is
    where Linux keeps POSIX semaphores in /dev/shm)."""
    if not isinstance(name, str):
        raise TypeError(f"'name' must be a str, got {type(name).__name__}")
    if name.startswith("/"):
        name = name[1:]
    owner = owner_of(name) or name
    if not owner or len(owner) > MAX_NAME_LENGTH or not _NAME_RE.match(name) or name in (".", ".."):
        raise ValueError(
            f"'name' must be 1-{MAX_NAME_LENGTH} characters of letters, digits, '_', '.', '-', got {name!r}"
        )
    if name.startswith("sem."):
        raise ValueError(f"'name' must not start with 'sem.' (the POSIX semaphores' namespace in {SHM_DIR}), got {name!r}")
    return name


# A queue's parts (side ring, slot pool, large-item blobs) are named after the
# queue: "<queue>.s", "<queue>.p", "<queue>.b<hex>", so that `ls --prefix`,
# `stat` and `gc` see a queue and its parts as one thing.
_PART_RE = re.compile(r"\.(s|p|b[0-9a-f]{1,16})\Z")


def part_name(owner: str, part: str) -> str:
    """The name of ``owner``'s part: ``part`` is "s", "p" or "b<hex>"."""
    name = f"{owner}.{part}"
    if not _PART_RE.search(name):
        raise ValueError(f"'part' must be 's', 'p' or 'b' and 1-16 hex digits, got {part!r}")
    return name


def owner_of(name: str) -> Optional[str]:
    """The queue whose part ``name`` is (see :func:`part_name`), or None."""
    m = _PART_RE.search(name)
    return name[: m.start()] if m and m.start() > 0 else None


def shm_free_bytes() -> Optional[int]:
    try:
        st = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return st.f_bavail * st.f_frsize


def _no_space(name: str, size: int) -> SharedMemoryFull:
    free = shm_free_bytes()
    free_txt = "unknown" if free is None else f"{free:,}"
    return SharedMemoryFull(
        errno.ENOSPC,
        f"no room in {SHM_DIR} for segment {name!r} of {size:,} bytes "
        f"({free_txt} bytes free); free space there, or enlarge it "
        f"(docker: --shm-size)",
    )


def shm_create(name: str, size: int) -> int:
    """Create segment ``name`` of ``size`` bytes, owner-only, with its memory
    reserved now.  Returns an open fd.  Raises FileExistsError if the name is
    taken and SharedMemoryFull if /dev/shm cannot hold it."""
    free = shm_free_bytes()
    if free is not None and size > free:
        raise _no_space(name, size)
    try:
        shm = posix_ipc.SharedMemory("/" + name, posix_ipc.O_CREX, mode=0o600, size=0)
    except posix_ipc.ExistentialError:
        raise FileExistsError(errno.EEXIST, f"shared memory {name!r} already exists", name) from None
    fd = shm.fd
    try:
        os.ftruncate(fd, size)
        # Reserve the pages now: tmpfs files are sparse, and touching an
        # unbacked page once /dev/shm is full kills the process with SIGBUS.
        if hasattr(os, "posix_fallocate"):
            os.posix_fallocate(fd, 0, size)
    except OSError as exc:
        os.close(fd)
        _unlink_quietly(name)
        if exc.errno in (errno.ENOSPC, errno.EFBIG, errno.ENOMEM):
            raise _no_space(name, size) from exc
        raise
    return fd


def shm_open(name: str) -> int:
    """Open existing segment ``name`` read-write.  Returns an open fd.
    Raises FileNotFoundError or PermissionError."""
    try:
        shm = posix_ipc.SharedMemory("/" + name, 0)
    except posix_ipc.ExistentialError:
        raise FileNotFoundError(errno.ENOENT, f"no shared memory named {name!r}", name) from None
    except posix_ipc.PermissionsError:
        raise PermissionError(errno.EACCES, f"no permission to open shared memory {name!r}", name) from None
    return shm.fd


def reopen_fd(fd: int, name: str) -> int:
    """A new open file description for the file behind ``fd`` (works after unlink on Linux)."""
    try:
        return os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
    except OSError:
        return shm_open(name)


def _unlink_quietly(name: str) -> bool:
    try:
        posix_ipc.unlink_shared_memory("/" + name)
        return True
    except posix_ipc.ExistentialError:
        return False


def shm_unlink(name: str) -> bool:
    """Remove segment ``name`` and its semaphores.  True if the segment existed."""
    existed = _unlink_quietly(name)
    for suffix in SEM_SUFFIXES:
        sem_unlink(name + suffix)
    return existed


def sem_create(name: str, initial_value: int, maxvalue: int = SEM_VALUE_MAX) -> Semaphore:
    """Create semaphore ``name`` (mode 0600).  Raises FileExistsError."""
    try:
        return Semaphore(_SEMAPHORE, initial_value, maxvalue, "/" + name, False)
    except FileExistsError:
        raise FileExistsError(errno.EEXIST, f"semaphore {name!r} already exists", name) from None


def sem_open(name: str, maxvalue: int = SEM_VALUE_MAX) -> Semaphore:
    """Open semaphore ``name``.  Raises FileNotFoundError."""
    try:
        return Semaphore._rebuild(0, _SEMAPHORE, maxvalue, "/" + name)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no semaphore named {name!r}", name) from None


def semaphore(name: str, create: bool, *, lock: bool = False) -> Semaphore:
    """Create (``create``) or open semaphore ``name``: a lock (starts free,
    never above 1) or, by default, a wake-up bell (starts at 0)."""
    maxvalue = 1 if lock else SEM_VALUE_MAX
    return sem_create(name, int(lock), maxvalue) if create else sem_open(name, maxvalue)


def sem_unlink(name: str) -> None:
    try:
        _multiprocessing.sem_unlink("/" + name)
    except FileNotFoundError:
        pass


def process_start_us(pid: int) -> int:
    """Start time of process ``pid`` in microseconds since the epoch, 0 if unknown."""
    try:
        return int(psutil.Process(pid).create_time() * 1e6)
    except (psutil.Error, OSError, ValueError):
        return 0


_MY_START = (0, 0)


def my_start_us() -> int:
    global _MY_START
    pid = os.getpid()
    if _MY_START[0] != pid:
        _MY_START = (pid, process_start_us(pid))
    return _MY_START[1]


def is_alive(pid: int, start_us: int = 0) -> bool:
    """True if ``pid`` runs and is not a zombie; with ``start_us``, also that it
    is the same process (not a later one that reused the pid)."""
    if pid <= 0:
        return False
    try:
        proc = psutil.Process(pid)
        if proc.status() == psutil.STATUS_ZOMBIE:
            return False
        if start_us and abs(int(proc.create_time() * 1e6) - start_us) > 50_000:
            return False
        return True
    except (psutil.NoSuchProcess, ValueError):
        return False
    except psutil.AccessDenied:
        return True


def shm_open_readonly(name: str) -> int:
    """Open existing segment ``name`` read-only, for inspection (``shmq ls``,
    ``stat``, ``gc``).  Refuses anything but a regular file without blocking
    (a FIFO or a symlink under the name raises OSError).  Returns an open fd.
    Raises FileNotFoundError or PermissionError."""
    if not IS_LINUX:
        try:
            return posix_ipc.SharedMemory("/" + name, 0, read_only=True).fd
        except posix_ipc.ExistentialError:
            raise FileNotFoundError(errno.ENOENT, f"no shared memory named {name!r}", name) from None
        except posix_ipc.PermissionsError:
            raise PermissionError(errno.EACCES, f"no permission to open shared memory {name!r}", name) from None
    path = os.path.join(SHM_DIR, name)
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        raise FileNotFoundError(errno.ENOENT, f"no shared memory named {name!r}", name) from None
    except PermissionError:
        raise PermissionError(errno.EACCES, f"no permission to open shared memory {name!r}", name) from None
    if not stat.S_ISREG(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, f"{path} is not a regular file", name)
    return fd


def list_shm_semaphores() -> list:
    """Names of the POSIX semaphores in /dev/shm (Linux; without the ``sem.``
    prefix), sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e[4:] for e in entries if e.startswith("sem.") and _NAME_RE.match(e[4:]))


_GENERATED_RE = re.compile(r"^" + NAME_PREFIX + r"(?:[A-Za-z0-9]{1,6}_)?([0-9]+)_[0-9a-f]{4,}$")


def generated_name_pid(name: str) -> int:
    """The creator pid encoded in a name made by :func:`new_name` (a segment
    name, or a semaphore name with one of SEM_SUFFIXES); 0 if ``name`` is not
    such a name."""
    for suffix in SEM_SUFFIXES:
        if name.endswith(suffix):
            name = name[: -len(suffix)]
            break
    m = _GENERATED_RE.match(name)
    return int(m.group(1)) if m else 0


def list_shm_names() -> list:
    """Names of the shmq segments in /dev/shm (Linux), sorted."""
    try:
        entries = os.listdir(SHM_DIR)
    except OSError:
        return []
    return sorted(e for e in entries if not e.startswith("sem.") and _NAME_RE.match(e))


IS_LINUX = sys.platform.startswith("linux")

CGROUP_ROOT = "/sys/fs/cgroup"


def _read_words(path: str) -> list:
    try:
        with open(path, "rb") as f:
            return f.read().split()
    except OSError:
        return []


def _cgroup_dirs(mount: str, path: str) -> list:
    """``mount``/``path`` and its ancestors up to ``mount``: every level may
    set a limit.  (In a container, ``path`` may name the host's cgroup, absent
    from the container's mount: the levels that exist are what counts.)"""
    parts = [p for p in path.split("/") if p and p not in (".", "..")]
    return [os.path.join(mount, *parts[:k]) for k in range(len(parts), -1, -1)]


def cgroup_cpu_quota(membership: str = "/proc/self/cgroup", root: str = CGROUP_ROOT) -> Optional[float]:
    """The CPU time this process's cgroups allow, in CPUs (``quota / period``:
    1.5 means 150 ms per 100 ms), the tightest level of the hierarchy; None
    if no level sets a quota or none can be read.  Reads cgroup v2's
    ``cpu.max`` and cgroup v1's ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``."""
    try:
        with open(membership) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    quotas = []
    for line in lines:
        fields = line.split(":", 2)
        if len(fields) != 3:
            continue
        controllers, path = fields[1].split(","), fields[2]
        if fields[0] == "0" and fields[1] == "":  # v2: "max 100000" or "<quota> <period>"
            for d in _cgroup_dirs(root, path):
                words = _read_words(os.path.join(d, "cpu.max"))
                if len(words) == 2 and words[0] != b"max":
                    quotas.append((words[0], words[1]))
        elif "cpu" in controllers:  # v1: quota -1 is no limit
            for mount in dict.fromkeys((os.path.join(root, fields[1]), os.path.join(root, "cpu"))):
                for d in _cgroup_dirs(mount, path):
                    quota = _read_words(os.path.join(d, "cpu.cfs_quota_us"))
                    period = _read_words(os.path.join(d, "cpu.cfs_period_us"))
                    if quota and period and not quota[0].startswith(b"-"):
                        quotas.append((quota[0], period[0]))
    cpus = []
    for quota, period in quotas:
        try:
            q, t = int(quota), int(period)
        except ValueError:
            continue
        if q > 0 and t > 0:
            cpus.append(q / t)
    return min(cpus) if cpus else None


def cpu_affinity() -> Optional[frozenset]:
    """The CPUs the calling thread may run on (its affinity mask, which may
    change while it runs; new threads inherit it), None where unknown."""
    try:
        return frozenset(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return None


def usable_cpus(quota: Optional[float] = None, affinity: Optional[frozenset] = None) -> int:
    """How many CPUs the calling thread's work can keep busy at once: the
    CPUs of ``affinity`` (default: :func:`cpu_affinity`), no more than the
    whole CPUs of a cgroup ``quota`` (as :func:`cgroup_cpu_quota` gives it;
    None: no quota), and at least 1."""
    if affinity is None:
        affinity = cpu_affinity()
    cpus = len(affinity) if affinity else (os.cpu_count() or 1)
    if quota is not None:
        cpus = min(cpus, int(quota))
    return max(1, cpus)
