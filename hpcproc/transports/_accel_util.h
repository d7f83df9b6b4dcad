/* Small C-API pieces the transports' compiled parts share (_socket_accel.c,
 * _mpi_accel.c): 3.12's exception calls on 3.10 and 3.11, an attribute's truth, and a
 * monotonic clock for deadlines compared in C. Each including module has its own copy. */
#ifndef HPCPROC_ACCEL_UTIL_H
#define HPCPROC_ACCEL_UTIL_H
#include <Python.h>
#include <time.h>

#if PY_VERSION_HEX < 0x030C0000
/* Python 3.10 and 3.11: the exception being handled, as 3.12's calls keep it. */
static PyObject *PyErr_GetRaisedException(void) {
    PyObject *type, *value, *tb;
    PyErr_Fetch(&type, &value, &tb);
    if (type == NULL)
        return NULL;
    PyErr_NormalizeException(&type, &value, &tb);
    if (tb != NULL)
        PyException_SetTraceback(value, tb);
    Py_DECREF(type);
    Py_XDECREF(tb);
    return value;
}

static void PyErr_SetRaisedException(PyObject *exc) {
    if (exc == NULL)
        return;
    PyObject *type = Py_NewRef((PyObject *)Py_TYPE(exc));
    PyObject *tb = PyException_GetTraceback(exc);
    PyErr_Restore(type, exc, tb);
}
#endif

/* The truth of attribute ``obj.name`` (a flag, or whether a container holds anything):
 * 1, 0, or -1 with an exception set. */
static int attr_true(PyObject *obj, PyObject *name) {
    PyObject *v = PyObject_GetAttr(obj, name);
    if (v == NULL)
        return -1;
    int r = PyObject_IsTrue(v);
    Py_DECREF(v);
    return r;
}

/* A monotonic clock's reading in seconds, for a deadline the C alone compares (a Python
 * clock is read where Python compares the value): CLOCK_MONOTONIC where there is one
 * (time.perf_counter's clock on Linux), time.perf_counter otherwise. 0, or -1 with an
 * exception set. */
static int deadline_clock(double *out) {
#ifdef CLOCK_MONOTONIC
    struct timespec ts;
    if (clock_gettime(CLOCK_MONOTONIC, &ts) == 0) {
        *out = (double)ts.tv_sec + (double)ts.tv_nsec * 1e-9;
        return 0;
    }
#endif
    PyObject *time = PyImport_ImportModule("time");
    PyObject *v = time == NULL ? NULL : PyObject_CallMethod(time, "perf_counter", NULL);
    Py_XDECREF(time);
    if (v == NULL)
        return -1;
    *out = PyFloat_AsDouble(v);
    Py_DECREF(v);
    return (*out == -1.0 && PyErr_Occurred()) ? -1 : 0;
}

#endif
