/* The compact message format in C: the writer that serialize uses for small messages
 * of plain data, and the reader every received message goes through. The format, what
 * it takes and what it refuses are specified in hpcproc/_compact.py, whose pure-Python
 * encode and decode are the reference (the tests compare this writer's bytes with
 * them) and the reader of nodes built without this module.
 *
 * Optional: built at install where a compiler exists; HPCPROC_PICKLE_ACCEL=0, or a
 * build without it, leaves serialize writing pickles, which every node reads alike.
 *
 * serialize(obj) -> [frame] in the compact format, or fallback(obj) (pickle) where the
 * format does not take obj. loads(frame) -> the message: the compact reader for a
 * frame starting with MAGIC, pickle_loads(frame) for any other; loads_frames(frames)
 * for a compact frame followed by the frames of its large bytes and arrays.
 *
 * While writing, only exact built-in types, pids and envelopes (whose attributes are
 * slots) and numpy arrays (whose dtype and buffer numpy gives in C) are taken; numpy's
 * types are fetched through arrays_hook before a walk that met the first array is
 * done again, and the memoryviews of out-of-band arrays are made once the walk is
 * over. Python code could run during a walk only through the garbage collector, were
 * numpy to allocate a tracked object while it hands out a dtype, hashes one or exports
 * a buffer (numpy 2.4 was not seen to: a gc callback with threshold 1 never ran during
 * a walk with a dtype not numpy's own; nothing promises it), and a finalizer could then
 * change a list or dict being written: so the walk holds what it writes, and gives up
 * (pickle then) where a container's size changed. While reading: NodeId(address) the
 * first time a node's address is seen, ChanMessage's and numpy's constructors, and
 * arrays_hook for the first array.
 *
 * Why not a library: msgpack cannot tell a tuple from a list both ways and needs a
 * Python callback per pid (its ext types); marshal has no way to carry a pid, and its
 * reader is not meant for untrusted bytes. Pickle is what this replaces for the small
 * messages.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

#include "_accel_pid.h"

#define MAGIC 0xC5
#define MAX_DEPTH 32
#define MAX_CONTAINERS 64
#define MAX_NDIM 32
#define MAX_LARGE 64

static PyObject *PidType = NULL;
static PyObject *NodeIdType = NULL;
static PyObject *Interned = NULL;  /* address bytes -> NodeId */
static PyObject *ChanType = NULL;  /* ChanMessage */
static PyObject *Error = NULL;     /* SerializationError */
static PyObject *Fallback = NULL;  /* obj -> frames (pickle) */
static PyObject *PickleLoads = NULL;
static Py_ssize_t MaxBytes = 0;    /* bytes this long or longer: not compact */
static Py_ssize_t MaxFrame = 0;    /* frames longer than this: not compact */
static PyObject *KeyName = NULL, *PortName = NULL, *PayloadName = NULL;

/* Arrays: numpy's types, fetched from arrays_hook when the first array is met (hpcproc
 * does not import numpy before a message needs it). */
static PyObject *ArraysHook = NULL;  /* () -> (numpy.ndarray, dtypes by code) */
static PyObject *ArrayType = NULL;   /* numpy.ndarray, or NULL until fetched */
static PyObject *Dtypes = NULL;      /* tuple: the dtype of each code */
static PyObject *DtypeCodes = NULL;  /* dict: dtype -> code, for dtypes equal to one */
static Py_ssize_t Itemsizes[256];
static PyObject *DtypeName = NULL, *MetadataName = NULL, *CastName = NULL, *ByteFormat = NULL;

/* One-entry caches: most pids of a stream of messages name one node. */
static PyObject *EncNode = NULL, *EncKey = NULL; /* NodeId -> its address bytes */
static PyObject *DecKey = NULL, *DecNode = NULL; /* address bytes -> NodeId */

/* ------------------------------------------------------------------ writing */

typedef struct {
    char *buf;
    Py_ssize_t len, cap;
    int heap;
    int ncontainers;
    PyObject *containers[MAX_CONTAINERS];
    int frames;          /* whether large bytes and arrays may be frames of their own */
    int need_arrays;     /* met an ndarray before numpy's types were fetched */
    int nlarge;
    PyObject *large[MAX_LARGE]; /* the values of frames of their own, in order (borrowed) */
    char stack[512];
} Writer;

enum { ENC_OK = 0, ENC_SKIP = 1, ENC_ERROR = -1 };

/* Room for n more bytes: ENC_OK, ENC_SKIP past MaxFrame (the frame would be too large
 * for this format: pickle writes a repeated value once, this format every time),
 * ENC_ERROR out of memory. */
static int
w_reserve(Writer *w, Py_ssize_t n)
{
    if (n > MaxFrame - w->len)
        return ENC_SKIP;
    if (w->cap - w->len >= n)
        return ENC_OK;
    Py_ssize_t cap = w->cap * 2;
    if (cap < w->len + n)
        cap = w->len + n;
    char *buf;
    if (w->heap) {
        buf = PyMem_Realloc(w->buf, (size_t)cap);
    }
    else {
        buf = PyMem_Malloc((size_t)cap);
        if (buf != NULL)
            memcpy(buf, w->buf, (size_t)w->len);
    }
    if (buf == NULL) {
        PyErr_NoMemory();
        return ENC_ERROR;
    }
    w->buf = buf;
    w->cap = cap;
    w->heap = 1;
    return ENC_OK;
}

