/* The small-message path of hpcproc.serialization.serialize in C: the glue around a
 * seeded pickler (see "the seeded pickler" in serialization.py, which builds the
 * picklers, the seed memo and the preambles, and hands them to configure()).
 * Optional: built at install where a compiler exists; HPCPROC_PICKLE_ACCEL=0, or a
 * build without it, leaves serialize on its pure-Python path (pickle.dumps), whose
 * pickles every node loads alike.
 *
 * Why in C: the pickling itself is the C pickler's either way. What Python cannot do
 * cheaply is the bookkeeping around a reusable pickler (take it, dump, check the
 * header, put the preamble in front, reset the memo, give it back): about 0.35 us of
 * bytecode per message, as much as the seeded pickler saves on a message carrying a
 * pid. Here it is a few list operations and one copy.
 *
 * serialize(obj) -> [header, *out_of_band_frames]. Where the small-message path does
 * not apply (the pickler raised an Exception, the header is OUT_OF_BAND_MIN or longer,
 * or it names __main__), it returns general(obj), the Python general path, as the
 * Python fast path does. A BaseException that is not an Exception (KeyboardInterrupt)
 * propagates. It is hpcproc.serialization.serialize itself where built: sending a
 * small message then runs no Python frame for it.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

#include "_accel_pid.h"

#define MAX_SEEDS 8

static PyObject *Pool = NULL;      /* list of idle entries: (dump, chunks, frames, pickler) */
static PyObject *Factory = NULL;   /* () -> a new entry */
static PyObject *SeedMemo = NULL;  /* assigned to pickler.memo after every dump */
static PyObject *Preambles = NULL; /* tuple of bytes, indexed by the mask of seeds used */
static PyObject *MemoName = NULL;  /* "memo" */
static PyObject *General = NULL;   /* obj -> frames: the general path (Python) */
static Py_ssize_t Limit = 0;       /* headers this long or longer: general path */
static int NSeeds = 0;

static PyObject *
take_entry(void)
{
    Py_ssize_t n = PyList_GET_SIZE(Pool);
    if (n > 0) {
        PyObject *entry = PyList_GET_ITEM(Pool, n - 1);
        Py_INCREF(entry);
        if (PyList_SetSlice(Pool, n - 1, n, NULL) < 0) {
            Py_DECREF(entry);
            return NULL;
        }
        return entry;
    }
    /* Empty: serialize was re-entered (a reducer serializing) or runs in several threads. */
    PyObject *entry = PyObject_CallNoArgs(Factory);
    if (entry != NULL && !(PyTuple_CheckExact(entry) && PyTuple_GET_SIZE(entry) == 4 &&
                           PyList_CheckExact(PyTuple_GET_ITEM(entry, 1)) &&
                           PyList_CheckExact(PyTuple_GET_ITEM(entry, 2)))) {
        Py_DECREF(entry);
        PyErr_SetString(PyExc_TypeError,
                        "_pickle_accel: the factory must return (dump, chunks, frames, pickler)");
        return NULL;
    }
    return entry;
}

