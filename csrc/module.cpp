// Makes fastformers._C importable as a Python module; importing it runs the
// TORCH_LIBRARY_IMPL registrations of every kernel in csrc/.
#include <Python.h>

extern "C" {
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}
