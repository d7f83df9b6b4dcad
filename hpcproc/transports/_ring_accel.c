/* The shm transport's ring (hpcproc/transports/_shm_ring.py) written in C: the same
 * layout, protocol, checks and error messages as the pure-Python RingWriter and
 * RingReader there, which stay the reference and the fallback (the two interoperate:
 * either side of a link may use either). Optional: built at install where a compiler
 * exists; HPCPROC_RING_ACCEL=0 selects the Python classes.
 *
 * Why in C: a small message costs the Python classes about 0.3 us to write and 1 us to
 * parse and hand over; here the same work is a few stores, a copy and one callback.
 *
 * Memory order: the header's counters are accessed with C11-style atomics (GCC/Clang
 * builtins): the producer's head is published with a release store after the record,
 * the consumer reads it with an acquire load before the record, and the sleep and wait
 * handshakes put a sequentially consistent fence between their store and load
 * (Dekker's pattern; see _shm_ring.py).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <structmember.h>
#include <stdint.h>
#include <string.h>

#define HEADER_SIZE 4096
#define DATA_OFF HEADER_SIZE
#define W_HEAD (64 / 8)
#define W_TAIL (128 / 8)
#define W_SLEEP (192 / 8)
#define W_WAIT (256 / 8)
#define REC_MAGIC 0x43455248u
#define WRAP_MAGIC 0x50415257u
#define OUT_OF_LINE (1ULL << 63)
#define KIND_DATA 2
/* rec_len:u32 magic:u32 kind:u8 pad:3 nframes:u32 conn_id:u64 */
#define REC_SIZE 24
/* REC then one frame length */
#define ONE_SIZE 32
#define SEGREF_SIZE 16
#define ONE_SEG_SIZE (ONE_SIZE + SEGREF_SIZE)

static PyObject *RingError = NULL; /* _shm_ring.RingError, given by init() */
static PyObject *Kinds = NULL;     /* dict: kind number -> Kind member */
static PyObject *KindData = NULL;  /* Kind.DATA */

#define LOAD(p) __atomic_load_n((p), __ATOMIC_ACQUIRE)
#define STORE(p, v) __atomic_store_n((p), (v), __ATOMIC_RELEASE)
#define FENCE() __atomic_thread_fence(__ATOMIC_SEQ_CST)

static inline uint32_t rd32(const char *p) { uint32_t v; memcpy(&v, p, 4); return v; }
static inline uint64_t rd64(const char *p) { uint64_t v; memcpy(&v, p, 8); return v; }
static inline void wr32(char *p, uint32_t v) { memcpy(p, &v, 4); }
static inline void wr64(char *p, uint64_t v) { memcpy(p, &v, 8); }

static int
check_ready(void)
{
    if (RingError == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_ring_accel.init() was not called");
        return -1;
    }
    return 0;
}

/* The mapping, its buffer and the header seen as 64-bit words, shared by both types. */
typedef struct {
    PyObject *mm;
    PyObject *words; /* memoryview(mm)[:HEADER_SIZE].cast("Q"), for Python callers */
    Py_buffer buf;
    int has_buf;
    uint64_t capacity;
    uint64_t mask;
} Mapping;

