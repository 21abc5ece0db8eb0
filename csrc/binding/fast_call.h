// Keyword arguments without pybind11's dispatcher, for the entry point every
// clip goes through: pybind11 looks each parameter name up in a fresh string
// (hashed again on every call), ~1 us per call with a dozen keywords. Here a
// METH_FASTCALL | METH_KEYWORDS function matches the caller's keyword names
// against names interned once; Python interns the names in a call's code, so
// a match is a pointer comparison.
#pragma once

#include <Python.h>
#include <pybind11/pybind11.h>

#include <cstddef>
#include <stdexcept>
#include <string>

namespace gradclip::binding {

template <size_t N>
class FastArgs {
 public:
  // names: every parameter, in order; the first `positional` may also be given by position.
  FastArgs(const char* function, const char* const (&names)[N], Py_ssize_t positional, PyObject* const* args,
           Py_ssize_t nargs, PyObject* kwnames)
      : function_(function), names_(names) {
    static PyObject* interned[N] = {};
    if (!interned[0])
      for (size_t k = 0; k < N; ++k) interned[k] = PyUnicode_InternFromString(names[k]);
    if (nargs > positional)
      throw pybind11::type_error(std::string(function) + "() takes " + std::to_string(positional) +
                                 " positional argument(s), got " + std::to_string(nargs));
    for (Py_ssize_t i = 0; i < nargs; ++i) values_[i] = args[i];
    const Py_ssize_t n_kw = kwnames ? PyTuple_GET_SIZE(kwnames) : 0;
    for (Py_ssize_t j = 0; j < n_kw; ++j) {
      PyObject* key = PyTuple_GET_ITEM(kwnames, j);
      size_t k = 0;
      while (k < N && interned[k] != key) ++k;
      if (k == N)  // not interned: compare the text
        for (k = 0; k < N && PyUnicode_Compare(interned[k], key) != 0; ++k) {
        }
      if (k == N)
        throw pybind11::type_error(std::string(function) + "() got an unexpected keyword argument '" +
                                   PyUnicode_AsUTF8(key) + "'");
      if (values_[k])
        throw pybind11::type_error(std::string(function) + "() got multiple values for argument '" + names[k] + "'");
      values_[k] = args[nargs + j];
    }
  }

  // The argument, or null when not given.
  PyObject* get(size_t k) const { return values_[k]; }
  PyObject* required(size_t k) const {
    if (!values_[k])
      throw pybind11::type_error(std::string(function_) + "() missing required argument '" + names_[k] + "'");
    return values_[k];
  }
  pybind11::handle handle(size_t k) const { return values_[k] ? values_[k] : Py_None; }
  double as_double(size_t k, double fallback) const {
    if (!values_[k]) return fallback;
    const double v = PyFloat_AsDouble(values_[k]);
    if (v == -1.0 && PyErr_Occurred()) throw pybind11::error_already_set();
    return v;
  }
  bool as_bool(size_t k, bool fallback) const {
    if (!values_[k]) return fallback;
    const int v = PyObject_IsTrue(values_[k]);
    if (v < 0) throw pybind11::error_already_set();
    return v != 0;
  }
  std::string as_string(size_t k, const char* fallback) const {
    if (!values_[k]) return fallback;
    const char* s = PyUnicode_AsUTF8(values_[k]);
    if (!s) throw pybind11::error_already_set();
    return s;
  }
  // Converted by pybind11's caster; `expected` says what it takes, for the error.
  template <class T>
  T as(size_t k, T fallback, const char* expected) const {
    if (!values_[k]) return fallback;
    try {
      return pybind11::handle(values_[k]).cast<T>();
    } catch (const pybind11::cast_error&) {
      throw pybind11::type_error(std::string(function_) + "(): " + names_[k] + " must be " + expected + ", got " +
                                 Py_TYPE(values_[k])->tp_name);
    }
  }

 private:
  const char* function_;
  const char* const (&names_)[N];
  PyObject* values_[N] = {};
};

// Runs `body` (returning a new reference), turning a C++ exception into the
// Python error pybind11 would raise for it.
template <class Body>
PyObject* translate_errors(Body&& body) {
  try {
    return body();
  } catch (pybind11::error_already_set& e) {
    e.restore();
  } catch (pybind11::builtin_exception& e) {
    e.set_error();
  } catch (const std::invalid_argument& e) {
    PyErr_SetString(PyExc_ValueError, e.what());
  } catch (const std::bad_alloc&) {
    PyErr_NoMemory();
  } catch (const std::exception& e) {
    PyErr_SetString(PyExc_RuntimeError, e.what());
  }
  return nullptr;
}

}  // namespace gradclip::binding
