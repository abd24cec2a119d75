"""Segment: one named block of shared memory with a self-describing header.

Lifetimes follow CPython's SharedMemory: ``close()`` ends this handle in this
process; ``unlink()`` removes the name for everybody.  Unlike SharedMemory, the
creator *owns* the name: a process that created segments and has not unlinked
them unlinks them when it ends -- at normal exit, at the end of a
multiprocessing child (any start method), and on SIGTERM while the program
has no SIGTERM handler of its own (see ``run_exit_cleanup``).  A SIGKILLed
creator cannot; ``shmq gc`` reaps those, and so does the first segment a
process creates with ``SHMQ_SWEEP=1`` in its environment.  Attaching never
registers with multiprocessing's resource tracker, and never unlinks.
"""
from __future__ import annotations

import atexit
import dataclasses
import fcntl
import mmap
import os
import signal
import sys
import threading
import time
import warnings
import weakref
from typing import Callable, Dict, List, NamedTuple, Optional, Tuple

from . import _layout as L
from . import _platform as P
from ._errors import BrokenError, ClosedError, LayoutError

__all__ = ("Segment", "SegmentView", "Participant", "ParticipantInfo", "check_header", "participant_infos", "read_participants")


class Participant(NamedTuple):
    """A process registered in a segment's participant table."""

    pid: int
    start_us: int
    role: int
    alive: bool

    @property
    def roles(self) -> List[str]:
        names = []
        for bit, label in ((L.ROLE_CREATOR, "creator"), (L.ROLE_PRODUCER, "producer"), (L.ROLE_CONSUMER, "consumer")):
            if self.role & bit:
                names.append(label)
        return names or ["attached"]


# -- what this process removes when it ends ----------------------------------
#
# One registry for everything a process has to unlink when it ends, however
# it ends short of SIGKILL:
#   * normal interpreter exit: atexit;
#   * a multiprocessing child: multiprocessing.util's exit finalizers (fork
#     and forkserver children leave through os._exit(), which skips atexit);
#     they run after the child has joined its non-daemon children;
#   * SIGTERM, while no handler of the program's own is installed (below).
# It holds the names this process created (unlinked at the end only while
# the name still refers to the file created here) and named calls of the
# layers above (a queue's owner unlinks the parts other processes made for
# it).  A forked child starts empty: it owns nothing its parent made.

#: name -> (pid, st_dev, st_ino) of the segment this process created
_owned: Dict[str, Tuple[int, int, int]] = {}
#: key -> (pid, function, args): calls of the layers above, run before the names go
_exit_calls: Dict[str, Tuple[int, Callable[..., object], tuple]] = {}
# Reentrant: the SIGTERM handler runs in the main thread, which it may have
# interrupted while it held the lock.
_registry_lock = threading.RLock()
_finalizer_pid = 0  # the process whose multiprocessing exit finalizer is registered
_sigterm_pid = 0  # the process that decided (from its main thread) about SIGTERM
#: multiprocessing.util.Finalize priority: negative, so it runs after a
#: multiprocessing process has joined its non-daemon children (which may
#: still use the names); finalizers of priority >= 0 run before that join
EXIT_PRIORITY = -10

# Open segments, so a forked child can take fresh lock descriptors.
_open_segments: "weakref.WeakSet[Segment]" = weakref.WeakSet()


def run_exit_cleanup() -> None:
    """Unlink everything this process owns now: run the registered calls
    (newest first), then unlink the segments it created that still carry
    their name.  Empties the registry; never raises for a name already gone.
    Runs by itself at the end of the process (see above)."""
    pid = os.getpid()
    with _registry_lock:
        calls = [(fn, args) for owner, fn, args in _exit_calls.values() if owner == pid]
        _exit_calls.clear()
    for fn, args in reversed(calls):
        try:
            fn(*args)
        except Exception:  # one failed call must not keep the rest
            pass
    with _registry_lock:
        owned = [(name, dev, ino) for name, (owner, dev, ino) in _owned.items() if owner == pid]
        _owned.clear()
    for name, dev, ino in owned:
        _unlink_if_ours(name, dev, ino)


def _unlink_if_ours(name: str, dev: int, ino: int) -> None:
    try:
        st = os.stat(os.path.join(P.SHM_DIR, name))
    except FileNotFoundError:
        st = None  # gone: its semaphores are still ours to remove
    except OSError:
        return
    if st is not None and (st.st_dev, st.st_ino) != (dev, ino):
        return  # unlinked and made again by someone else: theirs now
    P.shm_unlink(name)


