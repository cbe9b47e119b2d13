/* Byte planes for `bastion ckpt pack` (bastion/checkpoint/planes.py has the same transform in
 * numpy, used when this module was not built, and the tests hold the two to the same bytes).
 *
 *   split(src, dst, planes, rotate): src holds little-endian elements of `planes` bytes;
 *       dst[k * n + i] = byte k of element i, where n = len(src) / planes. With `rotate`,
 *       each element's bits are first rotated left by one (the sign bit to the bottom, so the
 *       top byte holds the exponent alone).
 *   join(src, dst, planes, rotate): the inverse.
 *
 * One pass, no temporaries, the GIL released: numpy needs five passes and three temporary
 * arrays for the same thing (bench/checkpoint.py measures both). Lengths are checked before
 * anything is touched; the loops read and write only inside the two buffers.
 */
#define PY_SSIZE_T_CLEAN
#include <Python.h>
#include <stdint.h>
#include <string.h>

/* Built for the baseline x86-64 ISA (SSE2, no byte shuffles), each loop is also compiled for
 * AVX2 and picked at load time where the CPU has it (GCC/Clang function multi-versioning). */
#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
#define CLONES __attribute__((target_clones("avx2", "default")))
#else
#define CLONES
#endif

CLONES static void split2(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n, int rotate) {
    uint8_t *restrict d0 = d, *restrict d1 = d + n;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t v = (uint16_t)(s[2 * i] | (s[2 * i + 1] << 8));
        if (rotate) v = (uint16_t)((v << 1) | (v >> 15));
        d0[i] = (uint8_t)v;
        d1[i] = (uint8_t)(v >> 8);
    }
}

CLONES static void join2(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n, int rotate) {
    const uint8_t *restrict s0 = s, *restrict s1 = s + n;
    for (Py_ssize_t i = 0; i < n; i++) {
        uint16_t v = (uint16_t)(s0[i] | (s1[i] << 8));
        if (rotate) v = (uint16_t)((v >> 1) | (v << 15));
        d[2 * i] = (uint8_t)v;
        d[2 * i + 1] = (uint8_t)(v >> 8);
    }
}

CLONES static void split4(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n, int rotate) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)s[4 * i] | ((uint32_t)s[4 * i + 1] << 8) | ((uint32_t)s[4 * i + 2] << 16)
                     | ((uint32_t)s[4 * i + 3] << 24);
        if (rotate) v = (v << 1) | (v >> 31);
        d[i] = (uint8_t)v;
        d[n + i] = (uint8_t)(v >> 8);
        d[2 * n + i] = (uint8_t)(v >> 16);
        d[3 * n + i] = (uint8_t)(v >> 24);
    }
}

CLONES static void join4(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n, int rotate) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint32_t v = (uint32_t)s[i] | ((uint32_t)s[n + i] << 8) | ((uint32_t)s[2 * n + i] << 16)
                     | ((uint32_t)s[3 * n + i] << 24);
        if (rotate) v = (v >> 1) | (v << 31);
        d[4 * i] = (uint8_t)v;
        d[4 * i + 1] = (uint8_t)(v >> 8);
        d[4 * i + 2] = (uint8_t)(v >> 16);
        d[4 * i + 3] = (uint8_t)(v >> 24);
    }
}

CLONES static void split8(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n, int rotate) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v = 0;
        for (int k = 7; k >= 0; k--) v = (v << 8) | s[8 * i + k];
        if (rotate) v = (v << 1) | (v >> 63);
        for (int k = 0; k < 8; k++) d[k * n + i] = (uint8_t)(v >> (8 * k));
    }
}

CLONES static void join8(const uint8_t *restrict s, uint8_t *restrict d, Py_ssize_t n, int rotate) {
    for (Py_ssize_t i = 0; i < n; i++) {
        uint64_t v = 0;
        for (int k = 7; k >= 0; k--) v = (v << 8) | s[k * n + i];
        if (rotate) v = (v >> 1) | (v << 63);
        for (int k = 0; k < 8; k++) d[8 * i + k] = (uint8_t)(v >> (8 * k));
    }
}

typedef void (*kernel)(const uint8_t *, uint8_t *, Py_ssize_t, int);

static PyObject *run(PyObject *args, kernel k2, kernel k4, kernel k8) {
    Py_buffer src, dst;
    int planes, rotate;
    if (!PyArg_ParseTuple(args, "y*w*ip", &src, &dst, &planes, &rotate)) return NULL;
    kernel k = planes == 2 ? k2 : planes == 4 ? k4 : planes == 8 ? k8 : NULL;
    PyObject *result = NULL;
    if (k == NULL) {
        PyErr_Format(PyExc_ValueError, "planes must be 2, 4 or 8, got %d", planes);
    } else if (src.len % planes != 0) {
        PyErr_Format(PyExc_ValueError, "%zd bytes is not a whole number of %d-byte elements", src.len, planes);
    } else if (dst.len != src.len) {
        PyErr_Format(PyExc_ValueError, "output holds %zd bytes, input %zd", dst.len, src.len);
    } else if (src.len > 0 && (const char *)src.buf < (const char *)dst.buf + dst.len
               && (const char *)dst.buf < (const char *)src.buf + src.len) {
        PyErr_SetString(PyExc_ValueError, "input and output must not overlap");
    } else {
        Py_BEGIN_ALLOW_THREADS
        k((const uint8_t *)src.buf, (uint8_t *)dst.buf, src.len / planes, rotate);
        Py_END_ALLOW_THREADS
        result = Py_NewRef(Py_None);
    }
    PyBuffer_Release(&src);
    PyBuffer_Release(&dst);
    return result;
}

static PyObject *split(PyObject *self, PyObject *args) { return run(args, split2, split4, split8); }
static PyObject *join(PyObject *self, PyObject *args) { return run(args, join2, join4, join8); }

static PyMethodDef methods[] = {
    {"split", split, METH_VARARGS, "split(src, dst, planes, rotate): byte k of every element to plane k of dst."},
    {"join", join, METH_VARARGS, "join(src, dst, planes, rotate): the planes of src back into elements in dst."},
    {NULL, NULL, 0, NULL},
};

static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, "_planes", "Byte planes for ckpt pack.", -1, methods,
                                   NULL, NULL, NULL, NULL};

PyMODINIT_FUNC PyInit__planes(void) { return PyModule_Create(&module); }
