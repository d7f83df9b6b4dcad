/* The tcp transport's read of a socket that may have nothing to read, a spinning
 * receiver's read and hand-over of messages, and the send of one small frame, in C.
 * Optional: built at install where a compiler exists; without it, or with
 * HPCPROC_SOCKET_ACCEL=0, the transport calls socket.recv_into, parses and sends in
 * Python (tcp.py), which stays the reference.
 *
 * Why in C: a receive that polls its links reads each socket once per turn, and most
 * reads find nothing. socket.recv_into reports that by raising BlockingIOError, whose
 * creation, raise and catch cost about 0.9 us a read here; recv_nowait returns -1
 * instead, for about 0.2 us (the system call). A turn that finds the reply sooner makes
 * the round trip shorter (measured in the closing note of the change).
 *
 * Reader(link, endpoint, wait_s)() -> bool
 *   The endpoint's _poll_links for its one polled link, a plain _TcpLink: when the
 *   link waits for the next message with its buffer empty (the spinning receiver's
 *   common case), the read of the socket into the link's buffer and, for each DATA
 *   message of one frame on an open connection, its hand-over (to the connection's
 *   receiver while no event waits, else as a Received event), as _TcpLink._parse and
 *   MultiplexedEndPoint._on_data do: a small frame copied out of the buffer, a large
 *   one (from DIRECT_MIN) in a buffer of the link's pool, its rest received straight
 *   into it for up to wait_s (the turn's wait for a frame that is arriving; then it is
 *   left with the link as its parse leaves one). Whatever else arrives (another kind,
 *   several frames, a partial small message, an unknown connection) is left where the
 *   link's Python parse takes it up, and every other state of the link goes to
 *   _poll_links itself. Measured: the Python from a read that brings a message to the
 *   event's return cost about 1.8 us a hop of an 8 B round trip of 13.6 us; at 256
 *   KiB, the first part's parse, the turns between the frame's reads and their
 *   low-water marks, about 8 us a hop of a 90 us round trip.
 *
 * Sender(link)(conn_id, frames) -> bool
 *   _TcpLink.send_now: the one-frame header and one small frame in one sendmsg (0.5 us
 *   of Python a message).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <sys/socket.h>
#include <sys/uio.h>
#include <sys/types.h>
#include <time.h>

#include "_accel_handover.h"
#include "_accel_util.h"

/* recv(fd, buf, len, MSG_DONTWAIT) with the GIL released (the caller keeps buf exported
 * meanwhile, as socket.recv_into does), again after EINTR once the signal handlers ran:
 * the count (0: end of stream), -1 with *err the errno (EAGAIN: nothing there), or -2
 * with an exception set (a signal handler raised). */
static ssize_t recv_dontwait(int fd, char *buf, size_t len, int *err) {
    for (;;) {
        ssize_t n;
        int e;
        Py_BEGIN_ALLOW_THREADS
        n = recv(fd, buf, len, MSG_DONTWAIT);
        e = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0)
            return n;
        if (e != EINTR) {
            *err = e;
            return -1;
        }
        if (PyErr_CheckSignals() < 0)
            return -2;
    }
}

/* recv_nowait(fd, buffer, offset) -> int: see _socket_accel.pyi. */
static PyObject *recv_nowait(PyObject *Py_UNUSED(module), PyObject *const *args,
                             Py_ssize_t nargs) {
    if (nargs != 3) {
        PyErr_Format(PyExc_TypeError, "recv_nowait(fd, buffer, offset) takes 3 arguments, not %zd",
                     nargs);
        return NULL;
    }
    long fd = PyLong_AsLong(args[0]);
    if (fd == -1 && PyErr_Occurred())
        return NULL;
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "%ld is not a file descriptor", fd);
        return NULL;
    }
    Py_ssize_t offset = PyLong_AsSsize_t(args[2]);
    if (offset == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(args[1], &view, PyBUF_WRITABLE) < 0)
        return NULL;
    if (offset < 0 || offset >= view.len) {
        /* (No room at all is refused too: recv of 0 bytes would read as end of stream.) */
        PyErr_Format(PyExc_ValueError, "offset %zd leaves no room in the buffer of %zd bytes",
                     offset, view.len);
        PyBuffer_Release(&view);
        return NULL;
    }
    int err = 0;
    ssize_t n =
        recv_dontwait((int)fd, (char *)view.buf + offset, (size_t)(view.len - offset), &err);
    PyBuffer_Release(&view);
    if (n == -2)
        return NULL;
    if (n >= 0)
        return PyLong_FromSsize_t(n);
    if (err == EAGAIN || err == EWOULDBLOCK)
        return PyLong_FromLong(-1);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