static int
mapping_open(Mapping *m, PyObject *mm, unsigned long long capacity)
{
    if (check_ready() < 0)
        return -1;
    if (capacity < 4096 || (capacity & (capacity - 1))) {
        PyErr_Format(PyExc_ValueError, "ring capacity %llu is not a power of two >= 4096",
                     capacity);
        return -1;
    }
    if (PyObject_GetBuffer(mm, &m->buf, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
        return -1;
    m->has_buf = 1;
    if ((uint64_t)m->buf.len < HEADER_SIZE + capacity) {
        PyErr_Format(PyExc_ValueError, "mapping of %zd bytes is too small for a ring of %llu",
                     m->buf.len, capacity);
        return -1;
    }
    if (((uintptr_t)m->buf.buf) & 63) {
        PyErr_SetString(PyExc_ValueError, "ring mapping is not aligned");
        return -1;
    }
    PyObject *view = PyMemoryView_FromObject(mm);
    if (view == NULL)
        return -1;
    PyObject *head = PySequence_GetSlice(view, 0, HEADER_SIZE);
    Py_DECREF(view);
    if (head == NULL)
        return -1;
    m->words = PyObject_CallMethod(head, "cast", "s", "Q");
    Py_DECREF(head);
    if (m->words == NULL)
        return -1;
    Py_INCREF(mm);
    m->mm = mm;
    m->capacity = capacity;
    m->mask = capacity - 1;
    return 0;
}

static void
mapping_release(Mapping *m)
{
    if (m->words != NULL) {
        PyObject *r = PyObject_CallMethod(m->words, "release", NULL);
        if (r == NULL)
            PyErr_Clear();
        Py_XDECREF(r);
    }
    if (m->has_buf) {
        PyBuffer_Release(&m->buf);
        m->has_buf = 0;
    }
}

static inline uint64_t *
counters(Mapping *m)
{
    return (uint64_t *)m->buf.buf;
}

static int
mapping_usable(Mapping *m)
{
    if (!m->has_buf) {
        PyErr_SetString(PyExc_ValueError, "operation on a released ring");
        return -1;
    }
    return 0;
}

/* What both types start with: their shared functions take a Ring. */
typedef struct {
    PyObject_HEAD
    Mapping m;
} Ring;

/* __init__(mm, capacity) of either type. */
static int
ring_init(Ring *self, const char *what, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"mm", "capacity", NULL};
    PyObject *mm;
    unsigned long long capacity;
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "OK", kwlist, &mm, &capacity))
        return -1;
    if (self->m.mm != NULL) {
        PyErr_Format(PyExc_RuntimeError, "%s initialised twice", what);
        return -1;
    }
    return mapping_open(&self->m, mm, capacity);
}

static void
Ring_dealloc(Ring *self)
{
    /* Releasing calls into Python: keep whatever exception is being raised. */
    PyObject *type, *value, *traceback;
    PyErr_Fetch(&type, &value, &traceback);
    mapping_release(&self->m);
    PyErr_Restore(type, value, traceback);
    Py_XDECREF(self->m.words);
    Py_XDECREF(self->m.mm);
    Py_TYPE(self)->tp_free((PyObject *)self);
}

static PyObject *
Ring_release(Ring *self, PyObject *Py_UNUSED(ignored))
{
    mapping_release(&self->m);
    Py_RETURN_NONE;
}

static PyObject *
Ring_get_capacity(Ring *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->m.capacity);
}

/* ------------------------------------------------------------------ writer */

typedef struct {
    PyObject_HEAD
    Mapping m;
    uint64_t head;    /* bytes published so far (our copy of the shared head) */
    uint64_t free_to; /* head may grow up to here without reading the consumer's tail */
    uint64_t woken;
    uint64_t waiting;
} Writer;

static int
Writer_init(Writer *self, PyObject *args, PyObject *kwds)
{
    if (ring_init((Ring *)self, "RingWriter", args, kwds) < 0)
        return -1;
    self->head = 0;
    self->free_to = self->m.capacity;
    self->woken = 0;
    self->waiting = 0;
    return 0;
}

/* Offset in the mapping for a record of `size` bytes (a multiple of 8), -1 when the
 * ring is full, -2 with an exception set. */
static int64_t
writer_reserve(Writer *self, uint64_t size)
{
    Mapping *m = &self->m;
    uint64_t head = self->head;
    uint64_t pos = head & m->mask;
    uint64_t room = m->capacity - pos;
    uint64_t need = size <= room ? size : room + size;
    if (head + need > self->free_to) {
        uint64_t tail = LOAD(&counters(m)[W_TAIL]);
        if (tail > head || head - tail > m->capacity) {
            PyErr_Format(RingError, "consumer tail is %lld bytes from head",
                         (long long)(head - tail));
            return -2;
        }
        self->free_to = tail + m->capacity;
        if (head + need > self->free_to)
            return -1;
    }
    char *base = (char *)m->buf.buf;
    if (size > room) {
        wr32(base + DATA_OFF + pos, (uint32_t)room);
        wr32(base + DATA_OFF + pos + 4, WRAP_MAGIC);
        head += room;
        pos = 0;
    }
    self->head = head + size;
    return (int64_t)(DATA_OFF + pos);
}

static int
writer_publish(Writer *self)
{
    uint64_t *c = counters(&self->m);
    STORE(&c[W_HEAD], self->head);
    FENCE();
    uint64_t seq = __atomic_load_n(&c[W_SLEEP], __ATOMIC_RELAXED);
    if ((seq & 1) && seq != self->woken) {
        self->woken = seq;
        return 1;
    }
    return 0;
}

