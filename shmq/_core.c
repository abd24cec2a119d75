/* shmq._core: the ring's one-record moves in C, on the same bytes and the
 * same protocol as the pure-Python core in shmq/_ring.py (the readable
 * specification; see docs/core.md).
 *
 * RingCore is the base class of shmq._ring.RingBuffer when this module is
 * built and SHMQ_PURE is not set.  It holds the fields the record moves read
 * on every call (_cap, _base, _maxm, _head_seen, _tail_seen, _buf, _psem,
 * _csem) as C members, which the Python code reads and writes as ordinary
 * attributes.  Its try_write / try_read / _write_many / _read_many replace
 * the generated Python methods of the same name, and Writer / Reader the
 * closures of encoding_writer / decoding_reader (shmq.Queue's put and get); everything off the common path (_refresh_free, _pad,
 * _skip_pad, the corrupt-word errors, _failure, the doorbells, the lock's
 * slow path and recovery) is a call back into the Python methods, so there
 * is one implementation of each of those.
 *
 * Memory order: every shared index word is loaded with acquire and stored
 * with release semantics (__atomic builtins), so a reader that sees TAIL sees
 * the record before it on any CPU, and a writer that sees HEAD sees the
 * reader done with the bytes before it.  The payload is copied with memcpy.
 *
 * The GIL is held throughout: a one-record move copies at most one record
 * (a 64-byte record costs less than releasing and retaking the GIL) and never
 * waits here (a busy lock is handed to RobustLock._acquire_slow, in Python,
 * which sleeps in bounded slices with the GIL released by SemLock).
 *
 * Test hook: SHMQ_CORE_STOP_AT=N (read at import) makes a record move stop
 * the process with SIGSTOP at step N (the STEP(N) lines: try_write 1-6,
 * try_read 11-15, _read_many 21-22, _write_many 31-33; a topic's publish
 * move, broadcast_write, 41-44), so a test can
 * SIGKILL it there (tests/test_core.py).  Unset, it costs one predictable
 * branch per step.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <pthread.h>
#include <signal.h>
#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#ifndef Py_NewRef /* 3.9 */
static inline PyObject *shmq_newref(PyObject *o) { Py_INCREF(o); return o; }
#define Py_NewRef(o) shmq_newref((PyObject *)(o))
#endif
#ifndef PySet_CheckExact /* 3.9: only PyAnySet_CheckExact */
#define PySet_CheckExact(op) (Py_TYPE(op) == &PySet_Type)
#endif

/* Word indices of the ring header (shmq/_layout.py); _ring.py compares them
 * with LAYOUT below and falls back to the pure-Python core if they differ. */
#define W_TAIL 272
#define W_MSGS_IN 273
#define W_HEAD 280
#define W_MSGS_OUT 281
#define W_CONSUMER_WAITING 288
#define W_PRODUCER_WAITING 296
#define W_PRODUCER_LOCK 304
#define W_CONSUMER_LOCK 312
#define ROLE_CONSUMER 4

static inline int64_t load_word(const char *mem, Py_ssize_t i) {
    return __atomic_load_n((const int64_t *)(mem + 8 * i), __ATOMIC_ACQUIRE);
}
static inline void store_word(char *mem, Py_ssize_t i, int64_t v) {
    __atomic_store_n((int64_t *)(mem + 8 * i), v, __ATOMIC_RELEASE);
}

static long my_pid; /* _sync._PID: refreshed in a forked child */
static void refresh_pid(void) { my_pid = (long)getpid(); }

static long stop_at = 0; /* SHMQ_CORE_STOP_AT */
#define STEP(k)                                                                \
    do {                                                                       \
        if (stop_at == (k)) raise(SIGSTOP);                                    \
    } while (0)

static PyObject *s_acquire, *s_release, *s_acquire_slow, *s_plock, *s_clock,
    *s_refresh_free, *s_pad, *s_skip_pad, *s_failure, *s_corrupt_indices,
    *s_corrupt_record, *s_not_empty, *s_not_full, *s_ring, *s_segment,
    *s_roles_marked, *s_add_role, *s_py_try_write;

typedef struct {
    PyObject_HEAD
    long long cap, base, maxm, head_seen, tail_seen;
    PyObject *buf, *psem, *csem;
} RingCore;

static int RingCore_traverse(RingCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->buf);
    Py_VISIT(self->psem);
    Py_VISIT(self->csem);
    return 0;
}

static int RingCore_clear(RingCore *self) {
    Py_CLEAR(self->buf);
    Py_CLEAR(self->psem);
    Py_CLEAR(self->csem);
    return 0;
}

static void RingCore_dealloc(RingCore *self) {
    PyObject_GC_UnTrack(self);
    RingCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* ---- helpers: calls back into the Python slow paths ------------------- */

/* Call self.<meth>(*args) and return a new reference (NULL on error). */
static PyObject *call_method(PyObject *self, PyObject *meth, PyObject *args) {
    PyObject *f = PyObject_GetAttr(self, meth);
    if (f == NULL) return NULL;
    PyObject *r = PyObject_Call(f, args, NULL);
    Py_DECREF(f);
    return r;
}

/* Raise self._corrupt_indices(a, b) / self._corrupt_record(a, n, b). */
static void raise_corrupt(PyObject *self, PyObject *meth, PyObject *args) {
    if (args == NULL) return;
    PyObject *exc = call_method(self, meth, args);
    Py_DECREF(args);
    if (exc != NULL) {
        PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
        Py_DECREF(exc);
    }
}

/* An exception is set: if it is a ValueError, replace it by
 * self._failure(exc) (the Python moves' `except ValueError as exc: raise
 * self._failure(exc)`). */
static void map_failure(PyObject *self) {
    if (!PyErr_ExceptionMatches(PyExc_ValueError)) return;
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL) PyException_SetTraceback(value, tb);
    PyObject *err = PyObject_CallMethodOneArg(self, s_failure, value);
    if (err != NULL) {
        if (err != value) PyException_SetContext(err, Py_NewRef(value));
        PyErr_SetObject((PyObject *)Py_TYPE(err), err);
        Py_DECREF(err);
    }
    Py_XDECREF(type);
    Py_XDECREF(value);
    Py_XDECREF(tb);
}

/* Ring self.<bell> (a Doorbell). 0 or -1. */
static int ring_bell(PyObject *self, PyObject *bell) {
    PyObject *b = PyObject_GetAttr(self, bell);
    if (b == NULL) return -1;
    PyObject *r = PyObject_CallMethodNoArgs(b, s_ring);
    Py_DECREF(b);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* RobustLock.acquire, inlined as the Python moves do: the semaphore without
 * blocking, else self.<lock>._acquire_slow(None).  0 or -1. */
static int take_lock(PyObject *self, PyObject *sem, PyObject *lockname) {
    PyObject *r = PyObject_CallMethodOneArg(sem, s_acquire, Py_False);
    if (r == NULL) return -1;
    int got = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (got < 0) return -1;
    if (got) return 0;
    PyObject *lock = PyObject_GetAttr(self, lockname);
    if (lock == NULL) return -1;
    r = PyObject_CallMethodOneArg(lock, s_acquire_slow, Py_None);
    Py_DECREF(lock);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* The Python moves' `finally:` -- the owner word back to 0 (if the view is
 * still there), then sem.release(); keeps a pending exception. */
static int drop_lock(char *mem, Py_ssize_t owner_word, PyObject *sem) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (mem != NULL) store_word(mem, owner_word, 0);
    PyObject *r = PyObject_CallMethodNoArgs(sem, s_release);
    Py_XDECREF(r);
    if (type != NULL) {
        if (r == NULL) { /* the move's own error wins, as in Python's finally */
            PyErr_Clear();
        }
        PyErr_Restore(type, value, tb);
        return -1;
    }
    return r == NULL ? -1 : 0;
}

static int checked_add(int64_t a, int64_t b, int64_t *out) {
    if (__builtin_add_overflow(a, b, out)) {
        PyErr_SetString(PyExc_ValueError, "a shared word would overflow int64");
        return -1;
    }
    return 0;
}

/* Python's a % b (b > 0): never negative. */
static inline int64_t py_mod(int64_t a, int64_t b) {
    int64_t r = a % b;
    return r < 0 ? r + b : r;
}

/* maxm and MSGS_IN - MSGS_OUT >= maxm, in Python's unbounded ints. */
static inline int msgs_full(const char *mem, int64_t maxm) {
    int64_t in = load_word(mem, W_MSGS_IN), out = load_word(mem, W_MSGS_OUT), d;
    if (__builtin_sub_overflow(in, out, &d)) return in > out;
    return d >= maxm;
}

/* ---- try_write: mirrors RingBuffer.try_write (the generated Python) ---- */

/* The record move of try_write and of the put closure: append the n bytes
 * at src.  Py_True if written, Py_False if full, NULL with an exception. */
static PyObject *write_record(RingCore *self, const char *src, int64_t n) {
    PyObject *me = (PyObject *)self;
    int64_t cap = self->cap, base = self->base, maxm = self->maxm;
    PyObject *sem = self->psem;
    if (sem == Py_None) sem = NULL;
    Py_XINCREF(sem);
    Py_buffer view;
    view.obj = NULL;
    char *mem = NULL;
    PyObject *result = NULL;
    if (sem != NULL && take_lock(me, sem, s_plock) < 0) {
        Py_DECREF(sem);
        return NULL;
    }
    STEP(1);
    /* the view: ValueError once the handle is closed (released) */
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        view.obj = NULL;
        goto fail;
    }
    mem = (char *)view.buf;
    if (sem != NULL) store_word(mem, W_PRODUCER_LOCK, my_pid);
    int64_t tail = load_word(mem, W_TAIL);
    int64_t need = (n + 15) & -8;
    /* HEAD is the consumers' cache line: read it only when the last value
     * seen says there is no room (it only grows, so a stale one is safe). */
    int64_t free_, used;
    /* free = cap - tail + head_seen, in Python's unbounded ints: a stale
     * HEAD_SEEN (_LONG_AGO) or a corrupt TAIL that would overflow here, or
     * a TAIL before the HEAD seen, takes the refresh (which checks both). */
    if (__builtin_sub_overflow(tail, self->head_seen, &used) || used < 0 || used > cap)
        free_ = -1;
    else
        free_ = cap - used;
    if (need > free_) {
        PyObject *f = PyObject_CallMethod(me, "_refresh_free", "LL", (long long)tail, (long long)n);
        if (f == NULL) goto fail;
        free_ = PyLong_AsLongLong(f);
        Py_DECREF(f);
        if (free_ == -1 && PyErr_Occurred()) goto fail;
    }
    int64_t off = py_mod(tail, cap), pos;
    if (need > free_ || (maxm && msgs_full(mem, maxm))) {
        pos = -1;
    } else if (need <= cap - off) {
        pos = base + off;
    } else { /* the record would wrap: pad the end of the data area, start it at 0 */
        if (cap - off + need > free_) { /* the HEAD seen may be old: look again first */
            PyObject *f = PyObject_CallMethod(me, "_refresh_free", "LL", (long long)tail, (long long)n);
            if (f == NULL) goto fail;
            free_ = PyLong_AsLongLong(f);
            Py_DECREF(f);
            if (free_ == -1 && PyErr_Occurred()) goto fail;
        }
        STEP(2);
        PyObject *t = PyObject_CallMethod(me, "_pad", "LLLL", (long long)tail, (long long)(cap - off),
                                          (long long)need, (long long)free_);
        if (t == NULL) goto fail;
        tail = PyLong_AsLongLong(t);
        Py_DECREF(t);
        if (tail == -1 && PyErr_Occurred()) goto fail;
        pos = tail >= 0 ? base : -1;
    }
    if (pos < 0) {
        result = Py_NewRef(Py_False);
        goto done;
    }
    if (pos < base || pos + 8 + n > base + cap) { /* cannot happen with checked indices */
        PyErr_SetString(PyExc_ValueError, "record placed outside the data area");
        goto fail;
    }
    int64_t msgs_in, new_tail;
    if (checked_add(load_word(mem, W_MSGS_IN), 1, &msgs_in) < 0 || checked_add(tail, need, &new_tail) < 0)
        goto fail;
    memcpy(mem + pos + 8, src, (size_t)n);
    STEP(3);
    store_word(mem, pos >> 3, n);
    STEP(4);
    store_word(mem, W_MSGS_IN, msgs_in);
    STEP(5);
    store_word(mem, W_TAIL, new_tail);
    STEP(6);
    if (load_word(mem, W_CONSUMER_WAITING) && ring_bell(me, s_not_empty) < 0) goto fail;
    result = Py_NewRef(Py_True);
    goto done;
fail:
    map_failure(me);
done:
    if (sem != NULL) {
        if (drop_lock(mem, W_PRODUCER_LOCK, sem) < 0) Py_CLEAR(result);
        Py_DECREF(sem);
    }
    if (view.obj != NULL) PyBuffer_Release(&view);
    return result;
}

/* ---- try_read: mirrors RingBuffer.try_read (the generated Python) ------ */

static PyObject *RingCore_try_write(RingCore *self, PyObject *data) {
    if (!PyBytes_CheckExact(data)) /* other buffers: _as_bytes and friends */
        return PyObject_CallMethodOneArg((PyObject *)self, s_py_try_write, data);
    return write_record(self, PyBytes_AS_STRING(data), (int64_t)PyBytes_GET_SIZE(data));
}

/* ---- try_read: mirrors RingBuffer.try_read (the generated Python) ------ */
/* (also the record move of the get closure): the record, None if empty */
static PyObject *RingCore_try_read(RingCore *self, PyObject *Py_UNUSED(ignored)) {
    PyObject *me = (PyObject *)self;
    int64_t cap = self->cap, base = self->base;
    PyObject *sem = self->csem;
    if (sem == Py_None) sem = NULL;
    Py_buffer view;
    view.obj = NULL;
    char *mem = NULL;
    PyObject *result = NULL;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        map_failure(me);
        return NULL;
    }
    mem = (char *)view.buf;
    Py_XINCREF(sem);
    if (sem != NULL) {
        int64_t head = load_word(mem, W_HEAD);
        if (head >= self->tail_seen && head == load_word(mem, W_TAIL)) {
            Py_DECREF(sem);
            PyBuffer_Release(&view);
            Py_RETURN_NONE; /* empty: no need for the lock */
        }
        if (take_lock(me, sem, s_clock) < 0) {
            Py_DECREF(sem);
            PyBuffer_Release(&view);
            return NULL;
        }
        store_word(mem, W_CONSUMER_LOCK, my_pid);
    }
    STEP(11);
    int64_t head = load_word(mem, W_HEAD);
    int64_t tail_seen = self->tail_seen;
    /* TAIL is the producers' cache line: read it only when caught up. */
    if (head >= tail_seen) { /* >=: other consumers may be ahead of it */
        tail_seen = load_word(mem, W_TAIL);
        PyObject *seg = PyObject_GetAttr(me, s_segment);
        if (seg == NULL) goto fail;
        PyObject *roles = PyObject_GetAttr(seg, s_roles_marked);
        if (roles == NULL) {
            Py_DECREF(seg);
            goto fail;
        }
        long r = PyLong_AsLong(roles);
        Py_DECREF(roles);
        if (r == -1 && PyErr_Occurred()) {
            Py_DECREF(seg);
            goto fail;
        }
        if (!(r & ROLE_CONSUMER)) {
            PyObject *x = PyObject_CallMethod(seg, "add_role", "i", ROLE_CONSUMER);
            if (x == NULL) {
                Py_DECREF(seg);
                goto fail;
            }
            Py_DECREF(x);
        }
        Py_DECREF(seg);
        if (!(0 <= head && head <= tail_seen && tail_seen - head <= cap)) {
            raise_corrupt(me, s_corrupt_indices, Py_BuildValue("LL", (long long)head, (long long)tail_seen));
            goto fail;
        }
        self->tail_seen = tail_seen; /* (only once checked: later reads trust it) */
        if (head == tail_seen) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    }
    int64_t pos = base + py_mod(head, cap);
    int64_t n = load_word(mem, pos >> 3), end;
    if (n < 0) { /* a pad fills the end of the data area: the record after it starts the area */
        STEP(12);
        PyObject *t = PyObject_CallMethod(me, "_skip_pad", "LL", (long long)head, (long long)n);
        if (t == NULL) goto fail;
        long long h2, n2, e2;
        if (!PyArg_ParseTuple(t, "LLL", &h2, &n2, &e2)) {
            Py_DECREF(t);
            goto fail;
        }
        Py_DECREF(t);
        head = h2, n = n2, end = e2;
        pos = base;
        if (n < 0) {
            result = Py_NewRef(Py_None);
            goto done;
        }
    } else {
        /* (n > cap: end would be past TAIL <= HEAD + cap, as in Python, and
         * computing it could overflow) */
        if (n > cap || __builtin_add_overflow(head, (n + 15) & -8, &end) || end > tail_seen) {
            raise_corrupt(me, s_corrupt_record,
                          Py_BuildValue("LLL", (long long)head, (long long)n, (long long)tail_seen));
            goto fail;
        }
    }
    if (n > cap - 8 || pos + 8 + n > base + cap) { /* a length the data area cannot hold */
        raise_corrupt(me, s_corrupt_record, Py_BuildValue("LLL", (long long)head, (long long)n, (long long)tail_seen));
        goto fail;
    }
    int64_t msgs_out;
    if (checked_add(load_word(mem, W_MSGS_OUT), 1, &msgs_out) < 0) goto fail;
    result = PyBytes_FromStringAndSize(mem + pos + 8, (Py_ssize_t)n);
    if (result == NULL) goto fail;
    STEP(13);
    store_word(mem, W_MSGS_OUT, msgs_out);
    STEP(14);
    store_word(mem, W_HEAD, end);
    STEP(15);
    if (load_word(mem, W_PRODUCER_WAITING) && ring_bell(me, s_not_full) < 0) {
        Py_CLEAR(result);
        goto fail;
    }
    goto done;