/* [preamble + header, *frames], or NULL without an exception set (not applicable). */
static PyObject *
frames_of(PyObject *chunks, PyObject *frames)
{
    if (PyList_GET_SIZE(chunks) != 1)
        return NULL;
    PyObject *h = PyList_GET_ITEM(chunks, 0);
    if (!PyBytes_CheckExact(h))
        return NULL;
    const char *s = PyBytes_AS_STRING(h);
    Py_ssize_t len = PyBytes_GET_SIZE(h);
    if (len >= Limit || memmem(s, (size_t)len, "__main__", 8) != NULL)
        return NULL;
    PyObject *header;
    /* Scan the opcodes after PROTO and, when framed, FRAME and its length (whose bytes
     * could read as a get). */
    Py_ssize_t skip = (len > 11 && (unsigned char)s[2] == 0x95) ? 11 : (len > 2 ? 2 : 0);
    const char *ops = s + skip;
    size_t nops = (size_t)(len - skip);
    if (memchr(ops, 'h', nops) == NULL && memchr(ops, 'j', nops) == NULL) {
        /* No memo get (BINGET, LONG_BINGET) at all: memo indices do not matter. */
        Py_INCREF(h);
        header = h;
    }
    else {
        /* Which seeds the pickle refers to: BINGET i ("h" and the index byte). A data
         * byte that happens to read so costs the receiver one needless preamble load. */
        Py_ssize_t mask = 0;
        for (int i = 0; i < NSeeds; i++) {
            char get[2] = {'h', (char)i};
            if (memmem(ops, nops, get, 2) != NULL)
                mask |= (Py_ssize_t)1 << i;
        }
        PyObject *pre = PyTuple_GET_ITEM(Preambles, mask);
        Py_ssize_t plen = PyBytes_GET_SIZE(pre);
        header = PyBytes_FromStringAndSize(NULL, plen + len);
        if (header == NULL)
            return NULL;
        memcpy(PyBytes_AS_STRING(header), PyBytes_AS_STRING(pre), (size_t)plen);
        memcpy(PyBytes_AS_STRING(header) + plen, s, (size_t)len);
    }
    Py_ssize_t nf = PyList_GET_SIZE(frames);
    PyObject *out = PyList_New(1 + nf);
    if (out == NULL) {
        Py_DECREF(header);
        return NULL;
    }
    PyList_SET_ITEM(out, 0, header);
    for (Py_ssize_t i = 0; i < nf; i++) {
        PyObject *f = PyList_GET_ITEM(frames, i);
        Py_INCREF(f);
        PyList_SET_ITEM(out, 1 + i, f);
    }
    return out;
}

static PyObject *
accel_serialize(PyObject *Py_UNUSED(mod), PyObject *obj)
{
    if (Pool == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_pickle_accel.configure() was not called");
        return NULL;
    }
    PyObject *entry = take_entry();
    if (entry == NULL)
        return NULL;
    PyObject *chunks = PyTuple_GET_ITEM(entry, 1);
    PyObject *frames = PyTuple_GET_ITEM(entry, 2);
    PyObject *out = NULL;
    PyObject *r = PyObject_CallOneArg(PyTuple_GET_ITEM(entry, 0), obj);
    if (r == NULL) {
        /* The general path retries, falls back to cloudpickle or reports the error;
         * anything that is not an Exception (KeyboardInterrupt) goes to the caller. */
        if (PyErr_ExceptionMatches(PyExc_Exception))
            PyErr_Clear();
    }
    else {
        Py_DECREF(r);
        out = frames_of(chunks, frames);
    }
    /* Forget the message (nothing of it may stay alive) and give the pickler back. */
#if PY_VERSION_HEX >= 0x030C0000
    PyObject *pending = PyErr_GetRaisedException();
#else
    PyObject *exc_type, *exc_value, *exc_tb;
    PyErr_Fetch(&exc_type, &exc_value, &exc_tb);
#endif
    if (PyList_SetSlice(chunks, 0, PY_SSIZE_T_MAX, NULL) < 0 ||
        PyList_SetSlice(frames, 0, PY_SSIZE_T_MAX, NULL) < 0 ||
        PyObject_SetAttr(PyTuple_GET_ITEM(entry, 3), MemoName, SeedMemo) < 0 ||
        PyList_Append(Pool, entry) < 0) {
        /* Not given back: a later call makes a new one. */
#if PY_VERSION_HEX >= 0x030C0000
        Py_XDECREF(pending);
#else
        Py_XDECREF(exc_type);
        Py_XDECREF(exc_value);
        Py_XDECREF(exc_tb);
#endif
        Py_XDECREF(out);
        Py_DECREF(entry);
        return NULL;
    }
    Py_DECREF(entry);
#if PY_VERSION_HEX >= 0x030C0000
    PyErr_SetRaisedException(pending);
#else
    PyErr_Restore(exc_type, exc_value, exc_tb);
#endif
    if (out == NULL) {
        if (PyErr_Occurred())
            return NULL;
        return PyObject_CallOneArg(General, obj);
    }
    return out;
}