def _at_interpreter_exit() -> None:
    mp_util = sys.modules.get("multiprocessing.util")
    if _finalizer_pid == os.getpid() and mp_util is not None and not getattr(mp_util, "_exiting", True):
        # multiprocessing's own atexit function runs after this one: it joins
        # this process's children first, then runs run_exit_cleanup.
        return
    run_exit_cleanup()


atexit.register(_at_interpreter_exit)
_exiting_pid = 0  # set when this process has begun to run its atexit functions
_exit_marked = False  # _mark_exiting is registered (fork children inherit it)


def _mark_exiting() -> None:
    global _exiting_pid
    _exiting_pid = os.getpid()


def _hook_exit() -> None:
    """Make sure this process runs run_exit_cleanup however it ends."""
    global _finalizer_pid, _exit_marked
    pid = os.getpid()
    if not _exit_marked:
        # Registered after weakref.finalize's own atexit function (a segment
        # makes its finalizer before it is owned), so it runs before it.
        _exit_marked = True
        atexit.register(_mark_exiting)
    if _finalizer_pid != pid:
        # A multiprocessing child's exit path (os._exit after these), which
        # its _bootstrap resets: registered per process.  (Without
        # multiprocessing loaded, atexit is the whole story.)
        mp_util = sys.modules.get("multiprocessing.util")
        if mp_util is not None:
            mp_util.Finalize(None, run_exit_cleanup, exitpriority=EXIT_PRIORITY)
            _finalizer_pid = pid
    if _sigterm_pid != pid:
        _install_sigterm_handler()


def _install_sigterm_handler() -> None:
    """Route SIGTERM through run_exit_cleanup if, and only if, the process
    still has the default disposition: a handler of the program's own (or
    SIG_IGN, or one set outside Python) is left alone.  Only the main thread
    may set signal handlers; other threads leave the decision to it."""
    global _sigterm_pid
    if threading.current_thread() is not threading.main_thread():
        return
    _sigterm_pid = os.getpid()
    try:
        if signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
            signal.signal(signal.SIGTERM, _on_sigterm)
    except (ValueError, OSError, RuntimeError):
        pass  # not the interpreter's main thread after all, or no signals here


def _on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM's default action, preceded by unlinking what this process owns."""
    try:
        run_exit_cleanup()
    finally:
        # Now what SIGTERM does by default: the process ends at once, and its
        # parent sees it killed by SIGTERM (no atexit, no finally blocks).
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        os.kill(os.getpid(), signal.SIGTERM)
        # (still here only if SIGTERM is blocked: it stays pending, as by default)


def _own(name: str, fd: int) -> None:
    """Record that this process created ``name`` (open as ``fd``): it unlinks
    it when it ends, unless it unlinks or disowns it first."""
    st = os.fstat(fd)
    with _registry_lock:
        _owned[name] = (os.getpid(), st.st_dev, st.st_ino)
    _hook_exit()


def disown(name: str) -> None:
    """This process no longer unlinks ``name`` when it ends."""
    with _registry_lock:
        _owned.pop(name, None)


def call_at_exit(key: str, fn: Callable[..., object], *args: object) -> None:
    """Have this process call ``fn(*args)`` when it ends (before it unlinks
    the segments it created), unless :func:`call_now` or
    :func:`cancel_at_exit` with ``key`` comes first.  A later call with the
    same ``key`` replaces the earlier.  For names a process is responsible
    for without having created them (a queue's parts made by its users)."""
    with _registry_lock:
        _exit_calls[key] = (os.getpid(), fn, args)
    _hook_exit()


def cancel_at_exit(key: str) -> None:
    """Forget the call registered as ``key`` (no error if there is none)."""
    with _registry_lock:
        _exit_calls.pop(key, None)


def call_now(key: str) -> bool:
    """Run the call registered as ``key`` now, once; False if there was none
    (never registered, cancelled, already run, or registered by the parent
    of this forked process, or the interpreter is exiting).

    At exit, weakref finalizers (a handle's) run from atexit, possibly before
    multiprocessing has joined this process's children: the call is then left
    to run_exit_cleanup, which runs after that join."""
    if _exiting_pid == os.getpid():
        return False
    with _registry_lock:
        entry = _exit_calls.pop(key, None)
    if entry is None or entry[0] != os.getpid():
        return False
    entry[1](*entry[2])
    return True


# SHMQ_SWEEP: collect dead creators' segments before this process makes its first.
_sweeper: Optional[Callable[[str], object]] = None
_swept_pid = 0


