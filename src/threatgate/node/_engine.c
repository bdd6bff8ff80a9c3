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

static PyMethodDef methods[] = {
    {"key_of", key_of, METH_VARARGS, "key_of(kind, utf8_bytes) -> the store's 64-bit key (XXH3-64, seed = kind)."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "threatgate.node._engine", NULL, -1, methods};

PyMODINIT_FUNC PyInit__engine(void) { return PyModule_Create(&module); }
