// sslseg._C: an empty CPython module. Importing it loads this shared library, whose static
// TORCH_LIBRARY / TORCH_LIBRARY_IMPL initialisers register every op under torch.ops.sslseg.
// No pybind11: the ops are reached through the dispatcher, not through Python bindings.
#include <Python.h>

extern "C" {

static struct PyModuleDef sslseg_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "sslseg custom operators (registered with the PyTorch dispatcher as torch.ops.sslseg.*)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&sslseg_module); }

}  // extern "C"
