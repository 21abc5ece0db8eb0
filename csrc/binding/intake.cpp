#include "binding/intake.h"

#include <pybind11/pybind11.h>

#include <algorithm>
#include <cstring>

#include "core/layout.h"

namespace py = pybind11;

namespace gradclip::binding {
namespace {

constexpr const char* kAccepted = "gradclip takes float16, bfloat16, float32 or float64";

// Errors of one item, labelled "argname[i]" (".grad" added for parameters).
class LabelledFailure final : public ItemFailure {
 public:
  LabelledFailure(const IntakeOptions& options, int32_t index) : options_(options), index_(index) {}
  [[noreturn]] void type(const std::string& why) const override {
    throw py::type_error(item_label(options_, index_) + ": " + why);
  }
  [[noreturn]] void value(const std::string& why) const override {
    throw py::value_error(item_label(options_, index_) + ": " + why);
  }

 private:
  const IntakeOptions& options_;
  int32_t index_;
};

std::string device_text(int32_t device) {
  if (device == Intake::kNoMemory) return "no memory of its own";
  return device == Intake::kHost ? "the CPU" : "cuda:" + std::to_string(device);
}

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
  entry_spans_.reserve(capacity);  // never reallocated: a sink reads it meanwhile
  span_of_entry.reserve(capacity);
  list_index_of_entry.reserve(capacity);
  hold_.expected = capacity;
  sink_ = options.sink;
  try {
    if (sink_) sink_->attach(entry_spans_.data(), capacity);
    if (options.only_items) {
      for (int32_t i : *options.only_items) {
        if (i < 0 || i >= n) throw py::value_error("items: index " + std::to_string(i) + " is not in the sequence");
        take(items[i], i, options);
      }
    } else {
      for (Py_ssize_t i = 0; i < n; ++i) take(items[i], static_cast<int32_t>(i), options);
    }
    if (device == kNoMemory && device_of_entry_.empty()) device_of_entry_.assign(entry_spans_.size(), 0);
    if (!device_of_entry_.empty()) {
      // Several devices, or tensors without memory: report which items lie
      // where, and nothing else (their addresses are not comparable, and the
      // caller calls again per device, or on the local shards).
      devices = devices_;
      items_by_device.resize(devices_.size());
      for (size_t e = 0; e < device_of_entry_.size(); ++e)
        items_by_device[device_of_entry_[e]].push_back(list_index_of_entry[e]);
      if (sink_) sink_->stop();
    } else {
      deduplicate(options);
    }
  } catch (...) {
    release();  // a constructor that throws gets no destructor call
    throw;
  }
}

Intake::~Intake() { release(); }

void Intake::release() {
  if (sink_) sink_->stop();  // no worker may still read what is released below
  for (Py_buffer& b : hold_.buffers) PyBuffer_Release(&b);
  for (PyObject* o : hold_.owned) Py_DECREF(o);
  Py_XDECREF(fast_);
  hold_.buffers.clear();
  hold_.owned.clear();
  fast_ = nullptr;
}

void Intake::take(PyObject* item, int32_t list_index, const IntakeOptions& options) {
  const LabelledFailure fail(options, list_index);
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
    if (hold_.owned.empty()) hold_.owned.reserve(hold_.expected);
    hold_.owned.push_back(obj);
  } else if (obj == Py_None) {
    fail.type("is None; expected a tensor or array");
  }

  RawTensor raw;
  if (const dlpack::ExchangeApi* api = exchange_api_of(Py_TYPE(obj))) raw = read_exchange_api(*api, obj, fail);
  else if (PyObject_CheckBuffer(obj)) raw = read_buffer(obj, options.access, hold_, fail);
  else raw = read_dlpack_capsule(obj, hold_, fail);
  validate(raw, obj, list_index, options);
}