fail:
    map_failure(me);
done:
    if (sem != NULL) {
        if (drop_lock(mem, W_CONSUMER_LOCK, sem) < 0) Py_CLEAR(result);
        Py_DECREF(sem);
    }
    PyBuffer_Release(&view);
    return result;
}

/* ---- _write_many: mirrors RingBuffer._write_many (the generated Python):
 * try_write_many's records, under the producer lock the caller holds ----- */
static int64_t refresh_free(PyObject *me, int64_t tail, int64_t n) {
    PyObject *f = PyObject_CallMethod(me, "_refresh_free", "LL", (long long)tail, (long long)n);
    if (f == NULL) return -2;
    int64_t v = PyLong_AsLongLong(f);
    Py_DECREF(f);
    if (v == -1 && PyErr_Occurred()) return -2;
    return v;
}

static PyObject *RingCore_write_many(RingCore *self, PyObject *items) {
    PyObject *me = (PyObject *)self;
    int64_t cap = self->cap, base = self->base, maxm = self->maxm;
    Py_buffer view;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        map_failure(me);
        return NULL;
    }
    char *mem = (char *)view.buf;
    PyObject *it = NULL, *data = NULL;
    int64_t tail = load_word(mem, W_TAIL);
    int64_t room_msgs = -1;
    if (maxm) {
        int64_t held;
        if (__builtin_sub_overflow(load_word(mem, W_MSGS_IN), load_word(mem, W_MSGS_OUT), &held) ||
            __builtin_sub_overflow(maxm, held, &room_msgs)) {
            PyErr_SetString(PyExc_ValueError, "message counters out of range");
            goto fail;
        }
    }
    int64_t count = 0, pending = 0; /* records written; of those, not yet published */
    it = PyObject_GetIter(items);
    if (it == NULL) goto fail;
    while ((data = PyIter_Next(it)) != NULL) {
        Py_buffer src;
        if (PyBytes_CheckExact(data)) {
            src.buf = PyBytes_AS_STRING(data);
            src.len = PyBytes_GET_SIZE(data);
            src.obj = NULL;
        } else if (PyObject_GetBuffer(data, &src, PyBUF_C_CONTIGUOUS) < 0) {
            goto fail; /* (Python: _as_bytes raises TypeError for these too) */
        }
        int64_t n = (int64_t)src.len;
        if (count && n > cap - 8) {
            if (src.obj) PyBuffer_Release(&src);
            break; /* (the first record raises MessageTooLarge below) */
        }
        int64_t need = (n + 15) & -8, used, free_, pos;
        /* HEAD is the consumers' cache line: read it only when the last value
         * seen says there is no room (see write_record) */
        if (__builtin_sub_overflow(tail, self->head_seen, &used) || used < 0 || used > cap)
            free_ = -1;
        else
            free_ = cap - used;
        if (need > free_ && (free_ = refresh_free(me, tail, n)) == -2) goto fail_src;
        int64_t off = py_mod(tail, cap);
        if (need > free_ || count == room_msgs) {
            pos = -1;
        } else if (need <= cap - off) {
            pos = base + off;
        } else { /* the record would wrap: pad the end of the data area, start it at 0 */
            if (cap - off + need > free_ && (free_ = refresh_free(me, tail, n)) == -2) goto fail_src;
            if (pending) {
                int64_t msgs_in;
                if (checked_add(load_word(mem, W_MSGS_IN), pending, &msgs_in) < 0) goto fail_src;
                store_word(mem, W_MSGS_IN, msgs_in);
                store_word(mem, W_TAIL, tail);
                if (load_word(mem, W_CONSUMER_WAITING) && ring_bell(me, s_not_empty) < 0) goto fail_src;
                pending = 0;
            }
            STEP(31);
            PyObject *t = PyObject_CallMethod(me, "_pad", "LLLL", (long long)tail, (long long)(cap - off),
                                              (long long)need, (long long)free_);
            if (t == NULL) goto fail_src;
            tail = PyLong_AsLongLong(t);
            Py_DECREF(t);
            if (tail == -1 && PyErr_Occurred()) goto fail_src;
            pos = tail >= 0 ? base : -1;
        }
        if (pos < 0) {
            if (src.obj) PyBuffer_Release(&src);
            Py_CLEAR(data);
            break;
        }
        if (pos < base || pos + 8 + n > base + cap) {
            PyErr_SetString(PyExc_ValueError, "record placed outside the data area");
            goto fail_src;
        }
        memcpy(mem + pos + 8, src.buf, (size_t)n);
        store_word(mem, pos >> 3, n);
        if (src.obj) PyBuffer_Release(&src);
        Py_CLEAR(data);
        tail += need; /* (tail is where the record went: past a pad, if any) */
        count++;
        pending++;
        continue;
    fail_src:
        if (src.obj) PyBuffer_Release(&src);
        goto fail;
    }
    if (PyErr_Occurred()) goto fail;
    if (pending) {
        int64_t msgs_in;
        if (checked_add(load_word(mem, W_MSGS_IN), pending, &msgs_in) < 0) goto fail;
        STEP(32);
        store_word(mem, W_MSGS_IN, msgs_in);
        STEP(33);
        store_word(mem, W_TAIL, tail);
        if (load_word(mem, W_CONSUMER_WAITING) && ring_bell(me, s_not_empty) < 0) goto fail;
    }
    Py_XDECREF(data);
    Py_DECREF(it);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(count);
fail:
    Py_XDECREF(data);
    Py_XDECREF(it);
    map_failure(me);
    PyBuffer_Release(&view);
    return NULL;
}

/* ---- _read_many: mirrors RingBuffer._read_many (the generated Python):
 * try_read_many's records, under the consumer lock the caller holds ------ */
static PyObject *RingCore_read_many(RingCore *self, PyObject *args) {
    PyObject *me = (PyObject *)self;
    PyObject *items_obj, *bytes_obj;
    if (!PyArg_ParseTuple(args, "OO:_read_many", &items_obj, &bytes_obj)) return NULL;
    int over1, over2; /* a limit past int64 is no limit (Python's ints are unbounded) */
    long long max_items = PyLong_AsLongLongAndOverflow(items_obj, &over1);
    if (max_items == -1 && PyErr_Occurred()) return NULL;
    long long max_bytes = PyLong_AsLongLongAndOverflow(bytes_obj, &over2);
    if (max_bytes == -1 && PyErr_Occurred()) return NULL;
    if (over1) max_items = over1 > 0 ? LLONG_MAX : LLONG_MIN;
    if (over2) max_bytes = over2 > 0 ? LLONG_MAX : LLONG_MIN;
    int64_t cap = self->cap, base = self->base;
    Py_buffer view;
    PyObject *out = NULL;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        map_failure(me);
        return NULL;
    }
    char *mem = (char *)view.buf;
    out = PyList_New(0);
    if (out == NULL) goto fail;
    int64_t head = load_word(mem, W_HEAD), start = head;
    int64_t tail_seen = load_word(mem, W_TAIL);
    PyObject *seg = PyObject_GetAttr(me, s_segment);
    if (seg == NULL) goto fail;
    PyObject *roles = PyObject_GetAttr(seg, s_roles_marked);
    long r = roles == NULL ? -1 : PyLong_AsLong(roles);
    Py_XDECREF(roles);
    if (r == -1 && PyErr_Occurred()) {
        Py_DECREF(seg);
        goto fail;
    }
    if (!(r & ROLE_CONSUMER)) {
        PyObject *x = PyObject_CallMethod(seg, "add_role", "i", ROLE_CONSUMER);
        if (x == NULL) {
            Py_DECREF(seg);
            goto fail;
        }
        Py_DECREF(x);
    }
    Py_DECREF(seg);
    if (!(0 <= head && head <= tail_seen && tail_seen - head <= cap)) {
        raise_corrupt(me, s_corrupt_indices, Py_BuildValue("LL", (long long)head, (long long)tail_seen));
        goto fail;
    }
    self->tail_seen = tail_seen; /* (only once checked: later reads trust it) */
    int64_t nbytes = 0;
    while (head != tail_seen && PyList_GET_SIZE(out) < max_items && nbytes < max_bytes) {
        int64_t pos = base + py_mod(head, cap);
        int64_t n = load_word(mem, pos >> 3), end;
        if (n < 0) {
            PyObject *e = PyObject_CallMethod(me, "_check_pad", "LLL", (long long)head, (long long)n,
                                              (long long)tail_seen);
            if (e == NULL) goto fail;
            head = PyLong_AsLongLong(e);
            Py_DECREF(e);
            if (head == -1 && PyErr_Occurred()) goto fail;
            continue;
        }
        if (n > cap - 8 || pos + 8 + n > base + cap || __builtin_add_overflow(head, (n + 15) & -8, &end) ||
            end > tail_seen) {
            raise_corrupt(me, s_corrupt_record,
                          Py_BuildValue("LLL", (long long)head, (long long)n, (long long)tail_seen));
            goto fail;
        }
        PyObject *rec = PyBytes_FromStringAndSize(mem + pos + 8, (Py_ssize_t)n);
        if (rec == NULL || PyList_Append(out, rec) < 0) {
            Py_XDECREF(rec);
            goto fail;
        }
        Py_DECREF(rec);
        nbytes += n;
        head = end;
    }
    if (head != start) {
        int64_t msgs_out;
        if (checked_add(load_word(mem, W_MSGS_OUT), PyList_GET_SIZE(out), &msgs_out) < 0) goto fail;
        STEP(21);
        store_word(mem, W_MSGS_OUT, msgs_out);
        STEP(22);
        store_word(mem, W_HEAD, head);
        if (load_word(mem, W_PRODUCER_WAITING) && ring_bell(me, s_not_full) < 0) goto fail;
    }
    PyBuffer_Release(&view);
    return out;
fail:
    Py_XDECREF(out);
    map_failure(me);
    PyBuffer_Release(&view);
    return NULL;
}

static PyMethodDef RingCore_methods[] = {
    {"try_write", (PyCFunction)RingCore_try_write, METH_O,
     "Append one record.  True if written, False if the ring is full\n"
     "(in bytes or in messages).  Raises MessageTooLarge if it can never fit.\n"
     "(C core: mirrors the generated RingBuffer.try_write.)"},
    {"try_read", (PyCFunction)RingCore_try_read, METH_NOARGS,
     "Remove and return the oldest record, or None if the ring is empty.\n"
     "Raises CorruptError if the ring's indices or the record's length\n"
     "word are impossible.  (C core: mirrors the generated RingBuffer.try_read.)"},
    {"_write_many", (PyCFunction)RingCore_write_many, METH_O,
     "try_write_many under the producer lock.  (C core: mirrors the generated RingBuffer._write_many.)"},
    {"_read_many", (PyCFunction)RingCore_read_many, METH_VARARGS,
     "try_read_many under the consumer lock.  (C core: mirrors the generated RingBuffer._read_many.)"},
    {NULL, NULL, 0, NULL}};

static PyMemberDef RingCore_members[] = {
    /* (the geometry: C copies of RingBuffer's _cap, _base, _maxm, which stay
     * in its __dict__, where its Python methods read them faster) */
    {"_c_cap", T_LONGLONG, offsetof(RingCore, cap), 0, NULL},
    {"_c_base", T_LONGLONG, offsetof(RingCore, base), 0, NULL},
    {"_c_maxm", T_LONGLONG, offsetof(RingCore, maxm), 0, NULL},
    {"_head_seen", T_LONGLONG, offsetof(RingCore, head_seen), 0, NULL},
    {"_tail_seen", T_LONGLONG, offsetof(RingCore, tail_seen), 0, NULL},
    /* T_OBJECT_EX: the kind of member the interpreter reads fastest */
    {"_buf", T_OBJECT_EX, offsetof(RingCore, buf), 0, NULL},
    {"_psem", T_OBJECT_EX, offsetof(RingCore, psem), 0, NULL},
    {"_csem", T_OBJECT_EX, offsetof(RingCore, csem), 0, NULL},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject RingCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.RingCore",
    .tp_basicsize = sizeof(RingCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C record moves under shmq's RingBuffer (see docs/core.md).",
    .tp_dealloc = (destructor)RingCore_dealloc,
    .tp_traverse = (traverseproc)RingCore_traverse,
    .tp_clear = (inquiry)RingCore_clear,
    .tp_methods = RingCore_methods,
    .tp_members = RingCore_members,
};


/* ---- the Queue's put and get: mirror the closures that
 * RingBuffer.encoding_writer / decoding_reader return ----------------------
 * Writer(ring, dumps, protocol, buffer_callback, on_error, limit, on_long,
 * on_full) is put(owner, obj, block=True, timeout=None); Reader(ring, loads,
 * on_error, on_empty, held, on_held) is get(owner, block=True,
 * timeout=None).  Both are vectorcall objects with a __dict__ (the Queue
 * sets __name__/__qualname__/__doc__ and binds them with types.MethodType).
 * The pickling, the slow paths and the waits stay Python callables. */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict;
    PyObject *ring, *dumps, *protocol, *buffer_callback, *on_error, *on_long, *on_full;
    Py_ssize_t limit;
} Writer;

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *dict;
    PyObject *ring, *loads, *on_error, *on_empty, *held, *on_held;
} Reader;

static PyObject *kw_buffer_callback; /* ("buffer_callback",) */

/* owner, then one or two of obj/block/timeout, positional or by keyword. */
static int parse_call(PyObject *const *args, size_t nargsf, PyObject *kwnames, int npos_min,
                      PyObject **out, int nout, const char *const *names) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs < npos_min || nargs > nout) {
        PyErr_Format(PyExc_TypeError, "expected %d to %d positional arguments, got %zd", npos_min, nout, nargs);
        return -1;
    }
    for (Py_ssize_t i = 0; i < nargs; i++) out[i] = args[i];
    if (kwnames != NULL) {
        Py_ssize_t nkw = PyTuple_GET_SIZE(kwnames);
        for (Py_ssize_t k = 0; k < nkw; k++) {
            PyObject *key = PyTuple_GET_ITEM(kwnames, k);
            int found = 0;
            for (int i = npos_min; i < nout; i++) {
                if (PyUnicode_CompareWithASCIIString(key, names[i]) == 0) {
                    if (out[i] != NULL) {
                        PyErr_Format(PyExc_TypeError, "got multiple values for argument '%s'", names[i]);
                        return -1;
                    }
                    out[i] = args[nargs + k];
                    found = 1;
                }
            }
            if (!found) {
                PyErr_Format(PyExc_TypeError, "got an unexpected keyword argument '%U'", key);
                return -1;
            }
        }
    }
    return 0;
}

static const char *const put_names[] = {"owner", "obj", "block", "timeout"};
static const char *const get_names[] = {"owner", "block", "timeout"};