static inline void
put_u32(char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (char)(v >> (8 * i));
}

static inline void
put_u64(char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (char)(v >> (8 * i));
}

static int
w_count(Writer *w, char tag, Py_ssize_t n)
{
    int r;
    if ((uint64_t)n > UINT32_MAX)
        return ENC_SKIP;
    if ((r = w_reserve(w, 5)) != ENC_OK)
        return r;
    char *p = w->buf + w->len;
    p[0] = tag;
    put_u32(p + 1, (uint32_t)n);
    w->len += 5;
    return ENC_OK;
}

/* tag, u32 length, the bytes */
static int
w_sized(Writer *w, char tag, const char *data, Py_ssize_t n)
{
    int r;
    if ((r = w_count(w, tag, n)) != ENC_OK || (r = w_reserve(w, n)) != ENC_OK)
        return r;
    memcpy(w->buf + w->len, data, (size_t)n);
    w->len += n;
    return ENC_OK;
}

static int
w_tag_u64(Writer *w, char tag, uint64_t v)
{
    int r;
    if ((r = w_reserve(w, 9)) != ENC_OK)
        return r;
    char *p = w->buf + w->len;
    p[0] = tag;
    put_u64(p + 1, v);
    w->len += 9;
    return ENC_OK;
}

/* A mutable container (list, dict, channel envelope): refused when it appeared before
 * (pickle keeps the sharing). */
static int
w_container(Writer *w, PyObject *obj)
{
    for (int i = 0; i < w->ncontainers; i++) {
        if (w->containers[i] == obj)
            return ENC_SKIP;
    }
    if (w->ncontainers >= MAX_CONTAINERS)
        return ENC_SKIP;
    w->containers[w->ncontainers++] = obj;
    return ENC_OK;
}

/* The int64 value of an exact int: ENC_OK, or ENC_SKIP beyond 64 bits. */
static int
int64_of(PyObject *obj, long long *out)
{
    int overflow;
    long long v = PyLong_AsLongLongAndOverflow(obj, &overflow);
    if (overflow)
        return ENC_SKIP;
    if (v == -1 && PyErr_Occurred())
        return ENC_ERROR;
    *out = v;
    return ENC_OK;
}

static int w_value(Writer *w, PyObject *obj, int depth);

static int
w_pid(Writer *w, PyObject *pid)
{
    if (PyTuple_GET_SIZE(pid) != 2)
        return ENC_SKIP;
    PyObject *node = PyTuple_GET_ITEM(pid, 0), *lid = PyTuple_GET_ITEM(pid, 1);
    if ((PyObject *)Py_TYPE(node) != NodeIdType || !PyLong_CheckExact(lid))
        return ENC_SKIP;
    long long n;
    int r = int64_of(lid, &n);
    if (r != ENC_OK)
        return r;
    if (node != EncNode) {
        PyObject *key = PyObject_GetAttr(node, KeyName);
        if (key == NULL)
            return ENC_ERROR;
        if (!PyBytes_CheckExact(key)) {
            Py_DECREF(key);
            return ENC_SKIP;
        }
        Py_INCREF(node);
        Py_XSETREF(EncNode, node);
        Py_XSETREF(EncKey, key);
    }
    Py_ssize_t klen = PyBytes_GET_SIZE(EncKey);
    if ((r = w_sized(w, 'p', PyBytes_AS_STRING(EncKey), klen)) != ENC_OK)
        return r;
    if ((r = w_reserve(w, 8)) != ENC_OK)
        return r;
    put_u64(w->buf + w->len, (uint64_t)n);
    w->len += 8;
    return ENC_OK;
}

/* After a failed attribute read: ENC_SKIP for a missing attribute, else ENC_ERROR. */
static int
not_set(void)
{
    if (!PyErr_ExceptionMatches(PyExc_AttributeError))
        return ENC_ERROR;
    PyErr_Clear();
    return ENC_SKIP;
}

static int
w_chan(Writer *w, PyObject *msg, int depth)
{
    /* An envelope is mutable too: one that appears twice goes by pickle. */
    int r = w_container(w, msg);
    if (r != ENC_OK)
        return r;
    PyObject *port = PyObject_GetAttr(msg, PortName);
    if (port == NULL)
        return not_set(); /* an envelope without its fields: pickle reports it */
    long long n;
    r = PyLong_CheckExact(port) ? int64_of(port, &n) : ENC_SKIP;
    Py_DECREF(port);
    if (r != ENC_OK)
        return r;
    if ((r = w_tag_u64(w, 'c', (uint64_t)n)) != ENC_OK)
        return r;
    PyObject *payload = PyObject_GetAttr(msg, PayloadName);
    if (payload == NULL)
        return not_set();
    r = w_value(w, payload, depth + 1);
    Py_DECREF(payload);
    return r;
}

/* The code of an array's dtype: 0..255, or -1 (ENC_SKIP: not one of the table's, or
 * with metadata) or -2 (ENC_ERROR). */
