/* threatgate's compiled matching engine (stub: the engine lands with issue 13). */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#define XXH_INLINE_ALL
#include "xxhash.h"

static PyObject *key_of(PyObject *self, PyObject *args) {
    int kind;
    const char *data;
    Py_ssize_t len;
    if (!PyArg_ParseTuple(args, "iy#", &kind, &data, &len)) return NULL;
    return PyLong_FromUnsignedLongLong(XXH3_64bits_withSeed(data, (size_t)len, (XXH64_hash_t)kind));
}

/* keys_of(kinds, values) -> bytes: the uint64 keys (native order) of values[i] with kind kinds[i] (int8 buffer). */
static PyObject *keys_of(PyObject *self, PyObject *args) {
    Py_buffer kinds;
    PyObject *values;
    if (!PyArg_ParseTuple(args, "y*O", &kinds, &values)) return NULL;
    PyObject *seq = PySequence_Fast(values, "values must be a sequence of str");
    if (seq == NULL) { PyBuffer_Release(&kinds); return NULL; }
    Py_ssize_t n = PySequence_Fast_GET_SIZE(seq);
    if (n != kinds.len) {
        PyErr_SetString(PyExc_ValueError, "kinds and values differ in length");
        goto fail;
    }
    PyObject *out = PyBytes_FromStringAndSize(NULL, n * 8);
    if (out == NULL) goto fail;
    uint64_t *keys = (uint64_t *)PyBytes_AS_STRING(out);
    const signed char *k = (const signed char *)kinds.buf;
    PyObject **items = PySequence_Fast_ITEMS(seq);
    for (Py_ssize_t i = 0; i < n; i++) {
        PyObject *v = items[i];
        if (!PyUnicode_Check(v)) { Py_DECREF(out); PyErr_SetString(PyExc_TypeError, "values must be str"); goto fail; }
        if (PyUnicode_IS_ASCII(v)) {
            keys[i] = XXH3_64bits_withSeed(PyUnicode_DATA(v), (size_t)PyUnicode_GET_LENGTH(v), (XXH64_hash_t)k[i]);
        } else {
            PyObject *b = PyUnicode_AsEncodedString(v, "utf-8", "surrogatepass");
            if (b == NULL) { Py_DECREF(out); goto fail; }
            keys[i] = XXH3_64bits_withSeed(PyBytes_AS_STRING(b), (size_t)PyBytes_GET_SIZE(b), (XXH64_hash_t)k[i]);
            Py_DECREF(b);
        }
    }
    Py_DECREF(seq);
    PyBuffer_Release(&kinds);
    return out;
fail:
    Py_DECREF(seq);
    PyBuffer_Release(&kinds);
    return NULL;
}

static PyMethodDef methods[] = {
    {"keys_of", keys_of, METH_VARARGS, "keys_of(kinds: int8 buffer, values: list[str]) -> bytes of uint64 keys."},
    {"key_of", key_of, METH_VARARGS, "key_of(kind, utf8_bytes) -> the store's 64-bit key (XXH3-64, seed = kind)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, .m_name = "threatgate.node._engine", .m_size = -1, .m_methods = methods};

PyMODINIT_FUNC PyInit__engine(void) { return PyModule_Create(&module); }