/* mirrors the closure `put` of RingBuffer.encoding_writer */
static PyObject *Writer_call(Writer *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *a[4] = {NULL, NULL, NULL, NULL};
    if (parse_call(args, nargsf, kwnames, 2, a, 4, put_names) < 0) return NULL;
    PyObject *owner = a[0], *obj = a[1];
    PyObject *block = a[2] ? a[2] : Py_True, *timeout = a[3] ? a[3] : Py_None;
    PyObject *dargs[3] = {obj, self->protocol, self->buffer_callback};
    PyObject *data = PyObject_Vectorcall(self->dumps, dargs, 2, kw_buffer_callback);
    if (data == NULL) {
        if (!PyErr_ExceptionMatches(PyExc_Exception)) return NULL;
        PyObject *type, *value, *tb;
        PyErr_Fetch(&type, &value, &tb);
        PyErr_NormalizeException(&type, &value, &tb);
        if (tb != NULL) PyException_SetTraceback(value, tb);
        data = PyObject_CallFunctionObjArgs(self->on_error, obj, value, NULL);
        Py_XDECREF(type);
        Py_XDECREF(value);
        Py_XDECREF(tb);
        if (data == NULL) return NULL;
    }
    PyObject *result = NULL;
    Py_buffer view;
    Py_ssize_t n = PyObject_Size(data); /* len(data): on_error may give a marker with a __len__ */
    if (n < 0) goto out;
    if (n > self->limit) {
        result = PyObject_CallFunctionObjArgs(self->on_long, owner, obj, data, block, timeout, NULL);
        goto out;
    }
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) goto out;
    PyObject *written = write_record((RingCore *)self->ring, (const char *)view.buf, (int64_t)view.len);
    PyBuffer_Release(&view);
    if (written == NULL) goto out;
    if (written == Py_True) {
        Py_DECREF(written);
        result = Py_NewRef(Py_None);
        goto out;
    }
    Py_DECREF(written);
    result = PyObject_CallFunctionObjArgs(self->on_full, owner, data, block, timeout, NULL);
out:
    Py_DECREF(data);
    return result;
}

/* mirrors the closure `get` of RingBuffer.decoding_reader */
static PyObject *Reader_call(Reader *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    PyObject *a[3] = {NULL, NULL, NULL};
    if (parse_call(args, nargsf, kwnames, 1, a, 3, get_names) < 0) return NULL;
    PyObject *owner = a[0];
    PyObject *block = a[1] ? a[1] : Py_True, *timeout = a[2] ? a[2] : Py_None;
    int held = PyObject_IsTrue(self->held);
    if (held < 0) return NULL;
    if (held) return PyObject_CallFunctionObjArgs(self->on_held, owner, block, timeout, NULL);
    PyObject *data = RingCore_try_read((RingCore *)self->ring, NULL);
    if (data == NULL) return NULL;
    if (data != Py_None && PyBytes_GET_SIZE(data) > 0) {
        PyObject *obj = PyObject_CallOneArg(self->loads, data);
        if (obj == NULL && PyErr_ExceptionMatches(PyExc_Exception)) {
            PyObject *type, *value, *tb;
            PyErr_Fetch(&type, &value, &tb);
            PyErr_NormalizeException(&type, &value, &tb);
            if (tb != NULL) PyException_SetTraceback(value, tb);
            obj = PyObject_CallFunctionObjArgs(self->on_error, owner, data, value, NULL);
            Py_XDECREF(type);
            Py_XDECREF(value);
            Py_XDECREF(tb);
        }
        Py_DECREF(data);
        return obj;
    }
    PyObject *r = PyObject_CallFunctionObjArgs(self->on_empty, owner, data, block, timeout, NULL);
    Py_DECREF(data);
    return r;
}

static PyObject *Writer_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *ring, *dumps, *protocol, *bcb, *on_error, *on_long, *on_full;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "O!OOOOnOO:Writer", &RingCoreType, &ring, &dumps, &protocol, &bcb, &on_error, &limit,
                          &on_long, &on_full))
        return NULL;
    Writer *self = (Writer *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = (vectorcallfunc)Writer_call;
    self->ring = Py_NewRef(ring);
    self->dumps = Py_NewRef(dumps);
    self->protocol = Py_NewRef(protocol);
    self->buffer_callback = Py_NewRef(bcb);
    self->on_error = Py_NewRef(on_error);
    self->on_long = Py_NewRef(on_long);
    self->on_full = Py_NewRef(on_full);
    self->limit = limit;
    return (PyObject *)self;
}

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *ring, *loads, *on_error, *on_empty, *held = NULL, *on_held = Py_None;
    if (!PyArg_ParseTuple(args, "O!OOO|OO:Reader", &RingCoreType, &ring, &loads, &on_error, &on_empty, &held, &on_held))
        return NULL;
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = (vectorcallfunc)Reader_call;
    self->ring = Py_NewRef(ring);
    self->loads = Py_NewRef(loads);
    self->on_error = Py_NewRef(on_error);
    self->on_empty = Py_NewRef(on_empty);
    self->held = held ? Py_NewRef(held) : PyTuple_New(0);
    self->on_held = Py_NewRef(on_held);
    if (self->held == NULL) {
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

static int Writer_traverse(Writer *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict);
    Py_VISIT(self->ring);
    Py_VISIT(self->dumps);
    Py_VISIT(self->protocol);
    Py_VISIT(self->buffer_callback);
    Py_VISIT(self->on_error);
    Py_VISIT(self->on_long);
    Py_VISIT(self->on_full);
    return 0;
}
static int Writer_clear(Writer *self) {
    Py_CLEAR(self->dict);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->dumps);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->buffer_callback);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->on_long);
    Py_CLEAR(self->on_full);
    return 0;
}
static void Writer_dealloc(Writer *self) {
    PyObject_GC_UnTrack(self);
    Writer_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}
static int Reader_traverse(Reader *self, visitproc visit, void *arg) {
    Py_VISIT(self->dict);
    Py_VISIT(self->ring);
    Py_VISIT(self->loads);
    Py_VISIT(self->on_error);
    Py_VISIT(self->on_empty);
    Py_VISIT(self->held);
    Py_VISIT(self->on_held);
    return 0;
}
static int Reader_clear(Reader *self) {
    Py_CLEAR(self->dict);
    Py_CLEAR(self->ring);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->on_error);
    Py_CLEAR(self->on_empty);
    Py_CLEAR(self->held);
    Py_CLEAR(self->on_held);
    return 0;
}
static void Reader_dealloc(Reader *self) {
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.Writer",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "put(owner, obj, block=True, timeout=None): RingBuffer.encoding_writer's closure in C.",
    .tp_new = Writer_new,
    .tp_dealloc = (destructor)Writer_dealloc,
    .tp_traverse = (traverseproc)Writer_traverse,
    .tp_clear = (inquiry)Writer_clear,
    .tp_vectorcall_offset = offsetof(Writer, vectorcall),
    .tp_dictoffset = offsetof(Writer, dict),
    .tp_call = PyVectorcall_Call,
};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.Reader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "get(owner, block=True, timeout=None): RingBuffer.decoding_reader's closure in C.",
    .tp_new = Reader_new,
    .tp_dealloc = (destructor)Reader_dealloc,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_vectorcall_offset = offsetof(Reader, vectorcall),
    .tp_dictoffset = offsetof(Reader, dict),
    .tp_call = PyVectorcall_Call,
};

/* ==== the broadcast ring under shmq.Topic (shmq/_broadcast.py) ===========
 * BroadcastCore is the base class of _broadcast.BroadcastRing, CursorCore of
 * _broadcast.Cursor, when this module is built and SHMQ_PURE is not set;
 * TopicPublisher / TopicReceiver take the place of publishing_writer's
 * closure and of the Receiver class.  As for the ring above: the per-call
 * fields are C members the Python code reads as attributes, the Python
 * functions are the specification, and everything off the common path (the
 * lock's slow path, the doorbells, the corrupt-word errors, the waits) is a
 * call back into Python. */

/* Word indices of the topic header (shmq/_layout.py); _broadcast.py compares
 * them with TOPIC_LAYOUT and uses its Python moves if they differ. */
#define W_T_TAIL 272
#define W_T_NEXT_SEQ 273
#define W_T_OLDEST 274
#define W_T_OLDEST_SEQ 275
#define W_T_EPOCH 276
#define W_T_PUB_WAITING 280
#define W_T_SUB_WAITING 288
#define W_T_SUB_TABLE 512
#define T_SUBSCRIBERS 64
#define T_SUB_WORDS 8
#define TS_PID 0
#define TS_CURSOR 2
#define TS_NEXT_SEQ 3
#define TS_LOST 4
#define TS_WAITING 5
#define TS_RECEIVED 6
#define T_RECORD_HEADER 16

static PyObject *s_sem, *s_w_owner, *s_w_gen, *s_py_try_read, *s_get_value;

typedef struct {
    PyObject_HEAD
    long long cap, base, max_payload, gate, gate_epoch;
    PyObject *buf;
    /* the last lock try_write was given, and what it reads of it */
    PyObject *lock, *lock_sem;
    Py_ssize_t lock_owner, lock_gen;
} BroadcastCore;

static int BroadcastCore_traverse(BroadcastCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->buf);
    Py_VISIT(self->lock);
    Py_VISIT(self->lock_sem);
    return 0;
}
static int BroadcastCore_clear(BroadcastCore *self) {
    Py_CLEAR(self->buf);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->lock_sem);
    return 0;
}
static void BroadcastCore_dealloc(BroadcastCore *self) {
    PyObject_GC_UnTrack(self);
    BroadcastCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* mirrors BroadcastRing.lowest_cursor */
static int64_t lowest_cursor(const char *mem) {
    int64_t low = -1;
    for (int i = 0; i < T_SUBSCRIBERS; i++) {
        Py_ssize_t b = W_T_SUB_TABLE + (Py_ssize_t)i * T_SUB_WORDS;
        if (load_word(mem, b + TS_PID)) {
            int64_t c = load_word(mem, b + TS_CURSOR);
            if (low < 0 || c < low) low = c;
        }
    }
    return low;
}

/* Remember lock._sem, lock._w_owner, lock._w_gen of a new lock.  0 or -1. */
static int cache_lock(BroadcastCore *self, PyObject *lock) {
    if (lock == self->lock) return 0;
    PyObject *sem = PyObject_GetAttr(lock, s_sem);
    if (sem == NULL) return -1;
    PyObject *o = PyObject_GetAttr(lock, s_w_owner), *g = o ? PyObject_GetAttr(lock, s_w_gen) : NULL;
    Py_ssize_t ow = o ? PyLong_AsSsize_t(o) : -1, gw = g ? PyLong_AsSsize_t(g) : -1;
    Py_XDECREF(o);
    Py_XDECREF(g);
    if (PyErr_Occurred()) {
        Py_DECREF(sem);
        return -1;
    }
    if (ow < 0 || gw < 0 || ow >= W_T_SUB_TABLE || gw >= W_T_SUB_TABLE) {
        Py_DECREF(sem);
        PyErr_SetString(PyExc_ValueError, "lock words outside the topic header");
        return -1;
    }
    Py_XSETREF(self->lock, Py_NewRef(lock));
    Py_XSETREF(self->lock_sem, sem);
    self->lock_owner = ow;
    self->lock_gen = gw;
    return 0;
}

/* The body of BroadcastRing.try_write: 1 written (| 2 if a subscriber
 * sleeps, read after the lock's release), 0 no room (gated), -1 error. */
static int broadcast_write(BroadcastCore *self, const char *src, int64_t n, PyObject *lock, int gate) {
    if (cache_lock(self, lock) < 0) return -1;
    Py_buffer view;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        return -1;
    }
    char *mem = (char *)view.buf;
    int64_t cap = self->cap, base = self->base;
    if (cap <= 0 || view.len < base + cap || n < 0 || n > self->max_payload) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "record does not fit the topic's data area");
        return -1;
    }
    PyObject *sem = Py_NewRef(self->lock_sem);
    Py_ssize_t w_owner = self->lock_owner, w_gen = self->lock_gen;
    int result = -1;
    /* RobustLock.acquire, inlined: the semaphore without blocking, else lock.acquire() */
    PyObject *r = PyObject_CallMethodOneArg(sem, s_acquire, Py_False);
    if (r == NULL) goto out_nolock;
    int got = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (got < 0) goto out_nolock;
    if (!got) {
        r = PyObject_CallMethodNoArgs(lock, s_acquire);
        if (r == NULL) goto out_nolock;
        Py_DECREF(r);
    } else {
        store_word(mem, w_owner, my_pid);
        store_word(mem, w_gen, load_word(mem, w_gen) + 1);
    }
    STEP(41);
    int64_t t = load_word(mem, W_T_TAIL);
    int64_t size = T_RECORD_HEADER + ((n + 7) & -8);
    int64_t off = py_mod(t, cap);
    int64_t pad = off + size > cap ? cap - off : 0;
    int64_t bound; /* records starting before this are overwritten */
    if (t < 0 || __builtin_add_overflow(t, pad + size - cap, &bound)) {
        PyObject *exc = PyObject_CallMethod((PyObject *)self, "_corrupt", "s", "TAIL out of range");
        if (exc != NULL) {
            PyErr_SetObject((PyObject *)Py_TYPE(exc), exc);
            Py_DECREF(exc);
        }
        goto out;
    }
    int64_t o = load_word(mem, W_T_OLDEST);
    if (o < bound) {
        if (gate) {
            int64_t epoch = load_word(mem, W_T_EPOCH);
            if (!(self->gate_epoch == epoch && (self->gate < 0 || self->gate >= bound))) {
                self->gate_epoch = epoch;
                int64_t low = self->gate = lowest_cursor(mem);
                if (0 <= low && low < bound) {
                    result = 0;
                    goto out;
                }
            }
        }
        int64_t seq = load_word(mem, W_T_OLDEST_SEQ);
        while (o < bound && o < t) {
            int64_t h = load_word(mem, (base + py_mod(o, cap)) >> 3);
            if (h < -cap || h > cap) { /* a corrupt length: Python's walk passes TAIL, so does this */
                o = t;
            } else if (h < 0) {
                o -= h;
            } else {
                o += T_RECORD_HEADER + ((h + 7) & -8);
                seq += 1;
            }
        }
        if (o >= t) {
            o = t;
            seq = load_word(mem, W_T_NEXT_SEQ);
        }
        store_word(mem, W_T_OLDEST_SEQ, seq);
        store_word(mem, W_T_OLDEST, o); /* before any byte of the old records changes */
        __atomic_thread_fence(__ATOMIC_RELEASE); /* (a no-op on x86-64; the later stores stay after it elsewhere) */
        STEP(42);
    }
    if (pad) {
        store_word(mem, (base + off) >> 3, -pad);
        t += pad;
        off = 0;
    }
    int64_t at = base + off;
    int64_t seq = load_word(mem, W_T_NEXT_SEQ);
    store_word(mem, at >> 3, n);
    store_word(mem, (at >> 3) + 1, seq);
    memcpy(mem + at + T_RECORD_HEADER, src, (size_t)n);
    store_word(mem, W_T_NEXT_SEQ, seq + 1);
    STEP(43);
    store_word(mem, W_T_TAIL, t + size); /* publishes the record to every subscriber */
    STEP(44);
    result = 1;
out:
    /* the `finally:` -- owner word back to 0, then sem.release() */
    if (drop_lock(mem, w_owner, sem) < 0) result = -1;
    /* (after the release, a full barrier: a subscriber that announced its
     * sleep before our TAIL store is seen here) */
    if (result == 1 && load_word(mem, W_T_SUB_WAITING)) result |= 2;
out_nolock:
    Py_DECREF(sem);
    PyBuffer_Release(&view);
    return result;
}

/* mirrors BroadcastRing.try_write(data, lock, gate) */
static PyObject *BroadcastCore_try_write(BroadcastCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "try_write(data, lock, gate)");
        return NULL;
    }
    PyObject *data = args[0];
    if (!PyBytes_CheckExact(data)) /* other buffers: the Python one */
        return PyObject_CallMethodObjArgs((PyObject *)self, s_py_try_write, data, args[1], args[2], NULL);
    int gate = PyObject_IsTrue(args[2]);
    if (gate < 0) return NULL;
    int r = broadcast_write(self, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), args[1], gate);
    if (r < 0) return NULL;
    return Py_NewRef(r ? Py_True : Py_False);
}