static int
dtype_code(PyObject *obj)
{
    PyObject *dtype = PyObject_GetAttr(obj, DtypeName);
    if (dtype == NULL)
        return -2;
    Py_ssize_t n = PyTuple_GET_SIZE(Dtypes);
    for (Py_ssize_t i = 0; i < n; i++) {
        if (PyTuple_GET_ITEM(Dtypes, i) == dtype) { /* the common case: numpy's own */
            Py_DECREF(dtype);
            return (int)i;
        }
    }
    /* An equal dtype ("q" for "<i8", or one rebuilt by pickle), without metadata. */
    int code = -1;
    PyObject *found = PyDict_GetItemWithError(DtypeCodes, dtype); /* borrowed */
    if (found != NULL) {
        PyObject *meta = PyObject_GetAttr(dtype, MetadataName);
        if (meta == NULL)
            code = -2;
        else if (meta == Py_None)
            code = (int)PyLong_AsLong(found);
        Py_XDECREF(meta);
    }
    else if (PyErr_Occurred()) {
        code = -2;
    }
    Py_DECREF(dtype);
    return code;
}

/* obj (a large bytes or array, its tag written) as the message's next frame: ENC_OK,
 * or ENC_SKIP where this walk makes one frame only or MAX_LARGE are taken already. */
static int
w_large(Writer *w, PyObject *obj)
{
    if (!w->frames || w->nlarge >= MAX_LARGE)
        return ENC_SKIP;
    w->large[w->nlarge++] = obj;
    return ENC_OK;
}

static int
w_array(Writer *w, PyObject *obj)
{
    int r = w_container(w, obj);
    if (r != ENC_OK)
        return r;
    int code = dtype_code(obj);
    if (code < 0)
        return code == -1 ? ENC_SKIP : ENC_ERROR;
    Py_buffer view;
    if (PyObject_GetBuffer(obj, &view, PyBUF_C_CONTIGUOUS) < 0) {
        if (!PyErr_ExceptionMatches(PyExc_ValueError) &&
            !PyErr_ExceptionMatches(PyExc_BufferError))
            return ENC_ERROR;
        PyErr_Clear(); /* not C-contiguous: pickle copies it */
        return ENC_SKIP;
    }
    if (view.ndim > MAX_NDIM) {
        PyBuffer_Release(&view);
        return ENC_SKIP;
    }
    /* In this frame if small and it fits (the same test as the Python writer's). */
    Py_ssize_t head = 3 + 8 * (Py_ssize_t)view.ndim;
    int inline_ = view.len < MaxBytes && w->len + head + view.len <= MaxFrame;
    Py_ssize_t size = head + (inline_ ? view.len : 0);
    if ((r = w_reserve(w, size)) == ENC_OK) {
        char *p = w->buf + w->len;
        p[0] = inline_ ? 'a' : 'A';
        p[1] = (char)code;
        p[2] = (char)view.ndim;
        p += 3;
        for (int i = 0; i < view.ndim; i++, p += 8)
            put_u64(p, (uint64_t)view.shape[i]);
        if (inline_)
            memcpy(p, view.buf, (size_t)view.len);
        w->len += size;
        if (!inline_)
            r = w_large(w, obj);
    }
    PyBuffer_Release(&view);
    return r;
}

static int
w_value(Writer *w, PyObject *obj, int depth)
{
    if (depth > MAX_DEPTH)
        return ENC_SKIP;
    PyTypeObject *t = Py_TYPE(obj);
    int r;
    if (obj == Py_None || obj == Py_True || obj == Py_False) {
        if ((r = w_reserve(w, 1)) != ENC_OK)
            return r;
        w->buf[w->len++] = obj == Py_None ? 'N' : (obj == Py_True ? 'T' : 'F');
        return ENC_OK;
    }
    if (t == &PyLong_Type) {
        long long v;
        if ((r = int64_of(obj, &v)) != ENC_OK)
            return r;
        if (v >= 0 && v <= 255) {
            if ((r = w_reserve(w, 2)) != ENC_OK)
                return r;
            w->buf[w->len] = 'b';
            w->buf[w->len + 1] = (char)v;
            w->len += 2;
            return ENC_OK;
        }
        return w_tag_u64(w, 'i', (uint64_t)v);
    }
    if (t == &PyBytes_Type) {
        Py_ssize_t n = PyBytes_GET_SIZE(obj);
        if (n < MaxBytes && w->len + 5 + n <= MaxFrame)
            return w_sized(w, 'y', PyBytes_AS_STRING(obj), n);
        if ((r = w_reserve(w, 1)) != ENC_OK)
            return r;
        w->buf[w->len++] = 'Y';
        return w_large(w, obj);
    }
    if (t == &PyUnicode_Type) {
        Py_ssize_t n;
        const char *s = PyUnicode_AsUTF8AndSize(obj, &n);
        if (s == NULL) {
            if (!PyErr_ExceptionMatches(PyExc_UnicodeEncodeError))
                return ENC_ERROR;
            PyErr_Clear(); /* a lone surrogate: pickle writes it */
            return ENC_SKIP;
        }
        return w_sized(w, 's', s, n);
    }
    if (t == &PyTuple_Type || t == &PyList_Type) {
        if (t == &PyList_Type && (r = w_container(w, obj)) != ENC_OK)
            return r;
        Py_ssize_t n = PySequence_Fast_GET_SIZE(obj);
        if ((r = w_count(w, t == &PyTuple_Type ? 't' : 'l', n)) != ENC_OK)
            return r;
        for (Py_ssize_t i = 0; i < n; i++) {
            /* Held, and the size read again: see "while writing" at the top. */
            if (PySequence_Fast_GET_SIZE(obj) != n)
                return ENC_SKIP;
            PyObject *item = Py_NewRef(PySequence_Fast_GET_ITEM(obj, i));
            r = w_value(w, item, depth + 1);
            Py_DECREF(item);
            if (r != ENC_OK)
                return r;
        }
        return PySequence_Fast_GET_SIZE(obj) == n ? ENC_OK : ENC_SKIP;
    }
    if ((PyObject *)t == PidType)
        return w_pid(w, obj);
    if (t == &PyFloat_Type) {
        double d = PyFloat_AS_DOUBLE(obj);
        uint64_t bits;
        memcpy(&bits, &d, 8);
        return w_tag_u64(w, 'f', bits);
    }
    if (t == &PyDict_Type) {
        if ((r = w_container(w, obj)) != ENC_OK)
            return r;
        Py_ssize_t n = PyDict_GET_SIZE(obj), seen = 0;
        if ((r = w_count(w, 'd', n)) != ENC_OK)
            return r;
        Py_ssize_t pos = 0;
        PyObject *key, *value;
        while (PyDict_Next(obj, &pos, &key, &value)) {
            /* Held, and the items counted: see "while writing" at the top. */
            Py_INCREF(key);
            Py_INCREF(value);
            if ((r = w_value(w, key, depth + 1)) == ENC_OK)
                r = w_value(w, value, depth + 1);
            Py_DECREF(key);
            Py_DECREF(value);
            if (r != ENC_OK)
                return r;
            seen++;
        }
        return seen == n && PyDict_GET_SIZE(obj) == n ? ENC_OK : ENC_SKIP;
    }
    if ((PyObject *)t == ChanType)
        return w_chan(w, obj, depth);
    if ((PyObject *)t == ArrayType)
        return w_array(w, obj);
    if (ArrayType == NULL && strcmp(t->tp_name, "numpy.ndarray") == 0)
        w->need_arrays = 1; /* (the walk stops here; encode_frame fetches and retries) */
    return ENC_SKIP;
}

