#include "binding/readers.h"

#include <pybind11/pybind11.h>

#include <cstdlib>
#include <cstring>
#include <unordered_map>

namespace py = pybind11;

namespace gradclip::binding {
namespace {

// Set GRADCLIP_NO_EXCHANGE_API=1 to force the __dlpack__ path (what torch
// older than 2.10 takes); the tests use it to cover that path.
bool exchange_api_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("GRADCLIP_NO_EXCHANGE_API");
    return v && *v && std::strcmp(v, "0") != 0;
  }();
  return disabled;
}

std::string python_error_text() {
  PyObject *type, *value, *tb;
  PyErr_Fetch(&type, &value, &tb);
  PyErr_NormalizeException(&type, &value, &tb);
  std::string text = "unknown error";
  if (value) {
    if (PyObject* s = PyObject_Str(value)) {
      if (const char* c = PyUnicode_AsUTF8(s)) text.assign(c, std::strcspn(c, "\n"));  // torch adds a backtrace
      Py_DECREF(s);
    }
  }
  Py_XDECREF(type);
  Py_XDECREF(value);
  Py_XDECREF(tb);
  PyErr_Clear();
  return text;
}

// Whether obj is an instance of module.cls, without importing the module.
bool is_instance_of(PyObject* obj, const char* module, const char* cls) {
  PyObject* name = PyUnicode_FromString(module);
  PyObject* mod = name ? PyImport_GetModule(name) : nullptr;
  Py_XDECREF(name);
  if (!mod) {
    PyErr_Clear();
    return false;
  }
  PyObject* type = PyObject_GetAttrString(mod, cls);
  Py_DECREF(mod);
  const int r = type ? PyObject_IsInstance(obj, type) : -1;
  Py_XDECREF(type);
  if (r < 0) PyErr_Clear();
  return r == 1;
}

// The `stream` to pass to __dlpack__, or null for none. torch tensors and CuPy
// arrays on CUDA are processed on their framework's current stream (see
// gradclip._device.allocate), so their export must not synchronise: -1 says so
// (torch would otherwise order its default stream after the current one, which
// breaks graph capture, and refuse tensors off the current device). Other
// producers get no stream: they then order their work before the legacy
// default stream, which is where gradclip launches for them.
PyObject* export_stream(PyObject* obj) {
  PyObject* dev = PyObject_CallMethod(obj, "__dlpack_device__", nullptr);
  if (!dev) {
    PyErr_Clear();
    return nullptr;
  }
  long type = -1;
  if (PyTuple_Check(dev) && PyTuple_GET_SIZE(dev) >= 1) type = PyLong_AsLong(PyTuple_GET_ITEM(dev, 0));
  Py_DECREF(dev);
  if (PyErr_Occurred()) PyErr_Clear();
  const bool cuda = type == dlpack::kCUDA || type == dlpack::kCUDAManaged;
  if (cuda && (is_instance_of(obj, "torch", "Tensor") || is_instance_of(obj, "cupy", "ndarray")))
    return PyLong_FromLong(-1);
  return nullptr;
}

}  // namespace

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

std::string dtype_text(dlpack::DataType t) {
  const char* kind = "unknown-kind ";
  switch (t.code) {
    case dlpack::kInt: kind = "int"; break;
    case dlpack::kUInt: kind = "uint"; break;
    case dlpack::kFloat: kind = "float"; break;
    case dlpack::kBfloat: kind = "bfloat"; break;
    case dlpack::kComplex: kind = "complex"; break;
    case dlpack::kBool: return "bool";
    default: break;
  }
  std::string s = kind + std::to_string(t.bits);
  if (t.lanes != 1) s += "x" + std::to_string(t.lanes);
  return s;
}

// torch's exchange API also hands out negative-bit views (x.conj().imag) as
// their stored, un-negated values. They need no check: every operation here
// commutes with negation (norms see |x|, scaling is linear, and value clipping
// is symmetric, [-v, v]), so the stored values get exactly the right update.
const dlpack::ExchangeApi* exchange_api_of(PyTypeObject* type) {
  static std::unordered_map<PyTypeObject*, const dlpack::ExchangeApi*> cache;
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  const dlpack::ExchangeApi* found = nullptr;
  if (!exchange_api_disabled()) {
    for (const char* attr : {"__dlpack_c_exchange_api__", "__c_dlpack_exchange_api__"}) {
      PyObject* cap = PyObject_GetAttrString(reinterpret_cast<PyObject*>(type), attr);
      if (!cap) {
        PyErr_Clear();
        continue;
      }
      auto* api = static_cast<const dlpack::ExchangeApi*>(PyCapsule_GetPointer(cap, "dlpack_exchange_api"));
      Py_DECREF(cap);  // the producer owns the struct for the life of the process
      if (!api) {
        PyErr_Clear();
        continue;
      }
      if (api->header.version.major == 1) {
        found = api;
        // Cached by address: keep the type alive so the address is never reused.
        Py_INCREF(reinterpret_cast<PyObject*>(type));
        break;
      }
    }
  }
  return cache.emplace(type, found).first->second;
}

RawTensor read_exchange_api(const dlpack::ExchangeApi& api, PyObject* obj, const ItemFailure& fail) {
  // A non-owning view, valid while `obj` is alive.
  dlpack::Tensor t;
  if (api.dltensor_from_py_object_no_sync(obj, &t) != 0)
    fail.value("cannot be read as a dense strided tensor (sparse, nested and meta tensors are not supported): " +
               python_error_text());
  if (t.dtype.code == dlpack::kComplex)
    fail.type("complex tensors are not supported; gradclip takes float16, bfloat16, float32 or float64");
  return {t.data, t.byte_offset, t.device, t.ndim, t.dtype, t.shape, t.strides, false};
}

