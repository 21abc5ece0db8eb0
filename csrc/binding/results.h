// What gradclip._core returns: one Result type for every operation (fields an
// operation does not produce are None), and the one converter from an engine
// outcome to it.
#pragma once

#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <cstdint>
#include <vector>

#include "binding/device_resources.h"
#include "binding/intake.h"
#include "engine/engine.h"

namespace gradclip::binding {

namespace py = pybind11;

// The fields of the two result types, each once: name, C++ type, default,
// doc. Results reach Python as struct sequences (named tuples made in C:
// cheap to create, attribute reads as fast as a tuple's).
#define GRADCLIP_DEVICE_RESULT_FIELDS(X)                                                                        \
  X(buffer, py::object, py::none(), "uint8 tensor / array on the device holding the results")                   \
  X(f64, bool, false, "norms stored as float64 (else float32)")                                                 \
  X(total_offset, int64_t, -1, "byte offset of the total norm (-1: absent)")                                    \
  X(group_offset, int64_t, -1, "byte offset of the per-group norms (-1: absent)")                               \
  X(tensor_offset, int64_t, -1, "byte offset of the per-tensor norms, one per unique tensor (-1: absent)")      \
  X(flags_offset, int64_t, -1, "byte offset of a value clip's changed flags, one byte per block (-1: absent)")  \
  X(flag_count, int64_t, 0, "number of changed flags")                                                         \
  X(span_count, int64_t, 0, "unique tensors")                                                                  \
  X(entry_spans, py::object, py::none(), "per entry its unique tensor, when one was listed twice, else None")

#define GRADCLIP_RESULT_FIELDS(X)                                                                               \
  X(count, int64_t, 0, "accepted entries (parameters without .grad are skipped)")                              \
  X(first_index, int64_t, -1, "list index of the first accepted entry, or -1")                                 \
  X(result_f64, bool, false, "the results' dtype is float64 (some input is), else float32")                    \
  X(devices, py::object, py::none(),                                                                           \
    "split_devices, and several devices or tensors without memory: the devices (-1 host, n cuda:n, -2 none)")   \
  X(items_by_device, py::object, py::none(),                                                                   \
    "with devices: per device, the list indices on it (nothing computed)")                                      \
  X(total, py::object, py::none(), "the total norm (float)")                                                   \
  X(norms, py::object, py::none(), "per entry, its norm (float64 array)")                                      \
  X(indices, py::object, py::none(), "per entry, its list index (int32 array)")                                \
  X(group_norms, py::object, py::none(), "per group, its norm")                                                \
  X(group_coefs, py::object, py::none(), "per group, its coefficient (global, normalize)")                     \
  X(coefs, py::object, py::none(), "per entry, the factor it was (or, held, would be) scaled by")              \
  X(nonfinite, bool, false, "some norm was NaN or inf")                                                        \
  X(held, bool, false, "nothing was written because of a nonfinite norm")                                      \
  X(nonfinite_indices, py::object, py::none(), "list indices of entries with a NaN or inf norm")               \
  X(written, bool, false, "some element was changed")                                                          \
  X(changed, bool, false, "value clip: some element was clamped")                                              \
  X(zeroed, int64_t, 0, "elements set to 0 under nonfinite='zero'")                                            \
  X(device, py::object, py::none(), "CUDA without a report: a DeviceResult (results left on the device)")      \
  X(param_norms, py::object, py::none(), "clip_units: per entry, its parameter's norm")                        \
  X(grad_norms, py::object, py::none(), "clip_units: per entry, its gradient's norm")                          \
  X(units, int64_t, 0, "clip_units: rows seen")                                                                \
  X(clipped_units, int64_t, 0, "clip_units: rows scaled down")

#define GRADCLIP_DECLARE_FIELD(name, type, init, doc) type name = init;

// Where a CUDA call's results lie in device memory (gradclip._device makes
// framework views of them).
struct DeviceResult {
  GRADCLIP_DEVICE_RESULT_FIELDS(GRADCLIP_DECLARE_FIELD)
};

// What every operation returns; fields an operation does not produce are None.
struct Result {
  GRADCLIP_RESULT_FIELDS(GRADCLIP_DECLARE_FIELD)
};

// As gradclip._core.Result / DeviceResult objects.
py::object to_python(const Result& r);
py::object to_python(const DeviceResult& d);

template <class T>
py::array_t<T> array_of(const std::vector<T>& v) {
  return py::array_t<T>(static_cast<py::ssize_t>(v.size()), v.data());
}

// Per accepted entry (list order), the value of its span.
template <class T>
py::array_t<T> per_entry(const Intake& in, const std::vector<T>& per_span) {
  py::array_t<T> out(static_cast<py::ssize_t>(in.span_of_entry.size()));
  T* o = out.mutable_data();
  for (size_t e = 0; e < in.span_of_entry.size(); ++e) o[e] = per_span[in.span_of_entry[e]];
  return out;
}

// List indices of the entries whose span is flagged.
py::array_t<int32_t> nonfinite_items(const Intake& in, const std::vector<char>& nonfinite_spans);

// What every Result says about its input (and, for a list over several
// devices, the items on each).
Result describe(const Intake& in);

// The one converter: an engine outcome as a Result. `device`: where a CUDA
// call's output buffer came from.
Result convert(const Intake& in, const engine::Request& req, engine::Outcome& o, const PyDeviceResources* device);

// Creates the Result and DeviceResult types on the module.
void register_results(py::module_& m);

}  // namespace gradclip::binding