/* numpy's types from ArraysHook, once: 0, or -1 with an exception set. */
static int
load_arrays(void)
{
    if (ArrayType != NULL)
        return 0;
    PyObject *got = PyObject_CallNoArgs(ArraysHook);
    if (got == NULL)
        return -1;
    PyObject *type, *dtypes;
    if (!PyTuple_Check(got) ||
        !PyArg_ParseTuple(got, "O!O!:arrays_hook", &PyType_Type, &type, &PyTuple_Type,
                          &dtypes) ||
        PyTuple_GET_SIZE(dtypes) > 256) {
        if (!PyErr_Occurred())
            PyErr_SetString(PyExc_TypeError,
                            "arrays_hook must return (ndarray, a tuple of at most 256 dtypes)");
        Py_DECREF(got);
        return -1;
    }
    PyObject *codes = PyDict_New();
    if (codes == NULL) {
        Py_DECREF(got);
        return -1;
    }
    for (Py_ssize_t i = 0; i < PyTuple_GET_SIZE(dtypes); i++) {
        PyObject *dtype = PyTuple_GET_ITEM(dtypes, i);
        PyObject *code = PyLong_FromSsize_t(i);
        PyObject *size = PyObject_GetAttrString(dtype, "itemsize");
        int failed = code == NULL || size == NULL || PyDict_SetItem(codes, dtype, code) < 0;
        Itemsizes[i] = failed ? 0 : PyLong_AsSsize_t(size);
        Py_XDECREF(code);
        Py_XDECREF(size);
        if (failed || Itemsizes[i] <= 0) {
            if (!PyErr_Occurred())
                PyErr_SetString(PyExc_ValueError, "arrays_hook: a dtype without an item size");
            Py_DECREF(codes);
            Py_DECREF(got);
            return -1;
        }
    }
    Py_XSETREF(Dtypes, Py_NewRef(dtypes));
    Py_XSETREF(DtypeCodes, codes);
    Py_XSETREF(ArrayType, Py_NewRef(type));
    Py_DECREF(got);
    return 0;
}

/* obj in the compact format: a list [frame, *out-of-band array frames] if frames is
 * set, else the frame alone (large arrays refused); or NULL: with an exception set on
 * error, without where the format does not take obj. */
static PyObject *
encode_frame(PyObject *obj, int frames)
{
    Writer w;
    int r;
    for (;;) {
        w.buf = w.stack;
        w.cap = sizeof(w.stack);
        w.heap = 0;
        w.ncontainers = 0;
        w.frames = frames;
        w.need_arrays = 0;
        w.nlarge = 0;
        w.buf[0] = (char)MAGIC;
        w.len = 1;
        r = w_value(&w, obj, 1);
        if (!(r == ENC_SKIP && w.need_arrays))
            break;
        if (w.heap)
            PyMem_Free(w.buf);
        if (load_arrays() < 0)
            return NULL;
    }
    PyObject *out = NULL;
    if (r == ENC_OK)
        out = PyBytes_FromStringAndSize(w.buf, w.len);
    if (w.heap)
        PyMem_Free(w.buf);
    if (out == NULL || !frames)
        return out;
    PyObject *list = PyList_New(1 + w.nlarge);
    if (list == NULL) {
        Py_DECREF(out);
        return NULL;
    }
    PyList_SET_ITEM(list, 0, out);
    for (int i = 0; i < w.nlarge; i++) {
        PyObject *value = w.large[i], *flat;
        if (PyBytes_CheckExact(value)) {
            flat = Py_NewRef(value);
        }
        else { /* an array: a flat view of its bytes, as pickle's PickleBuffer.raw() */
            PyObject *view = PyMemoryView_FromObject(value);
            flat = view == NULL ? NULL : PyObject_CallMethodOneArg(view, CastName, ByteFormat);
            Py_XDECREF(view);
        }
        if (flat == NULL) {
            Py_DECREF(list);
            return NULL;
        }
        PyList_SET_ITEM(list, 1 + i, flat);
    }
    return list;
}