static PyObject *
accel_configure(PyObject *Py_UNUSED(mod), PyObject *args)
{
    PyObject *factory, *seed_memo, *preambles, *general;
    Py_ssize_t limit;
    if (!PyArg_ParseTuple(args, "OOO!nO:configure", &factory, &seed_memo, &PyTuple_Type,
                          &preambles, &limit, &general))
        return NULL;
    Py_ssize_t np = PyTuple_GET_SIZE(preambles);
    int nseeds = 0;
    while (nseeds <= MAX_SEEDS && ((Py_ssize_t)1 << nseeds) < np)
        nseeds++;
    if (nseeds > MAX_SEEDS || ((Py_ssize_t)1 << nseeds) != np) {
        PyErr_Format(PyExc_ValueError,
                     "configure: %zd preambles; expected 2**n of them for n <= %d seeds", np,
                     MAX_SEEDS);
        return NULL;
    }
    for (Py_ssize_t i = 0; i < np; i++) {
        if (!PyBytes_CheckExact(PyTuple_GET_ITEM(preambles, i))) {
            PyErr_SetString(PyExc_TypeError, "configure: every preamble must be bytes");
            return NULL;
        }
    }
    if (!PyCallable_Check(factory) || !PyCallable_Check(general) || limit <= 0) {
        PyErr_SetString(PyExc_ValueError,
                        "configure: expected callables and a positive limit");
        return NULL;
    }
    if (MemoName == NULL && (MemoName = PyUnicode_InternFromString("memo")) == NULL)
        return NULL;
    PyObject *pool = PyList_New(0);
    if (pool == NULL)
        return NULL;
    Py_XSETREF(Pool, pool);
    Py_INCREF(factory);
    Py_XSETREF(Factory, factory);
    Py_INCREF(seed_memo);
    Py_XSETREF(SeedMemo, seed_memo);
    Py_INCREF(preambles);
    Py_XSETREF(Preambles, preambles);
    Py_INCREF(general);
    Py_XSETREF(General, general);
    Limit = limit;
    NSeeds = nseeds;
    Py_RETURN_NONE;
}

/* ------------------------------------------------------------------ pids
 *
 * A pid pickles as _pid(address, lid) (see hpcproc/_ids.py, whose Python functions
 * stay the reference and the fallback): the reducer and the constructor here do the
 * same with no Python frame, about 0.1 us less each per pid. */

static PyObject *PidType = NULL;  /* hpcproc._ids.Pid */
static PyObject *Interned = NULL; /* hpcproc._ids._interned: address -> NodeId */
static PyObject *NodeIdType = NULL;
static PyObject *KeyName = NULL;  /* "_key" */
static PyObject *PidFunction = NULL; /* the constructor below, as hpcproc._ids._pid */

static PyObject *
pid_construct(PyObject *Py_UNUSED(self), PyObject *const *args, Py_ssize_t nargs)
{
    if (nargs != 2) {
        PyErr_Format(PyExc_TypeError, "_pid() takes 2 arguments (%zd given)", nargs);
        return NULL;
    }
    PyObject *nid = PyDict_GetItemWithError(Interned, args[0]); /* borrowed */
    if (nid != NULL) {
        Py_INCREF(nid);
    }
    else {
        if (PyErr_Occurred())
            return NULL;
        nid = PyObject_CallOneArg(NodeIdType, args[0]); /* interns it */
        if (nid == NULL)
            return NULL;
    }
    PyObject *pid = hpcproc_new_pid(PidType, nid, args[1]);
    Py_DECREF(nid);
    return pid;
}