/* mirrors BroadcastRing.lowest_cursor() */
static PyObject *BroadcastCore_lowest_cursor(BroadcastCore *self, PyObject *Py_UNUSED(ignored)) {
    Py_buffer view;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        return NULL;
    }
    if (view.len < (W_T_SUB_TABLE + T_SUBSCRIBERS * T_SUB_WORDS) * 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "topic header too short");
        return NULL;
    }
    int64_t low = lowest_cursor((const char *)view.buf);
    PyBuffer_Release(&view);
    return PyLong_FromLongLong(low);
}

/* mirrors BroadcastRing.wake_subscribers(sem) */
static PyObject *BroadcastCore_wake_subscribers(BroadcastCore *self, PyObject *sem) {
    Py_buffer view;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        return NULL;
    }
    char *mem = (char *)view.buf;
    if (view.len < (W_T_SUB_TABLE + T_SUBSCRIBERS * T_SUB_WORDS) * 8) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "topic header too short");
        return NULL;
    }
    store_word(mem, W_T_SUB_WAITING, 0);
    /* the clear before the scan (see the Python) */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    long count = 0;
    for (int i = 0; i < T_SUBSCRIBERS; i++) {
        Py_ssize_t word = W_T_SUB_TABLE + (Py_ssize_t)i * T_SUB_WORDS + TS_WAITING;
        if (load_word(mem, word)) {
            store_word(mem, word, 0);
            count++;
        }
    }
    PyBuffer_Release(&view);
    if (count == 0) Py_RETURN_NONE;
    /* a sleeper that timed out leaves a post behind: never pile them up */
    PyObject *v = PyObject_CallMethodNoArgs(sem, s_get_value);
    if (v == NULL) return NULL;
    long value = PyLong_AsLong(v);
    Py_DECREF(v);
    if (value == -1 && PyErr_Occurred()) return NULL;
    for (long k = 0; k < count - value; k++) {
        PyObject *r = PyObject_CallMethodNoArgs(sem, s_release);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
}

static PyMethodDef BroadcastCore_methods[] = {
    {"try_write", (PyCFunction)(void (*)(void))BroadcastCore_try_write, METH_FASTCALL,
     "try_write(data, lock, gate): append data as the next record (C core: mirrors BroadcastRing.try_write)."},
    {"lowest_cursor", (PyCFunction)BroadcastCore_lowest_cursor, METH_NOARGS,
     "The lowest cursor of a subscriber entry (-1 if none) (C core: mirrors BroadcastRing.lowest_cursor)."},
    {"wake_subscribers", (PyCFunction)BroadcastCore_wake_subscribers, METH_O,
     "Post sem once per subscriber that announced it sleeps (C core: mirrors BroadcastRing.wake_subscribers)."},
    {NULL, NULL, 0, NULL}};

