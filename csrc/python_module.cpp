// The Python module init of the ahead-of-time build (setup.py, ATTNKERNELS_BUILD_EXT=1) only.
//
// attnkernels._C carries the operators, which register with the dispatcher as the library
// loads (TORCH_LIBRARY in attnkernels.cpp); attnkernels._ext loads it with
// torch.ops.load_library. This empty module makes `import attnkernels._C` work as well.
// The JIT build and the CMake library do not compile this file.
#include <Python.h>

static struct PyModuleDef attnkernels_c_module = {
    PyModuleDef_HEAD_INIT,
    "_C",
    "attnkernels' compiled operators; they live in torch.ops.attnkernels.",
    -1,
    nullptr,
};

PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&attnkernels_c_module); }
