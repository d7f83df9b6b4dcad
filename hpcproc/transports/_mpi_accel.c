/* The mpi transport's small-message paths in C: the send of one small frame, and a
 * spinning receiver's probe, receive and hand-over of a small message. Optional: built
 * at install where a compiler exists; without it, or with HPCPROC_MPI_ACCEL=0, the same
 * work is done in Python (mpi.py: _MpiLink.send_now, _Engine.take_one and _take's fast
 * path, _MpiEndPoint._deliver_data; _busy_poll.IdlePoller.turn_and_poll), which stays
 * the reference. The MPI calls stay mpi4py's (called from here through its Python
 * objects), so this builds without MPI headers.
 *
 * Why in C: on an 8 B round trip the Python of these paths cost about 3 us of the
 * transport's 10-11 (the benchmark's asyncio-floor, the same MPI calls from a bare
 * asyncio loop, takes 6.4-7); with them here it takes 7.1-7.8 us. At 256 KiB the
 * Python of a hop's critical path (envelope to frame receive posted, the receive's
 * wait and hand-over, the sender's wait for its completion) cost about 10 us of a 66
 * us round trip (raw mpi4py making the same calls: 48); with it here, 53-58 us.
 *
 * deliver_inline(endpoint, buf, src, max_message, inbound) -> bool
 *   True when buf (a whole envelope from rank src) was one DATA message with one inline
 *   frame for a live link and open connection of endpoint, and was handed over: to the
 *   connection's receiver or, as a Received event, to the endpoint's event queue. False,
 *   having done nothing, for anything else (the Python path then deals with it).
 *
 * Spinner(engine, endpoint)(endpoint) -> bool
 *   _Engine.take_one(endpoint), the one probe of a spinning receiver's every turn, for
 *   the common case (nothing waits in the endpoint's inbox, no request outstanding):
 *   the probe, the receive of a small envelope and its hand-over (deliver_inline) here,
 *   anything else through the engine's Python methods (take_one itself, _take,
 *   _taken, _sort_out, _route), under the engine's lock as there. A DATA message of
 *   one separate frame (above inline_max, up to _DIRECT_MAX) for the endpoint is taken
 *   here too, as _taken's direct case (_direct_to, _take_direct): its buffer from the
 *   engine's pool (the pool's common case here, _BufferPool.take otherwise), the
 *   frame's receive and the wait for it (up to busy_poll_us), the hand-over; what does
 *   not end in a hand-over is settled by the engine's _took_one_direct. Its
 *   poll(poller, items, endpoint, ours) is IdlePoller.turn_and_poll with it as the
 *   step, the loop of turns here (on crowded CPUs, the poller's poll_yielding with
 *   it as the step: a system call per turn there anyway). Its spin(poller, future,
 *   endpoint, ours) is IdlePoller.spin with ``engine.progress(); return
 *   future.done()`` as the step (_MpiEndPoint._spin: a send's completion, mostly),
 *   each progress here in its common case (no frame receive outstanding): the sends
 *   tested as _test_sends does, one probe, a message found taken by the engine's
 *   Python methods as progress takes it.
 *
 * Sender(link)(conn_id, frames) -> bool
 *   _MpiLink.send_now but its check of the link's ``finished`` (which the link makes
 *   before): the envelope and the one small frame packed into one bytes object and
 *   posted with the engine's comm.Isend (through mpi4py, under the engine's lock);
 *   False, having posted nothing, where send_now would return False. Raises as send_now
 *   does (ConnectionError once the engine is shut down, MPI.Exception). What does not
 *   change for a link (its envelope's first fields, the engine, the Isend) is read
 *   once, when it is made.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <sched.h>
#include <stddef.h>
#include <stdint.h>
#include <string.h>
#include <time.h>

#include "_accel_handover.h"
#include "_accel_util.h"

/* The envelope of one frame, "<BBHIIIQQQ": kind flags pad nframes src_ep dst_ep gen
 * conn_id length (mpi.py's _ONE). */
#define ONE_SIZE 40
#define KIND_DATA 2
#define FLAG_INLINE 1

static PyObject *LinkType = NULL;       /* mpi._MpiLink: only its links are taken here */

static PyObject *One = NULL; /* the int 1 */
static PyObject *Tag = NULL; /* the transport's MPI tag */
static Py_ssize_t MaxUntracked = 0; /* small sends outstanding beyond which send waits */
static long FairStreak = 0;          /* _busy_poll.FAIR_STREAK */
static double ProbeMin = 0.0;        /* _busy_poll.PROBE_MIN */
static uint64_t DirectMax = 0;       /* mpi._DIRECT_MAX */
static uint64_t PoolMin = 0;         /* mpi._POOL_MIN */
static PyObject *SetResult = NULL;   /* mpi._set_result(loop, future) */
static PyObject *GetRunningLoop = NULL; /* asyncio._get_running_loop */
static PyObject *Monotonic = NULL, *PerfCounter = NULL, *ThreadTime = NULL; /* time's */
static PyObject *s_endpoint_id, *s_inbox, *s_addresses, *s_links, *s_gen, *s_alive,
    *s_incoming, *s_heard, *s_receivers, *s_events, *s_items, *s_handed_over,
    *s_waiters,
    *s_endpoint, *s_opts, *s_inline_max, *s_remote_ep, *s_engine, *s_lock,
    *s_closed, *s_send_reqs, *s_send_ops, *s_comm, *s_rank, *s_Isend, *s_Test, *s_acquire,
    *s_release, *s_byte;

static uint32_t le32(const unsigned char *p) {
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static uint64_t le64(const unsigned char *p) {
    return (uint64_t)le32(p) | (uint64_t)le32(p + 4) << 32;
}

/* Whether ``obj.name == value`` for an int attribute: 1, 0, -1 on error. */
static int attr_equals(PyObject *obj, PyObject *name, uint64_t value) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = 0;
    if (PyLong_Check(v)) {
        unsigned long long x = PyLong_AsUnsignedLongLong(v);
        if (x == (unsigned long long)-1 && PyErr_Occurred())
            PyErr_Clear(); /* negative or too large: not equal */
        else
            r = (uint64_t)x == value;
    }
    Py_DECREF(v);
    return r;
}

/* An int attribute as an unsigned value no larger than ``max``: 0, or -1 with an
 * exception set (as struct.pack would refuse it). */
static int attr_uint(PyObject *obj, PyObject *name, uint64_t max, uint64_t *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    unsigned long long x = PyLong_AsUnsignedLongLong(v);
    Py_DECREF(v);
    if (x == (unsigned long long)-1 && PyErr_Occurred())
        return -1;
    if ((uint64_t)x > max) {
        PyErr_Format(PyExc_OverflowError, "%U %llu is out of range", name, x);
        return -1;
    }
    *out = (uint64_t)x;
    return 0;
}

/* A float attribute: 0, or -1 with an exception set. */
static int attr_double(PyObject *obj, PyObject *name, double *out) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    double d = PyFloat_AsDouble(v);
    Py_DECREF(v);
    if (d == -1.0 && PyErr_Occurred())
        return -1;
    *out = d;
    return 0;
}