static PyMemberDef BroadcastCore_members[] = {
    {"_c_cap", T_LONGLONG, offsetof(BroadcastCore, cap), 0, NULL},
    {"_c_base", T_LONGLONG, offsetof(BroadcastCore, base), 0, NULL},
    {"_c_max_payload", T_LONGLONG, offsetof(BroadcastCore, max_payload), 0, NULL},
    {"_gate", T_LONGLONG, offsetof(BroadcastCore, gate), 0, NULL},
    {"_gate_epoch", T_LONGLONG, offsetof(BroadcastCore, gate_epoch), 0, NULL},
    {"_buf", T_OBJECT_EX, offsetof(BroadcastCore, buf), 0, NULL},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject BroadcastCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.BroadcastCore",
    .tp_basicsize = sizeof(BroadcastCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C publish move under shmq's BroadcastRing (see docs/core.md).",
    .tp_dealloc = (destructor)BroadcastCore_dealloc,
    .tp_traverse = (traverseproc)BroadcastCore_traverse,
    .tp_clear = (inquiry)BroadcastCore_clear,
    .tp_methods = BroadcastCore_methods,
    .tp_members = BroadcastCore_members,
};

/* ---- the subscriber's cursor ------------------------------------------ */
typedef struct {
    PyObject_HEAD
    long long pos, next_seq, lost, received, tail_seen, stored, pending, flush;
    long long cap, base, max_payload, sub;
    char drop, slot_records;
    PyObject *buf, *not_full;
} CursorCore;

static int CursorCore_traverse(CursorCore *self, visitproc visit, void *arg) {
    Py_VISIT(self->buf);
    Py_VISIT(self->not_full);
    return 0;
}
static int CursorCore_clear(CursorCore *self) {
    Py_CLEAR(self->buf);
    Py_CLEAR(self->not_full);
    return 0;
}
static void CursorCore_dealloc(CursorCore *self) {
    PyObject_GC_UnTrack(self);
    CursorCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* mirrors Cursor._store: 0 or -1 (the doorbell's ring failed) */
static int cursor_store(CursorCore *self, char *mem, int64_t pos) {
    self->stored = pos;
    store_word(mem, self->sub + TS_NEXT_SEQ, self->next_seq);
    store_word(mem, self->sub + TS_RECEIVED, self->received);
    store_word(mem, self->sub + TS_CURSOR, pos); /* publishers gate on this word */
    /* the CURSOR store before the PUB_WAITING load (x86-64 may let a load
     * pass an earlier store): else a publisher that announced and re-checked
     * the cursors in between sleeps unrung */
    __atomic_thread_fence(__ATOMIC_SEQ_CST);
    if (load_word(mem, W_T_PUB_WAITING)) {
        if (self->not_full == NULL) {
            PyErr_SetString(PyExc_AttributeError, "_not_full");
            return -1;
        }
        PyObject *r = PyObject_CallMethodNoArgs(self->not_full, s_ring);
        if (r == NULL) return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* mirrors Cursor.try_read: the next record's payload, None, NULL on error */
static PyObject *cursor_read(CursorCore *self) {
    Py_buffer view;
    if (self->buf == NULL || PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0) {
        if (self->buf == NULL) PyErr_SetString(PyExc_ValueError, "released");
        return NULL;
    }
    char *mem = (char *)view.buf;
    int64_t cap = self->cap, base = self->base, sub = self->sub;
    int drop = self->drop;
    if (cap <= 0 || view.len < base + cap || sub < W_T_SUB_TABLE ||
        sub + T_SUB_WORDS > W_T_SUB_TABLE + T_SUBSCRIBERS * T_SUB_WORDS) {
        PyBuffer_Release(&view);
        PyErr_SetString(PyExc_ValueError, "cursor geometry does not fit the topic");
        return NULL;
    }
    int64_t pos = self->pos;
    PyObject *data = NULL;
    for (;;) {
        if (pos >= self->tail_seen) {
            int64_t t = load_word(mem, W_T_TAIL);
            if (pos >= t) {
                self->pos = pos;
                if (pos != self->stored && cursor_store(self, mem, pos) < 0) goto fail;
                PyBuffer_Release(&view);
                Py_RETURN_NONE;
            }
            self->tail_seen = t;
            int64_t o = load_word(mem, W_T_OLDEST);
            if (pos < o) { /* lapped: the records in between were overwritten */
                pos = o;
                continue;
            }
        } else if (drop) {
            int64_t o = load_word(mem, W_T_OLDEST);
            if (pos < o) {
                pos = o;
                continue;
            }
        }
        int64_t off = py_mod(pos, cap), at = base + off;
        int64_t h = load_word(mem, at >> 3);
        if (h < 0) {
            if (drop && load_word(mem, W_T_OLDEST) > pos) continue; /* the top jumps to the oldest */
            if (h < -cap || -h > cap - off || (-h) % 8) {
                int64_t o = load_word(mem, W_T_OLDEST);
                if (o > pos) {
                    pos = o;
                    continue;
                }
                goto corrupt;
            }
            pos -= h;
            continue;
        }
        if (h > self->max_payload || off + T_RECORD_HEADER + h > cap) {
            int64_t o = load_word(mem, W_T_OLDEST);
            if (o > pos) {
                pos = o;
                continue;
            }
            goto corrupt;
        }
        int64_t seq = load_word(mem, (at >> 3) + 1);
        data = PyBytes_FromStringAndSize(mem + at + T_RECORD_HEADER, (Py_ssize_t)h);
        if (data == NULL) goto fail;
        if (drop) {
            __atomic_thread_fence(__ATOMIC_ACQUIRE); /* the copy's loads before OLDEST's */
            if (load_word(mem, W_T_OLDEST) > pos) {
                Py_CLEAR(data); /* overwritten while we copied: lost, look again */
                continue;
            }
        }
        if (seq > self->next_seq) {
            self->lost += seq - self->next_seq;
            store_word(mem, sub + TS_LOST, self->lost);
        }
        self->next_seq = seq + 1;
        self->received += 1;
        pos += T_RECORD_HEADER + ((h + 7) & -8);
        self->pos = pos;
        if (self->slot_records && h && PyBytes_AS_STRING(data)[0] == 0) {
            /* slot references: the stored cursor waits for commit() */
            self->pending = 1;
            break;
        }
        if ((pos >= self->tail_seen || pos - self->stored >= self->flush) && cursor_store(self, mem, pos) < 0)
            goto fail;
        break;
    }
    PyBuffer_Release(&view);
    return data;
corrupt:
    /* the Python move reads the same words and raises BrokenError naming them */
    self->pos = pos;
    PyBuffer_Release(&view);
    return PyObject_CallMethodNoArgs((PyObject *)self, s_py_try_read);
fail:
    Py_XDECREF(data);
    PyBuffer_Release(&view);
    return NULL;
}

static PyObject *CursorCore_try_read(CursorCore *self, PyObject *Py_UNUSED(ignored)) {
    return cursor_read(self);
}

static PyMethodDef CursorCore_methods[] = {
    {"try_read", (PyCFunction)CursorCore_try_read, METH_NOARGS,
     "The next record's payload, or None if there is none yet (C core: mirrors Cursor.try_read)."},
    {NULL, NULL, 0, NULL}};

static PyMemberDef CursorCore_members[] = {
    {"pos", T_LONGLONG, offsetof(CursorCore, pos), 0, NULL},
    {"next_seq", T_LONGLONG, offsetof(CursorCore, next_seq), 0, NULL},
    {"lost", T_LONGLONG, offsetof(CursorCore, lost), 0, NULL},
    {"received", T_LONGLONG, offsetof(CursorCore, received), 0, NULL},
    {"_tail_seen", T_LONGLONG, offsetof(CursorCore, tail_seen), 0, NULL},
    {"_stored", T_LONGLONG, offsetof(CursorCore, stored), 0, NULL},
    {"_pending", T_LONGLONG, offsetof(CursorCore, pending), 0, NULL},
    {"_flush", T_LONGLONG, offsetof(CursorCore, flush), 0, NULL},
    {"_drop", T_BOOL, offsetof(CursorCore, drop), 0, NULL},
    {"_slot_records", T_BOOL, offsetof(CursorCore, slot_records), 0, NULL},
    {"_c_cap", T_LONGLONG, offsetof(CursorCore, cap), 0, NULL},
    {"_c_base", T_LONGLONG, offsetof(CursorCore, base), 0, NULL},
    {"_c_max_payload", T_LONGLONG, offsetof(CursorCore, max_payload), 0, NULL},
    {"_c_sub", T_LONGLONG, offsetof(CursorCore, sub), 0, NULL},
    {"_buf", T_OBJECT_EX, offsetof(CursorCore, buf), 0, NULL},
    {"_not_full", T_OBJECT_EX, offsetof(CursorCore, not_full), 0, NULL},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject CursorCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.CursorCore",
    .tp_basicsize = sizeof(CursorCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C read move under shmq's broadcast Cursor (see docs/core.md).",
    .tp_dealloc = (destructor)CursorCore_dealloc,
    .tp_traverse = (traverseproc)CursorCore_traverse,
    .tp_clear = (inquiry)CursorCore_clear,
    .tp_methods = CursorCore_methods,
    .tp_members = CursorCore_members,
};

/* ---- flat tuples: mirror topic._pack_flat / topic._unpack_flat ----------
 * 0x01, item count, then per item a kind byte and its value: N / T / F,
 * i + int64, d + float64 (little-endian), s + uint32 length + UTF-8,
 * b + uint32 length + bytes. */
#define FLAT_TAG 1
#define FLAT_MAX_ITEMS 255

/* mirrors topic._pack_flat: new bytes, or a new reference to None if obj is
 * not a flat tuple; NULL with an exception only if memory runs out */
static PyObject *flat_pack(PyObject *obj) {
    if (!PyTuple_CheckExact(obj) || PyTuple_GET_SIZE(obj) > FLAT_MAX_ITEMS) Py_RETURN_NONE;
    Py_ssize_t n = PyTuple_GET_SIZE(obj), size = 2;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyTuple_GET_ITEM(obj, i);
        if (x == Py_None || x == Py_True || x == Py_False) {
            size += 1;
        } else if (PyLong_CheckExact(x)) {
            int overflow;
            long long v = PyLong_AsLongLongAndOverflow(x, &overflow);
            if (overflow || (v == -1 && PyErr_Occurred())) {
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            size += 9;
        } else if (PyFloat_CheckExact(x)) {
            size += 9;
        } else if (PyUnicode_CheckExact(x)) {
            Py_ssize_t len;
            if (PyUnicode_AsUTF8AndSize(x, &len) == NULL) { /* lone surrogates: pickle keeps them */
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            if ((unsigned long long)len > 0xFFFFFFFFull) Py_RETURN_NONE;
            size += 5 + len;
        } else if (PyBytes_CheckExact(x)) {
            if ((unsigned long long)PyBytes_GET_SIZE(x) > 0xFFFFFFFFull) Py_RETURN_NONE;
            size += 5 + PyBytes_GET_SIZE(x);
        } else {
            Py_RETURN_NONE;
        }
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, size);
    if (out == NULL) return NULL;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(out);
    *p++ = FLAT_TAG;
    *p++ = (unsigned char)n;
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *x = PyTuple_GET_ITEM(obj, i);
        if (x == Py_None) {
            *p++ = 'N';
        } else if (x == Py_True) {
            *p++ = 'T';
        } else if (x == Py_False) {
            *p++ = 'F';
        } else if (PyLong_CheckExact(x)) {
            int64_t v = (int64_t)PyLong_AsLongLong(x);
            *p++ = 'i';
            memcpy(p, &v, 8); /* x86-64: little-endian, as struct "<q" */
            p += 8;
        } else if (PyFloat_CheckExact(x)) {
            double v = PyFloat_AS_DOUBLE(x);
            *p++ = 'd';
            memcpy(p, &v, 8);
            p += 8;
        } else {
            const char *raw;
            Py_ssize_t len;
            if (PyUnicode_CheckExact(x)) {
                raw = PyUnicode_AsUTF8AndSize(x, &len); /* (cached by the first pass) */
                *p++ = 's';
            } else {
                raw = PyBytes_AS_STRING(x);
                len = PyBytes_GET_SIZE(x);
                *p++ = 'b';
            }
            uint32_t l32 = (uint32_t)len;
            memcpy(p, &l32, 4);
            p += 4;
            memcpy(p, raw, (size_t)len);
            p += len;
        }
    }
    return out;
}

/* mirrors topic._unpack_flat: the tuple, NULL with ValueError if malformed */
static PyObject *flat_unpack(const unsigned char *data, Py_ssize_t n) {
    if (n < 2 || data[0] != FLAT_TAG) {
        PyErr_SetString(PyExc_ValueError, "not a flat-tuple record");
        return NULL;
    }
    Py_ssize_t count = data[1], at = 2;
    PyObject *out = PyTuple_New(count);
    if (out == NULL) return NULL;
    for (Py_ssize_t i = 0; i < count; i++) {
        if (at >= n) goto truncated;
        unsigned char kind = data[at++];
        PyObject *x;
        switch (kind) {
        case 'N':
            x = Py_NewRef(Py_None);
            break;
        case 'T':
            x = Py_NewRef(Py_True);
            break;
        case 'F':
            x = Py_NewRef(Py_False);
            break;
        case 'i':
        case 'd': {
            if (at + 8 > n) goto truncated;
            if (kind == 'i') {
                int64_t v;
                memcpy(&v, data + at, 8);
                x = PyLong_FromLongLong(v);
            } else {
                double v;
                memcpy(&v, data + at, 8);
                x = PyFloat_FromDouble(v);
            }
            at += 8;
            break;
        }
        case 's':
        case 'b': {
            if (at + 4 > n) goto truncated;
            uint32_t len;
            memcpy(&len, data + at, 4);
            at += 4;
            if ((Py_ssize_t)len > n - at) goto truncated;
            x = kind == 's' ? PyUnicode_DecodeUTF8((const char *)data + at, len, NULL)
                            : PyBytes_FromStringAndSize((const char *)data + at, len);
            at += len;
            break;
        }
        default:
            Py_DECREF(out);
            PyErr_Format(PyExc_ValueError, "flat-tuple record has an unknown item kind %d", (int)kind);
            return NULL;
        }
        if (x == NULL) {
            Py_DECREF(out);
            return NULL;
        }
        PyTuple_SET_ITEM(out, i, x);
    }
    if (at != n) {
        Py_DECREF(out);
        PyErr_SetString(PyExc_ValueError, "flat-tuple record has bytes after its last item");
        return NULL;
    }
    return out;
truncated:
    Py_DECREF(out);
    PyErr_SetString(PyExc_ValueError, "flat-tuple record is truncated");
    return NULL;
}

/* module function pack_flat(obj): mirrors topic._pack_flat */
static PyObject *core_pack_flat(PyObject *Py_UNUSED(module), PyObject *obj) { return flat_pack(obj); }

/* module function unpack_flat(data): mirrors topic._unpack_flat */
static PyObject *core_unpack_flat(PyObject *Py_UNUSED(module), PyObject *data) {
    Py_buffer view;
    if (PyObject_GetBuffer(data, &view, PyBUF_SIMPLE) < 0) return NULL;
    PyObject *r = flat_unpack((const unsigned char *)view.buf, view.len);
    PyBuffer_Release(&view);
    return r;
}

static int is_core_function(PyObject *f, PyCFunction c) {
    return f != NULL && PyCFunction_Check(f) && PyCFunction_GET_FUNCTION(f) == c;
}

/* ---- TopicReceiver: mirrors the class _broadcast.Receiver --------------- */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *cursor, *loads, *unpack, *slow, *end;
    char closed, c_unpack;
} TopicReceiver;

static int timeout_is_plain(PyObject *timeout) {
    if (timeout == Py_None) return 1;
    if (PyFloat_CheckExact(timeout)) return PyFloat_AS_DOUBLE(timeout) >= 0.0;
    if (PyLong_CheckExact(timeout)) {
        int overflow;
        long long v = PyLong_AsLongLongAndOverflow(timeout, &overflow);
        return overflow ? overflow > 0 : v >= 0;
    }
    return 0;
}

/* Receiver.__call__ */
static PyObject *receiver_receive(TopicReceiver *self, PyObject *timeout) {
    if (self->closed || !timeout_is_plain(timeout)) return PyObject_CallOneArg(self->slow, timeout);
    PyObject *data = cursor_read((CursorCore *)self->cursor);
    if (data == NULL) return NULL;
    if (data == Py_None) {
        Py_DECREF(data);
        return PyObject_CallOneArg(self->slow, timeout);
    }
    PyObject *obj;
    if (PyBytes_GET_SIZE(data) > 0 && PyBytes_AS_STRING(data)[0] == FLAT_TAG)
        obj = self->c_unpack ? flat_unpack((const unsigned char *)PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data))
                             : PyObject_CallOneArg(self->unpack, data);
    else
        obj = PyObject_CallOneArg(self->loads, data);
    Py_DECREF(data);
    return obj;
}

static PyObject *TopicReceiver_call(TopicReceiver *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    static const char *const names[] = {"timeout"};
    PyObject *a[1] = {NULL};
    if (parse_call(args, nargsf, kwnames, 0, a, 1, names) < 0) return NULL;
    return receiver_receive(self, a[0] ? a[0] : Py_None);
}

/* Receiver.__next__ */
static PyObject *TopicReceiver_next(TopicReceiver *self) {
    PyObject *obj = receiver_receive(self, Py_None);
    if (obj == NULL && PyErr_ExceptionMatches(self->end)) PyErr_Clear(); /* StopIteration */
    return obj;
}

/* Receiver.close */
static PyObject *TopicReceiver_close(TopicReceiver *self, PyObject *Py_UNUSED(ignored)) {
    self->closed = 1;
    Py_RETURN_NONE;
}

static PyObject *TopicReceiver_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *cursor, *loads, *unpack, *slow, *end;
    if (!PyArg_ParseTuple(args, "O!OOOO:TopicReceiver", &CursorCoreType, &cursor, &loads, &unpack, &slow, &end))
        return NULL;
    TopicReceiver *self = (TopicReceiver *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = (vectorcallfunc)TopicReceiver_call;
    self->cursor = Py_NewRef(cursor);
    self->loads = Py_NewRef(loads);
    self->unpack = Py_NewRef(unpack);
    self->c_unpack = (char)is_core_function(unpack, (PyCFunction)core_unpack_flat);
    self->slow = Py_NewRef(slow);
    self->end = Py_NewRef(end);
    return (PyObject *)self;
}
static int TopicReceiver_traverse(TopicReceiver *self, visitproc visit, void *arg) {
    Py_VISIT(self->cursor);
    Py_VISIT(self->loads);
    Py_VISIT(self->unpack);
    Py_VISIT(self->slow);
    Py_VISIT(self->end);
    return 0;
}
static int TopicReceiver_clear(TopicReceiver *self) {
    Py_CLEAR(self->cursor);
    Py_CLEAR(self->loads);
    Py_CLEAR(self->unpack);
    Py_CLEAR(self->slow);
    Py_CLEAR(self->end);
    return 0;
}
static void TopicReceiver_dealloc(TopicReceiver *self) {
    PyObject_GC_UnTrack(self);
    TopicReceiver_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyMethodDef TopicReceiver_methods[] = {
    {"close", (PyCFunction)TopicReceiver_close, METH_NOARGS, "From now on every call goes to slow."},
    {NULL, NULL, 0, NULL}};
static PyMemberDef TopicReceiver_members[] = {
    {"cursor", T_OBJECT_EX, offsetof(TopicReceiver, cursor), READONLY, NULL},
    {"closed", T_BOOL, offsetof(TopicReceiver, closed), READONLY, NULL},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject TopicReceiverType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.TopicReceiver",
    .tp_basicsize = sizeof(TopicReceiver),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "receive(timeout=None) and iteration (C core: mirrors _broadcast.Receiver).",
    .tp_new = TopicReceiver_new,
    .tp_dealloc = (destructor)TopicReceiver_dealloc,
    .tp_traverse = (traverseproc)TopicReceiver_traverse,
    .tp_clear = (inquiry)TopicReceiver_clear,
    .tp_vectorcall_offset = offsetof(TopicReceiver, vectorcall),
    .tp_call = PyVectorcall_Call,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)TopicReceiver_next,
    .tp_methods = TopicReceiver_methods,
    .tp_members = TopicReceiver_members,
};

/* ---- TopicIteration: mirrors the class _broadcast.Iteration ------------- */
typedef struct {
    PyObject_HEAD
    PyObject *receiver, *owner;
} TopicIteration;

/* Iteration.__next__ */
static PyObject *TopicIteration_next(TopicIteration *self) {
    return TopicReceiver_next((TopicReceiver *)self->receiver);
}
static PyObject *TopicIteration_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *receiver, *owner;
    if (!PyArg_ParseTuple(args, "O!O:TopicIteration", &TopicReceiverType, &receiver, &owner)) return NULL;
    TopicIteration *self = (TopicIteration *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->receiver = Py_NewRef(receiver);
    self->owner = Py_NewRef(owner);
    return (PyObject *)self;
}
static int TopicIteration_traverse(TopicIteration *self, visitproc visit, void *arg) {
    Py_VISIT(self->receiver);
    Py_VISIT(self->owner);
    return 0;
}
static int TopicIteration_clear(TopicIteration *self) {
    Py_CLEAR(self->receiver);
    Py_CLEAR(self->owner);
    return 0;
}
static void TopicIteration_dealloc(TopicIteration *self) {
    PyObject_GC_UnTrack(self);
    TopicIteration_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}
static PyMemberDef TopicIteration_members[] = {
    {"receiver", T_OBJECT_EX, offsetof(TopicIteration, receiver), READONLY, NULL},
    {"owner", T_OBJECT_EX, offsetof(TopicIteration, owner), READONLY, NULL},
    {NULL, 0, 0, 0, NULL}};
static PyTypeObject TopicIterationType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.TopicIteration",
    .tp_basicsize = sizeof(TopicIteration),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "iter(subscription) (C core: mirrors _broadcast.Iteration).",
    .tp_new = TopicIteration_new,
    .tp_dealloc = (destructor)TopicIteration_dealloc,
    .tp_traverse = (traverseproc)TopicIteration_traverse,
    .tp_clear = (inquiry)TopicIteration_clear,
    .tp_iter = PyObject_SelfIter,
    .tp_iternext = (iternextfunc)TopicIteration_next,
    .tp_members = TopicIteration_members,
};

/* ---- TopicPublisher: mirrors the closure of publishing_writer ----------- */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *ring, *lock, *dumps, *protocol, *pack, *wake, *slow;
    long pid;
    int gate, c_pack;
    long long max_payload;
} TopicPublisher;

static PyObject *TopicPublisher_call(TopicPublisher *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    static const char *const names[] = {"obj", "timeout"};
    PyObject *a[2] = {NULL, NULL};
    if (parse_call(args, nargsf, kwnames, 0, a, 2, names) < 0) return NULL;
    if (a[0] == NULL) {
        PyErr_SetString(PyExc_TypeError, "publish() missing required argument 'obj'");
        return NULL;
    }
    PyObject *obj = a[0], *timeout = a[1] ? a[1] : Py_None;
    if (my_pid != self->pid) return PyObject_CallFunctionObjArgs(self->slow, obj, timeout, Py_None, NULL);
    PyObject *data = NULL;
    if (self->c_pack)
        data = flat_pack(obj);
    else if (self->pack != Py_None)
        data = PyObject_CallOneArg(self->pack, obj);
    else
        data = Py_NewRef(Py_None);
    if (data == NULL) return NULL;
    if (data == Py_None) {
        Py_DECREF(data);
        PyObject *dargs[2] = {obj, self->protocol};
        data = PyObject_Vectorcall(self->dumps, dargs, 2, NULL);
        if (data == NULL) return NULL;
    }
    int r = 0;
    if (PyBytes_CheckExact(data) && PyBytes_GET_SIZE(data) <= self->max_payload) {
        r = broadcast_write((BroadcastCore *)self->ring, PyBytes_AS_STRING(data), PyBytes_GET_SIZE(data), self->lock,
                            self->gate);
        if (r < 0) {
            Py_DECREF(data);
            return NULL;
        }
    }
    if (r == 0) { /* too large, no room now, or not bytes: the Python path */
        PyObject *res = PyObject_CallFunctionObjArgs(self->slow, obj, timeout, data, NULL);
        Py_DECREF(data);
        return res;
    }
    Py_DECREF(data);
    if (r & 2) return PyObject_CallNoArgs(self->wake);
    Py_RETURN_NONE;
}

static PyObject *TopicPublisher_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *ring, *lock, *dumps, *protocol, *pack, *wake, *slow;
    if (!PyArg_ParseTuple(args, "O!OOOOOO:TopicPublisher", &BroadcastCoreType, &ring, &lock, &dumps, &protocol, &pack,
                          &wake, &slow))
        return NULL;
    PyObject *drop = PyObject_GetAttrString(ring, "drop_oldest");
    if (drop == NULL) return NULL;
    int d = PyObject_IsTrue(drop);
    Py_DECREF(drop);
    if (d < 0) return NULL;
    TopicPublisher *self = (TopicPublisher *)type->tp_alloc(type, 0);
    if (self == NULL) return NULL;
    self->vectorcall = (vectorcallfunc)TopicPublisher_call;
    self->ring = Py_NewRef(ring);
    self->lock = Py_NewRef(lock);
    self->dumps = Py_NewRef(dumps);
    self->protocol = Py_NewRef(protocol);
    self->pack = Py_NewRef(pack);
    self->c_pack = is_core_function(pack, (PyCFunction)core_pack_flat);
    self->wake = Py_NewRef(wake);
    self->slow = Py_NewRef(slow);
    self->pid = my_pid;
    self->gate = !d;
    self->max_payload = ((BroadcastCore *)ring)->max_payload;
    return (PyObject *)self;
}
static int TopicPublisher_traverse(TopicPublisher *self, visitproc visit, void *arg) {
    Py_VISIT(self->ring);
    Py_VISIT(self->lock);
    Py_VISIT(self->dumps);
    Py_VISIT(self->protocol);
    Py_VISIT(self->pack);
    Py_VISIT(self->wake);
    Py_VISIT(self->slow);
    return 0;
}
static int TopicPublisher_clear(TopicPublisher *self) {
    Py_CLEAR(self->ring);
    Py_CLEAR(self->lock);
    Py_CLEAR(self->dumps);
    Py_CLEAR(self->protocol);
    Py_CLEAR(self->pack);
    Py_CLEAR(self->wake);
    Py_CLEAR(self->slow);
    return 0;
}
static void TopicPublisher_dealloc(TopicPublisher *self) {
    PyObject_GC_UnTrack(self);
    TopicPublisher_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyTypeObject TopicPublisherType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.TopicPublisher",
    .tp_basicsize = sizeof(TopicPublisher),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_doc = "publish(obj, timeout=None) (C core: mirrors the closure of _broadcast.publishing_writer).",
    .tp_new = TopicPublisher_new,
    .tp_dealloc = (destructor)TopicPublisher_dealloc,
    .tp_traverse = (traverseproc)TopicPublisher_traverse,
    .tp_clear = (inquiry)TopicPublisher_clear,
    .tp_vectorcall_offset = offsetof(TopicPublisher, vectorcall),
    .tp_call = PyVectorcall_Call,
};


/* ======================================================================
 * The slot pool's hot moves: mirror shmq/_slots.py's SlotPool (the
 * readable specification; docs/core.md).  PoolCore is SlotPool's base class
 * when this module is built and SHMQ_PURE is not set.  Its C members are the
 * per-process fields those moves read or change (_member, _holds,
 * _pending_frees, _last_sent, _epoch, _closing, the dicts and sets of
 * loaned / outstanding / unfenced slots, ...), which the Python methods read
 * and write as ordinary attributes, and C copies of the geometry (_c_*).
 *
 * Each move takes its fast path only when the case is the common one; in
 * any other case (another thread inside the pool, deferred releases queued,
 * a return queue that is not plausibly a queue, a lost notification, a
 * corrupt notification, a reference that names no slot in flight, keyword
 * arguments, ...) it calls the Python original (``_py_<name>``) BEFORE it
 * has changed anything, so errors and recoveries have one implementation.
 * Off the common path it calls the Python helpers: _high (corrupt
 * MEMBERS_HIGH), _when_short_locked (no free slot), _wake_waiters, the lock's
 * slow path (RobustLock.acquire), _free_own_locked, _after_collect,
 * _warm_up, _drain_deferred(_locked), _push_notes_locked.
 * ==================================================================== */
#define W_POOL_LOCK 288
#define W_POOL_LOCK_GEN 289 /* RobustLock: generation right after the owner */
#define W_FREE_COUNT 296
#define W_ALLOC_HINT 297
#define W_MEMBERS_HIGH 298
#define W_RETURN_WAITING 304
#define W_POOL_COUNTERS 312 /* allocations, frees, returns, ..., lost_returns (+6) */
#define SLOT_WORDS 8
#define S_STATE 0
#define S_GEN 1
#define S_OWNER 2
#define S_NBYTES 3
#define S_DELIVERIES 4
#define S_FENCE 5
#define SLOT_FREE 0
#define SLOT_LOANED 1
#define SLOT_SENT 2
#define MEMBER_WORDS 8
#define M_STATE 2
#define M_RQ_HEAD 3
#define M_RQ_TAIL 4
#define M_RQ_LOST 5
#define M_REUSES 6
#define MEMBER_LIVE 1
#define MEMBER_DEAD 2
#define HOLD_ACQUIRE ((int64_t)1 << 32)
#define HOLD_RELEASED_MASK (HOLD_ACQUIRE - 1)
#define MAX_GEN (((int64_t)1 << 31) - 1)

static PyObject *s_py_try_allocate, *s_py_mark_sent, *s_py_set_fence, *s_py_acquire, *s_py_release_later,
    *s_high, *s_when_short_locked, *s_wake_waiters, *s_free_own_locked, *s_after_collect, *s_warm_up,
    *s_drain_deferred, *s_drain_deferred_locked, *s_push_notes_locked;

typedef struct {
    PyObject_HEAD
    long long member, holds, pending_frees, last_sent, epoch;
    char closing;
    /* geometry, set by _c_setup from the checked header */
    long long slot_size, count, max_members, q, slots, members, holdw, rqw, data, stride, size;
    PyObject *buf, *rbuf, *lock, *lock_sem, *tlock, *loaned, *outstanding, *unfenced, *early, *orphan_seen,
        *deferred, *notes, *cold, *on_return;
} PoolCore;

#define POOL_OBJECTS(X)                                                                                   \
    X(buf) X(rbuf) X(lock) X(lock_sem) X(tlock) X(loaned) X(outstanding) X(unfenced) X(early) X(orphan_seen) \
        X(deferred) X(notes) X(cold) X(on_return)

static int PoolCore_traverse(PoolCore *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    POOL_OBJECTS(VISIT)
#undef VISIT
    return 0;
}
static int PoolCore_clear(PoolCore *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    POOL_OBJECTS(CLEAR)
#undef CLEAR
    return 0;
}
static void PoolCore_dealloc(PoolCore *self) {
    PyObject_GC_UnTrack(self);
    PoolCore_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* The per-process containers are what _init_local makes (else: Python). */
static int pool_state_ok(PoolCore *self) {
    return self->buf && self->rbuf && self->lock && self->lock_sem && self->tlock && self->loaned &&
           PyDict_CheckExact(self->loaned) && self->outstanding && PyDict_CheckExact(self->outstanding) &&
           self->unfenced && PySet_CheckExact(self->unfenced) && self->early && PySet_CheckExact(self->early) &&
           self->orphan_seen && PyDict_CheckExact(self->orphan_seen) && self->deferred && self->notes &&
           PyList_CheckExact(self->notes) && self->cold && PySet_CheckExact(self->cold) && self->count > 0 &&
           self->q > 0 && (self->q & (self->q - 1)) == 0;
}

/* The mapping, checked against the geometry.  0 or -1. */
static int pool_mem(PoolCore *self, Py_buffer *view) {
    view->obj = NULL;
    if (PyObject_GetBuffer(self->buf, view, PyBUF_WRITABLE) < 0) return -1;
    if (view->len < self->size || self->size <= 0) {
        PyBuffer_Release(view);
        PyErr_SetString(PyExc_ValueError, "slot pool mapping shorter than its geometry");
        return -1;
    }
    return 0;
}

/* self._tlock.acquire(False): 1 taken, 0 busy, -1 error. */
static int tlock_try(PoolCore *self) {
    PyObject *r = PyObject_CallMethodOneArg(self->tlock, s_acquire, Py_False);
    if (r == NULL) return -1;
    int got = PyObject_IsTrue(r);
    Py_DECREF(r);
    return got;
}

/* self._tlock.release(), keeping a pending exception.  0 or -1. */
static int tlock_drop(PoolCore *self) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    PyObject *r = PyObject_CallMethodNoArgs(self->tlock, s_release);
    Py_XDECREF(r);
    if (type != NULL) {
        if (r == NULL) PyErr_Clear();
        PyErr_Restore(type, value, tb);
        return -1;
    }
    return r == NULL ? -1 : 0;
}

/* self._lock.acquire() (blocking): the semaphore without blocking, else the
 * Python RobustLock.acquire (its slow path and recovery).  0 or -1. */
static int pool_lock(PoolCore *self, char *mem) {
    PyObject *r = PyObject_CallMethodOneArg(self->lock_sem, s_acquire, Py_False);
    if (r == NULL) return -1;
    int got = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (got < 0) return -1;
    if (got) {
        store_word(mem, W_POOL_LOCK, my_pid);
        store_word(mem, W_POOL_LOCK_GEN, (int64_t)((uint64_t)load_word(mem, W_POOL_LOCK_GEN) + 1));
        return 0;
    }
    r = PyObject_CallMethodNoArgs(self->lock, s_acquire);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* self._lock.acquire(0): the semaphore without blocking (RobustLock's slow
 * path gives up at once with timeout 0).  1 taken, 0 busy, -1 error. */
static int pool_lock_try(PoolCore *self, char *mem) {
    PyObject *r = PyObject_CallMethodOneArg(self->lock_sem, s_acquire, Py_False);
    if (r == NULL) return -1;
    int got = PyObject_IsTrue(r);
    Py_DECREF(r);
    if (got > 0) {
        store_word(mem, W_POOL_LOCK, my_pid);
        store_word(mem, W_POOL_LOCK_GEN, (int64_t)((uint64_t)load_word(mem, W_POOL_LOCK_GEN) + 1));
    }
    return got;
}

/* self._wake_waiters(False) when RETURN_WAITING says somebody may wait (the
 * Python reads the same word first).  0 or -1. */
static int pool_wake(PoolCore *self, const char *mem) {
    if (!load_word(mem, W_RETURN_WAITING)) return 0;
    PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_wake_waiters, Py_False);
    if (r == NULL) return -1;
    Py_DECREF(r);
    return 0;
}

/* w[word] += d, failing as Python's store of an out-of-range int does. */
static int add_word(char *mem, Py_ssize_t word, int64_t d) {
    int64_t v;
    if (checked_add(load_word(mem, word), d, &v) < 0) return -1;
    store_word(mem, word, v);
    return 0;
}

/* mirrors SlotPool._high: MEMBERS_HIGH, or BrokenError from the Python. */
static int pool_high(PoolCore *self, const char *mem, int64_t *high) {
    int64_t h = load_word(mem, W_MEMBERS_HIGH);
    if (h < 0 || h > self->max_members) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_high);
        if (r == NULL) return -1;
        h = PyLong_AsLongLong(r);
        Py_DECREF(r);
        if (h == -1 && PyErr_Occurred()) return -1;
        if (h < 0 || h > self->max_members) {
            PyErr_SetString(PyExc_ValueError, "MEMBERS_HIGH out of range");
            return -1;
        }
    }
    *high = h;
    return 0;
}

