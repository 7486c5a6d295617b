// sslseg._C: an empty CPython module (limited API: the wheel is abi3). Importing it loads this
// shared library, whose static STABLE_TORCH_LIBRARY / _IMPL initialisers register every schema
// and CPU kernel under torch.ops.sslseg. No pybind11: ops are reached through the dispatcher.
#include <Python.h>

extern "C" {

static struct PyModuleDef sslseg_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "sslseg custom operators: schemas and CPU kernels (torch.ops.sslseg.*)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sslseg_module); }

}  // extern "C"