static int
configured(void)
{
    if (PidType == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_compact_accel.configure() was not called");
        return 0;
    }
    return 1;
}

static PyObject *
accel_serialize(PyObject *Py_UNUSED(mod), PyObject *obj)
{
    if (!configured())
        return NULL;
    PyObject *frames = encode_frame(obj, 1);
    if (frames == NULL && !PyErr_Occurred())
        return PyObject_CallOneArg(Fallback, obj);
    return frames;
}

static PyObject *
accel_encode(PyObject *Py_UNUSED(mod), PyObject *obj)
{
    if (!configured())
        return NULL;
    PyObject *frame = encode_frame(obj, 0);
    if (frame == NULL && !PyErr_Occurred())
        Py_RETURN_NONE;
    return frame;
}

/* ------------------------------------------------------------------ reading */

typedef struct {
    const unsigned char *p, *end, *start;
    Py_ssize_t need; /* bytes the open containers' items still to come take at least */
    PyObject *frames; /* the message's frames (a tuple), or NULL: header only */
    Py_ssize_t next;  /* the next array frame's index in frames */
} Reader;

static PyObject *
malformed(Reader *r, const char *what)
{
    PyErr_Format(Error, "cannot deserialize message: compact message %s (at byte %zd)", what,
                 (Py_ssize_t)(r->p - r->start));
    return NULL;
}

static inline uint32_t
get_u32(const unsigned char *p)
{
    return (uint32_t)p[0] | (uint32_t)p[1] << 8 | (uint32_t)p[2] << 16 | (uint32_t)p[3] << 24;
}

static inline uint64_t
get_u64(const unsigned char *p)
{
    uint64_t v = 0;
    for (int i = 7; i >= 0; i--)
        v = v << 8 | p[i];
    return v;
}

/* A u32 count of items that take at least min_size bytes each. */
static int
r_count(Reader *r, Py_ssize_t min_size, Py_ssize_t *n)
{
    if (r->end - r->p < 4) {
        malformed(r, "is truncated");
        return -1;
    }
    uint32_t count = get_u32(r->p);
    r->p += 4;
    if ((uint64_t)count * (uint64_t)min_size + (uint64_t)r->need > (uint64_t)(r->end - r->p)) {
        malformed(r, "is truncated");
        return -1;
    }
    *n = (Py_ssize_t)count;
    return 0;
}

/* A u32 length followed by that many bytes: their start, or NULL (error set). */
static const unsigned char *
r_sized(Reader *r, Py_ssize_t *n)
{
    if (r_count(r, 1, n) < 0)
        return NULL;
    const unsigned char *s = r->p;
    r->p += *n;
    return s;
}

static PyObject *
node_of(const unsigned char *s, Py_ssize_t n)
{
    if (DecKey != NULL && PyBytes_GET_SIZE(DecKey) == n &&
        memcmp(PyBytes_AS_STRING(DecKey), s, (size_t)n) == 0) {
        Py_INCREF(DecNode);
        return DecNode;
    }
    PyObject *key = PyBytes_FromStringAndSize((const char *)s, n);
    if (key == NULL)
        return NULL;
    PyObject *node = PyDict_GetItemWithError(Interned, key); /* borrowed */
    if (node != NULL) {
        Py_INCREF(node);
    }
    else if (PyErr_Occurred() || (node = PyObject_CallOneArg(NodeIdType, key)) == NULL) {
        Py_DECREF(key);
        return NULL;
    }
    Py_INCREF(node);
    Py_XSETREF(DecNode, node);
    Py_XSETREF(DecKey, key);
    return node;
}

static PyObject *r_value(Reader *r, int depth);

static PyObject *
r_pid(Reader *r)
{
    Py_ssize_t n;
    const unsigned char *s = r_sized(r, &n);
    if (s == NULL)
        return NULL;
    if (r->end - r->p < 8)
        return malformed(r, "is truncated");
    PyObject *lid = PyLong_FromLongLong((long long)get_u64(r->p));
    r->p += 8;
    if (lid == NULL)
        return NULL;
    PyObject *node = node_of(s, n);
    if (node == NULL) {
        Py_DECREF(lid);
        return NULL;
    }
    PyObject *pid = hpcproc_new_pid(PidType, node, lid);
    Py_DECREF(node);
    Py_DECREF(lid);
    return pid;
}

/* The message's next frame (borrowed), its buffer in *view (to release); or NULL, an
 * exception set. */
static PyObject *
next_frame(Reader *r, Py_buffer *view)
{
    if (r->frames == NULL || r->next >= PyTuple_GET_SIZE(r->frames)) {
        malformed(r, "refers to a frame it did not come with");
        return NULL;
    }
    PyObject *frame = PyTuple_GET_ITEM(r->frames, r->next);
    if (PyObject_GetBuffer(frame, view, PyBUF_SIMPLE) < 0)
        return NULL;
    r->next++;
    return frame;
}