// The rules every tensor meets, whatever protocol it came through.
void Intake::validate(const RawTensor& raw, PyObject* obj, int32_t list_index, const IntakeOptions& options) {
  const LabelledFailure fail(options, list_index);
  if (options.access == Access::kWrite && raw.read_only) fail.value("is read-only; it cannot be modified in place");
  const int32_t dev = raw.device.device_type;
  int32_t where = kHost;
  if (dev == dlpack::kCUDA || dev == dlpack::kCUDAManaged) where = raw.device.device_id;
  else if (dev != dlpack::kCPU && dev != dlpack::kCUDAHost)
    fail.value("is on an unsupported device (DLPack device type " + std::to_string(dev) + "); gradclip takes CPU and CUDA memory");
  const Layout layout = analyse_layout(raw.ndim, raw.shape, raw.strides);
  // A wrapper subclass without storage of its own (DTensor, FakeTensor,
  // functional tensors) exports a NULL pointer with its full shape: there is
  // no memory to read.
  if (layout.numel > 0 && raw.data == nullptr) {
    if (!options.split_devices)
      fail.type(type_name(obj) + " has no memory of its own (its data pointer is NULL: a tensor subclass such as "
                "DTensor or FakeTensor, or a meta tensor); pass plain tensors, e.g. a DTensor's .to_local()");
    where = kNoMemory;  // reported, never read: the caller decides (a DTensor's local shard)
  }
  check_device(where, obj, list_index, options);
  DType dtype;
  const dlpack::DataType dt = raw.dtype;
  if (dt.lanes != 1) fail.type(dtype_text(dt) + " (vector lanes) cannot be clipped; " + kAccepted);
  if (dt.code == dlpack::kFloat && dt.bits == 32) dtype = DType::kF32;
  else if (dt.code == dlpack::kFloat && dt.bits == 64) dtype = DType::kF64;
  else if (dt.code == dlpack::kFloat && dt.bits == 16) dtype = DType::kF16;
  else if (dt.code == dlpack::kBfloat && dt.bits == 16) dtype = DType::kBF16;
  else fail.type(dtype_text(dt) + " data cannot be clipped; " + kAccepted);

  if (!layout.dense)
    fail.value("is strided with gaps or overlaps (not one dense block of memory); pass a contiguous copy "
               "(e.g. .contiguous() / np.ascontiguousarray) and clip that");
  const int64_t itemsize = element_size(dtype);
  char* base = nullptr;
  if (layout.numel > 0 && where != kNoMemory) {
    base = static_cast<char*>(raw.data) + raw.byte_offset + layout.lowest_offset * itemsize;
    if (reinterpret_cast<uintptr_t>(base) % itemsize != 0)
      fail.value("data is not aligned to its " + std::to_string(itemsize) + "-byte element size");
  }

  if (options.rows) {
    // Row r must be the block [r * numel / rows, (r + 1) * numel / rows) of the
    // dense span: the first dimension outermost, with a positive stride. The
    // order inside a row does not matter (norms and scaling ignore it), so
    // e.g. channels-last convolution weights are fine.
    const int64_t rows = raw.ndim >= 2 ? raw.shape[0] : 1;
    if (rows > 1 && layout.numel > 0 && raw.strides && raw.strides[0] != layout.numel / rows)
      fail.value("its rows (first dimension, stride " + std::to_string(raw.strides[0]) + ") are not contiguous "
                 "blocks of memory, as clipping row by row needs (e.g. a transposed view); pass a contiguous "
                 "tensor (.contiguous())");
    rows_of_entry.push_back(rows);
  }
  dtype_mask_ |= 1u << int(dtype);
  span_of_entry.push_back(-1);  // assigned by deduplicate()
  list_index_of_entry.push_back(list_index);
  entry_spans_.push_back({base, layout.numel, dtype});
  if (sink_ && device == kHost && device_of_entry_.empty()) sink_->added(entry_spans_.size());
}

void Intake::check_device(int32_t dev, PyObject* obj, int32_t list_index, const IntakeOptions& options) {
  if (device_item_ < 0) {
    device = dev;
    device_item_ = list_index;
    device_example = obj;
    devices_.push_back(dev);
    return;
  }
  if (dev == device && device_of_entry_.empty()) return;
  if (!options.split_devices)
    throw py::value_error(item_label(options, list_index) + ": is on " + device_text(dev) + " but " +
                          item_label(options, device_item_) + " is on " + device_text(device) +
                          "; one call takes tensors on one device (call once per device)");
  if (device_of_entry_.empty()) device_of_entry_.assign(entry_spans_.size(), 0);  // all on the first so far
  const auto it = std::find(devices_.begin(), devices_.end(), dev);
  device_of_entry_.push_back(static_cast<int32_t>(it - devices_.begin()));
  if (it == devices_.end()) devices_.push_back(dev);
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

}  // namespace gradclip::binding