/* ---------------------------------------------------------------- Reader */

/* The wire's one-frame DATA header, "<B3xIQQ": kind, pad, frame count, connection id,
 * frame length (tcp.py's _ONE_FRAME_HEADER). */
#define ONE_FRAME_SIZE 24

static unsigned char DataKind = 0;    /* Kind.DATA */
static uint64_t DirectMin = 0;        /* tcp.DIRECT_MIN: larger frames are the link's */
static uint64_t SendNowMax = 0;       /* tcp._SEND_NOW_MAX: larger ones go through send_data */
static PyObject *s_dead, *s_state, *s_start, *s_end, *s_lowat, *s_heard, *s_alive,
    *s_incoming, *s_buf, *s_fd, *s_max_message, *s_receivers, *s_events, *s_items,
    *s_waiters, *s_handed_over, *s_parse, *s_on_readable, *s_on_eof,
    *s_read_failed, *s_poll_links, *s_wq, *s_queue_rest, *s_pool, *s_get, *s_frames,
    *s_fi, *s_fpos, *s_nframes, *s_cid, *s_read_error;

/* init(received_type, data_kind, direct_min, send_now_max): see _socket_accel.pyi. */
static PyObject *init(PyObject *Py_UNUSED(module), PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError, "init(received_type, data_kind, direct_min, send_now_max) "
                                      "takes 4 arguments, not %zd", nargs);
        return NULL;
    }
    long kind = PyLong_AsLong(args[1]);
    if (kind == -1 && PyErr_Occurred())
        return NULL;
    unsigned long long direct_min = PyLong_AsUnsignedLongLong(args[2]);
    if (direct_min == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    unsigned long long send_now_max = PyLong_AsUnsignedLongLong(args[3]);
    if (send_now_max == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if (kind < 0 || kind > 255) {
        PyErr_Format(PyExc_ValueError, "init: data_kind %ld is not a byte", kind);
        return NULL;
    }
    if (handover_init(args[0]) < 0)
        return NULL;
    DataKind = (unsigned char)kind;
    DirectMin = direct_min;
    SendNowMax = send_now_max;
    Py_RETURN_NONE;
}

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *link;      /* the _TcpLink */
    PyObject *endpoint;  /* its _TcpEndPoint */
    PyObject *buf;       /* link._buf (a bytearray, the link's for its life) */
    PyObject *incoming;  /* link.incoming: sender's connection id -> local id */
    PyObject *receivers; /* endpoint._receivers: local id -> receiver */
    PyObject *events;    /* endpoint._events (an EventQueue) */
    PyObject *items;     /* its _items (a deque) */
    PyObject *waiters;   /* its _waiters (a deque) */
    PyObject *pool_get;  /* link._pool.get: a large frame's buffer */
    int fd;              /* link._fd: open until the link is _dead */
    uint64_t max_message;
    double wait_s;       /* how long a large frame's rest is waited for in a turn */
} Reader;

#define READER_FIELDS(X) \
    X(link) X(endpoint) X(buf) X(incoming) X(receivers) X(events) X(items) X(waiters) \
    X(pool_get)