static PyObject *
Writer_reserve(Writer *self, PyObject *arg)
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    unsigned long long size = PyLong_AsUnsignedLongLong(arg);
    if (size == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    if ((size & 7) || size > self->m.capacity / 4) {
        PyErr_Format(PyExc_ValueError, "record size %llu is not a multiple of 8 up to %llu",
                     size, (unsigned long long)(self->m.capacity / 4));
        return NULL;
    }
    int64_t off = writer_reserve(self, size);
    if (off == -2)
        return NULL;
    return PyLong_FromLongLong(off);
}

static PyObject *
Writer_publish(Writer *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    return PyBool_FromLong(writer_publish(self));
}

static PyObject *
Writer_send_one(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 3) {
        PyErr_SetString(PyExc_TypeError, "send_one(conn_id, frame, n)");
        return NULL;
    }
    if (mapping_usable(&self->m) < 0)
        return NULL;
    unsigned long long conn_id = PyLong_AsUnsignedLongLong(args[0]);
    if (conn_id == (unsigned long long)-1 && PyErr_Occurred())
        return NULL;
    Py_ssize_t n = PyLong_AsSsize_t(args[2]);
    if (n == -1 && PyErr_Occurred())
        return NULL;
    Py_buffer frame;
    if (PyObject_GetBuffer(args[1], &frame, PyBUF_C_CONTIGUOUS) < 0)
        return NULL;
    PyObject *result = NULL;
    if (frame.len != n || n < 0) {
        PyErr_Format(PyExc_ValueError, "frame of %zd bytes given as %zd", frame.len, n);
        goto done;
    }
    Mapping *m = &self->m;
    uint64_t rec_len = ONE_SIZE + (uint64_t)n;
    uint64_t size = (rec_len + 7) & ~(uint64_t)7;
    if (size > m->capacity / 4) {
        PyErr_Format(PyExc_ValueError, "record of %llu bytes exceeds a quarter of the ring",
                     (unsigned long long)size);
        goto done;
    }
    uint64_t head = self->head;
    uint64_t pos = head & m->mask;
    int64_t off;
    if (size <= m->capacity - pos && head + size <= self->free_to) {
        self->head = head + size;
        off = (int64_t)(DATA_OFF + pos);
    }
    else {
        off = writer_reserve(self, size);
        if (off == -2)
            goto done;
        if (off < 0) {
            result = PyLong_FromLong(0);
            goto done;
        }
    }
    char *p = (char *)m->buf.buf + off;
    wr32(p, (uint32_t)rec_len);
    wr32(p + 4, REC_MAGIC);
    p[8] = KIND_DATA;
    p[9] = p[10] = p[11] = 0;
    wr32(p + 12, 1);
    wr64(p + 16, conn_id);
    wr64(p + 24, (uint64_t)n);
    memcpy(p + ONE_SIZE, frame.buf, (size_t)n);
    result = PyLong_FromLong(writer_publish(self) ? 2 : 1);
done:
    PyBuffer_Release(&frame);
    return result;
}

