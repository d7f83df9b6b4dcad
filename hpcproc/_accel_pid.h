/* A Pid built in C, shared by the compiled helpers (_pickle_accel.c, _compact_accel.c).
 *
 * tuple.__new__(Pid, (node, lid)), as hpcproc._ids._pid does: through tuple's own
 * constructor, which fills a subtype's instance as the running CPython needs it (3.14
 * caches a tuple's hash, and marks a new one "not computed"; tp_alloc alone would leave
 * it at 0). */
#ifndef HPCPROC_ACCEL_PID_H
#define HPCPROC_ACCEL_PID_H
#include <Python.h>

static PyObject *
hpcproc_new_pid(PyObject *pid_type, PyObject *node, PyObject *lid)
{
    PyObject *items = PyTuple_Pack(2, node, lid);
    if (items == NULL)
        return NULL;
    PyObject *args = PyTuple_Pack(1, items);
    Py_DECREF(items);
    if (args == NULL)
        return NULL;
    PyObject *pid = PyTuple_Type.tp_new((PyTypeObject *)pid_type, args, NULL);
    Py_DECREF(args);
    return pid;
}

#endif