/* mirrors SlotPool._releasable(i): 1, 0 or -1. */
static int pool_releasable(PoolCore *self, const char *mem, int64_t i) {
    Py_ssize_t s = self->slots + i * SLOT_WORDS;
    if (load_word(mem, s + S_STATE) != SLOT_SENT) return 0;
    int64_t high, acquired = 0, n = self->count;
    if (pool_high(self, mem, &high) < 0) return -1;
    for (int64_t m = 0; m < high; m++) {
        int64_t v = load_word(mem, self->holdw + i + m * n);
        if (v) {
            int64_t a = v >> 32;
            if ((int64_t)((uint64_t)v & HOLD_RELEASED_MASK) < a &&
                load_word(mem, self->members + m * MEMBER_WORDS + M_STATE) != MEMBER_DEAD)
                return 0;
            acquired += a;
        }
    }
    return acquired >= load_word(mem, s + S_DELIVERIES);
}

/* mirrors SlotPool._clear_slot(i): its slot-table word, or -1. */
static Py_ssize_t pool_clear_slot(PoolCore *self, char *mem, int64_t i) {
    int64_t high, n = self->count;
    if (pool_high(self, mem, &high) < 0) return -1;
    for (int64_t m = 0; m < high; m++) {
        Py_ssize_t hw = self->holdw + i + m * n;
        if (load_word(mem, hw)) store_word(mem, hw, 0);
    }
    Py_ssize_t s = self->slots + i * SLOT_WORDS;
    store_word(mem, s + S_FENCE, 0);
    store_word(mem, s + S_DELIVERIES, 0);
    store_word(mem, s + S_NBYTES, 0);
    return s;
}

static int64_t next_gen(const char *mem, Py_ssize_t s) {
    int64_t g = load_word(mem, s + S_GEN);
    return (g < 0 || g >= MAX_GEN) ? 1 : g + 1; /* Python: g + 1, then 1 unless 0 < gen <= _MAX_GEN */
}

/* self._orphan_seen.pop(i, None) when it is not empty. */
static int orphan_forget(PoolCore *self, PyObject *key) {
    if (PyDict_GET_SIZE(self->orphan_seen) == 0) return 0;
    if (PyDict_DelItem(self->orphan_seen, key) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_KeyError)) return -1;
        PyErr_Clear();
    }
    return 0;
}

/* mirrors SlotPool._reloan_locked(i).  0 or -1. */
static int pool_reloan(PoolCore *self, char *mem, PyObject *key, int64_t i) {
    Py_ssize_t s = pool_clear_slot(self, mem, i);
    if (s < 0) return -1;
    int64_t gen = next_gen(mem, s);
    store_word(mem, s + S_GEN, gen);
    STEP(55);
    store_word(mem, s + S_STATE, SLOT_LOANED);
    STEP(56);
    if (PyDict_DelItem(self->outstanding, key) < 0 || orphan_forget(self, key) < 0) return -1;
    PyObject *g = PyLong_FromLongLong(gen);
    if (g == NULL) return -1;
    int r = PyDict_SetItem(self->loaned, key, g);
    Py_DECREF(g);
    if (r < 0) return -1;
    return add_word(mem, self->members + self->member * MEMBER_WORDS + M_REUSES, 1);
}

/* mirrors SlotPool._free_own_locked(freed[start:], defer_count=True):
 * forget them, zero their hold words, mark FREE, count them later. */
static int pool_free_own_deferred(PoolCore *self, char *mem, PyObject *freed, Py_ssize_t start) {
    Py_ssize_t k = PyList_GET_SIZE(freed);
    if (start >= k) return 0;
    for (Py_ssize_t j = start; j < k; j++) {
        PyObject *key = PyList_GET_ITEM(freed, j);
        if (PyDict_DelItem(self->outstanding, key) < 0) {
            if (!PyErr_ExceptionMatches(PyExc_KeyError)) return -1;
            PyErr_Clear();
        }
        if (orphan_forget(self, key) < 0) return -1;
    }
    int64_t i = 0;
    for (Py_ssize_t j = start; j < k; j++) {
        i = PyLong_AsLongLong(PyList_GET_ITEM(freed, j));
        Py_ssize_t s = pool_clear_slot(self, mem, i);
        if (s < 0) return -1;
        store_word(mem, s + S_STATE, SLOT_FREE);
    }
    store_word(mem, W_ALLOC_HINT, i); /* the slot freed last is reused first */
    self->pending_frees += k - start;
    return 0;
}

/* mirrors SlotPool._apply_frees(count) (pool lock held). */
static int pool_apply_frees(char *mem, int64_t count) {
    if (add_word(mem, W_FREE_COUNT, count) < 0) return -1;
    return add_word(mem, W_POOL_COUNTERS + 1, count);
}

/* mirrors SlotPool._count_pending_frees. */
static int pool_count_pending(PoolCore *self, char *mem) {
    if (!self->pending_frees) return 0;
    if (pool_lock(self, mem) < 0) return -1;
    int bad = pool_apply_frees(mem, self->pending_frees);
    if (!bad) self->pending_frees = 0;
    if (drop_lock(mem, W_POOL_LOCK, self->lock_sem) < 0 || bad) return -1;
    return pool_wake(self, mem);
}

/* mirrors SlotPool._take_locked(1, m): the slot, -1 if none free, -2 error. */
static int64_t pool_take(PoolCore *self, char *mem, int64_t m) {
    if (pool_lock(self, mem) < 0) return -2;
    STEP(52);
    int64_t result = -2, n = self->count, i = -1;
    if (self->pending_frees) {
        if (pool_apply_frees(mem, self->pending_frees) < 0) goto out;
        self->pending_frees = 0;
    }
    if (load_word(mem, W_FREE_COUNT) < 1) {
        result = -1;
        goto out;
    }
    int64_t start = load_word(mem, W_ALLOC_HINT); /* LIFO: the slot freed last */
    if (!(0 <= start && start < n)) start = 0; /* (a hint, written without the lock: never trusted) */
    for (int64_t k = 0; k < n; k++) {
        int64_t j = start + k;
        if (j >= n) j -= n;
        if (load_word(mem, self->slots + j * SLOT_WORDS + S_STATE) == SLOT_FREE) {
            i = j;
            break;
        }
    }
    if (i < 0) {
        store_word(mem, W_FREE_COUNT, 0); /* the hint had drifted: it is exact now */
        result = -1;
        goto out;
    }
    Py_ssize_t s = self->slots + i * SLOT_WORDS;
    int64_t gen = next_gen(mem, s);
    store_word(mem, s + S_GEN, gen);
    store_word(mem, s + S_OWNER, m + 1);
    store_word(mem, s + S_NBYTES, 0);
    store_word(mem, s + S_DELIVERIES, 0);
    store_word(mem, s + S_FENCE, 0);
    STEP(53);
    store_word(mem, s + S_STATE, SLOT_LOANED);
    PyObject *key = PyLong_FromLongLong(i), *g = PyLong_FromLongLong(gen);
    int bad = key == NULL || g == NULL || PyDict_SetItem(self->loaned, key, g) < 0;
    Py_XDECREF(key);
    Py_XDECREF(g);
    if (bad) goto out;
    store_word(mem, W_FREE_COUNT, load_word(mem, W_FREE_COUNT) - 1);
    if (add_word(mem, W_POOL_COUNTERS, 1) < 0) goto out;
    STEP(54);
    result = i;
out:
    if (drop_lock(mem, W_POOL_LOCK, self->lock_sem) < 0) result = -2;
    return result;
}

/* Call self.<name>(*args) (a new reference, or NULL). */
static PyObject *pool_call(PoolCore *self, PyObject *name, PyObject *const *args, Py_ssize_t nargs) {
    PyObject *f = PyObject_GetAttr((PyObject *)self, name);
    if (f == NULL) return NULL;
    PyObject *r = PyObject_Vectorcall(f, args, nargs, NULL);
    Py_DECREF(f);
    return r;
}

static int deferred_empty(PoolCore *self) {
    Py_ssize_t k = PyObject_Size(self->deferred);
    if (k < 0) PyErr_Clear(); /* (not a deque any more: the Python path says what is wrong) */
    return k == 0;
}

/* count is the int 1 (an overflowing int is not: the Python raises). */
static int is_one(PyObject *count) {
    if (!PyLong_CheckExact(count)) return 0;
    int overflow;
    long v = PyLong_AsLongAndOverflow(count, &overflow);
    if (v == -1 && PyErr_Occurred()) PyErr_Clear();
    return !overflow && v == 1;
}