def set_sweeper(fn: Callable[[str], object]) -> None:
    """Install what ``SHMQ_SWEEP=1`` runs, with a name prefix, before a
    process creates its first segment (``_stats.collect_garbage``, which
    lives above this layer).  The prefix is ``shmq_<tag>_`` when
    ``SHMQ_NAME_TAG`` is set (a tagged application sweeps its own
    namespace only), else "" (every shmq segment of this user)."""
    global _sweeper
    _sweeper = fn


def _sweep_once() -> None:
    global _swept_pid
    pid = os.getpid()
    if _swept_pid == pid:
        return
    _swept_pid = pid
    if os.environ.get("SHMQ_SWEEP", "") in ("", "0") or _sweeper is None:
        return
    stem = P.name_stem()
    try:
        _sweeper(stem if stem != P.NAME_PREFIX else "")
    except Exception as exc:  # a sweep is a courtesy: never a reason to fail a create
        warnings.warn(f"SHMQ_SWEEP: collecting dead creators' segments failed: {exc!r}", RuntimeWarning, stacklevel=3)


def _after_fork_in_child() -> None:
    global _registry_lock
    # The child owns nothing its parent made: the parent unlinks it.
    _registry_lock = threading.RLock()
    _owned.clear()
    _exit_calls.clear()
    # Nor does it keep shmq's SIGTERM handler: until it creates a segment of
    # its own, SIGTERM does to it what it would without shmq.
    try:
        if signal.getsignal(signal.SIGTERM) is _on_sigterm:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except (ValueError, OSError, RuntimeError):
        pass
    # flock() locks belong to an open file description, which fork shares:
    # without a fresh one the child would "hold" every lock its parent holds.
    for seg in list(_open_segments):
        seg._reopen_lock_fd()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _release_mapping(mm: mmap.mmap, views: list, fds: list) -> None:
    for v in views:
        try:
            v.release()
        except (BufferError, ValueError):
            pass
    try:
        mm.close()
    except BufferError:
        # A caller still holds a view; the mapping goes when the last view does.
        pass
    for fd in fds:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass


class Segment:
    """A mapped shmq segment.

    Use :meth:`create` or :meth:`attach`; the constructor is private.
    ``buf`` is a writable memoryview of the whole segment and ``words`` the
    same memory as int64 words (see ``_layout``).
    """

    name: str
    size: int
    kind: int
    is_creator: bool
    _mmap: Optional[mmap.mmap] = None
    _lock_fd: int = -1
    _slot: int = -1
    buf: memoryview
    words: memoryview

    def __init__(self, *, _token: object = None) -> None:
        if _token is not _TOKEN:
            raise TypeError("use Segment.create() or Segment.attach()")
        self._closed = False
        self._thread_lock = threading.Lock()
        self._pid = os.getpid()

    # -- construction ---------------------------------------------------
    @classmethod
    def create(cls, kind: int, size: int, name: Optional[str] = None) -> "Segment":
        """Create a zero-filled segment of ``size`` bytes (header included).

        Raises FileExistsError if ``name`` is taken, SharedMemoryFull if
        /dev/shm has no room, ValueError for a bad name or size.
        """
        if size < L.DATA_OFFSET:
            raise ValueError(f"'size' must be at least {L.DATA_OFFSET}, got {size}")
        _sweep_once()
        if name is None:
            for _ in range(8):  # a random suffix can collide; only O_CREX can tell
                name = P.new_name()
                try:
                    fd = P.shm_create(name, size)
                    break
                except FileExistsError:
                    continue
            else:
                raise FileExistsError(f"could not find a free shared-memory name like {name!r}")
        else:
            name = P.check_name(name)
            fd = P.shm_create(name, size)
        self = cls(_token=_TOKEN)
        try:
            self._map(name, fd, size)
            w = self.words
            w[L.W_VERSION] = L.LAYOUT_VERSION
            w[L.W_KIND] = kind
            w[L.W_SIZE] = size
            w[L.W_CREATOR_PID] = os.getpid()
            w[L.W_CREATOR_START_US] = P.my_start_us()
            w[L.W_CREATED_NS] = time.time_ns()
        except BaseException:
            self._closed = True
            self._teardown()
            P.shm_unlink(name)
            raise
        self.kind = kind
        self.is_creator = True
        _own(name, fd)
        return self

    def publish(self) -> None:
        """Mark the header complete (creator only): attachers wait for this."""
        self.buf[0:8] = L.MAGIC

    @classmethod
    def attach(cls, name: str, kind: Optional[int] = None, *, wait: float = 1.0) -> "Segment":
        """Map the existing segment ``name``.

        Raises FileNotFoundError if there is no such name, PermissionError if
        it belongs to another user, LayoutError if it is not an shmq segment
        (of ``kind``, when given) of this layout version.
        """
        name = P.check_name(name)
        fd = P.shm_open(name)
        self = cls(_token=_TOKEN)
        self._fd = fd
        try:
            size = os.fstat(fd).st_size
            if size < L.DATA_OFFSET or size % L.WORD:
                raise LayoutError(
                    f"{name!r} is not an shmq segment: expected at least {L.DATA_OFFSET} bytes "
                    f"in whole 8-byte words, found {size}"
                )
            self._map(name, fd, size)
            # The creator writes MAGIC last; a young segment may still be zero.
            deadline = time.monotonic() + wait
            while bytes(self.buf[0:8]) == b"\0" * 8 and time.monotonic() < deadline:
                time.sleep(0.001)
            self._validate(kind)
        except BaseException:
            self._closed = True  # half-built: no "unclosed" warning when collected
            self._teardown()
            raise
        self.kind = self.words[L.W_KIND]
        self.is_creator = False
        return self

    def _map(self, name: str, fd: int, size: int) -> None:
        self.name = name
        self.size = size
        self._fd = fd
        self._mmap = mmap.mmap(fd, size)
        self.buf = memoryview(self._mmap)
        self.words = self.buf.cast("q")
        self._lock_fd = P.reopen_fd(fd, name)
        self._finalizer = weakref.finalize(
            self, _release_mapping, self._mmap, [self.words, self.buf], [fd, self._lock_fd]
        )
        _open_segments.add(self)

    def _validate(self, kind: Optional[int]) -> None:
        check_header(self.name, self.buf, self.size, kind)

    def _reopen_lock_fd(self) -> None:
        if self._closed or self._lock_fd < 0:
            return
        old = self._lock_fd
        try:
            self._lock_fd = P.reopen_fd(self._fd, self.name)
        except OSError:
            self._lock_fd = -1
        try:
            os.close(old)
        except OSError:
            pass
        self._pid = os.getpid()
        self._thread_lock = threading.Lock()
        self._slot = -1
        self.roles_marked = 0
        self._finalizer.detach()
        self._finalizer = weakref.finalize(
            self, _release_mapping, self._mmap, [self.words, self.buf], [self._fd, self._lock_fd]
        )

    # -- admin lock -----------------------------------------------------
    def admin_lock(self) -> "_AdminLock":
        """A context manager holding the segment's admin lock (flock: the
        kernel drops it if the holder dies).  For rare bookkeeping only."""
        return _AdminLock(self)

    # -- participants -----------------------------------------------------
    def register(self, role: int) -> None:
        """Enter this process in the participant table (idempotent per handle)."""
        w = self.words
        if self._slot >= 0:
            w[L.participant_word(self._slot) + L.P_ROLE] |= role
            return
        pid, start = os.getpid(), P.my_start_us()
        with self.admin_lock():
            chosen = -1
            for i in range(L.PARTICIPANTS):
                base = L.participant_word(i)
                p = w[base + L.P_PID]
                if p and not P.is_alive(p, w[base + L.P_START_US]):
                    w[base + L.P_PID] = p = 0  # reap: the table keeps only the living
                if p == 0 and chosen < 0:
                    chosen = i
            if chosen < 0:
                return  # table full of live processes: stay unlisted
            base = L.participant_word(chosen)
            w[base + L.P_ROLE] = role
            w[base + L.P_START_US] = start
            w[base + L.P_PID] = pid
        self._slot = chosen

    #: role bits this handle has recorded (reset in a forked child)
    roles_marked = 0

    def add_role(self, role: int) -> None:
        """Record that this process acts as ``role`` (ROLE_PRODUCER, ...)."""
        self.roles_marked |= role
        if self._slot >= 0:
            self.words[L.participant_word(self._slot) + L.P_ROLE] |= role
        else:
            self.register(role)

    def _deregister(self) -> None:
        if self._slot >= 0 and self._pid == os.getpid():
            try:
                base = L.participant_word(self._slot)
                if self.words[base + L.P_PID] == self._pid:
                    self.words[base + L.P_PID] = 0
            except (ValueError, IndexError):
                pass
        self._slot = -1

    def participants(self) -> List[Participant]:
        """The registered processes, with whether each is still alive."""
        self._check_open()
        return read_participants(self.words)

    @property
    def creator_pid(self) -> int:
        return self.words[L.W_CREATOR_PID]

    def creator_alive(self) -> bool:
        """True while the process that created the segment is running."""
        w = self.words
        return P.is_alive(w[L.W_CREATOR_PID], w[L.W_CREATOR_START_US])

    # -- lifetime -------------------------------------------------------
    @property
    def closed(self) -> bool:
        return self._closed

    def _check_open(self) -> None:
        if self._closed:
            raise ClosedError(f"segment {self.name!r} is closed")

    def check_exists(self) -> None:
        """Raise BrokenError if the name was unlinked under this handle."""
        try:
            st_name = os.stat(os.path.join(P.SHM_DIR, self.name))
            st_fd = os.fstat(self._fd)
        except FileNotFoundError as exc:
            raise BrokenError(f"shared memory {self.name!r} was removed (unlinked, or systemd RemoveIPC)") from exc
        if (st_name.st_ino, st_name.st_dev) != (st_fd.st_ino, st_fd.st_dev):
            raise BrokenError(f"shared memory {self.name!r} was removed and replaced by another segment")

    def close(self) -> None:
        """Unmap this handle.  Idempotent; the segment stays for others."""
        if self._closed:
            return
        self._closed = True
        self._deregister()
        _open_segments.discard(self)
        self._teardown()

    def _teardown(self) -> None:
        self._closed = True  # also for a half-built handle: nothing left to warn about
        fin = getattr(self, "_finalizer", None)
        if fin is not None:
            fin()
        elif self._mmap is not None:
            _release_mapping(self._mmap, [], [getattr(self, "_fd", -1), self._lock_fd])
        elif getattr(self, "_fd", -1) >= 0:
            os.close(self._fd)

    def unlink(self) -> None:
        """Remove the segment's name (and its semaphores) for every process.
        Mappings already open keep working.  Safe to call more than once."""
        self.disown()
        P.shm_unlink(self.name)

    def disown(self) -> None:
        """Hand the name's lifetime to others: this process no longer unlinks
        it at exit (whoever consumes the segment does, or ``shmq gc``)."""
        disown(self.name)

    def __enter__(self) -> "Segment":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        if not getattr(self, "_closed", True) and getattr(self, "_pid", None) == os.getpid():
            warnings.warn(f"unclosed shmq segment {getattr(self, 'name', '?')!r}", ResourceWarning, stacklevel=2)

    def __repr__(self) -> str:
        state = "closed" if self._closed else f"{self.size} bytes"
        return f"<Segment {getattr(self, 'name', '?')!r} {state}>"