static int Reader_traverse(Reader *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    READER_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int Reader_clear(Reader *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    READER_FIELDS(CLEAR)
#undef CLEAR
    return 0;
}

static void Reader_dealloc(Reader *self) {
    PyObject_GC_UnTrack(self);
    Reader_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

/* An int attribute as a Py_ssize_t: 0, or -1 with an exception set. */
static int attr_ssize(PyObject *obj, PyObject *name, Py_ssize_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    *out = PyLong_AsSsize_t(v);
    Py_DECREF(v);
    return *out == -1 && PyErr_Occurred() ? -1 : 0;
}

/* ``obj.name = value`` for a Py_ssize_t value: 0, or -1 with an exception set. */
static int set_ssize(PyObject *obj, PyObject *name, Py_ssize_t value) {
    PyObject *v = PyLong_FromSsize_t(value);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(obj, name, v);
    Py_DECREF(v);
    return r;
}

/* Call ``obj.name(*args)`` and drop its result: 0, or -1 with an exception set. */
static int call_method(PyObject *obj, PyObject *name, PyObject *arg) {
    PyObject *args[2] = {obj, arg};
    PyObject *res = PyObject_VectorcallMethod(name, args, arg == NULL ? 1 : 2, NULL);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

static PyObject *Reader_call(Reader *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames);

static PyObject *Reader_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *link, *endpoint, *wait;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "Reader(link, endpoint, wait_s) takes no keywords");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Reader", 3, 3, &link, &endpoint, &wait))
        return NULL;
    double wait_s = PyFloat_AsDouble(wait);
    if (wait_s == -1.0 && PyErr_Occurred())
        return NULL;
    if (!(wait_s >= 0.0 && wait_s <= 60.0)) {
        PyErr_Format(PyExc_ValueError, "Reader: wait_s must be 0 to 60 seconds, not %R", wait);
        return NULL;
    }
    if (HandOverReceived == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_socket_accel.init() was not called");
        return NULL;
    }
    Reader *self = (Reader *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)Reader_call;
    self->link = Py_NewRef(link);
    self->endpoint = Py_NewRef(endpoint);
    self->wait_s = wait_s;
    Py_ssize_t fd, max_message;
    PyObject *pool = NULL;
    if ((self->buf = PyObject_GetAttr(link, s_buf)) == NULL ||
        (pool = PyObject_GetAttr(link, s_pool)) == NULL ||
        (self->pool_get = PyObject_GetAttr(pool, s_get)) == NULL ||
        (self->incoming = PyObject_GetAttr(link, s_incoming)) == NULL ||
        (self->receivers = PyObject_GetAttr(endpoint, s_receivers)) == NULL ||
        (self->events = PyObject_GetAttr(endpoint, s_events)) == NULL ||
        (self->items = PyObject_GetAttr(self->events, s_items)) == NULL ||
        (self->waiters = PyObject_GetAttr(self->events, s_waiters)) == NULL ||
        attr_ssize(link, s_fd, &fd) < 0 || attr_ssize(link, s_max_message, &max_message) < 0) {
        Py_XDECREF(pool);
        goto fail;
    }
    Py_DECREF(pool);
    if (!PyByteArray_CheckExact(self->buf) || PyByteArray_GET_SIZE(self->buf) < ONE_FRAME_SIZE ||
        !PyDict_CheckExact(self->incoming) || !PyDict_CheckExact(self->receivers)) {
        PyErr_SetString(PyExc_TypeError, "Reader: the link's _buf is not a bytearray, or its "
                                         "incoming or the endpoint's _receivers not a dict");
        goto fail;
    }
    if (fd < 0 || fd > INT_MAX || max_message < 0) {
        PyErr_Format(PyExc_ValueError, "Reader: the link's _fd %zd or _max_message %zd is "
                                       "out of range", fd, max_message);
        goto fail;
    }
    self->fd = (int)fd;
    self->max_message = (uint64_t)max_message;
    return (PyObject *)self;
fail:
    Py_DECREF(self);
    return NULL;
}

/* Hand one frame of connection ``local`` over (handover_deliver, which says how);
 * *handed set when it went to a receiver. 0, or -1 with an exception set. */
static int hand_over(Reader *self, PyObject *local, PyObject *frame, int *handed) {
    PyObject *frames = PyList_New(1);
    if (frames == NULL)
        return -1;
    PyList_SET_ITEM(frames, 0, Py_NewRef(frame));
    int rc = handover_deliver(self->endpoint, self->receivers, self->events, self->items,
                              self->waiters, local, frames, handed);
    Py_DECREF(frames);
    return rc;
}

/* A read of link's socket failed with errno err: OSError(errno, strerror), the errno's
 * subclass, as recv_into raises it, to the link's _read_failed. 0, or -1 with an
 * exception set. */
static int read_failed(PyObject *link, int err) {
    PyObject *exc = PyObject_CallFunction(PyExc_OSError, "is", err, strerror(err));
    int rc = exc == NULL ? -1 : call_method(link, s_read_failed, exc);
    Py_XDECREF(exc);
    return rc;
}

/* The exception set while the Reader read, parsed or handed over: to the link's
 * _read_error, which does with it what _on_readable's handler does (a read that would
 * block ignored, bad input drops the peer, a failed read fails the link) and raises
 * anything else again. 0 when it was dealt with, -1 with an exception set. */
static int read_error(Reader *self) {
    if (!PyErr_ExceptionMatches(PyExc_Exception))
        return -1; /* (KeyboardInterrupt, SystemExit: not a read's) */
    PyObject *exc = PyErr_GetRaisedException();
    int rc = call_method(self->link, s_read_error, exc);
    Py_DECREF(exc);
    return rc;
}

/* Leave a large frame being received with the link, as its parse leaves one (state 2,
 * ``fpos`` bytes in, the buffer consumed up to ``start``): 0, or -1 with an exception. */
static int leave_frame(Reader *self, PyObject *frame, Py_ssize_t fpos, uint64_t cid,
                       Py_ssize_t start) {
    PyObject *link = self->link;
    PyObject *frames = PyList_New(1);
    PyObject *conn = PyLong_FromUnsignedLongLong(cid);
    int rc = -1;
    if (frames != NULL && conn != NULL) {
        PyList_SET_ITEM(frames, 0, Py_NewRef(frame));
        rc = (PyObject_SetAttr(link, s_frames, frames) < 0 || set_ssize(link, s_fi, 0) < 0 ||
              set_ssize(link, s_fpos, fpos) < 0 || set_ssize(link, s_nframes, 1) < 0 ||
              PyObject_SetAttr(link, s_cid, conn) < 0 || set_ssize(link, s_start, start) < 0 ||
              set_ssize(link, s_state, 2) < 0)
                 ? -1
                 : 0;
    }
    Py_XDECREF(frames);
    Py_XDECREF(conn);
    return rc;
}

/* A DATA message of one large frame (``len`` >= DirectMin) for connection ``local``,
 * its header at p[pos] of the n bytes read: the frame from the link's pool, the part
 * read copied into it, the rest received straight into it (for up to wait_s), and its
 * hand-over: the position after it. Where the rest did not come in time, or the stream
 * ended or failed meanwhile, the frame is left with the link (leave_frame; its end or
 * failure reported as the link's reads report them) and -2 returned; -1 with an
 * exception set on error. */
static Py_ssize_t take_large(Reader *self, const unsigned char *p, Py_ssize_t pos,
                             Py_ssize_t n, uint64_t cid, uint64_t len, PyObject *local,
                             int *handed) {
    PyObject *size = PyLong_FromUnsignedLongLong(len);
    PyObject *frame = size == NULL ? NULL : PyObject_CallOneArg(self->pool_get, size);
    Py_XDECREF(size);
    if (frame == NULL)
        return -1;
    Py_buffer fb;
    if (PyObject_GetBuffer(frame, &fb, PyBUF_WRITABLE) < 0) {
        Py_DECREF(frame);
        return -1;
    }
    if ((uint64_t)fb.len != len) {
        PyErr_Format(PyExc_ValueError, "the link's pool gave %zd bytes for a frame of %llu",
                     fb.len, (unsigned long long)len);
        PyBuffer_Release(&fb);
        Py_DECREF(frame);
        return -1;
    }
    Py_ssize_t have = n - pos - ONE_FRAME_SIZE;
    if ((uint64_t)have > len)
        have = (Py_ssize_t)len;
    memcpy(fb.buf, p + pos + ONE_FRAME_SIZE, (size_t)have);
    Py_ssize_t fpos = have, next = pos + ONE_FRAME_SIZE + have;
    int ended = 0, err = 0; /* 1: the stream ended, 2: the read failed (err), 3: an
                             * exception is set (a signal handler's, the clock's) */
    double now, deadline;
    if (fpos < fb.len && deadline_clock(&now) < 0)
        ended = 3;
    else if (fpos < fb.len) {
        deadline = now + self->wait_s;
        for (;;) {
            ssize_t got =
                recv_dontwait(self->fd, (char *)fb.buf + fpos, (size_t)(fb.len - fpos), &err);
            if (got > 0) {
                fpos += got;
                if (fpos == fb.len)
                    break;
            } else if (got == 0) {
                ended = 1;
                break;
            } else if (got == -2) {
                ended = 3;
                break;
            } else if (err != EAGAIN && err != EWOULDBLOCK) {
                ended = 2;
                break;
            }
            /* Every turn, not only when nothing came: a frame that streams in for
             * longer than wait_s goes back to the link's reads too. */
            if (deadline_clock(&now) < 0) {
                ended = 3;
                break;
            }
            if (now >= deadline)
                break;
        }
    }
    int complete = fpos == fb.len;
    PyBuffer_Release(&fb);
    if (!complete) {
        /* The bytes taken stay taken: with the link, whatever else happened. */
        PyObject *raised = ended == 3 ? PyErr_GetRaisedException() : NULL;
        int rc = leave_frame(self, frame, fpos, cid, next);
        Py_DECREF(frame);
        if (ended == 3) {
            if (rc == 0)
                PyErr_SetRaisedException(raised);
            else
                Py_XDECREF(raised);
            return -1;
        }
        if (rc == 0 && ended == 1)
            rc = call_method(self->link, s_on_eof, NULL);
        else if (rc == 0 && ended == 2)
            rc = read_failed(self->link, err);
        return rc < 0 ? -1 : -2;
    }
    int rc = set_ssize(self->link, s_start, next) < 0 ? -1 : hand_over(self, local, frame, handed);
    Py_DECREF(frame);
    return rc < 0 ? -1 : next;
}

/* The whole one-frame small DATA messages at the front of buf[pos:n], handed over while
 * their connection is open on a live link: the position after the last one handed over
 * (the link's _start is kept at it), or -1 with an exception set. Stops where the
 * link's own parse must go on (anything else, or the link changed under a receiver). */
static Py_ssize_t deliver(Reader *self, const unsigned char *p, Py_ssize_t pos, Py_ssize_t n,
                          int *handed) {
    while (n - pos >= ONE_FRAME_SIZE) {
        const unsigned char *h = p + pos;
        uint32_t nframes = (uint32_t)h[4] | (uint32_t)h[5] << 8 | (uint32_t)h[6] << 16 |
                           (uint32_t)h[7] << 24;
        uint64_t cid = 0, len = 0;
        for (int i = 7; i >= 0; i--) {
            cid = cid << 8 | h[8 + i];
            len = len << 8 | h[16 + i];
        }
        int small = len < DirectMin;
        if (h[0] != DataKind || nframes != 1 || len > self->max_message ||
            (small && len > (uint64_t)(n - pos - ONE_FRAME_SIZE)))
            break;
        PyObject *key = PyLong_FromUnsignedLongLong(cid);
        if (key == NULL)
            return -1;
        PyObject *local = PyDict_GetItemWithError(self->incoming, key);
        Py_DECREF(key);
        if (local == NULL) {
            if (PyErr_Occurred())
                return -1;
            break; /* unknown connection: the link's parse reports it */
        }
        Py_INCREF(local);
        int alive = attr_true(self->link, s_alive);
        if (alive <= 0) {
            Py_DECREF(local);
            if (alive < 0)
                return -1;
            break;
        }
        if (!small) {
            Py_ssize_t next = take_large(self, p, pos, n, cid, len, local, handed);
            Py_DECREF(local);
            if (next < 0)
                return next;
            pos = next;
        } else {
            /* The frame is a copy, as the link's parse makes it (its buffer is reused). */
            PyObject *bytes = PyByteArray_FromStringAndSize((const char *)h + ONE_FRAME_SIZE,
                                                            (Py_ssize_t)len);
            PyObject *frame = bytes == NULL ? NULL : PyMemoryView_FromObject(bytes);
            Py_XDECREF(bytes);
            Py_ssize_t next = pos + ONE_FRAME_SIZE + (Py_ssize_t)len;
            if (frame == NULL || set_ssize(self->link, s_start, next) < 0) {
                Py_XDECREF(frame);
                Py_DECREF(local);
                return -1;
            }
            int rc = hand_over(self, local, frame, handed);
            Py_DECREF(frame);
            Py_DECREF(local);
            if (rc < 0)
                return -1;
            pos = next;
        }
        if (!*handed)
            continue;
        /* A receiver ran: the link may have been read, failed or closed meanwhile. */
        Py_ssize_t start, end;
        int dead = attr_true(self->link, s_dead);
        if (dead < 0 || attr_ssize(self->link, s_start, &start) < 0 ||
            attr_ssize(self->link, s_end, &end) < 0)
            return -1;
        if (dead || start != pos || end != n)
            return -2;
    }
    return pos;
}

/* Reader(link, endpoint)(): see the top of this file and _socket_accel.pyi. */
static PyObject *Reader_call(Reader *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 0 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Reader takes no arguments");
        return NULL;
    }
    (void)args;
    PyObject *link = self->link;
    if (link == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Reader was cleared (garbage collected)");
        return NULL;
    }
    int dead = attr_true(link, s_dead);
    if (dead != 0) {
        if (dead < 0)
            return NULL;
        Py_RETURN_FALSE; /* nothing to poll */
    }
    Py_ssize_t state, start, end, lowat;
    if (attr_ssize(link, s_state, &state) < 0 || attr_ssize(link, s_start, &start) < 0 ||
        attr_ssize(link, s_end, &end) < 0 || attr_ssize(link, s_lowat, &lowat) < 0)
        return NULL;
    if (state != 0 || start != end || lowat != 1) {
        /* Mid-message, or a large frame's low-water mark still set: the link's own. */
        PyObject *a[1] = {self->endpoint};
        return PyObject_VectorcallMethod(s_poll_links, a, 1, NULL);
    }
    Py_buffer view;
    if (PyObject_GetBuffer(self->buf, &view, PyBUF_WRITABLE) < 0)
        return NULL;
    Py_ssize_t cap = view.len;
    int err = 0;
    ssize_t n = recv_dontwait(self->fd, view.buf, (size_t)view.len, &err);
    if (n == -2) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (n < 0 && (err == EAGAIN || err == EWOULDBLOCK)) {
        PyBuffer_Release(&view);
        Py_RETURN_TRUE; /* polled, nothing there */
    }
    /* The buffer was empty: what _make_room does before a read (after one that brought
     * bytes, _end is set to their count below). */
    if (start != 0 &&
        (set_ssize(link, s_start, 0) < 0 || (n <= 0 && set_ssize(link, s_end, 0) < 0))) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (n <= 0) {
        PyBuffer_Release(&view);
        if (n == 0) {
            if (call_method(link, s_on_eof, NULL) < 0)
                return NULL;
        } else if (read_failed(link, err) < 0) {
            return NULL;
        }
        Py_RETURN_TRUE;
    }
    int handed = 0;
    Py_ssize_t pos = -1;
    if (PyObject_SetAttr(link, s_heard, Py_True) == 0 && set_ssize(link, s_end, n) == 0)
        pos = deliver(self, (const unsigned char *)view.buf, 0, n, &handed);
    PyBuffer_Release(&view);
    if (pos == -1) {
        /* Bad input, or a receiver's failed read: the read ends here, as in
         * _on_readable (whose handler this is). */
        if (read_error(self) < 0)
            return NULL;
    } else if (pos >= 0 && (pos < n || n == cap)) {
        /* The rest is the link's: its parse from _start, then its reads if the buffer
         * filled up (the socket may hold more). */
        PyObject *before = PyObject_GetAttr(self->endpoint, s_handed_over);
        if (before == NULL)
            return NULL;
        int rc = call_method(link, s_parse, NULL);
        if (rc < 0)
            rc = read_error(self) < 0 ? -1 : 1; /* dealt with: no reading on */
        if (rc == 0 && n == cap)
            rc = call_method(link, s_on_readable, NULL); /* (its own handler) */
        PyObject *after = rc < 0 ? NULL : PyObject_GetAttr(self->endpoint, s_handed_over);
        int same = after == NULL ? -1 : PyObject_RichCompareBool(before, after, Py_EQ);
        Py_DECREF(before);
        Py_XDECREF(after);
        if (same < 0)
            return NULL;
        if (!same)
            handed = 1;
    }
    if (handed)
        Py_RETURN_FALSE; /* a message went to a receiver: the poll ends */
    Py_RETURN_TRUE;
}

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hpcproc.transports._socket_accel.Reader",
    .tp_doc = "Reader(link, endpoint): the endpoint's _poll_links for its one plain link.",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Reader, vectorcall),
    .tp_new = Reader_new,
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)Reader_traverse,
    .tp_clear = (inquiry)Reader_clear,
    .tp_dealloc = (destructor)Reader_dealloc,
};

