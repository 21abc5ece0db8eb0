#include "binding/intake.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstdlib>
#include <cstring>
#include <unordered_map>

#include "binding/dlpack_abi.h"
#include "core/layout.h"

namespace py = pybind11;

namespace gradclip::binding {
namespace {

// What we know about a Python type's DLPack C exchange API, cached per type.
//
// torch's exchange API also hands out negative-bit views (x.conj().imag) as
// their stored, un-negated values. They need no check: every operation here
// commutes with negation (norms see |x|, scaling is linear, and value clipping
// is symmetric, [-v, v]), so the stored values get exactly the right update.
struct TypeInfo {
  const dlpack::ExchangeApi* api = nullptr;
};

// Set GRADCLIP_NO_EXCHANGE_API=1 to force the __dlpack__ path (what torch
// older than 2.10 takes); the tests use it to cover that path.
bool exchange_api_disabled() {
  static const bool disabled = [] {
    const char* v = std::getenv("GRADCLIP_NO_EXCHANGE_API");
    return v && *v && std::strcmp(v, "0") != 0;
  }();
  return disabled;
}

const TypeInfo& type_info(PyTypeObject* type) {
  static std::unordered_map<PyTypeObject*, TypeInfo> cache;
  auto it = cache.find(type);
  if (it != cache.end()) return it->second;
  TypeInfo info;
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
        info.api = api;
        // Cached by address: keep the type alive so the address is never reused.
        Py_INCREF(reinterpret_cast<PyObject*>(type));
        break;
      }
    }
  }
  return cache.emplace(type, info).first->second;
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

std::string type_name(PyObject* obj) { return Py_TYPE(obj)->tp_name; }

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

// One element as the intake sees it, whatever protocol produced it.
struct RawTensor {
  void* data;
  dlpack::Device device;
  int ndim;
  dlpack::DataType dtype;
  const int64_t* shape;
  const int64_t* strides;  // elements; may be null
  bool read_only;
};

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

constexpr const char* kAccepted = "gradclip takes float16, bfloat16, float32 or float64";

}  // namespace

std::string item_label(const IntakeOptions& options, int64_t index) {
  std::string s = std::string(options.argname) + "[" + std::to_string(index) + "]";
  if (options.grad_attr) s += ".grad";
  return s;
}

Intake::Intake(PyObject* sequence, const IntakeOptions& options) {
  fast_ = PySequence_Fast(sequence, "");
  if (!fast_) {
    PyErr_Clear();
    throw py::type_error(std::string(options.argname) + ": expected a sequence of tensors or arrays, got " +
                         type_name(sequence));
  }
  const Py_ssize_t n = PySequence_Fast_GET_SIZE(fast_);
  if (n > INT32_MAX) throw py::value_error(std::string(options.argname) + ": too many tensors");
  PyObject** items = PySequence_Fast_ITEMS(fast_);
  const size_t capacity = options.only_items ? options.only_items->size() : size_t(n);
  entry_spans_.reserve(capacity);  // never reallocated: a stream reads it meanwhile
  span_of_entry.reserve(capacity);
  list_index_of_entry.reserve(capacity);
  stream_ = options.stream;
  try {
    if (stream_) stream_->attach(entry_spans_.data(), capacity);
    if (options.only_items) {
      for (int32_t i : *options.only_items) take(items[i], i, options);
    } else {
      for (Py_ssize_t i = 0; i < n; ++i) take(items[i], static_cast<int32_t>(i), options);
    }
    deduplicate(options);
  } catch (...) {
    release();  // a constructor that throws gets no destructor call
    throw;
  }
}

Intake::~Intake() { release(); }

void Intake::release() {
  if (stream_) stream_->stop();  // no worker may still read what is released below
  for (Py_buffer& b : buffers_) PyBuffer_Release(&b);
  for (PyObject* o : owned_) Py_DECREF(o);
  Py_XDECREF(fast_);
  buffers_.clear();
  owned_.clear();
  fast_ = nullptr;
}