static PyMethodDef pid_construct_def = {
    "_pid", (PyCFunction)(void (*)(void))pid_construct, METH_FASTCALL,
    "Unpickle a Pid (see Pid.__reduce_ex__); hpcproc._ids._pid in C."};

static PyObject *
pid_reduce(PyObject *Py_UNUSED(self), PyObject *pid)
{
    if (PidFunction == NULL) {
        PyErr_SetString(PyExc_RuntimeError, "_pickle_accel.pid_functions() was not called");
        return NULL;
    }
    if (!PyTuple_Check(pid) || PyTuple_GET_SIZE(pid) != 2) {
        PyErr_SetString(PyExc_TypeError, "pid_reduce: expected a Pid");
        return NULL;
    }
    PyObject *key = PyObject_GetAttr(PyTuple_GET_ITEM(pid, 0), KeyName);
    if (key == NULL)
        return NULL;
    PyObject *out = Py_BuildValue("(O(NO))", PidFunction, key, PyTuple_GET_ITEM(pid, 1));
    return out;
}

static PyObject *
accel_pid_functions(PyObject *mod, PyObject *args)
{
    PyObject *pid_type, *interned, *nodeid_type;
    if (!PyArg_ParseTuple(args, "O!O!O!:pid_functions", &PyType_Type, &pid_type, &PyDict_Type,
                          &interned, &PyType_Type, &nodeid_type))
        return NULL;
    if (!PyType_IsSubtype((PyTypeObject *)pid_type, &PyTuple_Type)) {
        PyErr_SetString(PyExc_TypeError, "pid_functions: Pid must be a tuple subclass");
        return NULL;
    }
    if (KeyName == NULL && (KeyName = PyUnicode_InternFromString("_key")) == NULL)
        return NULL;
    if (PidFunction == NULL) {
        /* Named as hpcproc._ids._pid, so that it pickles by that name (and its code). */
        PyObject *module_name = PyUnicode_FromString("hpcproc._ids");
        if (module_name == NULL)
            return NULL;
        PidFunction = PyCFunction_NewEx(&pid_construct_def, NULL, module_name);
        Py_DECREF(module_name);
        if (PidFunction == NULL)
            return NULL;
    }
    Py_INCREF(pid_type);
    Py_XSETREF(PidType, pid_type);
    Py_INCREF(interned);
    Py_XSETREF(Interned, interned);
    Py_INCREF(nodeid_type);
    Py_XSETREF(NodeIdType, nodeid_type);
    PyObject *reduce = PyObject_GetAttrString(mod, "pid_reduce");
    if (reduce == NULL)
        return NULL;
    return Py_BuildValue("(ON)", PidFunction, reduce);
}

static PyMethodDef module_methods[] = {
    {"configure", accel_configure, METH_VARARGS,
     "configure(factory, seed_memo, preambles, limit, general): what serialize works "
     "with (see hpcproc/serialization.py)."},
    {"serialize", accel_serialize, METH_O,
     "serialize(obj) -> [header, *buffers]: hpcproc.serialization.serialize (see there), "
     "small messages by a seeded pickler, the others by general(obj).\n\n"
     "Raises SerializationError where neither pickle nor cloudpickle can serialize obj."},
    {"pid_functions", accel_pid_functions, METH_VARARGS,
     "pid_functions(Pid, interned, NodeId) -> (_pid, pid_reduce): a pid's constructor "
     "for pickles (named hpcproc._ids._pid) and its reducer for copyreg."},
    {"pid_reduce", pid_reduce, METH_O, "pid_reduce(pid) -> (_pid, (address, lid))."},
    {NULL}};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT, "_pickle_accel",
    "serialize's small-message path in C (see hpcproc/serialization.py).", -1,
    module_methods};

PyMODINIT_FUNC
PyInit__pickle_accel(void)
{
    return PyModule_Create(&module);
}