static PyObject *
Writer_write(Writer *self, PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 6) {
        PyErr_SetString(PyExc_TypeError, "write(off, rec_len, kind, conn_id, lengths, parts)");
        return NULL;
    }
    if (mapping_usable(&self->m) < 0)
        return NULL;
    Mapping *m = &self->m;
    Py_ssize_t off = PyLong_AsSsize_t(args[0]);
    unsigned long long rec_len = PyLong_AsUnsignedLongLong(args[1]);
    long kind = PyLong_AsLong(args[2]);
    unsigned long long conn_id = PyLong_AsUnsignedLongLong(args[3]);
    if (PyErr_Occurred())
        return NULL;
    PyObject *lengths = args[4], *parts = args[5];
    if (!PyTuple_Check(lengths)) {
        PyErr_SetString(PyExc_TypeError, "lengths must be a tuple");
        return NULL;
    }
    PyObject *seq = PySequence_Fast(parts, "parts must be a sequence");
    if (seq == NULL)
        return NULL;
    Py_ssize_t n = PyTuple_GET_SIZE(lengths);
    if (off < DATA_OFF || rec_len > 0xffffffffULL || off > m->buf.len - (Py_ssize_t)rec_len ||
        kind < 0 || kind > 255 || REC_SIZE + 8 * n > (Py_ssize_t)rec_len) {
        PyErr_SetString(PyExc_ValueError, "record outside the ring");
        Py_DECREF(seq);
        return NULL;
    }
    Py_ssize_t end = off + (Py_ssize_t)rec_len;
    char *base = (char *)m->buf.buf;
    char *p = base + off;
    wr32(p, (uint32_t)rec_len);
    wr32(p + 4, REC_MAGIC);
    p[8] = (char)kind;
    p[9] = p[10] = p[11] = 0;
    wr32(p + 12, (uint32_t)n);
    wr64(p + 16, conn_id);
    Py_ssize_t q = off + REC_SIZE;
    for (Py_ssize_t i = 0; i < n; i++) {
        unsigned long long len = PyLong_AsUnsignedLongLong(PyTuple_GET_ITEM(lengths, i));
        if (len == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(seq);
            return NULL;
        }
        wr64(base + q, len);
        q += 8;
    }
    Py_ssize_t nparts = PySequence_Fast_GET_SIZE(seq);
    for (Py_ssize_t i = 0; i < nparts; i++) {
        PyObject *part = PySequence_Fast_GET_ITEM(seq, i);
        if (PyTuple_Check(part)) {
            unsigned long long seg_id, seg_off;
            if (!PyArg_ParseTuple(part, "KK", &seg_id, &seg_off)) {
                Py_DECREF(seq);
                return NULL;
            }
            if (q + SEGREF_SIZE > end) {
                PyErr_SetString(PyExc_ValueError, "parts overrun the record");
                Py_DECREF(seq);
                return NULL;
            }
            wr64(base + q, seg_id);
            wr64(base + q + 8, seg_off);
            q += SEGREF_SIZE;
        }
        else {
            Py_buffer b;
            if (PyObject_GetBuffer(part, &b, PyBUF_C_CONTIGUOUS) < 0) {
                Py_DECREF(seq);
                return NULL;
            }
            if (q + b.len > end) {
                PyBuffer_Release(&b);
                PyErr_SetString(PyExc_ValueError, "parts overrun the record");
                Py_DECREF(seq);
                return NULL;
            }
            memcpy(base + q, b.buf, (size_t)b.len);
            q += b.len;
            PyBuffer_Release(&b);
        }
    }
    Py_DECREF(seq);
    Py_RETURN_NONE;
}

static PyObject *
Writer_start_waiting(Writer *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    self->waiting += 2;
    __atomic_store_n(&counters(&self->m)[W_WAIT], self->waiting - 1, __ATOMIC_RELAXED);
    FENCE();
    Py_RETURN_NONE;
}

static PyObject *
Writer_stop_waiting(Writer *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    STORE(&counters(&self->m)[W_WAIT], self->waiting);
    Py_RETURN_NONE;
}

static PyObject *
Writer_get_head(Writer *self, void *Py_UNUSED(closure))
{
    return PyLong_FromUnsignedLongLong(self->head);
}

static PyMethodDef Writer_methods[] = {
    {"reserve", (PyCFunction)Writer_reserve, METH_O, NULL},
    {"publish", (PyCFunction)Writer_publish, METH_NOARGS, NULL},
    {"send_one", (PyCFunction)(void (*)(void))Writer_send_one, METH_FASTCALL, NULL},
    {"write", (PyCFunction)(void (*)(void))Writer_write, METH_FASTCALL, NULL},
    {"start_waiting", (PyCFunction)Writer_start_waiting, METH_NOARGS, NULL},
    {"stop_waiting", (PyCFunction)Writer_stop_waiting, METH_NOARGS, NULL},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, NULL},
    {NULL}};

static PyMemberDef Writer_members[] = {
    {"mm", T_OBJECT, offsetof(Writer, m.mm), READONLY, NULL},
    {"words", T_OBJECT, offsetof(Writer, m.words), READONLY, NULL},
    {NULL}};

static PyGetSetDef Writer_getset[] = {
    {"head", (getter)Writer_get_head, NULL, NULL, NULL},
    {"capacity", (getter)Ring_get_capacity, NULL, NULL, NULL},
    {NULL}};

static PyTypeObject WriterType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hpcproc.transports._ring_accel.RingWriter",
    .tp_basicsize = sizeof(Writer),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The producer side of a ring (see _shm_ring.RingWriter).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Writer_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Writer_methods,
    .tp_members = Writer_members,
    .tp_getset = Writer_getset,
};

/* ------------------------------------------------------------------ reader */

typedef struct {
    PyObject_HEAD
    Mapping m;
    unsigned long long tail; /* bytes consumed so far (our copy of the shared tail) */
    uint64_t sleep;
    uint64_t signalled;
} Reader;