/* An array (tag 'a' if inline_, else 'A'), from its dtype code on. */
static PyObject *
r_array(Reader *r, int inline_)
{
    if (load_arrays() < 0)
        return NULL;
    if (r->end - r->p < 2)
        return malformed(r, "is truncated");
    unsigned int code = r->p[0], ndim = r->p[1];
    if (code >= (unsigned int)PyTuple_GET_SIZE(Dtypes))
        return malformed(r, "has an unknown array dtype code");
    if (ndim > MAX_NDIM)
        return malformed(r, "has an array of too many dimensions");
    r->p += 2;
    if (r->end - r->p < 8 * (Py_ssize_t)ndim)
        return malformed(r, "is truncated");
    PyObject *shape = PyTuple_New(ndim);
    if (shape == NULL)
        return NULL;
    uint64_t nbytes = (uint64_t)Itemsizes[code];
    for (unsigned int i = 0; i < ndim; i++, r->p += 8) {
        uint64_t n = get_u64(r->p);
        /* (The Python reader refuses the same: a dimension or a product past 63 bits.) */
        if (n >> 63 || __builtin_mul_overflow(nbytes, n, &nbytes) || nbytes >> 63) {
            Py_DECREF(shape);
            return malformed(r, "has an array too large to address");
        }
        PyObject *dim = PyLong_FromUnsignedLongLong(n);
        if (dim == NULL) {
            Py_DECREF(shape);
            return NULL;
        }
        PyTuple_SET_ITEM(shape, i, dim);
    }
    PyObject *dtype = PyTuple_GET_ITEM(Dtypes, code);
    PyObject *out = NULL;
    if (inline_) {
        if ((uint64_t)(r->end - r->p) < nbytes + (uint64_t)r->need) {
            Py_DECREF(shape);
            return malformed(r, "is truncated");
        }
        out = PyObject_CallFunctionObjArgs(ArrayType, shape, dtype, NULL);
        Py_buffer view;
        if (out != NULL && PyObject_GetBuffer(out, &view, PyBUF_WRITABLE | PyBUF_C_CONTIGUOUS) < 0)
            Py_CLEAR(out);
        if (out != NULL) {
            memcpy(view.buf, r->p, (size_t)nbytes);
            PyBuffer_Release(&view);
            r->p += nbytes;
        }
        Py_DECREF(shape);
        return out;
    }
    Py_buffer view;
    PyObject *frame = next_frame(r, &view);
    if (frame == NULL) {
        Py_DECREF(shape);
        return NULL;
    }
    Py_ssize_t len = view.len;
    PyBuffer_Release(&view);
    if ((uint64_t)len != nbytes) {
        Py_DECREF(shape);
        return malformed(r, "has an array frame whose length does not match its dtype and dimensions");
    }
    /* Over a PickleBuffer of the frame, which the array keeps as its base: given a
     * memoryview itself, numpy keeps the memoryview's exporter instead, or that
     * exporter's base array, and a transport that recycles the frame's buffer once
     * the frame's own object is gone (tcp's pool) would then reuse it under the array. */
    PyObject *held = PyPickleBuffer_FromObject(frame);
    if (held != NULL) {
        out = PyObject_CallFunctionObjArgs(ArrayType, shape, dtype, held, NULL);
        Py_DECREF(held);
    }
    Py_DECREF(shape);
    return out;
}

