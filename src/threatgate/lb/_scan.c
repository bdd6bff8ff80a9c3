/* The balancer's two per-event loops in C: scanning a read of a node's answers, and tagging events.
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

/* tag_lines(ids, events) -> bytes | None
 *
 * ``b"<id> <event>\n"`` for each id, the event's text taken from ``events`` (a dict id -> str) as UTF-8: what the
 * balancer writes to a lane.  None when an event cannot be encoded strictly (a lone surrogate): the caller then
 * encodes with errors="replace", as the reference does for every event.  Why C: the f-string per event, the join
 * and the encode cost a seventh of the balancer's time per event in Python.
 */
static PyObject *tag_lines(PyObject *module, PyObject *const *args, Py_ssize_t nargs) {
    if (nargs != 2 || !PyList_Check(args[0]) || !PyDict_Check(args[1])) {
        PyErr_SetString(PyExc_TypeError, "tag_lines(ids: list[int], events: dict[int, str])");
        return NULL;
    }
    PyObject *ids = args[0];
    PyObject *events = args[1];
    Py_ssize_t count = PyList_GET_SIZE(ids);
    Py_ssize_t total = 0;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *event = PyDict_GetItemWithError(events, PyList_GET_ITEM(ids, i));
        if (event == NULL) {
            if (!PyErr_Occurred()) {
                PyErr_SetObject(PyExc_KeyError, PyList_GET_ITEM(ids, i));
            }
            return NULL;
        }
        Py_ssize_t size;
        if (!PyUnicode_Check(event)) {
            PyErr_SetString(PyExc_TypeError, "an event is not a str");
            return NULL;
        }
        if (PyUnicode_AsUTF8AndSize(event, &size) == NULL) {
            if (PyErr_ExceptionMatches(PyExc_UnicodeEncodeError)) {
                PyErr_Clear();
                Py_RETURN_NONE;
            }
            return NULL;
        }
        total += size + 22; /* at most 20 digits, a space, a LF */
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, total);
    if (out == NULL) {
        return NULL;
    }
    char *w = PyBytes_AS_STRING(out);
    char *start = w;
    for (Py_ssize_t i = 0; i < count; i++) {
        PyObject *id = PyList_GET_ITEM(ids, i);
        unsigned long long value = PyLong_AsUnsignedLongLong(id);
        if (value == (unsigned long long)-1 && PyErr_Occurred()) {
            Py_DECREF(out);
            return NULL;
        }
        char digits[24];
        int n = 0;
        do {
            digits[n++] = (char)('0' + value % 10);
            value /= 10;
        } while (value);
        while (n) {
            *w++ = digits[--n];
        }
        *w++ = ' ';
        Py_ssize_t size;
        const char *utf8 = PyUnicode_AsUTF8AndSize(PyDict_GetItem(events, id), &size);
        memcpy(w, utf8, (size_t)size);
        w += size;
        *w++ = '\n';
    }
    if (_PyBytes_Resize(&out, w - start) < 0) {
        return NULL;
    }
    return out;
}

static PyMethodDef methods[] = {
    {"tag_lines", (PyCFunction)(void (*)(void))tag_lines, METH_FASTCALL,
     "tag_lines(ids, events) -> bytes | None: '<id> <event>\\n' for each id, UTF-8; None if one cannot encode."},
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