static int
Reader_init(Reader *self, PyObject *args, PyObject *kwds)
{
    if (ring_init((Ring *)self, "RingReader", args, kwds) < 0)
        return -1;
    self->tail = 0;
    self->sleep = 0;
    self->signalled = 0;
    return 0;
}

static PyObject *
Reader_pending(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    uint64_t head = __atomic_load_n(&counters(&self->m)[W_HEAD], __ATOMIC_RELAXED);
    return PyBool_FromLong(head != self->tail);
}

/* A writable memoryview of a copy of n bytes at p. */
static PyObject *
copied_view(const char *p, Py_ssize_t n)
{
    PyObject *ba = PyByteArray_FromStringAndSize(p, n);
    if (ba == NULL)
        return NULL;
    PyObject *view = PyMemoryView_FromObject(ba);
    Py_DECREF(ba);
    return view;
}

/* Calls f(args...) and returns its truth: 1, 0, or -1 with an exception set. */
static int
call_truth(PyObject *f, PyObject *const *args, Py_ssize_t nargs)
{
    PyObject *r = PyObject_Vectorcall(f, args, (size_t)nargs, NULL);
    if (r == NULL)
        return -1;
    int t = PyObject_IsTrue(r);
    Py_DECREF(r);
    return t;
}

/* deliver_inline(conn_id, [view]) or, without one, deliver(Kind.DATA, conn_id, [view]) */
static int
deliver_one_inline(PyObject *deliver, PyObject *deliver_inline, uint64_t conn_id,
                   const char *p, Py_ssize_t n)
{
    PyObject *view = copied_view(p, n);
    if (view == NULL)
        return -1;
    PyObject *frames = PyList_New(1);
    if (frames == NULL) {
        Py_DECREF(view);
        return -1;
    }
    PyList_SET_ITEM(frames, 0, view);
    PyObject *cid = PyLong_FromUnsignedLongLong(conn_id);
    if (cid == NULL) {
        Py_DECREF(frames);
        return -1;
    }
    int t;
    if (deliver_inline != Py_None) {
        PyObject *args[2] = {cid, frames};
        t = call_truth(deliver_inline, args, 2);
    }
    else {
        PyObject *args[3] = {KindData, cid, frames};
        t = call_truth(deliver, args, 3);
    }
    Py_DECREF(cid);
    Py_DECREF(frames);
    return t;
}