RawTensor read_buffer(PyObject* obj, Access access, Holdings& hold, const ItemFailure& fail) {
  Py_buffer view;
  const int flags = PyBUF_STRIDES | PyBUF_FORMAT | (access == Access::kWrite ? PyBUF_WRITABLE : 0);
  if (PyObject_GetBuffer(obj, &view, flags) != 0) {
    const std::string why = python_error_text();
    if (access == Access::kWrite && PyObject_GetBuffer(obj, &view, PyBUF_STRIDES | PyBUF_FORMAT) == 0) {
      PyBuffer_Release(&view);
      fail.value("array is read-only; it cannot be modified in place");
    }
    PyErr_Clear();
    fail.value("cannot be read through the buffer protocol (" + why + ")");
  }
  if (hold.buffers.empty()) hold.buffers.reserve(hold.expected);  // no regrowth copies
  hold.buffers.push_back(view);
  Py_buffer& v = hold.buffers.back();
  const char* fmt = v.format ? v.format : "B";
  if (*fmt == '<' || *fmt == '=' || *fmt == '@') ++fmt;
  // '<' is little-endian, the only order this (x86/ARM little-endian) build runs on.
  dlpack::DataType dt{dlpack::kOpaque, static_cast<uint8_t>(8 * v.itemsize), 1};
  if (std::strcmp(fmt, "f") == 0 || std::strcmp(fmt, "d") == 0 || std::strcmp(fmt, "e") == 0) dt.code = dlpack::kFloat;
  else if (std::strcmp(fmt, "?") == 0) dt.code = dlpack::kBool;
  else if (std::strchr("bhilq", *fmt) && fmt[1] == '\0') dt.code = dlpack::kInt;
  else if (std::strchr("BHILQ", *fmt) && fmt[1] == '\0') dt.code = dlpack::kUInt;
  else if (*fmt == 'Z') dt.code = dlpack::kComplex;
  if (dt.code != dlpack::kFloat)
    fail.type("array of buffer format '" + std::string(v.format ? v.format : "B") + "' (" + dtype_text(dt) +
              ") cannot be clipped; gradclip takes float16, bfloat16, float32 or float64");
  // Buffer strides are in bytes; DLPack's (and ours) in elements. They are
  // only read by the intake before the next item is read: a scratch array will do.
  if (static_cast<size_t>(v.ndim) > hold.element_strides.size()) hold.element_strides.resize(v.ndim);
  for (int d = 0; d < v.ndim; ++d) {
    if (v.strides[d] % v.itemsize != 0) fail.value("byte strides that are not a multiple of the element size");
    hold.element_strides[d] = v.strides[d] / v.itemsize;
  }
  static_assert(sizeof(Py_ssize_t) == sizeof(int64_t), "shape arrays are reinterpreted");
  return {v.buf, 0, {dlpack::kCPU, 0}, v.ndim, dt, reinterpret_cast<const int64_t*>(v.shape),
          hold.element_strides.data(), false};
}

RawTensor read_dlpack_capsule(PyObject* obj, Holdings& hold, const ItemFailure& fail) {
  static PyObject* dlpack_name = PyUnicode_InternFromString("__dlpack__");
  static PyObject* detach_name = PyUnicode_InternFromString("detach");
  PyObject* exporter = obj;
  if (PyObject_HasAttr(obj, detach_name)) {
    // torch before 2.10 (no exchange API) refuses to export tensors that
    // require grad, e.g. parameters; a detached view shares their memory.
    exporter = PyObject_CallMethodNoArgs(obj, detach_name);
    if (!exporter) fail.value("detach() failed (" + python_error_text() + ")");
    hold.owned.push_back(exporter);
  }
  PyObject* method = PyObject_GetAttr(exporter, dlpack_name);
  if (!method) {
    PyErr_Clear();
    fail.type(type_name(obj) + " is not a tensor or array (no DLPack or buffer protocol)");
  }
  PyObject* stream = export_stream(exporter);
  PyObject* kwargs = Py_BuildValue("{s:(ii)}", "max_version", 1, 0);
  if (stream) PyDict_SetItemString(kwargs, "stream", stream);
  PyObject* empty = PyTuple_New(0);
  PyObject* cap = PyObject_Call(method, empty, kwargs);
  if (!cap && PyErr_ExceptionMatches(PyExc_TypeError)) {  // a producer without max_version
    PyErr_Clear();
    PyDict_DelItemString(kwargs, "max_version");
    cap = PyObject_Call(method, empty, kwargs);
  }
  Py_XDECREF(stream);
  Py_DECREF(kwargs);
  Py_DECREF(empty);
  Py_DECREF(method);
  if (!cap) fail.value("__dlpack__() failed (" + python_error_text() + ")");
  hold.owned.push_back(cap);  // its destructor calls the producer's deleter
  if (auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"))) {
    if (m->version.major != 1) fail.value("unsupported DLPack major version " + std::to_string(m->version.major));
    const dlpack::Tensor& t = m->dl_tensor;
    return {t.data, t.byte_offset, t.device, t.ndim, t.dtype, t.shape, t.strides, (m->flags & dlpack::kFlagReadOnly) != 0};
  }
  PyErr_Clear();
  auto* legacy = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
  if (!legacy) fail.value("__dlpack__() returned something other than a DLPack capsule");
  const dlpack::Tensor& t = legacy->dl_tensor;
  return {t.data, t.byte_offset, t.device, t.ndim, t.dtype, t.shape, t.strides, false};
}

}  // namespace gradclip::binding