/* mirrors SlotPool.try_allocate(count=1) */
static PyObject *PoolCore_try_allocate(PoolCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs > 1 || (nargs == 1 && !is_one(args[0])) ||
        self->closing || self->member < 0 || self->member >= self->max_members || !pool_state_ok(self) ||
        !deferred_empty(self))
        goto python;
    int got = tlock_try(self);
    if (got < 0) return NULL;
    if (!got) goto python;
    Py_buffer view;
    if (pool_mem(self, &view) < 0) {
        tlock_drop(self);
        return NULL;
    }
    char *mem = (char *)view.buf;
    int64_t m = self->member, n = self->count, q = self->q, slot = -1;
    Py_ssize_t mb = self->members + m * MEMBER_WORDS;
    int64_t head = load_word(mem, mb + M_RQ_HEAD), tail = load_word(mem, mb + M_RQ_TAIL);
    PyObject *freed = NULL, *cands = NULL, *result = NULL;
    int ok = 0;
    if (head != tail || load_word(mem, mb + M_RQ_LOST)) {
        int64_t d;
        if (load_word(mem, mb + M_RQ_LOST) || __builtin_sub_overflow(tail, head, &d) || !(0 < d && d <= q))
            goto python_unlock; /* a lost or implausible queue: the Python re-checks everything */
        int reuse = !load_word(mem, W_RETURN_WAITING);
        /* read the notifications first: a corrupt one sends the whole move to the Python */
        if ((cands = PyDict_New()) == NULL) goto out;
        Py_ssize_t qw = self->rqw + m * q;
        for (int64_t pos = head; pos != tail; pos++) {
            int64_t v = load_word(mem, qw + (int64_t)((uint64_t)pos & (uint64_t)(q - 1)));
            int64_t i = (int64_t)((uint64_t)v & HOLD_RELEASED_MASK), gen = v >> 32;
            if (i >= n || !(0 < gen && gen <= MAX_GEN)) goto python_unlock;
            PyObject *key = PyLong_FromLongLong(i);
            if (key == NULL) goto out;
            PyObject *o = PyDict_GetItemWithError(self->outstanding, key);
            int mine = o != NULL && PyLong_CheckExact(o) && PyLong_AsLongLong(o) == gen;
            if (!mine && PyErr_Occurred()) {
                Py_DECREF(key);
                goto out;
            }
            if (mine) {
                int r = PyDict_SetItem(cands, key, Py_None);
                Py_DECREF(key);
                if (r < 0) goto out;
            } else {
                Py_DECREF(key);
                Py_ssize_t s = self->slots + i * SLOT_WORDS;
                if (load_word(mem, s + S_GEN) == gen && load_word(mem, s + S_STATE) != SLOT_FREE)
                    goto python_unlock; /* a live slot this member never sent */
            }
        }
        store_word(mem, mb + M_RQ_HEAD, tail);
        STEP(51);
        if ((freed = PyList_New(0)) == NULL) goto out;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(cands, &pos, &key, &value)) {
            int r = PySet_Contains(self->unfenced, key);
            if (r < 0) goto out;
            if (r) {
                if (PySet_Add(self->early, key) < 0) goto out;
                continue;
            }
            r = PyDict_Contains(self->outstanding, key);
            if (r > 0) r = pool_releasable(self, mem, PyLong_AsLongLong(key));
            if (r < 0) goto out;
            if (r && PyList_Append(freed, key) < 0) goto out;
        }
        if (PyList_GET_SIZE(freed)) {
            Py_ssize_t start = 0;
            if (reuse) {
                PyObject *first = PyList_GET_ITEM(freed, 0);
                if (pool_reloan(self, mem, first, PyLong_AsLongLong(first)) < 0) goto out;
                slot = PyLong_AsLongLong(first);
                start = 1;
            }
            if (pool_free_own_deferred(self, mem, freed, start) < 0) goto out;
        }
    }
    if (slot >= 0) {
        if (pool_count_pending(self, mem) < 0) goto out;
    } else {
        int64_t free = load_word(mem, W_FREE_COUNT), sum;
        if (__builtin_add_overflow(free, self->pending_frees, &sum) ? free < 0 : sum < 1) {
            /* none free: re-checks and the janitor, in Python (mirrors the Python's branch) */
            PyBuffer_Release(&view);
            view.obj = NULL;
            PyObject *a[2] = {PyLong_FromLong(1), freed ? freed : NULL};
            if (a[0] == NULL) goto out;
            if (a[1] == NULL && (a[1] = freed = PyList_New(0)) == NULL) {
                Py_DECREF(a[0]);
                goto out;
            }
            PyObject *more = pool_call(self, s_when_short_locked, a, 2);
            Py_DECREF(a[0]);
            if (more == NULL) goto out;
            Py_SETREF(freed, more);
            if (pool_mem(self, &view) < 0) goto out;
            mem = (char *)view.buf;
        }
        slot = pool_take(self, mem, m);
        if (slot == -2) goto out;
    }
    ok = 1;
out:
    if (view.obj != NULL) PyBuffer_Release(&view);
    Py_XDECREF(cands);
    if (ok && !deferred_empty(self)) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_drain_deferred_locked);
        if (r == NULL) ok = 0;
        Py_XDECREF(r);
    }
    if (tlock_drop(self) < 0) ok = 0;
    if (!ok) {
        Py_XDECREF(freed);
        return NULL;
    }
    if (slot >= 0) {
        PyObject *key = PyLong_FromLongLong(slot);
        if (key == NULL || (result = PyList_New(1)) == NULL) {
            Py_XDECREF(key);
            Py_XDECREF(freed);
            return NULL;
        }
        PyList_SET_ITEM(result, 0, key);
        if (PySet_GET_SIZE(self->cold)) {
            PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_warm_up, result);
            if (r == NULL) {
                Py_DECREF(result);
                Py_XDECREF(freed);
                return NULL;
            }
            Py_DECREF(r);
        }
    } else {
        result = Py_NewRef(Py_None);
    }
    if (freed != NULL && PyList_GET_SIZE(freed) && self->on_return != NULL && self->on_return != Py_None) {
        PyObject *empty = PyList_New(0);
        PyObject *a[2] = {freed, empty};
        PyObject *r = empty ? pool_call(self, s_after_collect, a, 2) : NULL;
        Py_XDECREF(empty);
        if (r == NULL) {
            if (slot >= 0) { /* the caller never sees it */
                PyObject *type, *value, *tb;
                PyErr_Fetch(&type, &value, &tb);
                PyObject *x = PyObject_CallMethod((PyObject *)self, "abort", "O", result);
                Py_XDECREF(x);
                if (x == NULL) PyErr_Clear();
                PyErr_Restore(type, value, tb);
            }
            Py_DECREF(result);
            Py_DECREF(freed);
            return NULL;
        }
        Py_DECREF(r);
    }
    Py_XDECREF(freed);
    return result;
python_unlock:
    PyBuffer_Release(&view);
    Py_XDECREF(cands);
    if (tlock_drop(self) < 0) return NULL;
python:
    return pool_call(self, s_py_try_allocate, args, nargs);
}

/* mirrors SlotPool.mark_sent(indices, nbytes, deliveries=1, fenced=False)
 * for one slot, given positionally; anything else goes to the Python. */
static PyObject *PoolCore_mark_sent(PoolCore *self, PyObject *const *args, size_t nargsf, PyObject *kwnames) {
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    PyObject *idx = NULL, *nb = NULL;
    int64_t deliveries = 1, i, nbytes;
    int fenced = 0;
    if (kwnames != NULL || nargs < 2 || nargs > 4 || !pool_state_ok(self)) goto python;
    if (nargs >= 3) {
        if (!PyLong_CheckExact(args[2])) goto python;
        deliveries = PyLong_AsLongLong(args[2]);
        if (deliveries == -1 && PyErr_Occurred()) {
            PyErr_Clear();
            goto python;
        }
        if (deliveries < 1) goto python;
    }
    if (nargs == 4 && (fenced = PyObject_IsTrue(args[3])) < 0) return NULL;
    if (!(PyTuple_CheckExact(args[0]) || PyList_CheckExact(args[0])) || PySequence_Fast_GET_SIZE(args[0]) != 1 ||
        !(PyTuple_CheckExact(args[1]) || PyList_CheckExact(args[1])) || PySequence_Fast_GET_SIZE(args[1]) != 1)
        goto python; /* (several slots: the Python) */
    idx = PySequence_Fast_GET_ITEM(args[0], 0);
    nb = PySequence_Fast_GET_ITEM(args[1], 0);
    if (!PyLong_CheckExact(idx) || !PyLong_CheckExact(nb)) goto python;
    i = PyLong_AsLongLong(idx);
    nbytes = PyLong_AsLongLong(nb);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        goto python;
    }
    if (!(0 <= i && i < self->count) || !(0 <= nbytes && nbytes <= self->slot_size)) goto python;
    int got = tlock_try(self);
    if (got < 0) return NULL;
    if (!got) goto python;
    PyObject *gen = PyDict_GetItemWithError(self->loaned, idx); /* borrowed */
    if (gen == NULL) {
        if (tlock_drop(self) < 0 || PyErr_Occurred()) return NULL;
        goto python; /* not loaned here: the Python raises SlotError */
    }
    Py_INCREF(gen);
    Py_buffer view;
    PyObject *gens = NULL;
    if (pool_mem(self, &view) < 0) goto out;
    char *mem = (char *)view.buf;
    Py_ssize_t s = self->slots + i * SLOT_WORDS;
    store_word(mem, s + S_NBYTES, nbytes);
    store_word(mem, s + S_DELIVERIES, deliveries);
    store_word(mem, s + S_FENCE, 0);
    STEP(61);
    store_word(mem, s + S_STATE, SLOT_SENT);
    STEP(62);
    PyBuffer_Release(&view);
    if (PyDict_DelItem(self->loaned, idx) < 0 || PyDict_SetItem(self->outstanding, idx, gen) < 0) goto out;
    self->last_sent = i;
    if ((gens = PyList_New(1)) == NULL) goto out;
    PyList_SET_ITEM(gens, 0, Py_NewRef(gen));
    if (fenced && PySet_Add(self->unfenced, idx) < 0) Py_CLEAR(gens);
out:
    Py_DECREF(gen);
    if (tlock_drop(self) < 0) Py_CLEAR(gens);
    return gens;
python:
    if (PyErr_Occurred()) return NULL;
    {
        PyObject *f = PyObject_GetAttr((PyObject *)self, s_py_mark_sent);
        if (f == NULL) return NULL;
        PyObject *r = PyObject_Vectorcall(f, args, nargsf, kwnames);
        Py_DECREF(f);
        return r;
    }
}

/* mirrors SlotPool.set_fence(indices, position) */
static PyObject *PoolCore_set_fence(PoolCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !(PyTuple_CheckExact(args[0]) || PyList_CheckExact(args[0])) || !PyLong_CheckExact(args[1]) ||
        !pool_state_ok(self))
        return pool_call(self, s_py_set_fence, args, nargs);
    int64_t position = PyLong_AsLongLong(args[1]);
    if (position == -1 && PyErr_Occurred()) {
        PyErr_Clear();
        return pool_call(self, s_py_set_fence, args, nargs);
    }
    PyObject *indices = args[0];
    int got = tlock_try(self);
    if (got < 0) return NULL;
    if (!got) return pool_call(self, s_py_set_fence, args, nargs);
    PyObject *freed = NULL;
    Py_buffer view;
    int ok = 0;
    if (pool_mem(self, &view) < 0) goto out;
    char *mem = (char *)view.buf;
    for (Py_ssize_t j = 0; j < PySequence_Fast_GET_SIZE(indices); j++) {
        PyObject *key = PySequence_Fast_GET_ITEM(indices, j); /* (a list may shrink in a callback: re-read) */
        int r = PySet_Discard(self->unfenced, key); /* 1: it was there */
        if (r < 0) goto out_view;
        if (!r) continue;
        int64_t i = PyLong_AsLongLong(key); /* (only our own slot indices are in _unfenced) */
        if ((i == -1 && PyErr_Occurred()) || !(0 <= i && i < self->count)) {
            PyErr_Clear();
            PyErr_SetString(PyExc_ValueError, "a slot index out of range in _unfenced");
            goto out_view;
        }
        store_word(mem, self->slots + i * SLOT_WORDS + S_FENCE, position);
        r = PySet_Discard(self->early, key); /* its holders were quicker than us */
        if (r > 0) r = pool_releasable(self, mem, i);
        if (r < 0) goto out_view;
        if (r) {
            if (freed == NULL && (freed = PyList_New(0)) == NULL) goto out_view;
            if (PyList_Append(freed, key) < 0) goto out_view;
        }
    }
    ok = 1;
out_view:
    PyBuffer_Release(&view);
    if (ok && freed != NULL) {
        PyObject *r = PyObject_CallMethodOneArg((PyObject *)self, s_free_own_locked, freed);
        if (r == NULL) ok = 0;
        Py_XDECREF(r);
    }
out:
    if (tlock_drop(self) < 0) ok = 0;
    if (ok && freed != NULL) {
        PyObject *empty = PyList_New(0);
        PyObject *a[2] = {freed, empty};
        PyObject *r = empty ? pool_call(self, s_after_collect, a, 2) : NULL;
        Py_XDECREF(empty);
        if (r == NULL) ok = 0;
        Py_XDECREF(r);
    }
    Py_XDECREF(freed);
    if (!ok) return NULL;
    Py_RETURN_NONE;
}

/* mirrors SlotPool.acquire(index, generation): a read-only memoryview of
 * the slot's nbytes, one hold recorded in this member's hold word. */
static PyObject *PoolCore_acquire(PoolCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) || self->closing ||
        self->member < 0 || self->member >= self->max_members || !pool_state_ok(self) || !deferred_empty(self))
        goto python;
    int64_t index = PyLong_AsLongLong(args[0]), generation = PyLong_AsLongLong(args[1]);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        goto python;
    }
    if (!(0 <= index && index < self->count)) goto python;
    int got = tlock_try(self);
    if (got < 0) return NULL;
    if (!got) goto python;
    Py_buffer view;
    if (pool_mem(self, &view) < 0) {
        tlock_drop(self);
        return NULL;
    }
    char *mem = (char *)view.buf;
    Py_ssize_t s = self->slots + index * SLOT_WORDS;
    int64_t nbytes = load_word(mem, s + S_NBYTES);
    if (load_word(mem, s + S_GEN) != generation || load_word(mem, s + S_STATE) != SLOT_SENT ||
        !(0 <= nbytes && nbytes <= self->slot_size)) {
        PyBuffer_Release(&view);
        if (tlock_drop(self) < 0) return NULL;
        goto python; /* the Python raises SlotError / BrokenError */
    }
    Py_ssize_t hw = self->holdw + self->member * self->count + index;
    int bad = add_word(mem, hw, HOLD_ACQUIRE);
    PyBuffer_Release(&view);
    if (bad) {
        tlock_drop(self);
        return NULL;
    }
    STEP(71);
    self->holds += 1;
    if (!deferred_empty(self)) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_drain_deferred_locked);
        Py_XDECREF(r);
        if (r == NULL) {
            tlock_drop(self);
            return NULL;
        }
    }
    if (tlock_drop(self) < 0) return NULL;
    int64_t off = self->data + index * self->stride;
    PyObject *lo = PyLong_FromLongLong(off), *hi = PyLong_FromLongLong(off + nbytes);
    PyObject *sl = lo && hi ? PySlice_New(lo, hi, NULL) : NULL;
    Py_XDECREF(lo);
    Py_XDECREF(hi);
    if (sl == NULL) return NULL;
    PyObject *r = PyObject_GetItem(self->rbuf, sl);
    Py_DECREF(sl);
    return r;
python:
    return pool_call(self, s_py_acquire, args, nargs);
}

/* mirrors SlotPool.release_later(index, generation, epoch) in its usual
 * case: nobody in this process is inside the pool, the hold is ours, and
 * nothing is pending; the release and the push of its return notice. */
static PyObject *PoolCore_release_later(PoolCore *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 3 || !PyLong_CheckExact(args[0]) || !PyLong_CheckExact(args[1]) || !PyLong_CheckExact(args[2]) ||
        self->closing || self->member < 0 || self->member >= self->max_members || !pool_state_ok(self) ||
        !deferred_empty(self) || PyList_GET_SIZE(self->notes))
        goto python;
    int64_t index = PyLong_AsLongLong(args[0]), generation = PyLong_AsLongLong(args[1]),
            epoch = PyLong_AsLongLong(args[2]);
    if (PyErr_Occurred()) {
        PyErr_Clear();
        goto python;
    }
    if (!(0 <= index && index < self->count) || epoch != self->epoch || !(0 <= generation && generation <= MAX_GEN))
        goto python;
    int got = tlock_try(self);
    if (got < 0) return NULL;
    if (!got) goto python;
    Py_buffer view;
    if (pool_mem(self, &view) < 0) {
        tlock_drop(self);
        return NULL;
    }
    char *mem = (char *)view.buf;
    int64_t m = self->member, n = self->count;
    Py_ssize_t s = self->slots + index * SLOT_WORDS, hw = self->holdw + m * n + index;
    int64_t v = load_word(mem, hw);
    if (load_word(mem, s + S_GEN) != generation ||
        (int64_t)((uint64_t)v & HOLD_RELEASED_MASK) >= (v >> 32)) { /* not held: the Python's SlotError, ignored */
        PyBuffer_Release(&view);
        if (tlock_drop(self) < 0) return NULL;
        goto python;
    }
    store_word(mem, hw, v + 1); /* (released < acquired < 2**31: no overflow) */
    STEP(81);
    self->holds -= 1;
    int64_t owner = load_word(mem, s + S_OWNER) - 1, note = generation << 32 | index;
    /* _push_notes_locked(block=False) of this one note */
    int ok = 0, kept = 0;
    got = pool_lock_try(self, mem);
    if (got < 0) goto out;
    if (!got) {
        kept = 1; /* the pool lock is busy: pushed by this process's next pool call */
    } else {
        int bad = 0;
        if (0 <= owner && owner < self->max_members) {
            Py_ssize_t mb = self->members + owner * MEMBER_WORDS;
            if (load_word(mem, mb + M_STATE) == MEMBER_LIVE) { /* (else the janitor frees its slots) */
                int64_t tail = load_word(mem, mb + M_RQ_TAIL);
                if ((__int128)tail - load_word(mem, mb + M_RQ_HEAD) >= self->q) {
                    store_word(mem, mb + M_RQ_LOST, 1);
                    bad = add_word(mem, W_POOL_COUNTERS + 6, 1);
                } else {
                    store_word(mem, self->rqw + owner * self->q + (int64_t)((uint64_t)tail & (uint64_t)(self->q - 1)),
                               note);
                    STEP(82);
                    int64_t t1;
                    if ((bad = checked_add(tail, 1, &t1)) == 0) {
                        store_word(mem, mb + M_RQ_TAIL, t1);
                        STEP(83);
                        bad = add_word(mem, W_POOL_COUNTERS + 2, 1);
                    } else {
                        kept = 1; /* as the Python: the notes are cleared only after the loop */
                    }
                }
            }
        }
        if (drop_lock(mem, W_POOL_LOCK, self->lock_sem) < 0 || bad) goto out;
        if (pool_wake(self, mem) < 0) goto out;
    }
    ok = 1;