static PyObject *
Reader_drain(Reader *self, PyObject *args, PyObject *kwds)
{
    static char *kwlist[] = {"deliver", "deliver_inline", "deliver_segment", "max_frames", NULL};
    PyObject *deliver, *deliver_inline = Py_None, *deliver_segment = Py_None;
    Py_ssize_t max_frames = 1 << 16; /* _wire.DEFAULT_MAX_FRAMES */
    if (!PyArg_ParseTupleAndKeywords(args, kwds, "O|OO$n", kwlist, &deliver, &deliver_inline,
                                     &deliver_segment, &max_frames))
        return NULL;
    if (mapping_usable(&self->m) < 0)
        return NULL;
    Mapping *m = &self->m;
    uint64_t *c = counters(m);
    const char *base = (const char *)m->buf.buf;
    const uint64_t cap = m->capacity, mask = m->mask;
    uint64_t tail = self->tail;
    uint64_t head = LOAD(&c[W_HEAD]);
    if (head == tail)
        return PyLong_FromLong(0);
    uint64_t avail = head - tail;
    if (head < tail || avail > cap || (avail & 7)) {
        PyErr_Format(RingError, "producer head is %lld bytes from tail", (long long)(head - tail));
        return NULL;
    }
    long count = 0;
    int failed = 0;
    while (tail != head) {
        uint64_t pos = tail & mask;
        const char *rec = base + DATA_OFF + pos;
        if (cap - pos >= ONE_SIZE && head - tail >= ONE_SIZE) {
            uint32_t rec_len = rd32(rec), magic = rd32(rec + 4);
            unsigned char kind_no = (unsigned char)rec[8];
            uint32_t nframes = rd32(rec + 12);
            uint64_t conn_id = rd64(rec + 16), length = rd64(rec + 24);
            /* length <= cap first: the sums below must not wrap (Python's ints do not). */
            if (magic == REC_MAGIC && kind_no == KIND_DATA && nframes == 1 && length <= cap &&
                (uint64_t)rec_len == ONE_SIZE + length) {
                /* Fast path: a DATA record of one inline frame. */
                uint64_t size = ((uint64_t)rec_len + 7) & ~(uint64_t)7;
                if (size > cap - pos || size > head - tail) {
                    PyErr_Format(RingError, "record length %u at %llu out of bounds", rec_len,
                                 (unsigned long long)pos);
                    failed = 1;
                    break;
                }
                tail += size;
                count++;
                int t = deliver_one_inline(deliver, deliver_inline, conn_id, rec + ONE_SIZE,
                                           (Py_ssize_t)length);
                if (t < 0) {
                    failed = 1;
                    break;
                }
                if (!t || !m->has_buf) /* stopped, or released by the callback */
                    break;
                continue;
            }
            if (deliver_segment != Py_None && magic == REC_MAGIC && kind_no == KIND_DATA) {
                if (nframes == 1 && (length & OUT_OF_LINE) && rec_len == ONE_SEG_SIZE &&
                    rec_len <= cap - pos && rec_len <= head - tail) {
                    /* Fast path: a DATA record of one frame held in a segment. */
                    uint64_t seg_id = rd64(rec + ONE_SIZE), seg_off = rd64(rec + ONE_SIZE + 8);
                    tail += ONE_SEG_SIZE;
                    count++;
                    PyObject *a[5] = {PyLong_FromUnsignedLongLong(conn_id), Py_None,
                                      PyLong_FromUnsignedLongLong(seg_id),
                                      PyLong_FromUnsignedLongLong(seg_off),
                                      PyLong_FromUnsignedLongLong(length & ~OUT_OF_LINE)};
                    int t = -1;
                    if (a[0] && a[2] && a[3] && a[4])
                        t = call_truth(deliver_segment, a, 5);
                    Py_XDECREF(a[0]);
                    Py_XDECREF(a[2]);
                    Py_XDECREF(a[3]);
                    Py_XDECREF(a[4]);
                    if (t < 0) {
                        failed = 1;
                        break;
                    }
                    if (!t || !m->has_buf) /* stopped, or released by the callback */
                        break;
                    continue;
                }
                if (nframes == 2 && length <= cap &&
                    (uint64_t)rec_len == ONE_SIZE + 8 + length + SEGREF_SIZE) {
                    /* Fast path: an inline frame, then one held in a segment. */
                    uint64_t size = ((uint64_t)rec_len + 7) & ~(uint64_t)7;
                    if (size > cap - pos || size > head - tail) {
                        PyErr_Format(RingError, "record length %u at %llu out of bounds", rec_len,
                                     (unsigned long long)pos);
                        failed = 1;
                        break;
                    }
                    uint64_t second = rd64(rec + ONE_SIZE);
                    if (second & OUT_OF_LINE) {
                        const char *p = rec + ONE_SIZE + 8;
                        uint64_t seg_id = rd64(p + length), seg_off = rd64(p + length + 8);
                        tail += size;
                        count++;
                        PyObject *a[5] = {PyLong_FromUnsignedLongLong(conn_id),
                                          copied_view(p, (Py_ssize_t)length),
                                          PyLong_FromUnsignedLongLong(seg_id),
                                          PyLong_FromUnsignedLongLong(seg_off),
                                          PyLong_FromUnsignedLongLong(second & ~OUT_OF_LINE)};
                        int t = -1;
                        if (a[0] && a[1] && a[2] && a[3] && a[4])
                            t = call_truth(deliver_segment, a, 5);
                        for (int i = 0; i < 5; i++)
                            Py_XDECREF(a[i]);
                        if (t < 0) {
                            failed = 1;
                            break;
                        }
                        if (!t || !m->has_buf) /* stopped, or released by the callback */
                            break;
                        continue;
                    }
                }
            }
        }
        /* The general path: a wrap marker, or any record, checked field by field. */
        uint32_t rec_len = rd32(rec), magic = rd32(rec + 4);
        if (magic == WRAP_MAGIC) {
            if (rec_len != cap - pos || rec_len > head - tail) {
                PyErr_Format(RingError, "wrap marker of %u bytes at %llu", rec_len,
                             (unsigned long long)pos);
                failed = 1;
                break;
            }
            tail += rec_len;
            continue;
        }
        if (magic != REC_MAGIC) {
            PyErr_Format(RingError, "bad record magic 0x%x at %llu", (unsigned int)magic, (unsigned long long)pos);
            failed = 1;
            break;
        }
        uint64_t size = ((uint64_t)rec_len + 7) & ~(uint64_t)7;
        if (rec_len < REC_SIZE || size > cap - pos || size > head - tail) {
            PyErr_Format(RingError, "record length %u at %llu out of bounds", rec_len,
                         (unsigned long long)pos);
            failed = 1;
            break;
        }
        unsigned char kind_no = (unsigned char)rec[8];
        uint32_t nframes = rd32(rec + 12);
        uint64_t conn_id = rd64(rec + 16);
        PyObject *kind_key = PyLong_FromLong(kind_no);
        if (kind_key == NULL) {
            failed = 1;
            break;
        }
        PyObject *kind = PyDict_GetItemWithError(Kinds, kind_key); /* borrowed */
        Py_DECREF(kind_key);
        if (kind == NULL) {
            if (!PyErr_Occurred())
                PyErr_Format(RingError, "unknown message kind %d", (int)kind_no);
            failed = 1;
            break;
        }
        const char *end = rec + rec_len;
        const char *p = rec + REC_SIZE;
        PyObject *frames = PyList_New(0);
        if (frames == NULL) {
            failed = 1;
            break;
        }
        int bad = 0;
        if (nframes) {
            if (kind != KindData) {
                PyObject *name = PyObject_GetAttrString(kind, "name");
                if (name != NULL) {
                    PyErr_Format(RingError, "control message %U carries frames", name);
                    Py_DECREF(name);
                }
                bad = 1;
            }
            else if ((Py_ssize_t)nframes > max_frames ||
                     8 * (uint64_t)nframes > (uint64_t)(end - p)) {
                PyErr_Format(RingError, "record claims %u frames", nframes);
                bad = 1;
            }
            const char *lens = p;
            p += 8 * (uint64_t)nframes;
            for (uint32_t i = 0; !bad && i < nframes; i++) {
                uint64_t length = rd64(lens + 8 * (uint64_t)i);
                PyObject *frame;
                if (length & OUT_OF_LINE) {
                    if (p + SEGREF_SIZE > end) {
                        PyErr_SetString(RingError, "segment reference beyond the record");
                        bad = 1;
                        break;
                    }
                    frame = Py_BuildValue("(KKK)", (unsigned long long)rd64(p),
                                          (unsigned long long)rd64(p + 8),
                                          (unsigned long long)(length & ~OUT_OF_LINE));
                    p += SEGREF_SIZE;
                }
                else {
                    if (length > (uint64_t)(end - p)) {
                        PyErr_Format(RingError, "frame of %llu bytes beyond the record",
                                     (unsigned long long)length);
                        bad = 1;
                        break;
                    }
                    frame = copied_view(p, (Py_ssize_t)length);
                    p += length;
                }
                if (frame == NULL || PyList_Append(frames, frame) < 0) {
                    Py_XDECREF(frame);
                    bad = 1;
                    break;
                }
                Py_DECREF(frame);
            }
        }
        if (!bad && p != end) {
            PyErr_Format(RingError, "record of %u bytes has %lld stray bytes", rec_len,
                         (long long)(end - p));
            bad = 1;
        }
        if (bad) {
            Py_DECREF(frames);
            failed = 1;
            break;
        }
        tail += size;
        count++;
        PyObject *cid = PyLong_FromUnsignedLongLong(conn_id);
        int t = -1;
        if (cid != NULL) {
            PyObject *a[3] = {kind, cid, frames};
            t = call_truth(deliver, a, 3);
            Py_DECREF(cid);
        }
        Py_DECREF(frames);
        if (t < 0) {
            failed = 1;
            break;
        }
        if (!t || !m->has_buf) /* stopped, or released by the callback */
            break;
    }
    /* What was delivered is consumed, whatever happened after it. */
    self->tail = tail;
    if (m->has_buf)
        STORE(&c[W_TAIL], tail);
    if (failed)
        return NULL;
    return PyLong_FromLong(count);
}

