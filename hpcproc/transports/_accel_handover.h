/* The hand-over of a received message to its endpoint, shared by the transports'
 * compiled parts (_socket_accel.c, _mpi_accel.c): what MultiplexedEndPoint._on_data
 * (_multiplex.py) does once it found the message's open connection, and the Received
 * event it makes (_multiplex.new_received). Each including module has its own copy of
 * the state below, set by its init. */
#ifndef HPCPROC_ACCEL_HANDOVER_H
#define HPCPROC_ACCEL_HANDOVER_H
#include <Python.h>

static PyObject *HandOverReceived = NULL; /* base.Received (a frozen dataclass with slots) */
static PyObject *HandOverConnId = NULL;   /* its conn_id slot */
static PyObject *HandOverFrames = NULL;   /* its frames slot */
static PyObject *HandOverOne = NULL, *HandOverCount = NULL, *HandOverAppend = NULL,
                *HandOverPut = NULL; /* 1, "_handed_over", "append", "put" */

/* The names a hand-over uses, made once (the module's PyInit): 0, or -1 with an
 * exception set. */
static int handover_names(void) {
    HandOverOne = PyLong_FromLong(1);
    HandOverCount = PyUnicode_InternFromString("_handed_over");
    HandOverAppend = PyUnicode_InternFromString("append");
    HandOverPut = PyUnicode_InternFromString("put");
    return HandOverOne && HandOverCount && HandOverAppend && HandOverPut ? 0 : -1;
}

/* The event type (base.Received), from the module's init(): 0, or -1 with TypeError
 * set when it is not a type with conn_id and frames slots. */
static int handover_init(PyObject *received_type) {
    if (!PyType_Check(received_type)) {
        PyErr_SetString(PyExc_TypeError, "init: the event type is not a type");
        return -1;
    }
    PyObject *conn_id = PyObject_GetAttrString(received_type, "conn_id");
    PyObject *frames = conn_id == NULL ? NULL : PyObject_GetAttrString(received_type, "frames");
    if (frames == NULL || Py_TYPE(conn_id)->tp_descr_set == NULL ||
        Py_TYPE(frames)->tp_descr_set == NULL) {
        Py_XDECREF(conn_id);
        Py_XDECREF(frames);
        PyErr_Clear();
        PyErr_SetString(PyExc_TypeError, "init: the event type has no conn_id and frames slots");
        return -1;
    }
    Py_INCREF(received_type);
    Py_XSETREF(HandOverReceived, received_type);
    Py_XSETREF(HandOverConnId, conn_id);
    Py_XSETREF(HandOverFrames, frames);
    return 0;
}

/* A Received(conn_id, frames), its slots filled directly (as new_received). */
static PyObject *handover_new_received(PyObject *conn_id, PyObject *frames) {
    PyTypeObject *type = (PyTypeObject *)HandOverReceived;
    PyObject *event = type->tp_alloc(type, 0);
    if (event == NULL)
        return NULL;
    if (Py_TYPE(HandOverConnId)->tp_descr_set(HandOverConnId, event, conn_id) < 0 ||
        Py_TYPE(HandOverFrames)->tp_descr_set(HandOverFrames, event, frames) < 0) {
        Py_DECREF(event);
        return NULL;
    }
    return event;
}

/* Hand ``frames`` (a list) of connection ``local`` over to ``endpoint``, whose
 * ``_receivers``, ``_events`` and that queue's ``_items`` and ``_waiters`` the other
 * arguments are: to the connection's receiver while no event waits (counted in the
 * endpoint's _handed_over first; *handed set, when not NULL), else as a Received event
 * (EventQueue.put). 0, or -1 with an exception set (what a receiver raised, say). */
static int handover_deliver(PyObject *endpoint, PyObject *receivers, PyObject *events,
                            PyObject *items, PyObject *waiters, PyObject *local,
                            PyObject *frames, int *handed) {
    if (PyDict_GET_SIZE(receivers) > 0) {
        Py_ssize_t waiting = PyObject_Length(items);
        if (waiting < 0)
            return -1;
        PyObject *receiver = waiting ? NULL : PyDict_GetItemWithError(receivers, local);
        if (receiver == NULL && PyErr_Occurred())
            return -1;
        if (receiver != NULL) {
            Py_INCREF(receiver);
            PyObject *count = PyObject_GetAttr(endpoint, HandOverCount);
            PyObject *more = count == NULL ? NULL : PyNumber_Add(count, HandOverOne);
            Py_XDECREF(count);
            if (more == NULL || PyObject_SetAttr(endpoint, HandOverCount, more) < 0) {
                Py_XDECREF(more);
                Py_DECREF(receiver);
                return -1;
            }
            Py_DECREF(more);
            if (handed != NULL)
                *handed = 1;
            PyObject *res = PyObject_CallOneArg(receiver, frames);
            Py_DECREF(receiver);
            if (res == NULL)
                return -1;
            Py_DECREF(res);
            return 0;
        }
    }
    PyObject *event = handover_new_received(local, frames);
    if (event == NULL)
        return -1;
    /* EventQueue.put: appended to its items; with a task waiting in get, through put
     * itself (which wakes it). */
    Py_ssize_t count = PyObject_Length(waiters);
    PyObject *res = NULL;
    if (count == 0) {
        PyObject *args[2] = {items, event};
        res = PyObject_VectorcallMethod(HandOverAppend, args, 2, NULL);
    } else if (count > 0) {
        PyObject *args[2] = {events, event};
        res = PyObject_VectorcallMethod(HandOverPut, args, 2, NULL);
    }
    Py_DECREF(event);
    if (res == NULL)
        return -1;
    Py_DECREF(res);
    return 0;
}

#endif