class _AdminLock:
    __slots__ = ("_seg",)

    def __init__(self, seg: Segment) -> None:
        self._seg = seg

    def __enter__(self) -> None:
        seg = self._seg
        seg._check_open()
        seg._thread_lock.acquire()
        try:
            fcntl.flock(seg._lock_fd, fcntl.LOCK_EX)
        except BaseException:
            seg._thread_lock.release()
            raise

    def __exit__(self, *exc: object) -> None:
        seg = self._seg
        try:
            fcntl.flock(seg._lock_fd, fcntl.LOCK_UN)
        finally:
            seg._thread_lock.release()


_TOKEN = object()


def check_header(name: str, buf: memoryview, size: int, kind: Optional[int] = None) -> None:
    """Raise LayoutError unless ``buf`` (a mapping of the whole segment
    ``name``, ``size`` bytes) holds a complete shmq header of this layout
    version (and of ``kind``, when given)."""
    found = bytes(buf[0:8])
    if found != L.MAGIC:
        raise LayoutError(f"{name!r} is not an shmq segment: expected magic {L.MAGIC!r}, found {found!r}")
    w = buf.cast("q")
    if w[L.W_VERSION] != L.LAYOUT_VERSION:
        raise LayoutError(f"{name!r} has shmq layout version {w[L.W_VERSION]}, expected {L.LAYOUT_VERSION}")
    if w[L.W_SIZE] != size:
        raise LayoutError(f"{name!r} header says {w[L.W_SIZE]} bytes, but the segment has {size}")
    if kind is not None and w[L.W_KIND] != kind:
        want = L.KIND_NAMES.get(kind, kind)
        got = L.KIND_NAMES.get(w[L.W_KIND], w[L.W_KIND])
        raise LayoutError(f"{name!r} is an shmq {got}, expected a {want}")