void Intake::take(PyObject* item, int32_t list_index, const IntakeOptions& options) {
  auto fail_type = [&](const std::string& why) { throw py::type_error(item_label(options, list_index) + ": " + why); };
  auto fail_value = [&](const std::string& why) { throw py::value_error(item_label(options, list_index) + ": " + why); };

  PyObject* obj = item;
  if (options.grad_attr) {
    static PyObject* grad_name = PyUnicode_InternFromString("grad");
    obj = PyObject_GetAttr(item, grad_name);
    if (!obj) {
      PyErr_Clear();
      throw py::type_error(std::string(options.argname) + "[" + std::to_string(list_index) + "]: " +
                           type_name(item) + " has no .grad attribute; expected a tensor or parameter");
    }
    if (obj == Py_None) {
      Py_DECREF(obj);
      return;  // like torch: parameters without a gradient are skipped
    }
    if (owned_.empty()) owned_.reserve(PySequence_Fast_GET_SIZE(fast_));
    owned_.push_back(obj);
  } else if (obj == Py_None) {
    fail_type("is None; expected a tensor or array");
  }

  RawTensor raw{};
  uint64_t byte_offset = 0;
  const TypeInfo& info = type_info(Py_TYPE(obj));
  if (info.api) {
    // Fast path (~60 ns): a non-owning view, valid while `obj` is alive.
    dlpack::Tensor t;
    if (info.api->dltensor_from_py_object_no_sync(obj, &t) != 0)
      fail_value("cannot be read as a dense strided tensor (sparse, nested and meta tensors are not "
                 "supported): " + python_error_text());
    if (t.dtype.code == dlpack::kComplex) fail_type("complex tensors are not supported; " + std::string(kAccepted));
    raw = {t.data, t.device, t.ndim, t.dtype, t.shape, t.strides, false};
    byte_offset = t.byte_offset;
  } else if (PyObject_CheckBuffer(obj)) {
    // NumPy and other buffer exporters (~46 ns).
    Py_buffer view;
    const int flags = PyBUF_STRIDES | PyBUF_FORMAT | (options.access == Access::kWrite ? PyBUF_WRITABLE : 0);
    if (PyObject_GetBuffer(obj, &view, flags) != 0) {
      const std::string why = python_error_text();
      if (options.access == Access::kWrite && PyObject_GetBuffer(obj, &view, PyBUF_STRIDES | PyBUF_FORMAT) == 0) {
        PyBuffer_Release(&view);
        fail_value("array is read-only; it cannot be modified in place");
      }
      PyErr_Clear();
      fail_value("cannot be read through the buffer protocol (" + why + ")");
    }
    if (buffers_.empty()) buffers_.reserve(PySequence_Fast_GET_SIZE(fast_));  // no regrowth copies
    buffers_.push_back(view);
    Py_buffer& v = buffers_.back();
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
      fail_type("array of buffer format '" + std::string(v.format ? v.format : "B") + "' (" + dtype_text(dt) +
                ") cannot be clipped; " + kAccepted);
    // Buffer strides are in bytes; DLPack's (and ours) in elements. They are
    // only read below, in this call: a scratch array will do.
    if (static_cast<size_t>(v.ndim) > element_strides_.size()) element_strides_.resize(v.ndim);
    for (int d = 0; d < v.ndim; ++d) {
      if (v.strides[d] % v.itemsize != 0) fail_value("byte strides that are not a multiple of the element size");
      element_strides_[d] = v.strides[d] / v.itemsize;
    }
    static_assert(sizeof(Py_ssize_t) == sizeof(int64_t), "shape arrays are reinterpreted");
    raw = {v.buf, {dlpack::kCPU, 0}, v.ndim, dt, reinterpret_cast<const int64_t*>(v.shape), element_strides_.data(),
           false};
  } else {
    // Any other DLPack producer, through the versioned capsule protocol (~3 us).
    static PyObject* dlpack_name = PyUnicode_InternFromString("__dlpack__");
    static PyObject* detach_name = PyUnicode_InternFromString("detach");
    PyObject* exporter = obj;
    if (PyObject_HasAttr(obj, detach_name)) {
      // torch before 2.10 (no exchange API) refuses to export tensors that
      // require grad, e.g. parameters; a detached view shares their memory.
      exporter = PyObject_CallMethodNoArgs(obj, detach_name);
      if (!exporter) fail_value("detach() failed (" + python_error_text() + ")");
      owned_.push_back(exporter);
    }
    PyObject* method = PyObject_GetAttr(exporter, dlpack_name);
    if (!method) {
      PyErr_Clear();
      fail_type(type_name(obj) + " is not a tensor or array (no DLPack or buffer protocol)");
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
    if (!cap) fail_value("__dlpack__() failed (" + python_error_text() + ")");
    owned_.push_back(cap);  // its destructor calls the producer's deleter
    if (auto* m = static_cast<dlpack::ManagedTensorVersioned*>(PyCapsule_GetPointer(cap, "dltensor_versioned"))) {
      if (m->version.major != 1) fail_value("unsupported DLPack major version " + std::to_string(m->version.major));
      const dlpack::Tensor& t = m->dl_tensor;
      raw = {t.data, t.device, t.ndim, t.dtype, t.shape, t.strides, (m->flags & dlpack::kFlagReadOnly) != 0};
      byte_offset = t.byte_offset;
    } else {
      PyErr_Clear();
      auto* legacy = static_cast<dlpack::ManagedTensor*>(PyCapsule_GetPointer(cap, "dltensor"));
      if (!legacy) fail_value("__dlpack__() returned something other than a DLPack capsule");
      const dlpack::Tensor& t = legacy->dl_tensor;
      raw = {t.data, t.device, t.ndim, t.dtype, t.shape, t.strides, false};
      byte_offset = t.byte_offset;
    }
  }

  // ---- rules shared by every protocol ----
  if (options.access == Access::kWrite && raw.read_only) fail_value("is read-only; it cannot be modified in place");
  const int32_t dev = raw.device.device_type;
  if (dev == dlpack::kCPU || dev == dlpack::kCUDAHost) check_device(kHost, obj, list_index, options);
  else if (dev == dlpack::kCUDA || dev == dlpack::kCUDAManaged) check_device(raw.device.device_id, obj, list_index, options);
  else fail_value("is on an unsupported device (DLPack device type " + std::to_string(dev) + "); gradclip takes CPU and CUDA memory");
  DType dtype;
  const dlpack::DataType dt = raw.dtype;
  if (dt.lanes != 1) fail_type(dtype_text(dt) + " (vector lanes) cannot be clipped; " + kAccepted);
  if (dt.code == dlpack::kFloat && dt.bits == 32) dtype = DType::kF32;
  else if (dt.code == dlpack::kFloat && dt.bits == 64) dtype = DType::kF64;
  else if (dt.code == dlpack::kFloat && dt.bits == 16) dtype = DType::kF16;
  else if (dt.code == dlpack::kBfloat && dt.bits == 16) dtype = DType::kBF16;
  else fail_type(dtype_text(dt) + " data cannot be clipped; " + kAccepted);

  const Layout layout = analyse_layout(raw.ndim, raw.shape, raw.strides);
  if (!layout.dense)
    fail_value("is strided with gaps or overlaps (not one dense block of memory); pass a contiguous copy "
               "(e.g. .contiguous() / np.ascontiguousarray) and clip that");
  const int64_t itemsize = element_size(dtype);
  char* base = static_cast<char*>(raw.data) + byte_offset + layout.lowest_offset * itemsize;
  if (layout.numel > 0 && reinterpret_cast<uintptr_t>(base) % itemsize != 0)
    fail_value("data is not aligned to its " + std::to_string(itemsize) + "-byte element size");

  if (options.rows) {
    // Row r must be the block [r * numel / rows, (r + 1) * numel / rows) of the
    // dense span: the first dimension outermost, with a positive stride. The
    // order inside a row does not matter (norms and scaling ignore it), so
    // e.g. channels-last convolution weights are fine.
    const int64_t rows = raw.ndim >= 2 ? raw.shape[0] : 1;
    if (rows > 1 && layout.numel > 0 && raw.strides && raw.strides[0] != layout.numel / rows)
      fail_value("its rows (first dimension, stride " + std::to_string(raw.strides[0]) + ") are not contiguous "
                 "blocks of memory, as clipping row by row needs (e.g. a transposed view); pass a contiguous "
                 "tensor (.contiguous())");
    rows_of_entry.push_back(rows);
  }
  dtype_mask |= 1u << int(dtype);
  span_of_entry.push_back(-1);  // assigned by deduplicate()
  list_index_of_entry.push_back(list_index);
  entry_spans_.push_back({layout.numel > 0 ? base : nullptr, layout.numel, dtype});
  if (stream_ && device == kHost) stream_->added(entry_spans_.size());
}

namespace {
std::string device_text(int32_t device) {
  return device == Intake::kHost ? "the CPU" : "cuda:" + std::to_string(device);
}
}  // namespace

void Intake::check_device(int32_t dev, PyObject* obj, int32_t list_index, const IntakeOptions& options) {
  if (device_item_ < 0) {
    device = dev;
    device_item_ = list_index;
    device_example = obj;
    return;
  }
  if (dev != device)
    throw MixedDevices(item_label(options, list_index) + ": is on " + device_text(dev) + " but " +
                          item_label(options, device_item_) + " is on " + device_text(device) +
                          "; one call takes tensors on one device (call once per device)");
}

void Intake::deduplicate(const IntakeOptions& options) {
  // Sort the non-empty entries by address to find repeats (same memory, same
  // dtype) and partial overlaps.
  const std::vector<Span>& entries = entry_spans_;
  struct Range { uintptr_t begin, end; int32_t entry; };
  std::vector<Range> ranges;
  ranges.reserve(entries.size());
  for (size_t e = 0; e < entries.size(); ++e) {
    if (entries[e].numel == 0) continue;
    const uintptr_t b = reinterpret_cast<uintptr_t>(entries[e].data);
    ranges.push_back({b, b + uintptr_t(entries[e].numel * element_size(entries[e].dtype)), int32_t(e)});
  }
  auto by_address = [](const Range& a, const Range& b) {
    return a.begin != b.begin ? a.begin < b.begin : a.end != b.end ? a.end < b.end : a.entry < b.entry;
  };
  if (!std::is_sorted(ranges.begin(), ranges.end(), by_address)) std::sort(ranges.begin(), ranges.end(), by_address);

  std::vector<int32_t> alias_of(entries.size(), -1);  // entry -> earlier entry with the same memory
  bool any_alias = false;
  uintptr_t reach = 0;                              // furthest end so far
  int32_t reach_entry = -1;
  for (size_t r = 0; r < ranges.size(); ++r) {
    const Range& cur = ranges[r];
    if (r > 0) {
      const Range& prev = ranges[r - 1];
      if (cur.begin == prev.begin && cur.end == prev.end &&
          entries[cur.entry].dtype == entries[prev.entry].dtype) {
        alias_of[cur.entry] = alias_of[prev.entry] >= 0 ? alias_of[prev.entry] : prev.entry;
        any_alias = true;
        continue;
      }
      if (cur.begin < reach) {
        const int32_t a = std::min(reach_entry, cur.entry), b = std::max(reach_entry, cur.entry);
        throw py::value_error(item_label(options, list_index_of_entry[b]) + ": overlaps the memory of " +
                              item_label(options, list_index_of_entry[a]) +
                              " without being the same tensor; partially overlapping inputs would be "
                              "counted and scaled twice in part");
      }
    }
    if (cur.end > reach) {
      reach = cur.end;
      reach_entry = cur.entry;
    }
  }

  // Unique spans in list order, so the summation order never depends on addresses.
  if (!any_alias) {
    spans = entries;
    for (size_t e = 0; e < entries.size(); ++e) span_of_entry[e] = static_cast<int32_t>(e);
    return;
  }
  spans.clear();
  spans.reserve(entries.size());
  first_entry_.clear();
  for (size_t e = 0; e < entries.size(); ++e) {
    if (alias_of[e] >= 0) {
      span_of_entry[e] = span_of_entry[alias_of[e]];
    } else {
      span_of_entry[e] = static_cast<int32_t>(spans.size());
      spans.push_back(entries[e]);
      first_entry_.push_back(static_cast<int32_t>(e));
    }
  }
}

std::unique_ptr<cpu::KnownPowerSums> close_stream(const Intake& in, cpu::NormStream& stream) {
  if (!stream.close(in.span_of_entry.size())) return nullptr;
  auto k = std::make_unique<cpu::KnownPowerSums>();
  k->known.resize(in.spans.size());
  k->value.resize(in.spans.size());
  for (size_t s = 0; s < in.spans.size(); ++s) {
    const int32_t e = in.first_entry_of_span(s);
    const bool known = cpu::NormStream::takes(in.spans[s].numel);  // the entry's span, as the stream saw it
    k->known[s] = known;
    k->value[s] = known ? stream.power_sum(e) : 0.0;
  }
  return k;
}

}  // namespace gradclip::binding