static PyObject *
Reader_producer_waiting(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    FENCE();
    uint64_t seq = __atomic_load_n(&counters(&self->m)[W_WAIT], __ATOMIC_RELAXED);
    if ((seq & 1) && seq != self->signalled) {
        self->signalled = seq;
        Py_RETURN_TRUE;
    }
    Py_RETURN_FALSE;
}

static PyObject *
Reader_sleep(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    uint64_t *c = counters(&self->m);
    self->sleep += 2;
    __atomic_store_n(&c[W_SLEEP], self->sleep - 1, __ATOMIC_RELAXED);
    FENCE();
    if (__atomic_load_n(&c[W_HEAD], __ATOMIC_RELAXED) != self->tail) {
        __atomic_store_n(&c[W_SLEEP], self->sleep, __ATOMIC_RELAXED);
        Py_RETURN_FALSE;
    }
    Py_RETURN_TRUE;
}

static PyObject *
Reader_wake(Reader *self, PyObject *Py_UNUSED(ignored))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    uint64_t *c = counters(&self->m);
    if (__atomic_load_n(&c[W_SLEEP], __ATOMIC_RELAXED) != self->sleep)
        __atomic_store_n(&c[W_SLEEP], self->sleep, __ATOMIC_RELAXED);
    Py_RETURN_NONE;
}