def read_participants(words: memoryview) -> List[Participant]:
    """The processes registered in a segment's participant table (``words``:
    the segment as int64 words), with whether each is still alive."""
    out = []
    for i in range(L.PARTICIPANTS):
        base = L.participant_word(i)
        pid = words[base + L.P_PID]
        if pid:
            start = words[base + L.P_START_US]
            out.append(Participant(pid, start, words[base + L.P_ROLE], P.is_alive(pid, start)))
    return out


class SegmentView:
    """A read-only mapping of an existing segment, for tools that inspect
    segments without joining them (``shmq ls``/``stat``/``top``/``gc``): it
    takes no participant entry, opens no semaphore and never writes.

    ``SegmentView.open(name)`` raises FileNotFoundError, PermissionError, or
    LayoutError if ``name`` is not a complete shmq segment of this layout
    version (a segment whose creator has not published it yet included).
    ``words`` is the segment as read-only int64 words (see ``_layout``).
    """

    __slots__ = ("name", "size", "kind", "words", "_buf", "_mmap", "_ident")

    def __init__(self, name: str, mm: mmap.mmap, ident: tuple) -> None:
        self.name = name
        self.size = len(mm)
        self._mmap = mm
        self._buf = memoryview(mm)
        self.words = self._buf.cast("q")
        self._ident = ident
        self.kind = self.words[L.W_KIND]

    @classmethod
    def open(cls, name: str) -> "SegmentView":
        name = P.check_name(name)
        try:
            fd = P.shm_open_readonly(name)
        except (FileNotFoundError, PermissionError):
            raise
        except OSError as exc:
            raise LayoutError(f"{name!r} is not an shmq segment: {exc.strerror or exc}") from None
        try:
            st = os.fstat(fd)
            if st.st_size < L.DATA_OFFSET or st.st_size % L.WORD:
                raise LayoutError(
                    f"{name!r} is not an shmq segment: expected at least {L.DATA_OFFSET} bytes "
                    f"in whole 8-byte words, found {st.st_size}"
                )
            mm = mmap.mmap(fd, st.st_size, access=mmap.ACCESS_READ)
        finally:
            os.close(fd)
        try:
            # Check a copy of the header: a view of the mapping kept alive by
            # the exception's traceback would make mm.close() raise BufferError.
            header = memoryview(mm[: L.DATA_OFFSET])
            check_header(name, header, st.st_size)
            kind = header.cast("q")[L.W_KIND]
            if kind not in L.KIND_NAMES:
                raise LayoutError(f"{name!r} is an shmq segment of unknown kind {kind}")
        except BaseException:
            mm.close()
            raise
        return cls(name, mm, (st.st_dev, st.st_ino))

    @property
    def creator_pid(self) -> int:
        return self.words[L.W_CREATOR_PID]

    @property
    def created_ns(self) -> int:
        """Wall-clock creation time (``time.time_ns()``)."""
        return self.words[L.W_CREATED_NS]

    def creator_alive(self) -> bool:
        w = self.words
        return P.is_alive(w[L.W_CREATOR_PID], w[L.W_CREATOR_START_US])

    def participants(self) -> List[Participant]:
        return read_participants(self.words)

    def is_current(self) -> bool:
        """True while ``name`` still names this segment (not unlinked, not
        replaced by a newer segment of the same name)."""
        try:
            st = os.stat(os.path.join(P.SHM_DIR, self.name))
        except OSError:
            return False
        return (st.st_dev, st.st_ino) == self._ident

    def close(self) -> None:
        """Unmap (idempotent)."""
        mm = self._mmap
        if mm is None:
            return
        self._mmap = None
        self.words.release()
        self._buf.release()
        try:
            mm.close()
        except BufferError:
            pass  # a caller still holds a view of it: unmapped when that goes

    def __enter__(self) -> "SegmentView":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"<SegmentView {self.name!r} {L.KIND_NAMES.get(self.kind, self.kind)}, {self.size} bytes>"


# -- what statistics show of a segment's participants ---------------------------
@dataclasses.dataclass(frozen=True)
class ParticipantInfo:
    """One process registered with a segment."""

    pid: int
    #: "creator", "producer", "consumer" (several joined by "+"), or "attached"
    role: str
    #: the process still runs (zombies and reused pids count as dead)
    alive: bool


def participant_infos(seg: "Segment | SegmentView") -> Tuple[ParticipantInfo, ...]:
    """The participants of ``seg`` as statistics show them."""
    return tuple(ParticipantInfo(p.pid, "+".join(p.roles), p.alive) for p in seg.participants())
