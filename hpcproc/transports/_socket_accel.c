/* The tcp transport's read of a socket that may have nothing to read, in C.
 * Optional: built at install where a compiler exists; without it, or with
 * HPCPROC_SOCKET_ACCEL=0, the transport calls socket.recv_into (see tcp.py).
 *
 * Why in C: a receive that polls its links reads each socket once per turn, and most
 * reads find nothing. socket.recv_into reports that by raising BlockingIOError, whose
 * creation, raise and catch cost about 0.9 us a read here; this returns -1 instead,
 * for about 0.2 us (the system call). A turn that finds the reply sooner makes the
 * round trip shorter (measured in the closing note of the change).
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <errno.h>
#include <limits.h>
#include <sys/socket.h>
#include <sys/types.h>

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
    ssize_t n;
    int err;
    for (;;) {
        /* The buffer stays exported (it cannot be resized or freed) while the GIL is
         * released, as socket.recv_into does. */
        Py_BEGIN_ALLOW_THREADS
        n = recv((int)fd, (char *)view.buf + offset, (size_t)(view.len - offset), MSG_DONTWAIT);
        err = errno;
        Py_END_ALLOW_THREADS
        if (n >= 0 || err != EINTR)
            break;
        if (PyErr_CheckSignals() < 0) {
            PyBuffer_Release(&view);
            return NULL;
        }
    }
    PyBuffer_Release(&view);
    if (n >= 0)
        return PyLong_FromSsize_t(n);
    if (err == EAGAIN || err == EWOULDBLOCK)
        return PyLong_FromLong(-1);
    errno = err;
    return PyErr_SetFromErrno(PyExc_OSError);
}

static PyMethodDef methods[] = {
    {"recv_nowait", (PyCFunction)(void (*)(void))recv_nowait, METH_FASTCALL,
     "recv_nowait(fd, buffer, offset) -> bytes read into buffer[offset:]; 0 at end of stream, "
     "-1 when nothing is there to read."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    PyModuleDef_HEAD_INIT,
    .m_name = "_socket_accel",
    .m_doc = "The tcp transport's socket read in C (see tcp.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__socket_accel(void) { return PyModule_Create(&module); }