out:
    PyBuffer_Release(&view);
    if (kept) {
        PyObject *t = Py_BuildValue("(LL)", (long long)owner, (long long)note);
        if (t == NULL || PyList_Append(self->notes, t) < 0) ok = 0;
        Py_XDECREF(t);
    }
    if (tlock_drop(self) < 0) ok = 0;
    if (!ok) return NULL;
    if (!deferred_empty(self)) {
        PyObject *r = PyObject_CallMethodNoArgs((PyObject *)self, s_drain_deferred);
        if (r == NULL) return NULL;
        Py_DECREF(r);
    }
    Py_RETURN_NONE;
python:
    return pool_call(self, s_py_release_later, args, nargs);
}

/* _c_setup(geometry): the C copies of the checked geometry, a tuple
 * (slot_size, slot_count, max_members, rq_capacity, slot table word, member
 * table word, hold table word, return queues word, data offset, stride,
 * segment size), and the pool lock's semaphore. */
static PyObject *PoolCore_c_setup(PoolCore *self, PyObject *args) {
    long long g[11];
    PyObject *sem;
    if (!PyArg_ParseTuple(args, "(LLLLLLLLLLL)O", &g[0], &g[1], &g[2], &g[3], &g[4], &g[5], &g[6], &g[7], &g[8],
                          &g[9], &g[10], &sem))
        return NULL;
    self->slot_size = g[0];
    self->count = g[1];
    self->max_members = g[2];
    self->q = g[3];
    self->slots = g[4];
    self->members = g[5];
    self->holdw = g[6];
    self->rqw = g[7];
    self->data = g[8];
    self->stride = g[9];
    self->size = g[10];
    Py_XSETREF(self->lock_sem, Py_NewRef(sem));
    Py_RETURN_NONE;
}

static PyMethodDef PoolCore_methods[] = {
    {"try_allocate", (PyCFunction)(void (*)(void))PoolCore_try_allocate, METH_FASTCALL,
     "try_allocate(count=1) (C core: mirrors SlotPool.try_allocate for one slot)."},
    {"mark_sent", (PyCFunction)(void (*)(void))PoolCore_mark_sent, METH_FASTCALL | METH_KEYWORDS,
     "mark_sent(indices, nbytes, deliveries=1, fenced=False) (C core: mirrors SlotPool.mark_sent for one slot)."},
    {"set_fence", (PyCFunction)(void (*)(void))PoolCore_set_fence, METH_FASTCALL,
     "set_fence(indices, position) (C core: mirrors SlotPool.set_fence)."},
    {"acquire", (PyCFunction)(void (*)(void))PoolCore_acquire, METH_FASTCALL,
     "acquire(index, generation) (C core: mirrors SlotPool.acquire)."},
    {"release_later", (PyCFunction)(void (*)(void))PoolCore_release_later, METH_FASTCALL,
     "release_later(index, generation, epoch) (C core: mirrors SlotPool.release_later)."},
    {"_c_setup", (PyCFunction)PoolCore_c_setup, METH_VARARGS, "_c_setup(geometry, lock_semaphore)"},
    {NULL, NULL, 0, NULL}};

static PyMemberDef PoolCore_members[] = {
    {"_member", T_LONGLONG, offsetof(PoolCore, member), 0, NULL},
    {"_holds", T_LONGLONG, offsetof(PoolCore, holds), 0, NULL},
    {"_pending_frees", T_LONGLONG, offsetof(PoolCore, pending_frees), 0, NULL},
    {"_last_sent", T_LONGLONG, offsetof(PoolCore, last_sent), 0, NULL},
    {"_epoch", T_LONGLONG, offsetof(PoolCore, epoch), 0, NULL},
    {"_closing", T_BOOL, offsetof(PoolCore, closing), 0, NULL},
    {"_c_slot_size", T_LONGLONG, offsetof(PoolCore, slot_size), READONLY, NULL},
    {"_c_count", T_LONGLONG, offsetof(PoolCore, count), READONLY, NULL},
    {"_buf", T_OBJECT_EX, offsetof(PoolCore, buf), 0, NULL},
    {"_rbuf", T_OBJECT_EX, offsetof(PoolCore, rbuf), 0, NULL},
    {"_lock", T_OBJECT_EX, offsetof(PoolCore, lock), 0, NULL},
    {"_tlock", T_OBJECT_EX, offsetof(PoolCore, tlock), 0, NULL},
    {"_loaned", T_OBJECT_EX, offsetof(PoolCore, loaned), 0, NULL},
    {"_outstanding", T_OBJECT_EX, offsetof(PoolCore, outstanding), 0, NULL},
    {"_unfenced", T_OBJECT_EX, offsetof(PoolCore, unfenced), 0, NULL},
    {"_early", T_OBJECT_EX, offsetof(PoolCore, early), 0, NULL},
    {"_orphan_seen", T_OBJECT_EX, offsetof(PoolCore, orphan_seen), 0, NULL},
    {"_deferred", T_OBJECT_EX, offsetof(PoolCore, deferred), 0, NULL},
    {"_notes", T_OBJECT_EX, offsetof(PoolCore, notes), 0, NULL},
    {"_cold", T_OBJECT_EX, offsetof(PoolCore, cold), 0, NULL},
    {"on_return", T_OBJECT, offsetof(PoolCore, on_return), 0, NULL},
    {NULL, 0, 0, 0, NULL}};

static PyTypeObject PoolCoreType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "shmq._core.PoolCore",
    .tp_basicsize = sizeof(PoolCore),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_BASETYPE | Py_TPFLAGS_HAVE_GC,
    .tp_doc = "The C slot moves under shmq's SlotPool (see docs/core.md).",
    .tp_dealloc = (destructor)PoolCore_dealloc,
    .tp_traverse = (traverseproc)PoolCore_traverse,
    .tp_clear = (inquiry)PoolCore_clear,
    .tp_methods = PoolCore_methods,
    .tp_members = PoolCore_members,
};

static PyMethodDef core_functions[] = {
    {"pack_flat", (PyCFunction)core_pack_flat, METH_O,
     "pack_flat(obj): obj as a flat-tuple record, or None (C core: mirrors topic._pack_flat)."},
    {"unpack_flat", (PyCFunction)core_unpack_flat, METH_O,
     "unpack_flat(data): the tuple of a flat-tuple record (C core: mirrors topic._unpack_flat)."},
    {NULL, NULL, 0, NULL}};

static struct PyModuleDef core_module = {PyModuleDef_HEAD_INIT, "shmq._core",
                                         "shmq's compiled core (see docs/core.md).", -1, core_functions, NULL, NULL, NULL, NULL};

#define INTERN(var, text)                                                      \
    if ((var = PyUnicode_InternFromString(text)) == NULL) return NULL

PyMODINIT_FUNC PyInit__core(void) {
    INTERN(s_acquire, "acquire");
    INTERN(s_release, "release");
    INTERN(s_acquire_slow, "_acquire_slow");
    INTERN(s_plock, "_plock");
    INTERN(s_clock, "_clock");
    INTERN(s_refresh_free, "_refresh_free");
    INTERN(s_pad, "_pad");
    INTERN(s_skip_pad, "_skip_pad");
    INTERN(s_failure, "_failure");
    INTERN(s_corrupt_indices, "_corrupt_indices");
    INTERN(s_corrupt_record, "_corrupt_record");
    INTERN(s_not_empty, "_not_empty");
    INTERN(s_not_full, "_not_full");
    INTERN(s_ring, "ring");
    INTERN(s_segment, "_segment");
    INTERN(s_roles_marked, "roles_marked");
    INTERN(s_add_role, "add_role");
    INTERN(s_py_try_write, "_py_try_write");
    INTERN(s_sem, "_sem");
    INTERN(s_w_owner, "_w_owner");
    INTERN(s_w_gen, "_w_gen");
    INTERN(s_py_try_read, "_py_try_read");
    INTERN(s_get_value, "_get_value");
    INTERN(s_py_try_allocate, "_py_try_allocate");
    INTERN(s_py_mark_sent, "_py_mark_sent");
    INTERN(s_py_set_fence, "_py_set_fence");
    INTERN(s_py_acquire, "_py_acquire");
    INTERN(s_py_release_later, "_py_release_later");
    INTERN(s_high, "_high");
    INTERN(s_when_short_locked, "_when_short_locked");
    INTERN(s_wake_waiters, "_wake_waiters");
    INTERN(s_free_own_locked, "_free_own_locked");
    INTERN(s_after_collect, "_after_collect");
    INTERN(s_warm_up, "_warm_up");
    INTERN(s_drain_deferred, "_drain_deferred");
    INTERN(s_drain_deferred_locked, "_drain_deferred_locked");
    INTERN(s_push_notes_locked, "_push_notes_locked");
    refresh_pid();
    pthread_atfork(NULL, NULL, refresh_pid);
    const char *stop = getenv("SHMQ_CORE_STOP_AT");
    stop_at = stop ? atol(stop) : 0;
    if ((kw_buffer_callback = Py_BuildValue("(s)", "buffer_callback")) == NULL) return NULL;
    /* object.__new__, which sets up the subclass's (managed) __dict__ the way
     * the interpreter's fast attribute paths expect: PyType_GenericNew
     * measured 10-17 ns slower per attribute of RingBuffer (docs/core.md). */
    RingCoreType.tp_new = PyBaseObject_Type.tp_new;
    BroadcastCoreType.tp_new = PyBaseObject_Type.tp_new;
    CursorCoreType.tp_new = PyBaseObject_Type.tp_new;
    PoolCoreType.tp_new = PyBaseObject_Type.tp_new;
    if (PyType_Ready(&RingCoreType) < 0 || PyType_Ready(&WriterType) < 0 || PyType_Ready(&ReaderType) < 0 ||
        PyType_Ready(&BroadcastCoreType) < 0 || PyType_Ready(&CursorCoreType) < 0 ||
        PyType_Ready(&TopicReceiverType) < 0 || PyType_Ready(&TopicPublisherType) < 0 ||
        PyType_Ready(&TopicIterationType) < 0 || PyType_Ready(&PoolCoreType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&core_module);
    if (m == NULL) return NULL;
    Py_INCREF(&RingCoreType);
    if (PyModule_AddObject(m, "RingCore", (PyObject *)&RingCoreType) < 0) return NULL;
    Py_INCREF(&WriterType);
    if (PyModule_AddObject(m, "Writer", (PyObject *)&WriterType) < 0) return NULL;
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(m, "Reader", (PyObject *)&ReaderType) < 0) return NULL;
    PyObject *layout = Py_BuildValue("{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "W_TAIL", W_TAIL, "W_MSGS_IN",
                                     W_MSGS_IN, "W_HEAD", W_HEAD, "W_MSGS_OUT", W_MSGS_OUT, "W_CONSUMER_WAITING",
                                     W_CONSUMER_WAITING, "W_PRODUCER_WAITING", W_PRODUCER_WAITING,
                                     "W_PRODUCER_LOCK", W_PRODUCER_LOCK, "W_CONSUMER_LOCK", W_CONSUMER_LOCK,
                                     "ROLE_CONSUMER", ROLE_CONSUMER);
    if (layout == NULL || PyModule_AddObject(m, "LAYOUT", layout) < 0) return NULL;
    PyTypeObject *topic_types[] = {&BroadcastCoreType, &CursorCoreType, &TopicReceiverType, &TopicPublisherType,
                                   &TopicIterationType};
    const char *topic_names[] = {"BroadcastCore", "CursorCore", "TopicReceiver", "TopicPublisher", "TopicIteration"};
    for (int i = 0; i < 5; i++) {
        Py_INCREF(topic_types[i]);
        if (PyModule_AddObject(m, topic_names[i], (PyObject *)topic_types[i]) < 0) return NULL;
    }
    PyObject *tlayout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i}", "W_T_TAIL", W_T_TAIL, "W_T_NEXT_SEQ",
        W_T_NEXT_SEQ, "W_T_OLDEST", W_T_OLDEST, "W_T_OLDEST_SEQ", W_T_OLDEST_SEQ, "W_T_EPOCH", W_T_EPOCH,
        "W_T_PUB_WAITING", W_T_PUB_WAITING, "W_T_SUB_WAITING", W_T_SUB_WAITING, "W_T_SUB_TABLE", W_T_SUB_TABLE,
        "T_SUBSCRIBERS", T_SUBSCRIBERS, "T_SUB_WORDS", T_SUB_WORDS, "TS_PID", TS_PID, "TS_CURSOR", TS_CURSOR,
        "TS_NEXT_SEQ", TS_NEXT_SEQ, "TS_LOST", TS_LOST, "TS_RECEIVED", TS_RECEIVED, "T_RECORD_HEADER", T_RECORD_HEADER,
        "TS_WAITING", TS_WAITING);
    if (tlayout == NULL || PyModule_AddObject(m, "TOPIC_LAYOUT", tlayout) < 0) return NULL;
    Py_INCREF(&PoolCoreType);
    if (PyModule_AddObject(m, "PoolCore", (PyObject *)&PoolCoreType) < 0) return NULL;
    PyObject *playout = Py_BuildValue(
        "{s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:i,s:L}",
        "W_POOL_LOCK", W_POOL_LOCK, "W_FREE_COUNT", W_FREE_COUNT, "W_ALLOC_HINT", W_ALLOC_HINT, "W_MEMBERS_HIGH",
        W_MEMBERS_HIGH, "W_RETURN_WAITING", W_RETURN_WAITING, "W_POOL_COUNTERS", W_POOL_COUNTERS, "SLOT_WORDS",
        SLOT_WORDS, "S_STATE", S_STATE, "S_GEN", S_GEN, "S_OWNER", S_OWNER, "S_NBYTES", S_NBYTES, "S_DELIVERIES",
        S_DELIVERIES, "S_FENCE", S_FENCE, "SLOT_FREE", SLOT_FREE, "SLOT_LOANED", SLOT_LOANED, "SLOT_SENT",
        SLOT_SENT, "MEMBER_WORDS", MEMBER_WORDS, "M_STATE", M_STATE, "M_RQ_HEAD", M_RQ_HEAD, "M_RQ_TAIL",
        M_RQ_TAIL, "M_RQ_LOST", M_RQ_LOST, "M_REUSES", M_REUSES, "MEMBER_LIVE", MEMBER_LIVE, "MEMBER_DEAD", MEMBER_DEAD, "HOLD_ACQUIRE",
        (long long)HOLD_ACQUIRE);
    if (playout == NULL || PyModule_AddObject(m, "POOL_LAYOUT", playout) < 0) return NULL;
    if (PyModule_AddIntConstant(m, "POOL_LOCK_GENERATION", W_POOL_LOCK_GEN) < 0) return NULL;
    if (PyModule_AddIntConstant(m, "STOP_AT", stop_at) < 0) return NULL;
    return m;
}
