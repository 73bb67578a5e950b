// The Python module calibfast._C. Importing it loads this library, whose static initialisers
// register the CPU (and, when built, CUDA) kernels of the ops that calibfast/_ops.py defines.
// No pybind11: the module only carries a couple of introspection functions.

#include <Python.h>

#include <string>

namespace calibfast {
namespace cpu {
std::string cpu_capability();
}  // namespace cpu
}  // namespace calibfast

static PyObject* calibfast_cpu_capability(PyObject*, PyObject*) {
  try {
    const std::string s = calibfast::cpu::cpu_capability();
    return PyUnicode_FromString(s.c_str());
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
    return nullptr;
  }
}

static PyObject* calibfast_has_cuda(PyObject*, PyObject*) {
#ifdef CALIBFAST_WITH_CUDA
  Py_RETURN_TRUE;
#else
  Py_RETURN_FALSE;
#endif
}

static PyMethodDef kMethods[] = {
    {"cpu_capability", calibfast_cpu_capability, METH_NOARGS,
     "Instruction set the CPU kernels use (base, avx2, avx512)."},
    {"has_cuda_kernels", calibfast_has_cuda, METH_NOARGS, "Whether this build holds the CUDA kernels."},
    {nullptr, nullptr, 0, nullptr}};

static struct PyModuleDef kModule = {PyModuleDef_HEAD_INIT, "_C", "calibfast native kernels", -1, kMethods};

extern "C" PyMODINIT_FUNC PyInit__C(void) { return PyModule_Create(&kModule); }
