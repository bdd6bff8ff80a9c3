/* The balancer's reply scanner: one pass over a read of a node's answers.
 *
 * finished_ids(data) -> list[int] | None
 *
 * When ``data`` is nothing but lines ``<1 to 19 ASCII digits> LookupFinished\n`` (what a node in HA mode
 * answers for events without detections: the balancer's common read), returns their request ids in
 * order; otherwise None, and the caller parses the read line by line.  Same result as the reference in
 * lb/correlation.py (a regular expression, a split and int() per line), which stays the definition:
 * tests/lb/test_scan.py runs both over the same inputs.  Why C: in Python, checking the read and turning
 * each id into an int cost about 150 ns per event, a sixth of the balancer's time per event.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <string.h>

static const char TAIL[] = " LookupFinished\n";
#define TAIL_LEN (sizeof(TAIL) - 1)
#define MAX_DIGITS 19

static PyObject *finished_ids(PyObject *module, PyObject *arg) {
    Py_buffer view;
    if (PyObject_GetBuffer(arg, &view, PyBUF_SIMPLE) < 0) {
        return NULL;
    }
    const unsigned char *p = view.buf;
    const unsigned char *end = p + view.len;
    PyObject *ids = PyList_New(0);
    if (ids == NULL) {
        PyBuffer_Release(&view);
        return NULL;
    }
    if (p == end) {
        goto not_plain; /* nothing: not the plain shape (the reference needs at least one line) */
    }
    while (p < end) {
        unsigned long long value = 0;
        int digits = 0;
        while (p < end && *p >= '0' && *p <= '9') {
            if (digits == MAX_DIGITS) {
                goto not_plain;
            }
            value = value * 10 + (unsigned long long)(*p - '0');
            digits++;
            p++;
        }
        if (digits == 0 || (size_t)(end - p) < TAIL_LEN || memcmp(p, TAIL, TAIL_LEN) != 0) {
            goto not_plain;
        }
        p += TAIL_LEN;
        PyObject *number = PyLong_FromUnsignedLongLong(value);
        if (number == NULL) {
            goto fail;
        }
        int appended = PyList_Append(ids, number);
        Py_DECREF(number);
        if (appended < 0) {
            goto fail;
        }
    }
    PyBuffer_Release(&view);
    return ids;
not_plain:
    PyBuffer_Release(&view);
    Py_DECREF(ids);
    Py_RETURN_NONE;
fail:
    PyBuffer_Release(&view);
    Py_DECREF(ids);
    return NULL;
}

static PyMethodDef methods[] = {
    {"finished_ids", finished_ids, METH_O,
     "finished_ids(data) -> list[int] | None: the ids of a read made only of '<id> LookupFinished' lines."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {
    .m_base = PyModuleDef_HEAD_INIT,
    .m_name = "threatgate.lb._scan",
    .m_doc = "The balancer's reply scanner (see lb/correlation.py).",
    .m_size = -1,
    .m_methods = methods,
};

PyMODINIT_FUNC PyInit__scan(void) { return PyModule_Create(&module); }