/* ---------------------------------------------------------------- Sender */

typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall;
    PyObject *link; /* the _TcpLink */
    PyObject *wq;   /* link._wq (a deque, the link's for its life) */
    int fd;         /* link._fd: open until the link is _dead */
} Sender;

static int Sender_traverse(Sender *self, visitproc visit, void *arg) {
    Py_VISIT(self->link);
    Py_VISIT(self->wq);
    return 0;
}

static int Sender_clear(Sender *self) {
    Py_CLEAR(self->link);
    Py_CLEAR(self->wq);
    return 0;
}

static void Sender_dealloc(Sender *self) {
    PyObject_GC_UnTrack(self);
    Sender_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *Sender_call(Sender *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames);

static PyObject *Sender_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *link;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "Sender(link) takes no keywords");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Sender", 1, 1, &link))
        return NULL;
    if (HandOverReceived == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_socket_accel.init() was not called");
        return NULL;
    }
    Sender *self = (Sender *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)Sender_call;
    self->link = Py_NewRef(link);
    Py_ssize_t fd;
    if ((self->wq = PyObject_GetAttr(link, s_wq)) == NULL || attr_ssize(link, s_fd, &fd) < 0) {
        Py_DECREF(self);
        return NULL;
    }
    if (fd < 0 || fd > INT_MAX) {
        PyErr_Format(PyExc_ValueError, "Sender: the link's _fd %zd is out of range", fd);
        Py_DECREF(self);
        return NULL;
    }
    self->fd = (int)fd;
    return (PyObject *)self;
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* Sender(link)(conn_id, frames): see the top of this file and _socket_accel.pyi. */
static PyObject *Sender_call(Sender *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    if (PyVectorcall_NARGS(nargsf) != 2 || kwnames != NULL) {
        PyErr_SetString(PyExc_TypeError, "a Sender takes (conn_id, frames)");
        return NULL;
    }
    PyObject *frames = args[1];
    if (self->link == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Sender was cleared (garbage collected)");
        return NULL;
    }
    int dead = attr_true(self->link, s_dead);
    if (dead != 0)
        return dead < 0 ? NULL : Py_NewRef(Py_False);
    Py_ssize_t queued = PyObject_Length(self->wq);
    if (queued != 0)
        return queued < 0 ? NULL : Py_NewRef(Py_False);
    Py_ssize_t count = PyObject_Length(frames);
    if (count < 0)
        return NULL;
    if (count != 1)
        Py_RETURN_FALSE;
    unsigned long long conn_id = PyLong_AsUnsignedLongLong(args[0]);
    if (conn_id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    PyObject *frame = PySequence_GetItem(frames, 0);
    if (frame == NULL)
        return NULL;
    Py_buffer view;
    int have = PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE);
    Py_DECREF(frame);
    if (have < 0) {
        /* Not a contiguous buffer: send_data makes one (or raises what is wrong). */
        PyErr_Clear();
        Py_RETURN_FALSE;
    }
    if ((uint64_t)view.len > SendNowMax) {
        PyBuffer_Release(&view);
        Py_RETURN_FALSE;
    }
    unsigned char header[ONE_FRAME_SIZE] = {0};
    header[0] = DataKind;
    header[4] = 1; /* one frame */
    put_le64(header + 8, conn_id);
    put_le64(header + 16, (uint64_t)view.len);
    struct iovec iov[2] = {{header, ONE_FRAME_SIZE}, {view.buf, (size_t)view.len}};
    struct msghdr msg = {.msg_iov = iov, .msg_iovlen = 2};
    Py_ssize_t total = ONE_FRAME_SIZE + view.len;
    ssize_t sent;
    int err;
    for (;;) {
        /* The frame stays exported while the GIL is released, as sendmsg does. */
        Py_BEGIN_ALLOW_THREADS
        sent = sendmsg(self->fd, &msg, MSG_DONTWAIT | MSG_NOSIGNAL);
        err = errno;
        Py_END_ALLOW_THREADS
        if (sent >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    if (sent == total) {
        PyBuffer_Release(&view);
        Py_RETURN_TRUE;
    }
    if (sent < 0 && err != EAGAIN && err != EWOULDBLOCK) {
        PyBuffer_Release(&view);
        errno = err;
        return PyErr_SetFromErrno(PyExc_OSError); /* as sendmsg raises it */
    }
    if (sent < 0)
        sent = 0;
    /* The kernel took part of it (its buffer is full): a copy of the rest waits in the
     * link's queue, so that the caller's frame is free at once either way. */
    PyObject *rest = PyBytes_FromStringAndSize(NULL, total - sent);
    if (rest != NULL) {
        char *out = PyBytes_AS_STRING(rest);
        Py_ssize_t from_header = sent < ONE_FRAME_SIZE ? ONE_FRAME_SIZE - sent : 0;
        memcpy(out, header + (ONE_FRAME_SIZE - from_header), (size_t)from_header);
        memcpy(out + from_header, (char *)view.buf + (view.len - (total - sent - from_header)),
               (size_t)(total - sent - from_header));
    }
    PyBuffer_Release(&view);
    if (rest == NULL)
        return NULL;
    int rc = call_method(self->link, s_queue_rest, rest);
    Py_DECREF(rest);
    if (rc < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hpcproc.transports._socket_accel.Sender",
    .tp_doc = "Sender(link): _TcpLink.send_now for link, in C.",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Sender, vectorcall),
    .tp_new = Sender_new,
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)Sender_traverse,
    .tp_clear = (inquiry)Sender_clear,
    .tp_dealloc = (destructor)Sender_dealloc,
};

static PyMethodDef methods[] = {
    {"recv_nowait", (PyCFunction)(void (*)(void))recv_nowait, METH_FASTCALL,
     "recv_nowait(fd, buffer, offset) -> bytes read into buffer[offset:]; 0 at end of stream, "
     "-1 when nothing is there to read."},
    {"init", (PyCFunction)(void (*)(void))init, METH_FASTCALL,
     "init(received_type, data_kind, direct_min, send_now_max): what a Reader and a Sender "
     "make and take, set once."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_socket_accel",
    .m_doc = "The tcp transport's socket read and small-message hand-over in C (see tcp.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__socket_accel(void) {
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_dead, "_dead"},         {&s_state, "_state"},
        {&s_start, "_start"},       {&s_end, "_end"},
        {&s_lowat, "_lowat"},       {&s_heard, "heard"},
        {&s_alive, "alive"},        {&s_incoming, "incoming"},
        {&s_buf, "_buf"},           {&s_fd, "_fd"},
        {&s_max_message, "_max_message"}, {&s_receivers, "_receivers"},
        {&s_events, "_events"},     {&s_items, "_items"},
        {&s_waiters, "_waiters"},   {&s_handed_over, "_handed_over"},
        {&s_parse, "_parse"},       {&s_on_readable, "_on_readable"},
        {&s_on_eof, "_on_eof"},     {&s_read_failed, "_read_failed"},
        {&s_poll_links, "_poll_links"}, {&s_wq, "_wq"},
        {&s_queue_rest, "_queue_rest"}, {&s_pool, "_pool"},
        {&s_get, "get"},            {&s_frames, "_frames"},
        {&s_fi, "_fi"},             {&s_fpos, "_fpos"},
        {&s_nframes, "_nframes"},   {&s_cid, "_cid"},
        {&s_read_error, "_read_error"},
    };
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].name);
        if (*names[i].slot == NULL)
            return NULL;
    }
    if (handover_names() < 0 || PyType_Ready(&ReaderType) < 0 || PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "Reader", Py_NewRef((PyObject *)&ReaderType)) < 0) {
        Py_DECREF(&ReaderType);
        Py_DECREF(m);
        return NULL;
    }
    if (PyModule_AddObject(m, "Sender", Py_NewRef((PyObject *)&SenderType)) < 0) {
        Py_DECREF(&SenderType);
        Py_DECREF(m);
        return NULL;
    }
    return m;
}