/* A clock's reading (perf_counter, thread_time): 0, or -1 with an exception set. */
static int read_clock(PyObject *clock, double *out) {
    PyObject *v = PyObject_CallNoArgs(clock);
    if (v == NULL)
        return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

/* An endpoint's containers that a hand-over uses: all made in its __init__ and never
 * replaced, so that a Spinner keeps them (the module's deliver_inline reads them). */
typedef struct {
    PyObject *inbox;     /* endpoint._inbox (a deque) */
    PyObject *addresses; /* endpoint._addresses: (rank, endpoint id) -> address */
    PyObject *links;     /* endpoint._links: address -> link */
    PyObject *receivers; /* endpoint._receivers: connection -> receiver */
    PyObject *events;    /* endpoint._events (an EventQueue) */
    PyObject *items;     /* its _items (a deque) */
    PyObject *waiters;   /* its _waiters (a deque) */
    uint64_t endpoint_id;
} Target;

#define TARGET_FIELDS(X) X(inbox) X(addresses) X(links) X(receivers) X(events) X(items) X(waiters)

static void target_release(Target *t) {
#define CLEAR(f) Py_CLEAR(t->f);
    TARGET_FIELDS(CLEAR)
#undef CLEAR
}

/* Fill ``t`` from ``endpoint`` (new references): 0, or -1 with an exception set. */
static int target_fill(Target *t, PyObject *endpoint) {
    memset(t, 0, sizeof *t);
    if (attr_uint(endpoint, s_endpoint_id, UINT32_MAX, &t->endpoint_id) < 0 ||
        (t->inbox = PyObject_GetAttr(endpoint, s_inbox)) == NULL ||
        (t->addresses = PyObject_GetAttr(endpoint, s_addresses)) == NULL ||
        (t->links = PyObject_GetAttr(endpoint, s_links)) == NULL ||
        (t->receivers = PyObject_GetAttr(endpoint, s_receivers)) == NULL ||
        (t->events = PyObject_GetAttr(endpoint, s_events)) == NULL ||
        (t->items = PyObject_GetAttr(t->events, s_items)) == NULL ||
        (t->waiters = PyObject_GetAttr(t->events, s_waiters)) == NULL)
        goto fail;
    if (!PyDict_Check(t->addresses) || !PyDict_Check(t->links) || !PyDict_Check(t->receivers)) {
        PyErr_SetString(PyExc_TypeError, "the endpoint's _addresses, _links and _receivers "
                                         "are not dicts");
        goto fail;
    }
    return 0;
fail:
    target_release(t);
    return -1;
}

/* Hand ``frames`` of connection ``local`` of ``endpoint`` over, as _deliver_data does once
 * it found them (handover_deliver, which says how). 0, or -1 with an exception set. */
static int hand_over(Target *t, PyObject *endpoint, PyObject *local, PyObject *frames) {
    return handover_deliver(endpoint, t->receivers, t->events, t->items, t->waiters, local,
                            frames, NULL);
}

/* The connection (its local id, a new reference) that a DATA message of link
 * generation ``gen``, connection ``conn_id``, from endpoint ``src_ep`` of rank ``src``
 * is for, when its link is alive: as _deliver_data finds it. NULL without an exception
 * when there is none; NULL with one on error. Marks the link heard when found. */
static PyObject *find_connection(Target *t, PyObject *src, uint32_t src_ep, uint64_t gen,
                                 uint64_t conn_id) {
    PyObject *link = NULL, *incoming = NULL, *local = NULL, *key = NULL, *cid = NULL;
    PyObject *ep_obj = PyLong_FromUnsignedLong(src_ep);
    if (ep_obj == NULL)
        return NULL;
    key = PyTuple_Pack(2, src, ep_obj);
    Py_DECREF(ep_obj);
    if (key == NULL)
        return NULL;
    PyObject *remote = PyDict_GetItemWithError(t->addresses, key); /* borrowed */
    if (remote == NULL)
        goto done;
    link = PyDict_GetItemWithError(t->links, remote);
    if (link == NULL)
        goto done;
    Py_INCREF(link);
    if ((PyObject *)Py_TYPE(link) != LinkType)
        goto done;
    int same = attr_equals(link, s_gen, gen);
    if (same <= 0)
        goto done;
    int alive = attr_true(link, s_alive);
    if (alive <= 0)
        goto done;
    incoming = PyObject_GetAttr(link, s_incoming);
    if (incoming == NULL || !PyDict_Check(incoming))
        goto done;
    cid = PyLong_FromUnsignedLongLong(conn_id);
    if (cid == NULL)
        goto done;
    local = PyDict_GetItemWithError(incoming, cid);
    if (local == NULL || local == Py_None) {
        local = NULL;
        goto done;
    }
    Py_INCREF(local); /* (before the attribute store, which may run Python code) */
    if (PyObject_SetAttr(link, s_heard, Py_True) < 0)
        Py_CLEAR(local);
done:
    Py_XDECREF(key);
    Py_XDECREF(link);
    Py_XDECREF(incoming);
    Py_XDECREF(cid);
    return local;
}

/* Whether a message from rank ``src`` for the endpoint of ``t`` comes next: nothing of
 * that sender waits before it in the engine's queue (``inbound``), nothing another
 * thread took for the endpoint waits in its inbox. 1, 0, or -1 with an exception set. */
static int nothing_before(Target *t, PyObject *inbound, PyObject *src) {
    if (!PyDict_Check(inbound))
        return 0;
    PyObject *queued = PyDict_GetItemWithError(inbound, src);
    if (queued == NULL && PyErr_Occurred())
        return -1;
    if (queued != NULL) {
        Py_INCREF(queued);
        int truth = PyObject_IsTrue(queued);
        Py_DECREF(queued);
        if (truth)
            return truth < 0 ? -1 : 0;
    }
    Py_ssize_t inbox = PyObject_Length(t->inbox);
    if (inbox < 0)
        return -1;
    return inbox == 0;
}

/* deliver_inline's work for ``endpoint`` (whose containers ``t`` holds): Py_True,
 * Py_False (new references), or NULL with an exception set. */
static PyObject *deliver(Target *t, PyObject *endpoint, PyObject *buf, PyObject *src,
                         unsigned long long max_message, PyObject *inbound) {
    unsigned char p[ONE_SIZE];
    Py_ssize_t size;
    if (PyByteArray_CheckExact(buf)) {
        size = PyByteArray_GET_SIZE(buf);
        if (size < ONE_SIZE)
            Py_RETURN_FALSE;
        memcpy(p, PyByteArray_AS_STRING(buf), ONE_SIZE);
    } else {
        /* Envelopes from 16 KiB on are received into numpy arrays. */
        Py_buffer view;
        if (PyObject_GetBuffer(buf, &view, PyBUF_SIMPLE) < 0)
            return NULL;
        size = view.len;
        if (size >= ONE_SIZE)
            memcpy(p, view.buf, ONE_SIZE);
        PyBuffer_Release(&view);
        if (size < ONE_SIZE)
            Py_RETURN_FALSE;
    }
    uint64_t length = le64(p + 32);
    if (p[0] != KIND_DATA || !(p[1] & FLAG_INLINE) || le32(p + 4) != 1 ||
        length != (uint64_t)(size - ONE_SIZE) || length > max_message)
        Py_RETURN_FALSE;
    int first = le32(p + 12) == t->endpoint_id ? nothing_before(t, inbound, src) : 0;
    if (first < 0)
        return NULL;
    if (!first)
        Py_RETURN_FALSE;
    PyObject *local = find_connection(t, src, le32(p + 8), le64(p + 16), le64(p + 24));
    if (local == NULL) {
        if (PyErr_Occurred())
            return NULL;
        Py_RETURN_FALSE;
    }
    PyObject *view = PyMemoryView_FromObject(buf);
    PyObject *frame = view == NULL ? NULL : PySequence_GetSlice(view, ONE_SIZE, size);
    Py_XDECREF(view);
    PyObject *frames = frame == NULL ? NULL : PyList_New(1);
    if (frames == NULL) {
        Py_XDECREF(frame);
        Py_DECREF(local);
        return NULL;
    }
    PyList_SET_ITEM(frames, 0, frame);
    int r = hand_over(t, endpoint, local, frames);
    Py_DECREF(frames);
    Py_DECREF(local);
    if (r < 0)
        return NULL;
    Py_RETURN_TRUE;
}

static PyObject *deliver_inline(PyObject *Py_UNUSED(module), PyObject *const *args,
                                Py_ssize_t nargs) {
    if (nargs != 5) {
        PyErr_Format(PyExc_TypeError,
                     "deliver_inline(endpoint, buf, src, max_message, inbound) takes 5 "
                     "arguments, not %zd",
                     nargs);
        return NULL;
    }
    if (LinkType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_mpi_accel.init() was not called");
        return NULL;
    }
    unsigned long long max_message = PyLong_AsUnsignedLongLong(args[3]);
    if (max_message == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Target t;
    if (target_fill(&t, args[0]) < 0)
        return NULL;
    PyObject *r = deliver(&t, args[0], args[1], args[2], max_message, args[4]);
    target_release(&t);
    return r;
}

static void put_le32(unsigned char *p, uint32_t v) {
    for (int i = 0; i < 4; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

static void put_le64(unsigned char *p, uint64_t v) {
    for (int i = 0; i < 8; i++)
        p[i] = (unsigned char)(v >> (8 * i));
}

/* ``release()`` of the engine's lock, whatever happened while it was held: 0, with
 * the error raised meanwhile (if any) set again; -1 with release's own error set (the
 * earlier one dropped: an RLock held by this thread does not fail to release). */
static int release_keeping_error(PyObject *release) {
    PyObject *exc = PyErr_GetRaisedException();
    PyObject *released = PyObject_CallNoArgs(release);
    if (released == NULL) {
        Py_XDECREF(exc);
        return -1;
    }
    Py_DECREF(released);
    PyErr_SetRaisedException(exc);
    return 0;
}

/* The posting part of a send, under the engine's lock: 1 posted, 0 too many sends
 * outstanding, -1 with an exception set. */
static int post_locked(PyObject *engine, PyObject *isend, PyObject *rank, PyObject *data) {
    int closed = attr_true(engine, s_closed);
    if (closed < 0)
        return -1;
    if (closed) {
        PyErr_SetString(PyExc_ConnectionError, "mpi transport engine is shut down");
        return -1;
    }
    PyObject *reqs = PyObject_GetAttr(engine, s_send_reqs);
    if (reqs == NULL)
        return -1;
    int r = -1;
    PyObject *req = NULL, *done = NULL, *ops = PyObject_GetAttr(engine, s_send_ops);
    if (ops == NULL)
        goto out;
    if (!PyList_Check(reqs) || !PyList_Check(ops)) {
        /* (Checked before posting: a send posted but not tracked must not happen.) */
        PyErr_SetString(PyExc_TypeError, "the engine's send lists are not lists");
        goto out;
    }
    Py_ssize_t outstanding = PyList_GET_SIZE(reqs);
    if (outstanding >= MaxUntracked) {
        r = 0;
        goto out;
    }
    PyObject *args[3] = {data, rank, Tag};
    req = PyObject_Vectorcall(isend, args, 3, NULL);
    if (req == NULL)
        goto out;
    done = PyObject_CallMethodNoArgs(req, s_Test);
    if (done == NULL)
        goto out;
    int complete = PyObject_IsTrue(done);
    if (complete < 0)
        goto out;
    if (!complete) {
        /* (Appended together: the lists stay the same length, as send_now keeps them.) */
        if (PyList_Append(reqs, req) < 0)
            goto out;
        if (PyList_Append(ops, Py_None) < 0) {
            PyList_SetSlice(reqs, PyList_GET_SIZE(reqs) - 1, PyList_GET_SIZE(reqs), NULL);
            goto out;
        }
    }
    r = 1;
out:
    Py_DECREF(reqs);
    Py_XDECREF(req);
    Py_XDECREF(done);
    Py_XDECREF(ops);
    return r;
}

/* What a link's sends need that does not change: its envelope's first 24 bytes (kind,
 * flags, frame count, endpoints, generation), the engine and its lock, the Isend. */
typedef struct {
    PyObject_HEAD
    vectorcallfunc vectorcall; /* Sender_call: called as link.send_now is, no tuple made */
    PyObject *engine;  /* the link's engine */
    PyObject *acquire; /* engine.lock.acquire */
    PyObject *release; /* engine.lock.release */
    PyObject *isend;   /* engine.comm.Isend */
    PyObject *rank;    /* link.rank */
    uint64_t inline_max;
    unsigned char prefix[24];
} Sender;

#define SENDER_FIELDS(X) X(engine) X(acquire) X(release) X(isend) X(rank)

static int Sender_traverse(Sender *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    SENDER_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int Sender_clear(Sender *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    SENDER_FIELDS(CLEAR)
#undef CLEAR
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
    if (Tag == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_mpi_accel.init() was not called");
        return NULL;
    }
    Sender *self = (Sender *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    self->vectorcall = (vectorcallfunc)Sender_call;
    PyObject *endpoint = NULL, *opts = NULL, *lock = NULL, *comm = NULL;
    uint64_t endpoint_id, remote_ep, gen;
    if ((endpoint = PyObject_GetAttr(link, s_endpoint)) == NULL ||
        (opts = PyObject_GetAttr(endpoint, s_opts)) == NULL ||
        attr_uint(opts, s_inline_max, UINT64_MAX, &self->inline_max) < 0 ||
        attr_uint(endpoint, s_endpoint_id, UINT32_MAX, &endpoint_id) < 0 ||
        attr_uint(link, s_remote_ep, UINT32_MAX, &remote_ep) < 0 ||
        attr_uint(link, s_gen, UINT64_MAX, &gen) < 0 ||
        (self->engine = PyObject_GetAttr(endpoint, s_engine)) == NULL ||
        (lock = PyObject_GetAttr(self->engine, s_lock)) == NULL ||
        (self->acquire = PyObject_GetAttr(lock, s_acquire)) == NULL ||
        (self->release = PyObject_GetAttr(lock, s_release)) == NULL ||
        (comm = PyObject_GetAttr(self->engine, s_comm)) == NULL ||
        (self->isend = PyObject_GetAttr(comm, s_Isend)) == NULL ||
        (self->rank = PyObject_GetAttr(link, s_rank)) == NULL) {
        Py_XDECREF(endpoint);
        Py_XDECREF(opts);
        Py_XDECREF(lock);
        Py_XDECREF(comm);
        Py_DECREF(self);
        return NULL;
    }
    Py_DECREF(endpoint);
    Py_DECREF(opts);
    Py_DECREF(lock);
    Py_DECREF(comm);
    unsigned char *p = self->prefix;
    p[0] = KIND_DATA;
    p[1] = FLAG_INLINE;
    p[2] = p[3] = 0;
    put_le32(p + 4, 1);
    put_le32(p + 8, (uint32_t)endpoint_id);
    put_le32(p + 12, (uint32_t)remote_ep);
    put_le64(p + 16, gen);
    return (PyObject *)self;
}

/* sender(conn_id, frames) -> bool: see the module (send_now but its ``finished``). */
static PyObject *Sender_call(Sender *self, PyObject *const *args, size_t nargsf,
                             PyObject *kwnames) {
    if (self->engine == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Sender was cleared");
        return NULL;
    }
    Py_ssize_t nargs = PyVectorcall_NARGS(nargsf);
    if (nargs != 2 || (kwnames != NULL && PyTuple_GET_SIZE(kwnames) > 0)) {
        PyErr_SetString(PyExc_TypeError, "a Sender takes (conn_id, frames)");
        return NULL;
    }
    PyObject *frames = args[1];
    unsigned long long conn_id = PyLong_AsUnsignedLongLong(args[0]);
    if (conn_id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t nframes = PyObject_Length(frames);
    if (nframes < 0)
        return NULL;
    if (nframes != 1)
        Py_RETURN_FALSE;
    PyObject *frame = PySequence_GetItem(frames, 0);
    if (frame == NULL)
        return NULL;
    PyObject *result = NULL, *data = NULL;
    Py_buffer view;
    /* Contiguous bytes of any format, as ``bytes + memoryview`` takes them. */
    int have_view = PyObject_GetBuffer(frame, &view, PyBUF_FULL_RO) == 0;
    Py_DECREF(frame);
    if (!have_view)
        return NULL;
    if ((uint64_t)view.len > self->inline_max || !PyBuffer_IsContiguous(&view, 'C')) {
        result = Py_NewRef(Py_False);
        goto out;
    }
    data = PyBytes_FromStringAndSize(NULL, ONE_SIZE + view.len);
    if (data == NULL)
        goto out;
    unsigned char *p = (unsigned char *)PyBytes_AS_STRING(data);
    memcpy(p, self->prefix, sizeof self->prefix);
    put_le64(p + 24, (uint64_t)conn_id);
    put_le64(p + 32, (uint64_t)view.len);
    if (PyBuffer_ToContiguous(p + ONE_SIZE, &view, view.len, 'C') < 0)
        goto out;
    PyBuffer_Release(&view);
    have_view = 0;
    PyObject *locked = PyObject_CallNoArgs(self->acquire);
    if (locked == NULL)
        goto out;
    Py_DECREF(locked);
    int posted = post_locked(self->engine, self->isend, self->rank, data);
    if (release_keeping_error(self->release) < 0)
        goto out;
    if (posted >= 0)
        result = Py_NewRef(posted ? Py_True : Py_False);
out:
    if (have_view)
        PyBuffer_Release(&view);
    Py_XDECREF(data);
    return result;
}

static PyTypeObject SenderType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hpcproc.transports._mpi_accel.Sender",
    .tp_doc = "Sender(link): _MpiLink.send_now for link (but its finished check), in C.",
    .tp_basicsize = sizeof(Sender),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC | Py_TPFLAGS_HAVE_VECTORCALL,
    .tp_vectorcall_offset = offsetof(Sender, vectorcall),
    .tp_new = Sender_new,
    .tp_call = PyVectorcall_Call,
    .tp_traverse = (traverseproc)Sender_traverse,
    .tp_clear = (inquiry)Sender_clear,
    .tp_dealloc = (destructor)Sender_dealloc,
};

/* Envelopes below this size are received into a bytearray (mpi.py's _ZERO_FILL_MAX);
 * larger ones go through the engine's _take. */
#define ZERO_FILL_MAX (16 << 10)

typedef struct {
    PyObject_HEAD
    PyObject *engine;       /* the _Engine */
    PyObject *loop;         /* the endpoint's loop */
    PyObject *acquire;      /* engine.lock.acquire */
    PyObject *release;      /* engine.lock.release */
    PyObject *improbe;      /* engine.comm.Improbe */
    PyObject *any_source;   /* engine._any_source */
    PyObject *status;       /* engine._status */
    PyObject *get_source;   /* engine._status.Get_source */
    PyObject *get_count;    /* engine._status.Get_count */
    PyObject *byte;         /* engine._byte */
    PyObject *poisoned;     /* engine._poisoned (a set, never replaced) */
    PyObject *inbound;      /* engine._inbound (a dict, never replaced) */
    PyObject *take_one;     /* engine.take_one: the whole of it, in Python */
    PyObject *take;         /* engine._take */
    PyObject *taken;        /* engine._taken */
    PyObject *sort_out;     /* engine._sort_out */
    PyObject *route;        /* engine._route */
    PyObject *frame_target; /* engine._frame_target */
    PyObject *irecv;        /* engine.comm.Irecv */
    PyObject *took_direct;  /* engine._took_one_direct */
    PyObject *mpi_error;    /* engine.MPI.Exception */
    PyObject *progress;     /* engine.progress */
    PyObject *poll_more;    /* engine._poll */
    PyObject *testsome;     /* engine.MPI.Request.Testsome */
    PyObject *pool_classes; /* engine._pool.classes (a dict, never replaced) */
    PyObject *trimmer;      /* engine._pool._trimmer */
    Target target;          /* the endpoint's containers */
    uint64_t max_message;   /* engine.options.max_message */
    /* The endpoint (compared, never used: no reference, as the endpoint holds this). */
    void *owner;
} Spinner;

#define SPINNER_FIELDS(X)                                                                    \
    X(engine) X(loop) X(acquire) X(release) X(improbe) X(any_source) X(status)      \
    X(get_source) X(get_count) X(byte) X(poisoned) X(inbound) X(take_one)     \
    X(take) X(taken) X(sort_out) X(route) X(frame_target) X(irecv) X(took_direct) X(mpi_error) \
    X(pool_classes) X(trimmer) X(progress) X(poll_more) X(testsome)

static int Spinner_traverse(Spinner *self, visitproc visit, void *arg) {
#define VISIT(f) Py_VISIT(self->f);
    SPINNER_FIELDS(VISIT)
#undef VISIT
#define VISIT(f) Py_VISIT(self->target.f);
    TARGET_FIELDS(VISIT)
#undef VISIT
    return 0;
}

static int Spinner_clear(Spinner *self) {
#define CLEAR(f) Py_CLEAR(self->f);
    SPINNER_FIELDS(CLEAR)
#undef CLEAR
    target_release(&self->target);
    return 0;
}

static void Spinner_dealloc(Spinner *self) {
    PyObject_GC_UnTrack(self);
    Spinner_clear(self);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *s_Improbe, *s_any_source, *s_status_attr,
    *s_Get_source, *s_Get_count, *s_poisoned, *s_inbound, *s_options,
    *s_max_message, *s_take_one, *s_take, *s_taken, *s_sort_out, *s_route, *s_loop,
    *s_recv_reqs, *s_last_activity, *s_Recv, *s_ready_attr, *s_streak, *s_no_poll_until,
    *s_crowding, *s_next_check, *s_crowded, *s_budget, *s_value, *s_probed, *s_Irecv,
    *s_frame_target, *s_took_one_direct, *s_MPI, *s_Exception, *s_direct_wait, *s_pool,
    *s_classes, *s_trimmer, *s_array, *s_used, *s_touch, *s_handle, *s_loop_attr,
    *s_progress, *s_poll, *s_Request, *s_Testsome, *s_remaining, *s_future, *s_done,
    *s_maximum, *s_yields, *s_poll_yielding, *s_grow;

static PyObject *Spinner_new(PyTypeObject *type, PyObject *args, PyObject *kwds) {
    PyObject *engine, *endpoint;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "Spinner(engine, endpoint) takes no keywords");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Spinner", 2, 2, &engine, &endpoint))
        return NULL;
    if (Tag == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_mpi_accel.init() was not called");
        return NULL;
    }
    Spinner *self = (Spinner *)type->tp_alloc(type, 0);
    if (self == NULL)
        return NULL;
    PyObject *lock = NULL, *comm = NULL, *options = NULL, *mpi = NULL, *pool = NULL,
             *request = NULL;
    self->engine = Py_NewRef(engine);
    self->owner = endpoint;
    if (target_fill(&self->target, endpoint) < 0 ||
        (self->loop = PyObject_GetAttr(endpoint, s_loop)) == NULL ||
        (lock = PyObject_GetAttr(engine, s_lock)) == NULL ||
        (self->acquire = PyObject_GetAttr(lock, s_acquire)) == NULL ||
        (self->release = PyObject_GetAttr(lock, s_release)) == NULL ||
        (comm = PyObject_GetAttr(engine, s_comm)) == NULL ||
        (self->improbe = PyObject_GetAttr(comm, s_Improbe)) == NULL ||
        (self->any_source = PyObject_GetAttr(engine, s_any_source)) == NULL ||
        (self->status = PyObject_GetAttr(engine, s_status_attr)) == NULL ||
        (self->get_source = PyObject_GetAttr(self->status, s_Get_source)) == NULL ||
        (self->get_count = PyObject_GetAttr(self->status, s_Get_count)) == NULL ||
        (self->byte = PyObject_GetAttr(engine, s_byte)) == NULL ||
        (self->poisoned = PyObject_GetAttr(engine, s_poisoned)) == NULL ||
        (self->inbound = PyObject_GetAttr(engine, s_inbound)) == NULL ||
        (options = PyObject_GetAttr(engine, s_options)) == NULL ||
        attr_uint(options, s_max_message, UINT64_MAX, &self->max_message) < 0 ||
        (self->take_one = PyObject_GetAttr(engine, s_take_one)) == NULL ||
        (self->take = PyObject_GetAttr(engine, s_take)) == NULL ||
        (self->taken = PyObject_GetAttr(engine, s_taken)) == NULL ||
        (self->sort_out = PyObject_GetAttr(engine, s_sort_out)) == NULL ||
        (self->route = PyObject_GetAttr(engine, s_route)) == NULL ||
        (self->frame_target = PyObject_GetAttr(engine, s_frame_target)) == NULL ||
        (self->irecv = PyObject_GetAttr(comm, s_Irecv)) == NULL ||
        (self->took_direct = PyObject_GetAttr(engine, s_took_one_direct)) == NULL ||
        (mpi = PyObject_GetAttr(engine, s_MPI)) == NULL ||
        (self->mpi_error = PyObject_GetAttr(mpi, s_Exception)) == NULL ||
        (pool = PyObject_GetAttr(engine, s_pool)) == NULL ||
        (self->pool_classes = PyObject_GetAttr(pool, s_classes)) == NULL ||
        (self->trimmer = PyObject_GetAttr(pool, s_trimmer)) == NULL ||
        (self->progress = PyObject_GetAttr(engine, s_progress)) == NULL ||
        (self->poll_more = PyObject_GetAttr(engine, s_poll)) == NULL ||
        (request = PyObject_GetAttr(mpi, s_Request)) == NULL ||
        (self->testsome = PyObject_GetAttr(request, s_Testsome)) == NULL) {
        Py_XDECREF(request);
        Py_XDECREF(lock);
        Py_XDECREF(comm);
        Py_XDECREF(options);
        Py_XDECREF(mpi);
        Py_XDECREF(pool);
        Py_DECREF(self);
        return NULL;
    }
    Py_DECREF(lock);
    Py_DECREF(comm);
    Py_DECREF(options);
    Py_DECREF(mpi);
    Py_DECREF(pool);
    Py_DECREF(request);
    if (!PySet_Check(self->poisoned) || !PyDict_Check(self->inbound) ||
        !PyDict_Check(self->pool_classes)) {
        PyErr_SetString(PyExc_TypeError, "the engine's _poisoned, _inbound and _pool.classes "
                                         "are not a set and dicts");
        Py_DECREF(self);
        return NULL;
    }
    return (PyObject *)self;
}

/* Whether the engine has requests outstanding (it then polls them: the Python path). */
static int engine_busy(PyObject *engine) {
    int r = attr_true(engine, s_send_reqs);
    if (r != 0)
        return r;
    return attr_true(engine, s_recv_reqs);
}

/* _BufferPool.take(length)'s common case, for a spinning receiver (on its loop): the
 * first array of the length's size class when nothing but the pool refers to it and
 * the pool's trim timer is armed, marked used: a new reference. NULL without an
 * exception otherwise (the engine's _frame_target then takes one), NULL with one on
 * error. */
static PyObject *pooled_target(Spinner *self, uint64_t length) {
    if (length < PoolMin || length > ((uint64_t)1 << 62))
        return NULL;
    uint64_t size = 1;
    while (size < length)
        size <<= 1;
    PyObject *key = PyLong_FromUnsignedLongLong(size);
    if (key == NULL)
        return NULL;
    PyObject *pooled = PyDict_GetItemWithError(self->pool_classes, key); /* borrowed */
    Py_DECREF(key);
    if (pooled == NULL)
        return NULL;
    Py_INCREF(pooled);
    PyObject *entry = NULL, *array = NULL, *result = NULL;
    Py_ssize_t n = PyObject_Length(pooled);
    if (n <= 0)
        goto out;
    if ((entry = PySequence_GetItem(pooled, 0)) == NULL ||
        (array = PyObject_GetAttr(entry, s_array)) == NULL)
        goto out;
    /* The entry's reference and this one: nobody else's (as take's getrefcount == 2). */
    if (Py_REFCNT(array) != 2)
        goto out;
    /* The trimmer's timer armed on this loop (trimmer.touch() would do nothing); else
     * the pool's take does it all (arming it needs the running loop). */
    PyObject *handle = PyObject_GetAttr(self->trimmer, s_handle);
    PyObject *loop = handle == NULL ? NULL : PyObject_GetAttr(self->trimmer, s_loop_attr);
    int armed = loop != NULL && handle != Py_None && loop == self->loop;
    Py_XDECREF(handle);
    Py_XDECREF(loop);
    if (loop == NULL || !armed)
        goto out;
    PyObject *now = PyObject_CallNoArgs(Monotonic); /* (the trimmer's clock) */
    if (now == NULL)
        goto out;
    int bad = PyObject_SetAttr(entry, s_used, now);
    Py_DECREF(now);
    if (bad < 0)
        goto out;
    result = length == size ? Py_NewRef(array)
                            : PySequence_GetSlice(array, 0, (Py_ssize_t)length);
out:
    Py_DECREF(pooled);
    Py_XDECREF(entry);
    Py_XDECREF(array);
    return result;
}

/* _taken's way with a DATA message of one separate frame for a spinning endpoint
 * (_direct_to, then _take_direct): the frame received here, directly, and handed over;
 * what does not end so (the frame still in flight at the deadline, a receive that
 * failed or another length, no connection found) settled by the engine's
 * _took_one_direct. ``buf`` is the envelope from rank ``src``. 1 taken, 0 not such a
 * message (nothing done: _taken deals with it), -1 with an exception set. */
static int take_direct(Spinner *self, PyObject *endpoint, PyObject *buf, PyObject *src,
                       PyObject *ready) {
    unsigned char p[ONE_SIZE];
    if (!PyByteArray_CheckExact(buf) || PyByteArray_GET_SIZE(buf) != ONE_SIZE)
        return 0;
    memcpy(p, PyByteArray_AS_STRING(buf), ONE_SIZE);
    uint64_t length = le64(p + 32);
    if (p[0] != KIND_DATA || (p[1] & FLAG_INLINE) || le32(p + 4) != 1 ||
        length > self->max_message || length > DirectMax ||
        le32(p + 12) != self->target.endpoint_id)
        return 0;
    int first = nothing_before(&self->target, self->inbound, src);
    if (first <= 0)
        return first;
    int result = -1;
    PyObject *size = NULL, *target = NULL, *frames = NULL, *spec = NULL, *req = NULL,
             *outcome = NULL, *msg = NULL;
    if ((size = PyLong_FromUnsignedLongLong(length)) == NULL)
        goto out;
    target = pooled_target(self, length);
    if (target == NULL && (PyErr_Occurred() ||
                           (target = PyObject_CallOneArg(self->frame_target, size)) == NULL))
        goto out;
    if ((frames = PyList_New(1)) == NULL || (spec = PyList_New(2)) == NULL)
        goto out;
    PyObject *frame = PyMemoryView_FromObject(target);
    if (frame == NULL)
        goto out;
    PyList_SET_ITEM(frames, 0, frame);
    PyList_SET_ITEM(spec, 0, Py_NewRef(target));
    PyList_SET_ITEM(spec, 1, Py_NewRef(self->byte));
    PyObject *recv_args[3] = {spec, src, Tag};
    if ((req = PyObject_Vectorcall(self->irecv, recv_args, 3, NULL)) == NULL)
        goto out;
    double wait, deadline, now;
    /* (Read every time, as _take_direct reads it.) */
    if (attr_double(self->engine, s_direct_wait, &wait) < 0 || deadline_clock(&now) < 0)
        goto out;
    deadline = now + wait;
    for (;;) {
        PyObject *test_args[2] = {req, self->status};
        PyObject *r = PyObject_VectorcallMethod(s_Test, test_args, 2, NULL);
        if (r == NULL) {
            /* (Other errors propagate, as from _take_direct.) */
            if (!PyErr_ExceptionMatches(self->mpi_error))
                goto out;
            outcome = PyErr_GetRaisedException();
            break;
        }
        int complete = PyObject_IsTrue(r);
        Py_DECREF(r);
        if (complete < 0)
            goto out;
        if (complete) {
            PyObject *count_args[1] = {self->byte};
            if ((outcome = PyObject_Vectorcall(self->get_count, count_args, 1, NULL)) == NULL)
                goto out;
            break;
        }
        if (deadline_clock(&now) < 0)
            goto out;
        if (now >= deadline) {
            outcome = Py_NewRef(Py_None);
            break;
        }
    }
    uint32_t src_ep = le32(p + 8);
    uint64_t gen = le64(p + 16), conn_id = le64(p + 24);
    if (PyLong_CheckExact(outcome)) {
        unsigned long long received = PyLong_AsUnsignedLongLong(outcome);
        if (received == (unsigned long long)-1 && PyErr_Occurred())
            PyErr_Clear(); /* (not the length: _took_one_direct says so) */
        else if (received == length) {
            PyObject *local = find_connection(&self->target, src, src_ep, gen, conn_id);
            if (local != NULL) {
                int r = hand_over(&self->target, endpoint, local, frames);
                Py_DECREF(local);
                result = r < 0 ? -1 : 1;
                goto out;
            }
            if (PyErr_Occurred())
                goto out;
        }
    }
    msg = Py_BuildValue("(OiIIKKO)", src, KIND_DATA, src_ep, (unsigned int)self->target.endpoint_id,
                        (unsigned long long)gen, (unsigned long long)conn_id, frames);
    if (msg == NULL)
        goto out;
    PyObject *args[5] = {msg, req, size, outcome, ready};
    PyObject *r = PyObject_Vectorcall(self->took_direct, args, 5, NULL);
    if (r == NULL)
        goto out;
    Py_DECREF(r);
    result = 1;
out:
    Py_XDECREF(size);
    Py_XDECREF(target);
    Py_XDECREF(frames);
    Py_XDECREF(spec);
    Py_XDECREF(req);
    Py_XDECREF(outcome);
    Py_XDECREF(msg);
    return result;
}

/* The part of take_one under the engine's lock, once the probe found ``message``:
 * receive it and take it, filling ``ready`` as _take does. 0, or -1 with an exception. */
static int take_locked(Spinner *self, PyObject *endpoint, PyObject *message, PyObject *ready) {
    PyObject *src = PyObject_CallNoArgs(self->get_source);
    if (src == NULL)
        return -1;
    PyObject *count_args[1] = {self->byte};
    PyObject *count = PyObject_Vectorcall(self->get_count, count_args, 1, NULL);
    if (count == NULL) {
        Py_DECREF(src);
        return -1;
    }
    Py_ssize_t size = PyLong_AsSsize_t(count);
    Py_DECREF(count);
    if (size == -1 && PyErr_Occurred()) {
        Py_DECREF(src);
        return -1;
    }
    if (size < 0 || size >= ZERO_FILL_MAX) {
        /* A large envelope (received into numpy memory): all of it in Python. */
        Py_DECREF(src);
        PyObject *args[3] = {message, ready, endpoint};
        PyObject *r = PyObject_Vectorcall(self->take, args, 3, NULL);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
        return 0;
    }
    int result = -1;
    PyObject *spec = NULL, *got = NULL;
    PyObject *buf = PyByteArray_FromStringAndSize(NULL, size);
    if (buf == NULL)
        goto out;
    if (size > 0) /* (zeroed, as bytearray(size) is) */
        memset(PyByteArray_AS_STRING(buf), 0, (size_t)size);
    spec = PyList_New(2);
    if (spec == NULL)
        goto out;
    PyList_SET_ITEM(spec, 0, Py_NewRef(buf));
    PyList_SET_ITEM(spec, 1, Py_NewRef(self->byte));
    PyObject *recv_args[2] = {message, spec};
    got = PyObject_VectorcallMethod(s_Recv, recv_args, 2, NULL);
    if (got == NULL)
        goto out;
    int poisoned = PySet_Contains(self->poisoned, src);
    if (poisoned < 0)
        goto out;
    if (poisoned) {
        result = 0;
        goto out;
    }
    PyObject *done = deliver(&self->target, endpoint, buf, src, self->max_message,
                             self->inbound);
    if (done == NULL)
        goto out;
    int delivered = done == Py_True;
    Py_DECREF(done);
    if (!delivered && (delivered = take_direct(self, endpoint, buf, src, ready)) < 0)
        goto out;
    if (!delivered) {
        PyObject *args[4] = {src, buf, ready, endpoint};
        PyObject *r = PyObject_Vectorcall(self->taken, args, 4, NULL);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    result = 0;
out:
    Py_DECREF(src);
    Py_XDECREF(buf);
    Py_XDECREF(spec);
    Py_XDECREF(got);
    return result;
}

/* engine._route(msg) for each message of the list ``ready`` (the caller's, which
 * nothing else changes meanwhile), in order: 0, or -1 with an exception set. */
static int route_all(Spinner *self, PyObject *ready) {
    if (!PyList_Check(ready)) {
        PyErr_SetString(PyExc_TypeError, "the messages to route are not a list");
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(ready); i++) {
        PyObject *msg = Py_NewRef(PyList_GET_ITEM(ready, i));
        PyObject *r = PyObject_CallOneArg(self->route, msg);
        Py_DECREF(msg);
        if (r == NULL)
            return -1;
        Py_DECREF(r);
    }
    return 0;
}

/* take_one(endpoint): True, False, or NULL with an exception set. */
static PyObject *spinner_take(Spinner *self, PyObject *endpoint) {
    if (self->engine == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Spinner was cleared");
        return NULL;
    }
    if ((void *)endpoint != self->owner) /* (not its endpoint: the whole of it in Python) */
        return PyObject_CallOneArg(self->take_one, endpoint);
    /* Messages another thread took for the endpoint, or requests to poll: Python. */
    Py_ssize_t waiting = PyObject_Length(self->target.inbox);
    if (waiting < 0)
        return NULL;
    int busy = waiting ? 1 : engine_busy(self->engine);
    if (busy < 0)
        return NULL;
    if (busy)
        return PyObject_CallOneArg(self->take_one, endpoint);
    PyObject *handed_over = PyObject_GetAttr(endpoint, s_handed_over);
    if (handed_over == NULL)
        return NULL;
    PyObject *ready = NULL, *result = NULL;
    PyObject *locked = PyObject_CallNoArgs(self->acquire);
    if (locked == NULL)
        goto out;
    Py_DECREF(locked);
    int taken = 0, failed = 0;
    int closed = attr_true(self->engine, s_closed);
    if (closed < 0) {
        failed = 1;
    } else if (closed) {
        result = Py_NewRef(Py_False);
    } else {
        PyObject *probe_args[3] = {self->any_source, Tag, self->status};
        PyObject *message = PyObject_Vectorcall(self->improbe, probe_args, 3, NULL);
        if (message == NULL) {
            failed = 1;
        } else if (message == Py_None) {
            Py_DECREF(message);
            result = Py_NewRef(Py_True);
        } else {
            ready = PyList_New(0);
            if (ready == NULL || take_locked(self, endpoint, message, ready) < 0) {
                failed = 1;
            } else if (PyList_GET_SIZE(ready) > 0) {
                PyObject *sort_args[2] = {ready, self->loop};
                PyObject *mine = PyObject_Vectorcall(self->sort_out, sort_args, 2, NULL);
                if (mine == NULL)
                    failed = 1;
                else
                    Py_SETREF(ready, mine);
            }
            Py_DECREF(message);
            taken = !failed;
        }
    }
    if (release_keeping_error(self->release) < 0) {
        Py_CLEAR(result);
        goto out;
    }
    if (failed || !taken)
        goto out;
    PyObject *now = PyObject_CallNoArgs(Monotonic);
    if (now == NULL || PyObject_SetAttr(self->engine, s_last_activity, now) < 0) {
        Py_XDECREF(now);
        goto out;
    }
    Py_DECREF(now);
    if (route_all(self, ready) < 0)
        goto out;
    PyObject *after = PyObject_GetAttr(endpoint, s_handed_over);
    if (after == NULL)
        goto out;
    int same = PyObject_RichCompareBool(after, handed_over, Py_EQ);
    Py_DECREF(after);
    if (same >= 0)
        result = Py_NewRef(same ? Py_True : Py_False);
out:
    Py_DECREF(handed_over);
    Py_XDECREF(ready);
    return result;
}

static PyObject *Spinner_call(Spinner *self, PyObject *args, PyObject *kwds) {
    PyObject *endpoint;
    if (kwds != NULL && PyDict_GET_SIZE(kwds) > 0) {
        PyErr_SetString(PyExc_TypeError, "a Spinner takes no keywords");
        return NULL;
    }
    if (!PyArg_UnpackTuple(args, "Spinner", 1, 1, &endpoint))
        return NULL;
    return spinner_take(self, endpoint);
}

/* Whether the poller's crowding says the CPUs are crowded at ``now``, as
 * ``c.crowded if now < c.next_check else c(now)``: 1, 0, -1 with an exception set. */
static int crowded_at(PyObject *poller, double now) {
    PyObject *c = PyObject_GetAttr(poller, s_crowding);
    if (c == NULL)
        return -1;
    double next_check;
    int r = -1;
    if (attr_double(c, s_next_check, &next_check) < 0)
        goto out;
    if (now < next_check) {
        r = attr_true(c, s_crowded);
    } else {
        PyObject *at = PyFloat_FromDouble(now);
        PyObject *answer = at == NULL ? NULL : PyObject_CallOneArg(c, at);
        Py_XDECREF(at);
        if (answer != NULL) {
            r = PyObject_IsTrue(answer);
            Py_DECREF(answer);
        }
    }
out:
    Py_DECREF(c);
    return r;
}

/* poller._streak = streak: 0, or -1 with an exception set. */
static int set_streak(PyObject *poller, long streak) {
    PyObject *v = PyLong_FromLong(streak);
    if (v == NULL)
        return -1;
    int r = PyObject_SetAttr(poller, s_streak, v);
    Py_DECREF(v);
    return r;
}

/* poll(poller, items, endpoint, ours) -> float: IdlePoller.turn_and_poll(items,
 * take_one, endpoint, ours) for this spinner's endpoint, with each turn's take_one
 * done here; see there for what it returns. */
static PyObject *Spinner_poll(Spinner *self, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "poll(poller, items, endpoint, ours) takes 4 arguments, not %zd", nargs);
        return NULL;
    }
    PyObject *poller = args[0], *items = args[1], *endpoint = args[2], *ours = args[3];
    PyObject *ready = PyObject_GetAttr(poller, s_ready_attr);
    if (ready == NULL)
        return NULL;
    PyObject *result = NULL;
    double gave_up = 0.0;
    if (ready == Py_None)
        goto done;
    Py_ssize_t queued = PyObject_Length(ready);
    if (queued < 0)
        goto fail;
    if (queued) {
        if (queued != 1)
            goto done;
        PyObject *first = PySequence_GetItem(ready, 0);
        if (first == NULL)
            goto fail;
        Py_DECREF(first);
        if (first != ours)
            goto done;
    }
    PyObject *streak_obj = PyObject_GetAttr(poller, s_streak);
    if (streak_obj == NULL)
        goto fail;
    long streak = PyLong_AsLong(streak_obj);
    Py_DECREF(streak_obj);
    if (streak == -1 && PyErr_Occurred())
        goto fail;
    streak += 1;
    if (streak > FairStreak) {
        if (set_streak(poller, 0) < 0)
            goto fail;
        gave_up = -1.0;
        goto done;
    }
    if (set_streak(poller, streak) < 0)
        goto fail;
    double start, no_poll_until;
    if (read_clock(PerfCounter, &start) < 0 ||
        attr_double(poller, s_no_poll_until, &no_poll_until) < 0)
        goto fail;
    int crowded = crowded_at(poller, start);
    if (crowded < 0)
        goto fail;
    if (crowded) {
        /* Poll by yielding, as turn_and_poll does: its loop in Python, each look one
         * call of this spinner (a system call per look anyway). */
        int yields = attr_true(poller, s_yields);
        if (yields < 0)
            goto fail;
        if (yields) {
            PyObject *yield_args[4] = {poller, items, (PyObject *)self, endpoint};
            PyObject *r = PyObject_VectorcallMethod(s_poll_yielding, yield_args, 4, NULL);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
        }
        goto done;
    }
    if (start < no_poll_until)
        goto done;
    /* The callbacks ready before the turns (read again: the crowding check may have
     * run Python code), as turn_and_poll reads them. */
    queued = PyObject_Length(ready);
    if (queued < 0)
        goto fail;
    double cpu = -1.0, budget_value;
    if (!(streak & 7) && read_clock(ThreadTime, &cpu) < 0)
        goto fail;
    PyObject *budget = PyObject_GetAttr(poller, s_budget);
    if (budget == NULL)
        goto fail;
    int bad = attr_double(budget, s_value, &budget_value);
    Py_DECREF(budget);
    if (bad < 0)
        goto fail;
    double deadline = start + budget_value, now = start;
    for (;;) {
        PyObject *r = spinner_take(self, endpoint);
        if (r == NULL)
            goto fail;
        int go_on = r == Py_True;
        Py_DECREF(r);
        if (!go_on)
            goto done; /* (0.0, and no probe: as turn_and_poll) */
        Py_ssize_t events = PyObject_Length(items);
        if (events < 0)
            goto fail;
        Py_ssize_t now_ready = events ? 0 : PyObject_Length(ready);
        if (now_ready < 0)
            goto fail;
        if (events || now_ready > queued)
            break;
        if (read_clock(PerfCounter, &now) < 0)
            goto fail;
        if (now >= deadline) {
            /* A last turn after giving the CPU away, as turn_and_poll (an event it
             * queues doubles the budget there too). */
            sched_yield();
            r = spinner_take(self, endpoint);
            if (r == NULL)
                goto fail;
            go_on = r == Py_True;
            Py_DECREF(r);
            if (!go_on)
                goto done;
            if ((events = PyObject_Length(items)) < 0)
                goto fail;
            if (!events) {
                gave_up = now;
                break;
            }
            PyObject *budget_now = PyObject_GetAttr(poller, s_budget);
            if (budget_now == NULL)
                goto fail;
            r = PyObject_CallMethodNoArgs(budget_now, s_grow);
            Py_DECREF(budget_now);
            if (r == NULL)
                goto fail;
            Py_DECREF(r);
            break;
        }
    }
    if (cpu >= 0 && now - start > ProbeMin) {
        double cpu_now;
        if (read_clock(ThreadTime, &cpu_now) < 0)
            goto fail;
        PyObject *at = PyFloat_FromDouble(now);
        if (at == NULL)
            goto fail;
        PyObject *starved = PyBool_FromLong(cpu_now - cpu < (now - start) / 2);
        PyObject *probe_args[3] = {poller, at, starved};
        PyObject *r = PyObject_VectorcallMethod(s_probed, probe_args, 3, NULL);
        Py_DECREF(at);
        Py_DECREF(starved);
        if (r == NULL)
            goto fail;
        Py_DECREF(r);
    }
done:
    result = PyFloat_FromDouble(gave_up);
fail:
    Py_DECREF(ready);
    return result;
}

/* _test_sends for a spinning wait, under the engine's lock: the send requests that
 * completed dropped from the engine's lists, the ops they finished appended to ``done``.
 * 0, or -1 with an exception set. */
static int test_sends_locked(Spinner *self, PyObject *done) {
    PyObject *reqs = PyObject_GetAttr(self->engine, s_send_reqs);
    if (reqs == NULL)
        return -1;
    int result = -1;
    char *finished = NULL;
    PyObject *indices = NULL, *kept_reqs = NULL, *kept_ops = NULL,
             *ops = PyObject_GetAttr(self->engine, s_send_ops);
    if (ops == NULL)
        goto out;
    if (!PyList_Check(reqs) || !PyList_Check(ops) ||
        PyList_GET_SIZE(reqs) != PyList_GET_SIZE(ops)) {
        PyErr_SetString(PyExc_TypeError, "the engine's send lists are not two lists of one "
                                         "length");
        goto out;
    }
    Py_ssize_t n = PyList_GET_SIZE(reqs);
    if (n == 0) {
        result = 0;
        goto out;
    }
    PyObject *test_args[1] = {reqs};
    if ((indices = PyObject_Vectorcall(self->testsome, test_args, 1, NULL)) == NULL)
        goto out;
    if (indices != Py_None && !PyList_Check(indices)) {
        /* (The requests it completed are null now: they must not go unreported.) */
        PyErr_SetString(PyExc_TypeError, "Testsome did not return a list");
        goto out;
    }
    if (indices == Py_None || PyList_GET_SIZE(indices) == 0) {
        result = 0;
        goto out;
    }
    /* (Made before the lists are read again: an allocation may collect garbage.) */
    if ((kept_reqs = PyList_New(0)) == NULL || (kept_ops = PyList_New(0)) == NULL)
        goto out;
    if ((finished = PyMem_Calloc((size_t)n, 1)) == NULL) {
        PyErr_NoMemory();
        goto out;
    }
    /* Python code may have run since the lists were read (a finalizer, on an
     * allocation): read them again, as _test_sends does; what was appended stays. */
    Py_SETREF(reqs, PyObject_GetAttr(self->engine, s_send_reqs));
    if (reqs == NULL)
        goto out;
    Py_SETREF(ops, PyObject_GetAttr(self->engine, s_send_ops));
    if (ops == NULL)
        goto out;
    if (!PyList_Check(reqs) || !PyList_Check(ops) || PyList_GET_SIZE(reqs) < n ||
        PyList_GET_SIZE(ops) != PyList_GET_SIZE(reqs)) {
        PyErr_SetString(PyExc_RuntimeError, "the engine's send lists changed under its lock");
        goto out;
    }
    for (Py_ssize_t k = 0; k < PyList_GET_SIZE(indices); k++) {
        Py_ssize_t i = PyLong_AsSsize_t(PyList_GET_ITEM(indices, k));
        if (i == -1 && PyErr_Occurred())
            goto out;
        if (i < 0 || i >= n) {
            PyErr_SetString(PyExc_IndexError, "Testsome reported a request it was not given");
            goto out;
        }
        finished[i] = 1;
        if (i >= PyList_GET_SIZE(ops)) {
            PyErr_SetString(PyExc_RuntimeError, "the engine's send lists shrank under its lock");
            goto out;
        }
        PyObject *op = PyList_GET_ITEM(ops, i);
        if (op == Py_None)
            continue;
        Py_INCREF(op);
        PyObject *remaining = PyObject_GetAttr(op, s_remaining);
        PyObject *less = remaining == NULL ? NULL : PyNumber_Subtract(remaining, One);
        Py_XDECREF(remaining);
        int bad = less == NULL || PyObject_SetAttr(op, s_remaining, less) < 0;
        int zero = bad ? 0 : PyObject_Not(less);
        Py_XDECREF(less);
        if (bad || zero < 0 || (zero && PyList_Append(done, op) < 0)) {
            Py_DECREF(op);
            goto out;
        }
        Py_DECREF(op);
    }
    /* (No allocation that may collect garbage below: the lists stay as they are.) */
    Py_ssize_t now_n = PyList_GET_SIZE(reqs);
    if (PyList_GET_SIZE(ops) != now_n || now_n < n) {
        PyErr_SetString(PyExc_RuntimeError, "the engine's send lists changed under its lock");
        goto out;
    }
    for (Py_ssize_t i = 0; i < now_n; i++) {
        if ((i >= n || !finished[i]) &&
            (PyList_Append(kept_reqs, PyList_GET_ITEM(reqs, i)) < 0 ||
             PyList_Append(kept_ops, PyList_GET_ITEM(ops, i)) < 0))
            goto out;
    }
    if (PyObject_SetAttr(self->engine, s_send_reqs, kept_reqs) < 0 ||
        PyObject_SetAttr(self->engine, s_send_ops, kept_ops) < 0)
        goto out;
    result = 0;
out:
    PyMem_Free(finished);
    Py_DECREF(reqs);
    Py_XDECREF(ops);
    Py_XDECREF(indices);
    Py_XDECREF(kept_reqs);
    Py_XDECREF(kept_ops);
    return result;
}

/* One turn of a spinning wait that is not a receive (a send's completion, mostly):
 * engine.progress(), its common case here (no frame receive outstanding): the sends
 * tested and one probe, a message found taken by the engine's Python methods as
 * progress takes it. 0, or -1 with an exception set. */
static int wait_turn(Spinner *self) {
    PyObject *done = PyList_New(0), *ready = NULL, *message = NULL;
    if (done == NULL)
        return -1;
    int result = -1, failed = 1, progress = 0;
    PyObject *locked = PyObject_CallNoArgs(self->acquire);
    if (locked == NULL)
        goto out;
    Py_DECREF(locked);
    int closed = attr_true(self->engine, s_closed);
    if (closed < 0)
        goto unlock;
    if (closed) {
        failed = 0;
        goto unlock;
    }
    /* Frame receives to test (read under the lock: another loop's thread may post
     * some): progress itself, once the lock is free. */
    if ((progress = attr_true(self->engine, s_recv_reqs)) != 0) {
        failed = progress < 0;
        goto unlock;
    }
    if (test_sends_locked(self, done) < 0)
        goto unlock;
    PyObject *probe_args[3] = {self->any_source, Tag, self->status};
    if ((message = PyObject_Vectorcall(self->improbe, probe_args, 3, NULL)) == NULL)
        goto unlock;
    if (message != Py_None) {
        if ((ready = PyList_New(0)) == NULL)
            goto unlock;
        PyObject *take_args[3] = {message, ready, Py_None};
        PyObject *r = PyObject_Vectorcall(self->take, take_args, 3, NULL);
        if (r == NULL)
            goto unlock;
        Py_DECREF(r);
        PyObject *more_args[1] = {ready};
        if ((r = PyObject_Vectorcall(self->poll_more, more_args, 1, NULL)) == NULL)
            goto unlock;
        Py_DECREF(r);
        if (PyList_GET_SIZE(ready) > 0) {
            /* (progress sorts them out for the loop running it.) */
            PyObject *loop = PyObject_CallNoArgs(GetRunningLoop);
            if (loop == NULL)
                goto unlock;
            PyObject *sort_args[2] = {ready, loop};
            r = PyObject_Vectorcall(self->sort_out, sort_args, 2, NULL);
            Py_DECREF(loop);
            if (r == NULL)
                goto unlock;
            Py_SETREF(ready, r);
        }
    }
    failed = 0;
unlock:
    if (release_keeping_error(self->release) < 0 || failed)
        goto out;
    if (progress > 0) {
        PyObject *r = PyObject_CallNoArgs(self->progress);
        Py_XDECREF(r);
        result = r == NULL ? -1 : 0;
        goto out;
    }
    if (PyList_GET_SIZE(done) == 0 && (message == NULL || message == Py_None)) {
        result = 0; /* nothing moved */
        goto out;
    }
    PyObject *now = PyObject_CallNoArgs(Monotonic);
    if (now == NULL || PyObject_SetAttr(self->engine, s_last_activity, now) < 0) {
        Py_XDECREF(now);
        goto out;
    }
    Py_DECREF(now);
    for (Py_ssize_t i = 0; i < PyList_GET_SIZE(done); i++) {
        PyObject *op = PyList_GET_ITEM(done, i);
        PyObject *loop = PyObject_GetAttr(op, s_loop);
        PyObject *future = loop == NULL ? NULL : PyObject_GetAttr(op, s_future);
        PyObject *r = NULL;
        if (future != NULL) {
            PyObject *args[2] = {loop, future};
            r = PyObject_Vectorcall(SetResult, args, 2, NULL);
        }
        Py_XDECREF(loop);
        Py_XDECREF(future);
        if (r == NULL)
            goto out;
        Py_DECREF(r);
    }
    if (ready != NULL && route_all(self, ready) < 0)
        goto out;
    result = 0;
out:
    Py_DECREF(done);
    Py_XDECREF(ready);
    Py_XDECREF(message);
    return result;
}

/* Whether ``future.done()``: 1, 0, -1 with an exception set. */
static int future_done(PyObject *future) {
    PyObject *r = PyObject_CallMethodNoArgs(future, s_done);
    if (r == NULL)
        return -1;
    int d = PyObject_IsTrue(r);
    Py_DECREF(r);
    return d;
}

/* spin(poller, future, endpoint, ours) -> bool: IdlePoller.spin(step, ours) for this
 * spinner's endpoint, step being ``progress(); return future.done()`` with each
 * progress done as wait_turn does it: whether ``future`` is done. */
static PyObject *Spinner_spin(Spinner *self, PyObject *const *args, Py_ssize_t nargs) {
    if (self->engine == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "this Spinner was cleared");
        return NULL;
    }
    if (nargs != 4) {
        PyErr_Format(PyExc_TypeError,
                     "spin(poller, future, endpoint, ours) takes 4 arguments, not %zd", nargs);
        return NULL;
    }
    PyObject *poller = args[0], *future = args[1], *endpoint = args[2], *ours = args[3];
    if ((void *)endpoint != self->owner) {
        PyErr_SetString(PyExc_ValueError, "spin: not this spinner's endpoint");
        return NULL;
    }
    /* others_ready(ours): another callback than ours ready (or no queue to read). */
    PyObject *ready = PyObject_GetAttr(poller, s_ready_attr);
    if (ready == NULL)
        return NULL;
    int others = 1;
    if (ready != Py_None) {
        Py_ssize_t queued = PyObject_Length(ready);
        if (queued < 0) {
            Py_DECREF(ready);
            return NULL;
        }
        others = queued > 1;
        if (queued == 1) {
            PyObject *first = PySequence_GetItem(ready, 0);
            if (first == NULL) {
                Py_DECREF(ready);
                return NULL;
            }
            others = first != ours;
            Py_DECREF(first);
        }
    }
    Py_DECREF(ready);
    if (others)
        Py_RETURN_FALSE;
    double now, no_poll_until, maximum;
    if (read_clock(PerfCounter, &now) < 0 ||
        attr_double(poller, s_no_poll_until, &no_poll_until) < 0)
        return NULL;
    if (now < no_poll_until)
        Py_RETURN_FALSE;
    int crowded = crowded_at(poller, now);
    if (crowded < 0)
        return NULL;
    if (crowded)
        Py_RETURN_FALSE;
    PyObject *budget = PyObject_GetAttr(poller, s_budget);
    if (budget == NULL)
        return NULL;
    int bad = attr_double(budget, s_maximum, &maximum);
    Py_DECREF(budget);
    if (bad < 0)
        return NULL;
    double deadline = now + maximum;
    for (;;) {
        if (wait_turn(self) < 0)
            return NULL;
        int d = future_done(future);
        if (d < 0)
            return NULL;
        if (d)
            Py_RETURN_TRUE;
        if (read_clock(PerfCounter, &now) < 0)
            return NULL;
        if (now >= deadline) {
            /* A last call after giving the CPU away, as IdlePoller.spin. */
            sched_yield();
            if (wait_turn(self) < 0)
                return NULL;
            if ((d = future_done(future)) < 0)
                return NULL;
            return PyBool_FromLong(d);
        }
    }
}

static PyMethodDef Spinner_methods[] = {
    {"spin", (PyCFunction)(void (*)(void))Spinner_spin, METH_FASTCALL,
     "spin(poller, future, endpoint, ours) -> bool: IdlePoller.spin with engine.progress "
     "and future.done() as the step."},
    {"poll", (PyCFunction)(void (*)(void))Spinner_poll, METH_FASTCALL,
     "poll(poller, items, endpoint, ours) -> float: IdlePoller.turn_and_poll with this "
     "spinner's take_one as the step."},
    {NULL, NULL, 0, NULL},
};

static PyTypeObject SpinnerType = {
    PyVarObject_HEAD_INIT(NULL, 0)
    .tp_name = "hpcproc.transports._mpi_accel.Spinner",
    .tp_doc = "Spinner(engine, endpoint): _Engine.take_one for endpoint, in C.",
    .tp_basicsize = sizeof(Spinner),
    .tp_flags = Py_TPFLAGS_DEFAULT | Py_TPFLAGS_HAVE_GC,
    .tp_new = Spinner_new,
    .tp_call = (ternaryfunc)Spinner_call,
    .tp_methods = Spinner_methods,
    .tp_traverse = (traverseproc)Spinner_traverse,
    .tp_clear = (inquiry)Spinner_clear,
    .tp_dealloc = (destructor)Spinner_dealloc,
};

/* init(link_type, received_type, tag, max_untracked, fair_streak, probe_min,
 * direct_max, pool_min, set_result): what this module needs from mpi.py, base.py and _busy_poll.py. */
static PyObject *init(PyObject *Py_UNUSED(module), PyObject *args) {
    PyObject *link_type, *received_type, *tag;
    Py_ssize_t max_untracked;
    long fair_streak;
    double probe_min;
    unsigned long long direct_max, pool_min;
    PyObject *set_result;
    if (!PyArg_ParseTuple(args, "O!O!O!nldKKO:init", &PyType_Type, &link_type, &PyType_Type,
                          &received_type, &PyLong_Type, &tag, &max_untracked, &fair_streak,
                          &probe_min, &direct_max, &pool_min, &set_result))
        return NULL;
    if (!PyCallable_Check(set_result)) {
        PyErr_SetString(PyExc_TypeError, "init: set_result is not callable");
        return NULL;
    }
    if (handover_init(received_type) < 0)
        return NULL;
    Py_INCREF(link_type);
    Py_XSETREF(LinkType, link_type);
    Py_INCREF(tag);
    Py_XSETREF(Tag, tag);
    MaxUntracked = max_untracked;
    FairStreak = fair_streak;
    ProbeMin = probe_min;
    DirectMax = direct_max;
    PoolMin = pool_min;
    Py_INCREF(set_result);
    Py_XSETREF(SetResult, set_result);
    Py_RETURN_NONE;
}

/* check_layout(one_size, data_kind, inline_flag, zero_fill_max): that mpi.py's wire
 * layout and envelope size class are the ones compiled in here. */
static PyObject *check_layout(PyObject *Py_UNUSED(module), PyObject *args) {
    long one_size, data_kind, inline_flag, zero_fill_max;
    if (!PyArg_ParseTuple(args, "llll:check_layout", &one_size, &data_kind, &inline_flag,
                          &zero_fill_max))
        return NULL;
    if (one_size != ONE_SIZE || data_kind != KIND_DATA || inline_flag != FLAG_INLINE ||
        zero_fill_max != ZERO_FILL_MAX) {
        PyErr_Format(PyExc_RuntimeError,
                     "_mpi_accel.c was built for another wire layout (envelope %d bytes, "
                     "DATA %d, inline flag %d, bytearray envelopes below %d): rebuild it "
                     "(pip install -e .) or set HPCPROC_MPI_ACCEL=0",
                     ONE_SIZE, KIND_DATA, FLAG_INLINE, ZERO_FILL_MAX);
        return NULL;
    }
    Py_RETURN_NONE;
}

static PyMethodDef methods[] = {
    {"check_layout", (PyCFunction)check_layout, METH_VARARGS,
     "check_layout(one_size, data_kind, inline_flag, zero_fill_max)"},
    {"init", (PyCFunction)init, METH_VARARGS,
     "init(link_type, received_type, tag, max_untracked, fair_streak, probe_min, "
     "direct_max, pool_min, set_result)"},
    {"deliver_inline", (PyCFunction)(void (*)(void))deliver_inline, METH_FASTCALL,
     "deliver_inline(endpoint, buf, src, max_message, inbound) -> bool: see the module."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_mpi_accel",
    .m_doc = "The mpi transport's hand-over of a small message, in C (see mpi.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__mpi_accel(void) {
    struct {
        PyObject **slot;
        const char *name;
    } names[] = {
        {&s_endpoint_id, "endpoint_id"}, {&s_inbox, "_inbox"},   {&s_addresses, "_addresses"},
        {&s_links, "_links"},            {&s_gen, "gen"},        {&s_alive, "alive"},
        {&s_incoming, "incoming"},       {&s_heard, "heard"},    {&s_receivers, "_receivers"},
        {&s_events, "_events"},          {&s_items, "_items"},   {&s_handed_over, "_handed_over"},
        {&s_endpoint, "endpoint"},      {&s_waiters, "_waiters"},
        {&s_opts, "opts"},               {&s_inline_max, "inline_max"},
        {&s_remote_ep, "remote_ep"},     {&s_engine, "engine"},   {&s_lock, "lock"},
        {&s_closed, "closed"},           {&s_send_reqs, "_send_reqs"},
        {&s_send_ops, "_send_ops"},      {&s_comm, "comm"},       {&s_rank, "rank"},
        {&s_Isend, "Isend"},             {&s_Test, "Test"},       {&s_acquire, "acquire"},
        {&s_release, "release"},
        {&s_Improbe, "Improbe"},
        {&s_any_source, "_any_source"},  {&s_status_attr, "_status"},
        {&s_Get_source, "Get_source"},   {&s_Get_count, "Get_count"}, {&s_byte, "_byte"},
        {&s_poisoned, "_poisoned"},      {&s_inbound, "_inbound"}, {&s_options, "options"},
        {&s_max_message, "max_message"}, {&s_take_one, "take_one"}, {&s_take, "_take"},
        {&s_taken, "_taken"},            {&s_sort_out, "_sort_out"}, {&s_route, "_route"},
        {&s_loop, "loop"},               {&s_recv_reqs, "_recv_reqs"},
        {&s_last_activity, "last_activity"}, {&s_Recv, "Recv"},
        {&s_ready_attr, "_ready"},       {&s_streak, "_streak"},
        {&s_no_poll_until, "_no_poll_until"}, {&s_crowding, "crowding"},
        {&s_next_check, "next_check"},   {&s_crowded, "crowded"}, {&s_budget, "budget"},
        {&s_value, "value"},             {&s_probed, "probed"},
        {&s_yields, "yields"},           {&s_poll_yielding, "poll_yielding"},
        {&s_grow, "grow"},
        {&s_Irecv, "Irecv"},             {&s_frame_target, "_frame_target"},
        {&s_took_one_direct, "_took_one_direct"}, {&s_MPI, "MPI"},
        {&s_Exception, "Exception"},     {&s_direct_wait, "_direct_wait"},
        {&s_pool, "_pool"},              {&s_classes, "classes"}, {&s_trimmer, "_trimmer"},
        {&s_array, "array"},             {&s_used, "used"},       {&s_touch, "touch"},
        {&s_handle, "_handle"},          {&s_loop_attr, "_loop"},
        {&s_progress, "progress"},       {&s_poll, "_poll"},
        {&s_Request, "Request"},         {&s_Testsome, "Testsome"},
        {&s_remaining, "remaining"},     {&s_future, "future"},   {&s_done, "done"},
        {&s_maximum, "maximum"},
    };
    One = PyLong_FromLong(1);
    if (One == NULL || handover_names() < 0)
        return NULL;
    for (size_t i = 0; i < sizeof names / sizeof names[0]; i++) {
        *names[i].slot = PyUnicode_InternFromString(names[i].name);
        if (*names[i].slot == NULL)
            return NULL;
    }
    PyObject *time = PyImport_ImportModule("time");
    if (time == NULL)
        return NULL;
    Monotonic = PyObject_GetAttrString(time, "monotonic");
    PerfCounter = PyObject_GetAttrString(time, "perf_counter");
    ThreadTime = PyObject_GetAttrString(time, "thread_time");
    Py_DECREF(time);
    if (Monotonic == NULL || PerfCounter == NULL || ThreadTime == NULL)
        return NULL;
    PyObject *asyncio = PyImport_ImportModule("asyncio");
    if (asyncio == NULL)
        return NULL;
    GetRunningLoop = PyObject_GetAttrString(asyncio, "_get_running_loop");
    Py_DECREF(asyncio);
    if (GetRunningLoop == NULL)
        return NULL;
    if (PyType_Ready(&SpinnerType) < 0 || PyType_Ready(&SenderType) < 0)
        return NULL;
    PyObject *m = PyModule_Create(&module);
    if (m == NULL)
        return NULL;
    if (PyModule_AddObject(m, "Spinner", Py_NewRef((PyObject *)&SpinnerType)) < 0) {
        Py_DECREF(&SpinnerType);
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