static PyObject *
r_value(Reader *r, int depth)
{
    if (depth > MAX_DEPTH)
        return malformed(r, "nests too deep");
    if (r->p >= r->end)
        return malformed(r, "is truncated");
    unsigned char tag = *r->p++;
    Py_ssize_t n;
    const unsigned char *s;
    switch (tag) {
    case 'N':
        Py_RETURN_NONE;
    case 'T':
        Py_RETURN_TRUE;
    case 'F':
        Py_RETURN_FALSE;
    case 'b':
        if (r->p >= r->end)
            return malformed(r, "is truncated");
        return PyLong_FromLong(*r->p++);
    case 'i':
    case 'f':
    case 'c': {
        if (r->end - r->p < 8)
            return malformed(r, "is truncated");
        uint64_t v = get_u64(r->p);
        r->p += 8;
        if (tag == 'i')
            return PyLong_FromLongLong((long long)v);
        if (tag == 'f') {
            double d;
            memcpy(&d, &v, 8);
            return PyFloat_FromDouble(d);
        }
        PyObject *payload = r_value(r, depth + 1);
        if (payload == NULL)
            return NULL;
        PyObject *port = PyLong_FromLongLong((long long)v);
        if (port == NULL) {
            Py_DECREF(payload);
            return NULL;
        }
        PyObject *msg = PyObject_CallFunctionObjArgs(ChanType, port, payload, NULL);
        Py_DECREF(port);
        Py_DECREF(payload);
        return msg;
    }
    case 'y':
        if ((s = r_sized(r, &n)) == NULL)
            return NULL;
        return PyBytes_FromStringAndSize((const char *)s, n);
    case 'Y': {
        Py_buffer view;
        if (next_frame(r, &view) == NULL)
            return NULL;
        PyObject *out = PyBytes_FromStringAndSize(view.buf, view.len);
        PyBuffer_Release(&view);
        return out;
    }
    case 's': {
        if ((s = r_sized(r, &n)) == NULL)
            return NULL;
        PyObject *str = PyUnicode_DecodeUTF8((const char *)s, n, NULL);
        if (str == NULL && PyErr_ExceptionMatches(PyExc_UnicodeDecodeError)) {
            PyErr_Clear();
            r->p = s;
            return malformed(r, "has a str that is not UTF-8");
        }
        return str;
    }
    case 't':
    case 'l': {
        if (r_count(r, 1, &n) < 0)
            return NULL;
        PyObject *out = tag == 't' ? PyTuple_New(n) : PyList_New(n);
        if (out == NULL)
            return NULL;
        Py_ssize_t saved = r->need;
        for (Py_ssize_t i = 0; i < n; i++) {
            r->need = saved + (n - 1 - i);
            PyObject *item = r_value(r, depth + 1);
            if (item == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            if (tag == 't')
                PyTuple_SET_ITEM(out, i, item);
            else
                PyList_SET_ITEM(out, i, item);
        }
        r->need = saved;
        return out;
    }
    case 'd': {
        if (r_count(r, 2, &n) < 0)
            return NULL;
        PyObject *out = PyDict_New();
        if (out == NULL)
            return NULL;
        Py_ssize_t saved = r->need;
        for (Py_ssize_t i = 0; i < n; i++) {
            r->need = saved + 1 + 2 * (n - 1 - i);
            PyObject *key = r_value(r, depth + 1);
            if (key == NULL) {
                Py_DECREF(out);
                return NULL;
            }
            r->need = saved + 2 * (n - 1 - i);
            PyObject *value = r_value(r, depth + 1);
            if (value == NULL) {
                Py_DECREF(key);
                Py_DECREF(out);
                return NULL;
            }
            int failed = PyDict_SetItem(out, key, value);
            Py_DECREF(key);
            Py_DECREF(value);
            if (failed) {
                Py_DECREF(out);
                if (PyErr_ExceptionMatches(PyExc_TypeError)) {
                    PyErr_Clear();
                    return malformed(r, "has an unhashable dict key");
                }
                return NULL;
            }
        }
        r->need = saved;
        return out;
    }
    case 'p':
        return r_pid(r);
    case 'a':
    case 'A':
        return r_array(r, tag == 'a');
    default:
        r->p--;
        return malformed(r, "has an unknown tag");
    }
}

/* The value of a compact frame; frames (or NULL) the message's frames, the frame
 * itself first. */
static PyObject *
decode_buffer(const unsigned char *data, Py_ssize_t len, PyObject *frames)
{
    Reader r = {data + 1, data + len, data, 0, frames, 1};
    PyObject *obj = r_value(&r, 1);
    if (obj != NULL && r.p != r.end) {
        Py_DECREF(obj);
        return malformed(&r, "has bytes after its value");
    }
    if (obj != NULL && frames != NULL && r.next != PyTuple_GET_SIZE(frames)) {
        Py_DECREF(obj);
        PyErr_Format(Error,
                     "cannot deserialize message: compact message came with %zd more frames "
                     "than its values refer to",
                     PyTuple_GET_SIZE(frames) - r.next);
        return NULL;
    }
    return obj;
}

/* The message of frame: a compact frame read here (frames: NULL, or a tuple of the
 * message's frames, frame first); any other by pickle_loads where pickles is set, else
 * refused. */
static PyObject *
read_frame(PyObject *frame, int pickles, PyObject *frames)
{
    if (!configured())
        return NULL;
    Py_buffer view;
    if (PyObject_GetBuffer(frame, &view, PyBUF_SIMPLE) < 0)
        return NULL;
    int compact = view.len > 0 && ((const unsigned char *)view.buf)[0] == MAGIC;
    PyObject *out = compact ? decode_buffer(view.buf, view.len, frames) : NULL;
    PyBuffer_Release(&view);
    if (compact)
        return out;
    if (pickles)
        return PyObject_CallOneArg(PickleLoads, frame);
    PyErr_SetString(Error, "cannot deserialize message: not a compact message");
    return NULL;
}

static PyObject *
accel_loads(PyObject *Py_UNUSED(mod), PyObject *frame)
{
    return read_frame(frame, 1, NULL);
}

static PyObject *
accel_decode(PyObject *Py_UNUSED(mod), PyObject *frame)
{
    return read_frame(frame, 0, NULL);
}

static PyObject *
accel_loads_frames(PyObject *Py_UNUSED(mod), PyObject *frames)
{
    if (!configured()) /* (before Error is used below) */
        return NULL;
    if (!PyList_Check(frames) && !PyTuple_Check(frames)) {
        PyErr_SetString(PyExc_TypeError, "loads_frames: expected a list or tuple of frames");
        return NULL;
    }
    if (PySequence_Fast_GET_SIZE(frames) == 0) {
        PyErr_SetString(Error, "cannot deserialize message: empty message");
        return NULL;
    }
    /* A tuple of its own: the constructors called while reading run Python code. */
    PyObject *held = PySequence_Tuple(frames);
    if (held == NULL)
        return NULL;
    PyObject *out = read_frame(PyTuple_GET_ITEM(held, 0), 0, held);
    Py_DECREF(held);
    return out;
}

static PyObject *
accel_configure(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *pid_type, *nodeid_type, *interned, *chan_type, *error, *fallback, *pickle_loads;
    PyObject *arrays_hook;
    Py_ssize_t max_bytes, max_frame, magic, max_depth, max_containers, max_ndim, max_large;
    if (!PyArg_ParseTuple(args, "O!O!O!O!O!OOOnnnnnnn:configure", &PyType_Type, &pid_type,
                          &PyType_Type, &nodeid_type, &PyDict_Type, &interned, &PyType_Type,
                          &chan_type, &PyType_Type, &error, &fallback, &pickle_loads,
                          &arrays_hook, &max_bytes, &max_frame, &magic, &max_depth,
                          &max_containers, &max_ndim, &max_large))
        return NULL;
    /* The format's constants are hpcproc/_compact.py's: a mismatch (a stale build)
     * would make the two writers disagree. */
    if (magic != MAGIC || max_depth != MAX_DEPTH || max_containers != MAX_CONTAINERS ||
        max_ndim != MAX_NDIM || max_large != MAX_LARGE) {
        PyErr_Format(PyExc_ValueError,
                     "configure: the compiled compact format (magic %d, depth %d, %d "
                     "containers, %d array dimensions, %d large values) is not "
                     "hpcproc._compact's (%zd, %zd, %zd, %zd, %zd): rebuild it (pip install -e .)",
                     MAGIC, MAX_DEPTH, MAX_CONTAINERS, MAX_NDIM, MAX_LARGE, magic, max_depth,
                     max_containers, max_ndim, max_large);
        return NULL;
    }
    if (!PyType_IsSubtype((PyTypeObject *)pid_type, &PyTuple_Type) ||
        !PyType_IsSubtype((PyTypeObject *)error, (PyTypeObject *)PyExc_Exception) ||
        !PyCallable_Check(fallback) || !PyCallable_Check(pickle_loads) ||
        !PyCallable_Check(arrays_hook) || max_bytes <= 0 || max_frame <= max_bytes) {
        PyErr_SetString(PyExc_ValueError,
                        "configure: expected Pid (a tuple subclass), NodeId, interned, "
                        "ChanMessage, an exception class, three callables, max_bytes > 0, "
                        "max_frame > max_bytes");
        return NULL;
    }
    if (KeyName == NULL) {
        if ((KeyName = PyUnicode_InternFromString("_key")) == NULL ||
            (PortName = PyUnicode_InternFromString("port_id")) == NULL ||
            (PayloadName = PyUnicode_InternFromString("payload")) == NULL ||
            (DtypeName = PyUnicode_InternFromString("dtype")) == NULL ||
            (MetadataName = PyUnicode_InternFromString("metadata")) == NULL ||
            (CastName = PyUnicode_InternFromString("cast")) == NULL ||
            (ByteFormat = PyUnicode_InternFromString("B")) == NULL)
            return NULL;
    }
    Py_XSETREF(PidType, Py_NewRef(pid_type));
    Py_XSETREF(NodeIdType, Py_NewRef(nodeid_type));
    Py_XSETREF(Interned, Py_NewRef(interned));
    Py_XSETREF(ChanType, Py_NewRef(chan_type));
    Py_XSETREF(Error, Py_NewRef(error));
    Py_XSETREF(Fallback, Py_NewRef(fallback));
    Py_XSETREF(PickleLoads, Py_NewRef(pickle_loads));
    Py_XSETREF(ArraysHook, Py_NewRef(arrays_hook));
    Py_CLEAR(ArrayType); /* fetched again from the new hook when first needed */
    MaxBytes = max_bytes;
    MaxFrame = max_frame;
    Py_CLEAR(EncNode);
    Py_CLEAR(EncKey);
    Py_CLEAR(DecKey);
    Py_CLEAR(DecNode);
    Py_RETURN_NONE;
}

static PyMethodDef module_methods[] = {
    {"configure", accel_configure, METH_VARARGS,
     "configure(Pid, NodeId, interned, ChanMessage, error, fallback, pickle_loads, "
     "arrays_hook, max_bytes, max_frame, magic, max_depth, max_containers, max_ndim, "
     "max_large): the types and paths it works with (see hpcproc/serialization.py); the "
     "last five must be the compiled ones."},
    {"serialize", accel_serialize, METH_O,
     "serialize(obj) -> [frame, *frames of large values]: obj in the compact format, or "
     "fallback(obj) where the format does not take it (see hpcproc/_compact.py)."},
    {"loads", accel_loads, METH_O,
     "loads(frame) -> obj: a compact frame read here, any other by pickle_loads.\n\n"
     "Raises error (configured) for a malformed compact frame."},
    {"loads_frames", accel_loads_frames, METH_O,
     "loads_frames(frames) -> obj: a compact frame followed by the frames of its large "
     "values.\n\nRaises error (configured) where malformed, or where the frames are not "
     "exactly those its values refer to."},
    {"encode", accel_encode, METH_O,
     "encode(obj) -> bytes | None: obj in the compact format as one frame, None where "
     "not taken (bytes and arrays of max_bytes or more included)."},
    {"decode", accel_decode, METH_O,
     "decode(frame) -> obj: a compact frame's value; raises error where malformed."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_compact_accel",
    "The compact message format in C (see hpcproc/_compact.py).", -1, module_methods};

PyMODINIT_FUNC
PyInit__compact_accel(void)
{
    return PyModule_Create(&module);
}