static PyObject *
Reader_get_asleep(Reader *self, void *Py_UNUSED(closure))
{
    if (mapping_usable(&self->m) < 0)
        return NULL;
    uint64_t seq = __atomic_load_n(&counters(&self->m)[W_SLEEP], __ATOMIC_RELAXED);
    return PyBool_FromLong(seq != self->sleep);
}

static PyMethodDef Reader_methods[] = {
    {"pending", (PyCFunction)Reader_pending, METH_NOARGS, NULL},
    {"drain", (PyCFunction)(void (*)(void))Reader_drain, METH_VARARGS | METH_KEYWORDS, NULL},
    {"producer_waiting", (PyCFunction)Reader_producer_waiting, METH_NOARGS, NULL},
    {"sleep", (PyCFunction)Reader_sleep, METH_NOARGS, NULL},
    {"wake", (PyCFunction)Reader_wake, METH_NOARGS, NULL},
    {"release", (PyCFunction)Ring_release, METH_NOARGS, NULL},
    {NULL}};

static PyMemberDef Reader_members[] = {
    {"mm", T_OBJECT, offsetof(Reader, m.mm), READONLY, NULL},
    {"words", T_OBJECT, offsetof(Reader, m.words), READONLY, NULL},
    {"tail", T_ULONGLONG, offsetof(Reader, tail), READONLY, NULL},
    {NULL}};

static PyGetSetDef Reader_getset[] = {
    {"asleep", (getter)Reader_get_asleep, NULL, NULL, NULL},
    {"capacity", (getter)Ring_get_capacity, NULL, NULL, NULL},
    {NULL}};

static PyTypeObject ReaderType = {
    PyVarObject_HEAD_INIT(NULL, 0).tp_name = "hpcproc.transports._ring_accel.RingReader",
    .tp_basicsize = sizeof(Reader),
    .tp_flags = Py_TPFLAGS_DEFAULT,
    .tp_doc = "The consumer side of a ring (see _shm_ring.RingReader).",
    .tp_new = PyType_GenericNew,
    .tp_init = (initproc)Reader_init,
    .tp_dealloc = (destructor)Ring_dealloc,
    .tp_methods = Reader_methods,
    .tp_members = Reader_members,
    .tp_getset = Reader_getset,
};

/* ------------------------------------------------------------------ module */

static PyObject *
accel_init(PyObject *Py_UNUSED(module), PyObject *args)
{
    PyObject *error, *kinds, *data;
    if (!PyArg_ParseTuple(args, "OO!O", &error, &PyDict_Type, &kinds, &data))
        return NULL;
    if (!PyType_Check(error) || !PyType_IsSubtype((PyTypeObject *)error,
                                                  (PyTypeObject *)PyExc_Exception)) {
        PyErr_SetString(PyExc_TypeError, "init(RingError, kinds, Kind.DATA)");
        return NULL;
    }
    Py_INCREF(error);
    Py_XSETREF(RingError, error);
    Py_INCREF(kinds);
    Py_XSETREF(Kinds, kinds);
    Py_INCREF(data);
    Py_XSETREF(KindData, data);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"init", accel_init, METH_VARARGS,
     "init(RingError, kinds, Kind.DATA): the Python objects the types raise and pass on."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_ring_accel",
    "The shm transport's ring in C (see _shm_ring.py, which stays the reference).", -1,
    module_methods};

PyMODINIT_FUNC
PyInit__ring_accel(void)
{
    if (PyType_Ready(&WriterType) < 0 || PyType_Ready(&ReaderType) < 0)
        return NULL;
    PyObject *mod = PyModule_Create(&module);
    if (mod == NULL)
        return NULL;
    Py_INCREF(&WriterType);
    Py_INCREF(&ReaderType);
    if (PyModule_AddObject(mod, "RingWriter", (PyObject *)&WriterType) < 0 ||
        PyModule_AddObject(mod, "RingReader", (PyObject *)&ReaderType) < 0) {
        Py_DECREF(mod);
        return NULL;
    }
    return mod;
}
