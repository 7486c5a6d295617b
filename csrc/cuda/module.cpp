// sslseg._C_cuda: an empty CPython module (limited API) whose library holds the CUDA kernels of
// every sslseg op (csrc/ops/cuda/*.cu, registered with STABLE_TORCH_LIBRARY_IMPL(sslseg, CUDA)).
// A separate module so that sslseg._C never links a CUDA library: sslseg/ops/_loader.py imports
// this one after sslseg._C, and only when the running torch is a CUDA build.
#include <Python.h>

extern "C" {

static struct PyModuleDef sslseg_cuda_module = {
    PyModuleDef_HEAD_INIT,
    "_C_cuda",
    "sslseg custom operators: CUDA kernels (torch.ops.sslseg.*)",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C_cuda(void) { return PyModule_Create(&sslseg_cuda_module); }

}  // extern "C"
